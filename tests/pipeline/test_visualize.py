"""`msdn visualize` on a real model: demo images through EfficientNet-Lite0 (ImageNet weights),
heads trained on them, pictures drawn by the CLI; the attention geometry on hand-made cases."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from extract.backbones import BackboneSpec
from extract.datasets import build_dataset
from extract.extractor import extract_features
from pipeline.commands.attention import box_mass, crop_region, heat_in_image
from pipeline.config import apply_overrides, load_recipe
from pipeline.train import train

# a smaller demo than `msdn demo` (8 images per class) so that extraction takes seconds
DEMO = dict(images_per_class=8)
OBJECT_GROUPS = ("shape", "colour")  # attributes of the object itself (size is judged against the background)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("visualize")
    dataset = build_dataset("demo", root=root / "demo", **DEMO)
    cache = extract_features(dataset, BackboneSpec("efficientnet_lite0", 224), root / "demo.h5", device="cpu",
                             progress=False, log=lambda msg: None)
    config = apply_overrides(load_recipe("demo"), {"selection": "fixed", "iterations": 150, "eval_every": 150})
    train(config, cache, root / "run", device="cpu", progress=False)
    return root, dataset


@pytest.fixture(scope="module")
def pictures(demo_run):
    pytest.importorskip("matplotlib", reason="the plot extra: pip install -e '.[plot]'")
    root, _ = demo_run
    done = subprocess.run(["msdn", "visualize", "--run", "run", "--images", "8", "--top-k", "3", "--device", "cpu"],
                          capture_output=True, text=True, cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr
    return root / "run" / "pictures", done.stdout


def test_visualize_writes_the_three_kinds_of_png(pictures):
    folder, stdout = pictures
    attention = sorted(folder.glob("attention_*.png"))
    assert len(attention) == 8 and (folder / "curve.png").is_file() and (folder / "tsne.png").is_file()
    for png in attention + [folder / "curve.png", folder / "tsne.png"]:
        with Image.open(png) as image:
            assert image.format == "PNG" and min(image.size) >= 200
            assert np.asarray(image.convert("L")).std() > 5  # something is drawn
    assert stdout.count("wrote ") == 2 * 8 + 2  # a PNG and an .npz per image, the curve, the t-SNE
    curve = json.loads((folder / "curve.json").read_text())
    summary = json.loads((folder.parent / "summary.json").read_text())
    assert curve["AUSUC"] == pytest.approx(summary["test"]["AUSUC"])  # the same model, the same curve


def test_attention_overlay_is_brightest_over_the_demo_object(pictures, demo_run):
    folder, _ = pictures
    _, dataset = demo_run
    argmax_inside, mass, area = [], [], []
    for npz in sorted(folder.glob("attention_*.npz")):
        data = np.load(npz)
        row, box = int(data["row"]), data["box"]
        np.testing.assert_array_equal(box, dataset.boxes[row])
        assert data["heat"].shape[1:] == (128, 128)  # in the demo image's own pixels
        for heat, attribute in zip(data["heat"], data["attributes"]):
            if dataset.attribute_names[attribute].split(":")[0] not in OBJECT_GROUPS:
                continue
            y, x = np.unravel_index(heat.argmax(), heat.shape)
            argmax_inside.append(box[0] <= x <= box[2] and box[1] <= y <= box[3])
            mass.append(box_mass(heat, box))
            area.append((box[2] - box[0] + 1) * (box[3] - box[1] + 1) / heat.size)
    assert len(argmax_inside) >= 8
    # chance (attention spread evenly) would put ~20% of the mass and of the argmaxes in the box
    assert np.mean(mass) > 2 * np.mean(area), (np.mean(mass), np.mean(area))
    assert np.mean(argmax_inside) >= 0.6, argmax_inside


def test_crop_region_follows_resize_then_center_crop():
    assert crop_region(128, 128, 224) == (0.0, 0.0, 128.0)
    # 200 x 100 -> Resize(50) -> 100 x 50 -> CenterCrop(50): x from 25 of 100, i.e. 50 of 200
    assert crop_region(200, 100, 50) == (50.0, 0.0, 100.0)
    left, top, side = crop_region(100, 300, 64)  # portrait: 64 x 192, crop y from 64 (of 192) = 100 px
    assert (left, top, side) == (0.0, 100.0, 100.0)


def test_heat_in_image_puts_a_cell_where_it_was_seen():
    grid = np.zeros((4, 4), dtype=np.float32)
    grid[1, 3] = 1.0  # row 1, column 3 of the crop
    heat = heat_in_image(grid, 200, 100, 64)  # the crop is x in [50, 150), y in [0, 100); cells 25 px
    assert heat.shape == (100, 200)
    assert heat[:, :50].max() == 0 and heat[:, 150:].max() == 0  # never seen, never lit
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert 125 <= x < 150 and 25 <= y < 50
    assert box_mass(heat, (125, 25, 149, 49)) > 0.5
    assert box_mass(heat, (0, 0, 199, 99)) == pytest.approx(1.0)


def test_missing_matplotlib_is_one_clear_error(demo_run):
    root, _ = demo_run
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from cli import main; main(['visualize', '--run', 'run', '--out', 'nomatplotlib'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip() == ('Error: msdn visualize needs matplotlib: pip install "msdn-zsl[plot]" '
                                   '(or pip install matplotlib)')
    assert not (root / "nomatplotlib").exists()


def test_a_head_without_the_ava_subnet_gets_curve_and_tsne_only(demo_run, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra: pip install -e '.[plot]'")
    root, _ = demo_run
    config = apply_overrides(load_recipe("demo"), {"selection": "fixed", "iterations": 10, "subnets": "vaa"})
    train(config, root / "demo.h5", tmp_path / "vaa", device="cpu", progress=False)
    from pipeline.commands.visualize import visualize
    lines = []
    torch.manual_seed(0)
    written = visualize(tmp_path / "vaa" / "best.pt", root / "demo.h5", tmp_path / "pics", images=2,
                        tsne_images=60, device="cpu", log=lines.append)
    assert [p.name for p in written] == ["curve.png", "tsne.png"]
    assert any("no attribute→visual sub-net" in line for line in lines)
