"""The store from stage 2's side: `msdn cache ls` (and --match RECIPE), `msdn train/evaluate --cache KEY`,
and `msdn cache export` to one self-contained TransZero-layout file, on real extracted entries."""
import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
from cache.reader import CacheError, FeatureCache
from cache.shards import join_shards
from cache.store import resolve_cache
from cache.verify import verify_cache
from pipeline.commands.cache import LS_COLUMNS, list_entries
from tests.fixtures.images import image_dataset
from tests.fixtures.store import extract_tiny, publish_tiny

TRANSZERO_KEYS = {"feature_map", "labels", "trainval_loc", "test_seen_loc", "test_unseen_loc", "att",
                  "original_att", "w2v_att"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    base = tmp_path_factory.mktemp("store")
    store, demo_key = publish_tiny(base / "store", base / "a", name="demo", compression="lzf")
    _, cub_key = publish_tiny(base / "store", base / "b", name="CUB100", seed=1)
    return store, demo_key, cub_key


def invoke(*args, env=None):
    return CliRunner().invoke(cli.main, [str(a) for a in args], env=env)


def test_ls_lists_every_entry_and_match_keeps_what_a_recipe_trains_on(store):
    store, demo_key, cub_key = store
    table = list_entries(store, full_keys=True)
    assert list(table.columns) == LS_COLUMNS and set(table["key"]) == {demo_key, cub_key}
    row = table.set_index("key").loc[demo_key]
    assert (row["dataset"], row["backbone"], row["shape"], row["dtype"], row["complete"]) == \
        ("demo", "efficientnet_lite0@64", "8 x 1280 x 2 x 2", "float16", True)
    result = invoke("cache", "ls", "--match", "demo", env={"MSDN_CACHE_DIR": str(store.root)})
    assert result.exit_code == 0 and demo_key[:12] in result.output and cub_key[:12] not in result.output
    assert all(column in result.output for column in LS_COLUMNS)
    assert "(no entries)" in invoke("cache", "ls", "--match", "CUB", "--cache-dir", store.root).output
    missing = invoke("cache", "ls", "--match", "NOPE", "--cache-dir", store.root)
    assert missing.exit_code == 1 and "NOPE" in missing.output


def test_a_cache_resolves_by_path_entry_folder_or_key(store, tmp_path, monkeypatch):
    store, demo_key, _ = store
    path = store.features_path(demo_key)
    monkeypatch.delenv("MSDN_CACHE_DIR", raising=False)
    assert resolve_cache(path) == path and resolve_cache(path.parent) == path
    assert resolve_cache(demo_key[:7], store.root) == path
    with pytest.raises(CacheError, match="MSDN_CACHE_DIR"):
        resolve_cache(demo_key[:7])
    monkeypatch.setenv("MSDN_CACHE_DIR", str(store.root))
    assert resolve_cache(demo_key[:7]) == path and (store.root / "used" / demo_key).exists()
    with pytest.raises(CacheError, match="not found"):
        resolve_cache(tmp_path / "nothing.h5")


def test_train_and_evaluate_take_an_entry_by_key(store, tmp_path):
    store, demo_key, _ = store
    sets = ["--set", 'selection="fixed"', "--set", "iterations=4", "--set", "eval_every=2",
            "--set", "batch_size=2", "--set", "log_every=2"]
    trained = invoke("train", "--recipe", "demo", "--cache", demo_key[:8], "--cache-dir", store.root,
                     "--out", tmp_path / "run", "--device", "cpu", "--quiet", *sets)
    assert trained.exit_code == 0, trained.output
    assert "test" in trained.output and (tmp_path / "run" / "best.pt").is_file()
    evaluated = invoke("evaluate", "--checkpoint", tmp_path / "run" / "best.pt", "--cache", demo_key[:8],
                       "--cache-dir", store.root, "--device", "cpu")
    assert evaluated.exit_code == 0, evaluated.output
    unknown = invoke("train", "--recipe", "demo", "--cache", "deadbeef", "--cache-dir", store.root,
                     "--out", tmp_path / "run2")
    assert unknown.exit_code == 1 and "no entry with key 'deadbeef'" in unknown.output


def test_export_writes_one_self_contained_transzero_file(store, tmp_path):
    store, demo_key, _ = store
    out = tmp_path / "demo_f32.h5"
    result = invoke("cache", "export", demo_key[:8], out, "--dtype", "float32", "--compression", "gzip",
                    "--cache-dir", store.root)
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as f, FeatureCache(store.features_path(demo_key)) as source:
        assert TRANSZERO_KEYS <= set(f) and f["feature_map"].dtype == np.float32
        assert f["feature_map"].compression == "gzip" and not f["feature_map"].is_virtual
        assert np.array_equal(f["feature_map"][()], source.features(dtype=torch.float32).numpy())
        assert np.array_equal(f["test_unseen_loc"][()], source.splits["test_unseen_loc"])
        assert f.attrs["content_key"] != source.content_key       # float32 is other content
    assert verify_cache(out).verdict == "ok"
    again = invoke("cache", "export", demo_key[:8], out, "--cache-dir", store.root)
    assert again.exit_code == 1 and "exists" in again.output


def test_export_materialises_a_virtual_cache(tmp_path):
    shards = [extract_tiny(tmp_path / f"s{r}", n=4, seed=r) for r in range(2)]
    joined = join_shards(tmp_path / "s0" / "joined.h5", shards, image_dataset(tmp_path / "all", n=8),
                         {"content_key": "j" * 64})
    result = invoke("cache", "export", joined, tmp_path / "one.h5")
    assert result.exit_code == 0, result.output
    shards[1].unlink()          # the export stands alone
    with FeatureCache(tmp_path / "one.h5") as one:
        assert not one.file["feature_map"].is_virtual and one.complete
        assert verify_cache(tmp_path / "one.h5").verdict == "ok"


def test_export_leaves_skipped_rows_out_of_the_locations(tmp_path):
    """A file written before skipped rows were left out of its splits: the export leaves them out
    and says how many; an unfinished extraction is not exported."""
    dataset = image_dataset(tmp_path / "images", n=8)
    path = extract_tiny(tmp_path / "src")
    with h5py.File(path, "r+") as f:                 # rows 4 and 6 skipped, still in the splits
        for row in (4, 6):
            f["done"][row], f["skipped"][row] = False, True
    result = CliRunner().invoke(cli.main, ["cache", "export", str(path), str(tmp_path / "out.h5")])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "out.h5")
    assert "2 skipped row(s) left out of the split locations" in result.stderr
    with h5py.File(tmp_path / "out.h5", "r") as f:
        for key, rows in dataset.splits.items():
            assert f[key][()].tolist() == [r for r in rows.tolist() if r not in (4, 6)]
    with h5py.File(path, "r+") as f:
        f["skipped"][6] = False                      # row 6: not extracted yet
    unfinished = CliRunner().invoke(cli.main, ["cache", "export", str(path), str(tmp_path / "out2.h5")])
    assert unfinished.exit_code == 1 and "not extracted yet" in unfinished.output
    assert not (tmp_path / "out2.h5").exists()
