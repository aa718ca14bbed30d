"""Fixtures of the stage-2 tests: the tiny learnable cache (tests/fixtures/caches.py) and the demo cache."""
from __future__ import annotations

import pytest

from tests.fixtures.caches import write_tiny_cache


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    return write_tiny_cache(tmp_path_factory.mktemp("cache") / "tiny.h5")


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """(dataset, cache path): the built-in demo set with `msdn demo`'s parameters, rendered and
    extracted with its backbone (EfficientNet-Lite0 ImageNet weights, 224 px) once per test session."""
    from extract.backbones import BackboneSpec
    from extract.datasets import build_dataset
    from extract.extractor import extract_features
    from pipeline.commands.demo import DEMO_BACKBONE, DEMO_IMAGE_SIZE
    root = tmp_path_factory.mktemp("demo_cache")
    dataset = build_dataset("demo", root=root / "data")
    cache = extract_features(dataset, BackboneSpec(DEMO_BACKBONE, DEMO_IMAGE_SIZE), root / "demo.h5", device="cpu",
                             progress=False, log=lambda msg: None)
    return dataset, cache
