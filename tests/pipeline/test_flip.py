"""TrainConfig.flip: training samples read their flipped image's map with probability flip; evaluation
never does. The flipped cache's maps outside trainval are NaN (tests/fixtures/caches.py), so any
run that loaded one for validation or test would be refused."""
import numpy as np
import pytest
import torch

from cache.reader import FeatureCache
from pipeline.config import ConfigError
from pipeline.features import NoFlippedMapsError
from pipeline.memory import describe_plan, memory_plan
from pipeline.runlog import read_metrics
from pipeline.train import train
from tests.fixtures.caches import tiny_config, write_tiny_cache

SHORT = dict(iterations=20, eval_every=10)


@pytest.fixture(scope="module")
def flipped_cache(tmp_path_factory):
    return write_tiny_cache(tmp_path_factory.mktemp("flip") / "flipped.h5", flipped=True)


def losses(run_dir) -> list[float]:
    return [r["losses"]["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "losses" in r]


def test_flip_zero_trains_bit_identically_to_the_cache_without_flipped_maps(tiny_cache, flipped_cache, tmp_path):
    plain = train(tiny_config(**SHORT), tiny_cache, tmp_path / "plain", progress=False)
    same = train(tiny_config(**SHORT), flipped_cache, tmp_path / "same", progress=False)
    assert losses(tmp_path / "plain") == losses(tmp_path / "same")
    assert plain["test"] == same["test"] and plain["feature_store"]["bytes"] == same["feature_store"]["bytes"]


def test_flip_one_trains_on_the_flipped_maps_and_evaluates_on_the_originals(flipped_cache, tmp_path):
    original = train(tiny_config(**SHORT), flipped_cache, tmp_path / "original", progress=False)
    flipped = train(tiny_config(flip=1.0, **SHORT), flipped_cache, tmp_path / "flipped", progress=False)
    assert losses(tmp_path / "original") != losses(tmp_path / "flipped")
    assert all(np.isfinite(losses(tmp_path / "flipped")))  # no NaN (non-trainval) flipped map was read
    with FeatureCache(flipped_cache) as cache:  # the flipped maps of the training rows only are held too
        held = sum(len(cache.splits[k]) for k in ("trainval_loc", "test_seen_loc", "test_unseen_loc"))
        trainval = len(cache.splits["trainval_loc"])
    extra = flipped["feature_store"]["bytes"] - original["feature_store"]["bytes"]
    assert extra * held == trainval * original["feature_store"]["bytes"]


def test_flip_half_is_deterministic_and_streaming_gives_the_resident_run(flipped_cache, tmp_path, monkeypatch):
    config = tiny_config(flip=0.5, **SHORT)
    a = train(config, flipped_cache, tmp_path / "a", progress=False)
    b = train(config, flipped_cache, tmp_path / "b", progress=False)
    monkeypatch.setenv("MSDN_FEATURE_STORE", "streaming")
    streamed = train(config, flipped_cache, tmp_path / "s", progress=False)
    assert losses(tmp_path / "a") == losses(tmp_path / "b") == losses(tmp_path / "s")
    assert a["test"] == b["test"] == streamed["test"] and streamed["feature_store"]["mode"] == "streaming"
    unflipped = train(tiny_config(**SHORT), flipped_cache, tmp_path / "u", progress=False)
    assert losses(tmp_path / "a") != losses(tmp_path / "u")


def test_flip_on_a_cache_without_flipped_maps_is_refused_in_one_line_before_training(tiny_cache, tmp_path):
    with pytest.raises(NoFlippedMapsError, match="msdn extract --flip") as err:
        train(tiny_config(flip=0.5), tiny_cache, tmp_path / "run", progress=False)
    assert str(tiny_cache) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="flip must lie in"):
        tiny_config(flip=1.5)


def test_the_memory_plan_counts_the_flipped_maps(flipped_cache):
    with FeatureCache(flipped_cache) as cache:
        rows, train_rows = np.arange(cache.num_images), cache.splits["trainval_loc"]
        common = dict(max_memory=None, batch_size=8, eval_batch_size=16, num_attributes=8)
        plain = memory_plan(cache, rows, torch.device("cpu"), "float16", **common)
        flipped = memory_plan(cache, rows, torch.device("cpu"), "float16", flipped_rows=train_rows, **common)
    per_image = int(np.prod(cache.feature_shape)) * 2
    assert flipped["bank_bytes"] - plain["bank_bytes"] == len(train_rows) * per_image
    assert flipped["flipped_rows"] == len(train_rows) and "flipped_rows" not in plain
    assert f"with {len(train_rows)} training rows' flipped maps" in describe_plan(flipped)
    assert "flipped" not in describe_plan(plain)


def test_flip_one_streams_and_builds_the_bank_chunk_by_chunk_as_in_one_piece(flipped_cache, tmp_path, monkeypatch):
    """All-flipped batches (streaming) and bank chunks holding only flipped maps (a chunk of 3 images)."""
    config = tiny_config(flip=1.0, **SHORT)
    train(config, flipped_cache, tmp_path / "whole", progress=False)
    monkeypatch.setattr("pipeline.features.CHUNK_BYTES", 3 * 16 * 2 * 2 * 4)  # 3 float32 maps of the tiny cache
    train(config, flipped_cache, tmp_path / "chunked", progress=False)
    monkeypatch.setenv("MSDN_FEATURE_STORE", "streaming")
    train(config, flipped_cache, tmp_path / "streamed", progress=False)
    assert losses(tmp_path / "whole") == losses(tmp_path / "chunked") == losses(tmp_path / "streamed")


def test_flip_draws_leave_the_batches_of_flip_zero_alone(tmp_path):
    """Runs of one seed stay paired: with flipped maps equal to the originals, flip = 0.5 trains
    exactly as flip = 0 (the coins come from their own generator, not the sampler's)."""
    import h5py

    cache = write_tiny_cache(tmp_path / "same.h5", flipped=True)
    with h5py.File(cache, "r+") as f:
        f["feature_map_flipped"][...] = f["feature_map"][...]
    train(tiny_config(**SHORT), cache, tmp_path / "zero", progress=False)
    train(tiny_config(flip=0.5, **SHORT), cache, tmp_path / "half", progress=False)
    assert losses(tmp_path / "zero") == losses(tmp_path / "half")
