"""The extraction engine refuses to store features that are not finite as stored: float16 turns
values above 65504 into inf, and a broken backbone can give NaN. A stand-in backbone gives those
values; everything else (dataset, file, writer) is the real thing."""
import pytest
import torch

from cache.layout import partial_path
from cache.reader import FeatureCache
from extract import extractor
from extract.backbones import BackboneSpec
from extract.extractor import ExtractError, extract_features
from tests.fixtures.images import image_dataset

SPEC = BackboneSpec("efficientnet_lite0", 96, "imagenet")   # feature maps (1280, 3, 3)


class _Constant(torch.nn.Module):
    """Maps of the real backbone's shape; image `bad` of every batch gets `value` in one place."""

    def __init__(self, value: float, bad: int = 1):
        super().__init__()
        self.value, self.bad = value, bad

    def forward(self, x):
        maps = torch.ones((x.shape[0], 1280, 3, 3))
        if x.shape[0] > self.bad:
            maps[self.bad, 7, 1, 1] = self.value
        return maps


@pytest.fixture
def dataset(tmp_path):
    return image_dataset(tmp_path / "images", n=6)


def _extract(dataset, out, dtype):
    return extract_features(dataset, SPEC, out, batch_size=3, num_workers=0, device="cpu", dtype=dtype,
                            progress=False, log=lambda msg: None)


def test_values_beyond_float16_are_refused_and_the_good_rows_kept(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(extractor, "build_backbone", lambda spec: _Constant(70000.0))
    with pytest.raises(ExtractError, match=r"img001\.jpg: its features exceed float16's range.*--dtype float32"):
        _extract(dataset, tmp_path / "f.h5", "float16")
    partial = partial_path(tmp_path / "f.h5")
    assert partial.exists() and not (tmp_path / "f.h5").exists()
    with FeatureCache(partial) as cache:  # rows 0 and 2 of the first batch were written; no inf anywhere
        assert cache.done.tolist() == [True, False, True, False, False, False]
        assert torch.isfinite(cache.features(rows=[0, 2], dtype=torch.float32)).all()


def test_float32_stores_the_same_values(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(extractor, "build_backbone", lambda spec: _Constant(70000.0))
    out = _extract(dataset, tmp_path / "f.h5", "float32")
    with FeatureCache(out) as cache:
        assert cache.complete and float(cache.features(rows=[1], dtype=torch.float32).max()) == 70000.0


def test_nan_features_are_refused(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(extractor, "build_backbone", lambda spec: _Constant(float("nan")))
    with pytest.raises(ExtractError, match="img001.jpg: the backbone gave NaN or inf features"):
        _extract(dataset, tmp_path / "f.h5", "float32")
