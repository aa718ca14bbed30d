import numpy as np
import pytest
import torch

from cache.reader import FeatureCache
from pipeline.checkpoint import (CheckpointError, cache_identity, check_compatible, load_checkpoint,
                                 save_checkpoint)
from pipeline.engine import build_model
from pipeline.tasks import benchmark_task

from .conftest import tiny_config, write_tiny_cache


def _model_and_identity(cache_path, seed=0):
    config = tiny_config()
    with FeatureCache(cache_path) as cache:
        task = benchmark_task(cache.labels, cache.splits, num_classes=cache.att.shape[0])
        model = build_model(config.head, cache, task, torch.device("cpu"), seed)
        identity = cache_identity(cache)
        features = cache.features(rows=task.eval_unseen_rows, dtype=torch.float32)
    return config, model, identity, features, cache, task


def test_round_trip_gives_identical_scores(tiny_cache, tmp_path):
    config, model, identity, features, cache, task = _model_and_identity(tiny_cache, seed=0)
    with torch.no_grad():
        model.W_2.normal_()  # non-trivial attention, so every parameter matters
        model.W_1_1.normal_()
        before = model.fused_scores(model(features))
    path = save_checkpoint(tmp_path / "best.pt", model=model, config=config.to_dict(), identity=identity,
                           gamma=0.25, iteration=7, metrics={"H": np.float64(0.5)})
    assert not list(tmp_path.glob("*.tmp"))
    raw = torch.load(path, weights_only=True)  # plain tensors / dicts only
    assert raw["gamma"] == 0.25 and raw["iteration"] == 7 and raw["metrics"] == {"H": 0.5}
    ckpt = load_checkpoint(path)
    with FeatureCache(tiny_cache) as cache:
        fresh = build_model(config.head, cache, task, torch.device("cpu"), seed=123)  # other init
    fresh.load_state_dict(ckpt["model"])
    with torch.no_grad():
        after = fresh.fused_scores(fresh(features))
    assert torch.equal(before, after)
    check_compatible(ckpt, identity, path, tiny_cache)  # the same cache is accepted


def test_other_content_key_or_class_split_is_refused(tiny_cache, tmp_path):
    config, model, identity, *_ = _model_and_identity(tiny_cache)
    path = save_checkpoint(tmp_path / "m.pt", model=model, config=config.to_dict(), identity=identity,
                           gamma=0.0, iteration=1)
    ckpt = load_checkpoint(path)
    other = write_tiny_cache(tmp_path / "other.h5", seed=1, content_key="another-key")
    with FeatureCache(other) as cache:
        with pytest.raises(CheckpointError, match=r"m\.pt: trained on a cache with content key tiny-cache-0, "
                                                  r"but .*other\.h5 has another-key"):
            check_compatible(ckpt, cache_identity(cache), path, other)
    moved = {**identity, "unseen_classes": [5, 6, 7]}
    with pytest.raises(CheckpointError, match="unseen classes"):
        check_compatible(ckpt, moved, path, "x.h5")


def test_caches_without_content_key_are_told_apart_by_their_data(tmp_path):
    a = write_tiny_cache(tmp_path / "a.h5", seed=0, content_key=None)
    b = write_tiny_cache(tmp_path / "b.h5", seed=0, content_key=None)
    c = write_tiny_cache(tmp_path / "c.h5", seed=1, content_key=None)  # other attributes
    ids = []
    for p in (a, b, c):
        with FeatureCache(p) as cache:
            ids.append(cache_identity(cache)["content_key"])
    assert ids[0] == ids[1] != ids[2] and ids[0].startswith("data-sha256:")


def test_unreadable_files_give_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt: not a readable checkpoint"):
        load_checkpoint(junk)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an msdn-zsl checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
