"""Bring your own dataset, end to end: a folder of real CUB-100 photos (20 seen + 5 unseen species, 12
photos each, symlinked into tmp) with classes.csv, attributes.csv (the real xlsa17 CUB attributes of
those species) and CUB's attribute word vectors, extracted by `msdn extract --dataset folder`
(EfficientNet-Lite0 ImageNet weights at 160 px: 5 x 5 regions, to keep CPU cost low) and trained
with the `folder` recipe on a short schedule. Chance on the 5 unseen species is 20% ZSL.
`--w2v none` gives a cache without word vectors that trains from random attribute embeddings.
(10 seen species were too few: the adapter's 2 validation classes cannot choose anything, and ZSL
on 4 unseen species measured 37.5-50%, i.e. 1.5-2x chance, depending on the schedule.)"""
import json

import h5py
import pytest
import torch
from click.testing import CliRunner

import cli
from cache.reader import FeatureCache
from pipeline.config import apply_overrides, load_recipe
from pipeline.train import train
from tests.fixtures.folder import cub_folder_dataset

IMAGE_SIZE = 160
SEEN, UNSEEN, PER_CLASS = 20, 5, 12
# 200 steps of 32 (~32 epochs of the 192 training photos), lr 3e-4 instead of the recipe's 1e-4 so
# that so few steps learn. With selection "val" the validation run (4 validation species) picks
# gamma; it does not pick the step count (select_iterations = false, as the demo recipe): with so
# few validation images its H peaks at the first evaluation (measured: step 50 chosen, ZSL 43.3
# instead of 46.7).
SHORT = {"iterations": 200, "eval_every": 50, "batch_size": 32, "lr": 3e-4, "select_iterations": False}
FIXED = {**SHORT, "selection": "fixed", "eval_every": 200}  # one 200-step run, gamma 0


@pytest.fixture(scope="module")
def folder(tmp_path_factory, shared_data):
    return cub_folder_dataset(tmp_path_factory.mktemp("folder") / "birds", shared_data, seen=SEEN, unseen=UNSEEN,
                              per_class=PER_CLASS, vectors="npy")


def extract(folder, out, *extra):
    result = CliRunner().invoke(cli.main, ["extract", "--dataset", "folder", "--data-root", str(folder),
                                           "--backbone", "efficientnet_lite0", "--image-size", str(IMAGE_SIZE),
                                           "--device", "cpu", "--workers", "0", "--no-progress",
                                           "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def caches(folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    return extract(folder, root / "birds.h5"), extract(folder, root / "birds_no_w2v.h5", "--w2v", "none")


@pytest.mark.slow
def test_own_folder_extracts_and_beats_chance_on_its_unseen_classes(caches, tmp_path):
    cache_path, _ = caches
    with FeatureCache(cache_path) as cache:
        manifest = cache.manifest
        assert cache.w2v_att.shape == (312, 300) and cache.att.shape == (SEEN + UNSEEN, 312)
        assert len(cache.unseen_classes) == UNSEEN and len(cache.seen_classes) == SEEN
    source = manifest["dataset"]["source"]
    assert manifest["dataset"]["name"] == "folder" and source["split_seed"] == 0 and source["test_fraction"] == 0.2
    assert "tables" in manifest["content"]["dataset"]["fingerprint"]
    summary = train(apply_overrides(load_recipe("folder"), SHORT), cache_path, tmp_path / "run", device="cpu",
                    progress=False, log=lambda msg: None)
    assert summary["selection"]["mode"] == "val" and summary["selection"]["task"]["unseen"] == 4
    test = summary["test"]
    # measured (CPU): ZSL 46.7 (2.3x chance), U 38.3, S 75.0, H 50.7, AUSUC 36.1; asked: 1.5x chance
    assert test["ZSL"] >= 0.30 and test["H"] >= 0.2, test
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["run"]["attribute_embeddings"].startswith("word vectors from the cache, 300-d")


@pytest.mark.slow
def test_w2v_none_stores_no_word_vectors_and_trains_from_random_embeddings(caches, tmp_path):
    with_w2v, without = caches
    with h5py.File(without, "r") as f:
        assert "w2v_att" not in f and "feature_map" in f
    with FeatureCache(without) as cache, FeatureCache(with_w2v) as other:
        assert cache.w2v_att is None and cache.content_key != other.content_key
        assert "--w2v none" in cache.manifest["dataset"]["source"]["w2v_att"]
        assert cache.manifest["dataset"]["word_vector_dim"] is None
        assert torch.equal(cache.features(), other.features())  # the same images, the same maps
    summary = train(apply_overrides(load_recipe("folder"), FIXED), without, tmp_path / "run", device="cpu",
                    progress=False, log=lambda msg: None)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["run"]["attribute_embeddings"].startswith("random init N(0, 1), 300-d, trained")
    # measured (CPU): ZSL 30.0 (1.5x chance), U 11.7, S 67.5, H 19.9, AUSUC 16.8: V learned from a random
    # init in 200 steps lags the word vectors (ZSL 46.7 on the same schedule); asked: 1.25x chance
    assert summary["test"]["ZSL"] >= 0.25, summary["test"]
