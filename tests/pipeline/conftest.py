"""A tiny but learnable feature cache in TransZero's HDF5 layout (docs/method.md) plus our train/val
locations: 24 classes (seen 0-19, unseen 20-23; validation: train classes 0-13, val classes 14-19),
6 images each (4 trainval + 2 test_seen per seen class), 16 channels x 2 x 2 regions, 8 binary
attributes. Each region is a fixed random projection of the class's attribute vector plus noise,
so attributes are recoverable from features and an unseen class can be recognised from its
attributes: a working engine must beat chance (ZSL 25%) by far."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

NUM_CLASSES, NUM_UNSEEN, NUM_VAL, PER_CLASS, NUM_ATT, CHANNELS, GRID, W2V_DIM = 24, 4, 6, 6, 8, 16, 2, 10


def write_tiny_cache(path, *, seed: int = 0, content_key: str | None = "tiny-cache-0",
                     with_val_split: bool = True, dtype=np.float32):
    rng = np.random.default_rng(seed)
    att = (rng.uniform(size=(NUM_CLASSES, NUM_ATT)) < 0.5).astype(np.float32) + 0.1
    att /= np.linalg.norm(att, axis=1, keepdims=True)
    projection = rng.normal(size=(CHANNELS, NUM_ATT)).astype(np.float32)
    labels = np.repeat(np.arange(NUM_CLASSES), PER_CLASS)
    n = len(labels)
    clean = (att[labels] @ projection.T)[:, :, None, None]  # (N, C, 1, 1)
    features = np.maximum(clean + 0.3 * rng.normal(size=(n, CHANNELS, GRID, GRID)), 0).astype(dtype)
    within = np.tile(np.arange(PER_CLASS), NUM_CLASSES)
    num_seen = NUM_CLASSES - NUM_UNSEEN
    seen = labels < num_seen
    trainval = np.flatnonzero(seen & (within < PER_CLASS - 2))
    test_seen = np.flatnonzero(seen & (within >= PER_CLASS - 2))
    test_unseen = np.flatnonzero(~seen)
    with h5py.File(path, "w") as f:
        f.create_dataset("feature_map", data=features, compression="gzip")
        f.create_dataset("labels", data=labels.astype(np.int64))
        f.create_dataset("trainval_loc", data=trainval)
        f.create_dataset("test_seen_loc", data=test_seen)
        f.create_dataset("test_unseen_loc", data=test_unseen)
        if with_val_split:  # like xlsa17: these also index test_seen images, on purpose
            f.create_dataset("train_loc", data=np.flatnonzero(labels < num_seen - NUM_VAL))
            f.create_dataset("val_loc", data=np.flatnonzero((labels >= num_seen - NUM_VAL) & seen))
        f.create_dataset("att", data=att)
        f.create_dataset("original_att", data=att * 100)
        f.create_dataset("w2v_att", data=rng.normal(size=(NUM_ATT, W2V_DIM)).astype(np.float32))
        if content_key is not None:
            f.attrs["content_key"] = content_key
    return path


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    return write_tiny_cache(tmp_path_factory.mktemp("cache") / "tiny.h5")


def tiny_config(**overrides):
    """The demo recipe cut down to seconds on the tiny cache."""
    from pipeline.config import apply_overrides, load_recipe
    base = {"iterations": 60, "eval_every": 20, "log_every": 10, "batch_size": 8, "lr": 3e-3,
            "select_iterations": True, "eval_batch_size": 16}
    return apply_overrides(load_recipe("demo"), {**base, **overrides})


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
