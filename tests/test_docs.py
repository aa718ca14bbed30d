"""The documentation's Python page runs: every ```python block of docs/python.md, in order and in one
namespace, against a small real demo cache (rendered, then extracted with EfficientNet-Lite0) in the
working directory the page assumes (demo.h5 and data/demo/ side by side), so the page cannot drift
from the code it shows."""
import re
from pathlib import Path

import pytest

from extract.backbones import BackboneSpec
from extract.datasets import build_dataset
from extract.extractor import extract_features

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "python.md"
# The page's demo.h5 is the full demo at 224 px; this one keeps its layout at a few seconds' cost.
SMALL_DEMO = {"num_classes": 12, "num_unseen": 3, "images_per_class": 6, "image_size": 64}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


@pytest.fixture
def demo_workdir(tmp_path, monkeypatch):
    dataset = build_dataset("demo", root=tmp_path / "data" / "demo", **SMALL_DEMO)
    extract_features(dataset, BackboneSpec("efficientnet_lite0", 64), tmp_path / "demo.h5", device="cpu",
                     progress=False, log=lambda message: None)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_python_page_runs_as_written(demo_workdir, capsys):
    blocks = python_blocks(PAGE.read_text())
    assert len(blocks) >= 3, f"{PAGE}: expected the load, train and score examples, found {len(blocks)} python blocks"
    namespace = {"__name__": "docs_python_page"}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"{PAGE.name} block {number}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert (demo_workdir / "runs" / "demo_py" / "best.pt").is_file()
    assert "predicted:" in printed and "GZSL:" in printed and "->" in printed
    assert namespace["scores"].shape == (4, SMALL_DEMO["num_classes"])
