"""A run folder is portable: config.json records the cache's absolute path and its content key, and
`msdn evaluate` (like predict and visualize) finds the cache from the run, or by key in the store once
the recorded path is gone."""
import json
import shutil

import h5py
from click.testing import CliRunner

import cli
from cache.store import FEATURES_FILE, Store
from pipeline.commands.visualize import resolve_inputs
from tests.fixtures.caches import write_tiny_cache

KEY = "cd" * 32
QUICK = ["--set", "selection=fixed", "--set", "iterations=10", "--set", "eval_every=10", "--set", "batch_size=8"]


def test_a_moved_run_finds_its_cache_by_path_then_by_key(tmp_path, monkeypatch):
    monkeypatch.delenv("MSDN_CACHE_DIR", raising=False)
    (tmp_path / "work").mkdir()
    write_tiny_cache(tmp_path / "work" / "tiny.h5", content_key=KEY)
    monkeypatch.chdir(tmp_path / "work")
    trained = CliRunner().invoke(cli.main, ["train", "--recipe", "demo", "--cache", "tiny.h5", "--out", "run",
                                            "--device", "cpu", "--quiet", *QUICK])
    assert trained.exit_code == 0, trained.output
    run = json.loads((tmp_path / "work" / "run" / "config.json").read_text())["run"]
    assert run["cache"] == str(tmp_path / "work" / "tiny.h5") and run["cache_identity"]["content_key"] == KEY

    shutil.move(tmp_path / "work" / "run", tmp_path / "moved")  # another folder: the relative path is gone
    monkeypatch.chdir(tmp_path)
    evaluate = ["evaluate", "--checkpoint", str(tmp_path / "moved" / "best.pt"), "--device", "cpu"]
    result = CliRunner().invoke(cli.main, evaluate)  # no --cache: the run's
    assert result.exit_code == 0, result.output
    assert resolve_inputs(tmp_path / "moved", None, None, None)[1] == tmp_path / "work" / "tiny.h5"

    store = Store(tmp_path / "store")  # the cache now lives only in a store
    stage = store.staging("extract", KEY)
    shutil.move(tmp_path / "work" / "tiny.h5", stage / FEATURES_FILE)
    with h5py.File(stage / FEATURES_FILE, "r") as f:
        shape = list(f["feature_map"].shape[1:])
    store.publish(stage, KEY, {"content_key": KEY, "dataset": {"name": "demo"}, "feature_shape": shape})
    gone = CliRunner().invoke(cli.main, evaluate)
    assert gone.exit_code == 1 and len(gone.output.splitlines()) == 1 and "cannot find the feature cache" in gone.output
    assert "--cache-dir or $MSDN_CACHE_DIR" in gone.output
    found = CliRunner().invoke(cli.main, [*evaluate, "--cache-dir", str(tmp_path / "store")])
    assert found.exit_code == 0, found.output
    monkeypatch.setenv("MSDN_CACHE_DIR", str(tmp_path / "store"))
    assert resolve_inputs(tmp_path / "moved", None, None, None)[1] == store.features_path(KEY)
