"""timm:<model> backbones with tiny random-init timm models on the CPU: feature maps, ViT tokens
laid out as maps, preprocessing from the pretrained config, weights from a file or timm's cache (never
downloaded), the manifest, and extraction through the same engine, including --resume of a killed run."""
import hashlib
import json
import os
import signal
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

if os.environ.get("CI") != "true":  # CI installs the extras: there a missing timm must fail
    pytest.importorskip("timm")
import timm  # noqa: E402
import timm.data  # noqa: E402

import cli  # noqa: E402
from cache.layout import partial_path  # noqa: E402
from cache.reader import FeatureCache  # noqa: E402
from extract.backbones import (  # noqa: E402
    BackboneSpec,
    BackboneWeightsError,
    build_backbone,
    build_transform,
    check_backbone_name,
    describe,
    feature_shape,
    normalize_images,
)
from extract.datasets import build_dataset  # noqa: E402
from extract.extractor import extract_features  # noqa: E402
from extract.manifest import build_manifest  # noqa: E402
from extract.timm_backbone import cached_weights  # noqa: E402
from tests.extract.test_extractor_cli import run_cli, start_and_stop  # noqa: E402
from tests.fixtures.images import image_dataset, mini_cub  # noqa: E402

RESNET = "timm:resnet10t"   # 4.9 M parameters, CNN: last stage layer4, stride 32
VIT = "timm:test_vit"       # 0.4 M parameters, ViT with a class token, patch 16
REG_VIT = "timm:vit_small_patch14_reg4_dinov2"  # class token + 4 register tokens, patch 14


@pytest.fixture
def no_timm_cache(tmp_path, monkeypatch):
    """Empty Hugging Face and torch hub caches: nothing to find, nothing downloaded (offline)."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf_cache"


@pytest.mark.parametrize("name,size,shape", [(RESNET, 64, (512, 2, 2)), (RESNET, 448, (512, 14, 14)),
                                             (VIT, 64, (64, 4, 4)), (VIT, 96, (64, 6, 6)),
                                             (REG_VIT, 56, (384, 4, 4))])
def test_maps_have_the_shape_feature_shape_predicts(name, size, shape):
    spec = BackboneSpec(name, size, "random")
    assert feature_shape(spec) == shape
    if size > 100:
        return  # the shape alone (computed on the meta device); the forward is tested at small sizes
    model = build_backbone(spec)
    model.train()  # stays frozen
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with torch.inference_mode():
        maps = model(torch.randn(2, 3, size, size))
    assert tuple(maps.shape) == (2, *shape) and torch.isfinite(maps).all()
    assert model.out_channels == shape[0]


def test_random_init_is_deterministic():
    spec = BackboneSpec(VIT, 64, "random")
    a, b = build_backbone(spec).state_dict(), build_backbone(spec).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_vit_map_is_the_patch_tokens_without_class_and_register_tokens():
    spec = BackboneSpec(REG_VIT, 56, "random")
    model = build_backbone(spec)
    vit = model.body.net.model  # timm's VisionTransformer inside its feature wrapper
    assert vit.num_prefix_tokens == 5  # 1 class + 4 register tokens
    x = torch.randn(2, 3, 56, 56)
    with torch.inference_mode():
        tokens = vit.blocks(vit.norm_pre(vit._pos_embed(vit.patch_embed(x))))  # (B, 5 + 16, C)
        maps = model(x)
    assert tokens.shape[1] == 5 + 16
    expected = tokens[:, 5:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)  # row-major patches -> (C, h, w)
    torch.testing.assert_close(maps, expected)


def test_channels_last_output_of_swin_is_permuted_to_channels_first():
    spec = BackboneSpec("timm:swin_tiny_patch4_window7_224", 64, "random")
    assert feature_shape(spec) == (768, 2, 2)
    model = build_backbone(spec)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        raw = model.body.net(x)[-1]  # timm's Swin features come (B, H, W, C)
        maps = model(x)
    assert tuple(raw.shape) == (1, 2, 2, 768)
    torch.testing.assert_close(maps, raw.permute(0, 3, 1, 2))


def test_transform_is_timms_own_eval_transform(shared_data):
    photo = sorted((shared_data / "cub100_subset" / "images" / "Mallard").glob("*.jpg"))[0]
    image = Image.open(photo)
    for name, size in ((RESNET, 120), (VIT, 96)):
        spec = BackboneSpec(name, size, "random")
        model = timm.create_model(name.split(":", 1)[1])
        config = timm.data.resolve_data_config({"input_size": (3, size, size)}, model=model)
        expected = timm.data.create_transform(**config, is_training=False)(image.convert("RGB"))
        ours = build_transform(spec)(image)
        assert ours.shape == (3, size, size)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
        pixels = build_transform(spec, normalize=False)(image)  # the engine's uint8 path: same input
        torch.testing.assert_close(normalize_images(spec, pixels[None])[0], expected, rtol=0, atol=1e-5)


def test_describe_records_timm_model_version_and_preprocessing():
    info = describe(BackboneSpec(RESNET, 448, "random"))
    assert json.loads(json.dumps(info)) == info
    assert info["timm_model"] == "resnet10t" and info["timm_version"] == timm.__version__
    assert info["random_init"] is True and info["weights_sha256"] is None
    cfg = timm.models.get_pretrained_cfg("resnet10t")
    pre = info["preprocessing"]
    assert pre["mean"] == list(cfg.mean) and pre["std"] == list(cfg.std)
    assert pre["resize_interpolation"].startswith(cfg.interpolation) and pre["crop_pct"] == cfg.crop_pct
    assert pre["resize"] == int(448 / cfg.crop_pct) and pre["crop"] == "center 448"
    assert info["channels"] == 512 and info["grid"] == [14, 14] and "layer4" in info["output_layer"]
    assert info["native_resolution"] == cfg.input_size[-1]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_is_loaded_hashed_and_recorded(tmp_path, suffix):
    full = timm.create_model("resnet10t")  # a full classifier's state dict, as users save them
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the seeded init: proves the file is what loads
    path = tmp_path / f"resnet10t{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    else:
        torch.save(full.state_dict(), path)
    spec = BackboneSpec(RESNET, 64, str(path))
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected = full.eval().forward_features(x)  # ResNet: layer4's output before pooling
        maps = build_backbone(spec)(x)
    torch.testing.assert_close(maps, expected)
    info = describe(spec)
    assert info["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["weights_source"] == "local file" and info["random_init"] is False


def test_vit_weights_of_another_image_size_get_their_position_embeddings_resampled(tmp_path):
    full = timm.create_model("test_vit")  # built for 160 px: 1 + 10 x 10 position embeddings
    path = tmp_path / "test_vit.pth"
    torch.save(full.state_dict(), path)
    model = build_backbone(BackboneSpec(VIT, 64, str(path)))
    vit = model.body.net.model
    assert tuple(vit.pos_embed.shape) == (1, 1 + 4 * 4, 64)
    torch.testing.assert_close(vit.patch_embed.proj.weight, full.patch_embed.proj.weight)  # the file's weights
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 64, 4, 4)


def test_weights_from_timms_hugging_face_cache(no_timm_cache):
    repo = timm.models.get_pretrained_cfg("resnet10t").hf_hub_id  # timm/resnet10t.c3_in1k
    snapshot = no_timm_cache / f"models--{repo.replace('/', '--')}" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (no_timm_cache / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (no_timm_cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("0123abc")
    from safetensors.torch import save_file
    save_file(timm.create_model("resnet10t").state_dict(), str(snapshot / "model.safetensors"))
    assert cached_weights("resnet10t")[0] == snapshot / "model.safetensors"
    info = describe(BackboneSpec(RESNET, 64, "imagenet"))
    assert info["weights_source"] == "timm local cache" and info["random_init"] is False
    assert info["weights_file"] == str((snapshot / "model.safetensors").resolve())
    with torch.inference_mode():
        assert build_backbone(BackboneSpec(RESNET, 64, "imagenet"))(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)


def test_no_cached_weights_is_one_line_naming_model_and_weights_file(no_timm_cache):
    for call in (build_backbone, describe):
        with pytest.raises(BackboneWeightsError) as err:
            call(BackboneSpec(RESNET, 64, "imagenet"))
        message = str(err.value)
        assert "\n" not in message and "'resnet10t'" in message and "--weights FILE" in message
        assert str(no_timm_cache) in message


def test_weights_for_another_model_name_the_file(tmp_path):
    wrong = tmp_path / "resnet_for_vit.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), wrong)
    with pytest.raises(BackboneWeightsError,
                       match=r"resnet_for_vit.pth: not weights timm can load into test_vit") as err:
        build_backbone(BackboneSpec(VIT, 64, str(wrong)))
    assert "\n" not in str(err.value)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a weights file")
    with pytest.raises(BackboneWeightsError, match="garbage.safetensors: not weights timm can load"):
        build_backbone(BackboneSpec(RESNET, 64, str(garbage)))


def test_unknown_names_are_refused_with_suggestions(monkeypatch):
    assert check_backbone_name(RESNET) == RESNET
    with pytest.raises(ValueError,
                       match=r"timm:resnet10tt: timm .* has no model 'resnet10tt'; did you mean .*resnet10t"):
        check_backbone_name("timm:resnet10tt")
    with pytest.raises(ValueError, match="unknown pretrained tag; timm knows resnet10t.c3_in1k"):
        check_backbone_name("timm:resnet10t.no_such_tag")
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'.*timm:<model>"):
        check_backbone_name("vgg16")
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(ValueError, match=r'timm:resnet10t: .*not installed \(pip install "msdn-zsl\[timm\]"\)'):
        check_backbone_name(RESNET)


def test_cli_refuses_an_unknown_timm_model_in_one_line(tmp_path):
    result = CliRunner().invoke(cli.main, ["extract", "--dataset", "demo", "--backbone", "timm:no_such_net",
                                           "--out", str(tmp_path / "x.h5")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and "timm:no_such_net" in lines[-1] and "has no model" in lines[-1]
    assert "Traceback" not in result.output and not (tmp_path / "x.h5").exists()


def test_cli_refuses_missing_timm_weights_in_one_line(tmp_path, no_timm_cache, shared_data):
    data_root = mini_cub(tmp_path / "data", shared_data, per_class=2)
    result = CliRunner().invoke(cli.main, ["extract", "--dataset", "CUB100", "--data-root", str(data_root),
                                           "--xlsa17-root", str(shared_data / "xlsa17"),
                                           "--w2v-root", str(shared_data / "attribute_w2v"),
                                           "--backbone", RESNET, "--image-size", "64", "--out", str(tmp_path / "x.h5")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "--weights FILE" in lines[0] and "resnet10t" in lines[0]
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("name,size,shape", [(RESNET, 64, (512, 2, 2)), (VIT, 48, (64, 3, 3))])
def test_extract_engine_writes_the_timm_maps_and_manifest(tmp_path, name, size, shape):
    dataset = image_dataset(tmp_path / "images", n=6)
    spec = BackboneSpec(name, size, "random")
    out = extract_features(dataset, spec, tmp_path / "f.h5", batch_size=4, num_workers=0, progress=False,
                           dtype="float32", log=lambda msg: None)
    model, transform = build_backbone(spec), build_transform(spec)
    with torch.inference_mode():
        expected = model(torch.stack([transform(Image.open(dataset.root / p)) for p in dataset.image_paths]))
    with FeatureCache(out) as cache:
        assert cache.complete and cache.feature_shape == shape
        torch.testing.assert_close(cache.features(dtype=torch.float32), expected, rtol=1e-4, atol=1e-4)
        manifest = cache.manifest
    assert manifest["backbone"]["timm_model"] == name.split(":", 1)[1]
    assert manifest["backbone"]["timm_version"] == timm.__version__
    assert manifest["content_key"] == build_manifest(dataset, spec, dtype="float32")["content_key"]
    other = build_manifest(dataset, BackboneSpec(name, size + 32, "random"), dtype="float32")
    assert other["content_key"] != manifest["content_key"]


def test_killed_timm_extraction_resumes_and_matches_an_uninterrupted_run(tmp_path_factory, shared_data, tmp_path):
    data_root = mini_cub(tmp_path_factory.mktemp("cub"), shared_data, per_class=5)
    common = ["--dataset", "CUB100", "--data-root", str(data_root), "--xlsa17-root", str(shared_data / "xlsa17"),
              "--w2v-root", str(shared_data / "attribute_w2v"), "--backbone", RESNET, "--image-size", "64",
              "--weights", "random", "--batch-size", "2", "--workers", "0", "--no-progress"]
    dataset = build_dataset("CUB100", data_root=data_root, xlsa17_root=shared_data / "xlsa17",
                            w2v_root=shared_data / "attribute_w2v")
    reference = extract_features(dataset, BackboneSpec(RESNET, 64, "random"), tmp_path / "ref.h5", batch_size=2,
                                 num_workers=0, progress=False, log=lambda msg: None)
    with FeatureCache(reference) as cache:
        expected, key = cache.features(), cache.content_key

    out = tmp_path / "cub.h5"
    args = ["extract", *common, "--out", str(out)]
    # A tiny model finishes 20 photos in a blink: 0.5 s after each written batch keeps it interruptible.
    returncode, _ = start_and_stop(args, out, signal.SIGKILL, at_least=4,
                                   env={"MSDN_EXTRACT_THROTTLE_S": "0.5"})
    assert returncode == -signal.SIGKILL and not out.exists()
    with FeatureCache(partial_path(out)) as cache:
        done = cache.done.copy()
        assert 4 <= done.sum() < 20 and cache.content_key == key
    resumed = run_cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"extracting {20 - done.sum()} of 20" in resumed.stderr
    with FeatureCache(out) as cache:
        assert cache.complete and cache.content_key == key
        assert torch.equal(cache.features(), expected)
        assert np.array_equal(cache.labels, dataset.labels)
