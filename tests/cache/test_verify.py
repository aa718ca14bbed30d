"""`msdn cache verify` on real extracted caches: a flipped byte inside a chunk is caught and its row
named, metadata damage in a store entry is caught by the file checksums, older/TransZero files verify
as readable without checksums, and the exit code carries the verdict."""
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import cli
from cache import chunk_check
from cache import layout as L
from cache.shards import join_shards
from cache.verify import verify_cache
from tests.fixtures.images import image_dataset
from tests.fixtures.store import chunk_offset, extract_tiny, flip_byte, publish_tiny


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """The same 8 images under each compression."""
    base = tmp_path_factory.mktemp("pristine")
    return {c: extract_tiny(base / c, compression=c) for c in ("none", "lzf", "gzip")}


def verify_cli(*args):
    result = CliRunner().invoke(cli.main, ["cache", "verify", *map(str, args)])
    return result.exit_code, result.output


def test_a_fresh_cache_verifies(pristine):
    code, out = verify_cli(pristine["lzf"])
    assert code == 0 and "OK: 8 of 8 rows read and matched their checksums" in out
    with h5py.File(pristine["lzf"], "r") as f:  # the checksums are those of the stored values
        assert f["row_crc32"][3] == L.row_crc32(f["feature_map"][3]) != 0


@pytest.mark.parametrize("path_taken", ["threaded chunks", "h5py"])
@pytest.mark.parametrize("compression", ["none", "lzf", "gzip"])
def test_a_flipped_byte_inside_a_chunk_names_its_row(pristine, tmp_path, compression, path_taken, monkeypatch):
    if path_taken == "h5py":  # the general path, taken by layouts the threaded decoder does not cover
        monkeypatch.setattr(chunk_check, "applies", lambda ds: False)
    path = tmp_path / "f.h5"
    shutil.copyfile(pristine[compression], path)
    offset, size = chunk_offset(path, 5)
    flip_byte(path, offset + size // 2)
    report = verify_cache(path)
    assert report.verdict == "corrupt" and report.exit_code == 1
    assert report.corrupt_rows + report.unreadable_rows == [5]   # lzf/gzip may fail to decode, or decode wrongly
    assert report.rows_checked == 8 - len(report.unreadable_rows)
    code, out = verify_cli(path)
    assert code == 1 and "CORRUPT" in out and "row(s): 5" in out


def test_damage_outside_the_features_is_caught_in_a_store_entry(tmp_path):
    store, key = publish_tiny(tmp_path / "store", tmp_path / "work")
    path = store.features_path(key)
    with h5py.File(path, "r") as f:
        att_offset = f["att"].id.get_offset()
    flip_byte(path, att_offset + 7)                 # a class attribute value, not a feature row
    code, out = verify_cli(key[:8], "--cache-dir", store.root)
    assert code == 1 and "bytes differ from the record" in out
    assert verify_cache(path).corrupt_rows == []    # the rows themselves are fine


def test_transzero_file_verifies_as_readable_without_checksums(tmp_path):
    path = tmp_path / "tz.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("feature_map", data=np.ones((3, 4, 2, 2), np.float32), compression="gzip")
        for key, value in (("labels", [0, 1, 1]), ("trainval_loc", [0]), ("test_seen_loc", [1]),
                           ("test_unseen_loc", [2])):
            f.create_dataset(key, data=np.array(value))
        f.create_dataset("att", data=np.eye(2, dtype=np.float32))
        f.create_dataset("original_att", data=np.eye(2, dtype=np.float32))
    code, out = verify_cli(path)
    assert code == 3 and "no row checksums" in out and "3 of 3 rows read" in out


def test_an_unfinished_file_is_incomplete_not_corrupt(pristine, tmp_path):
    path = tmp_path / "f.h5"
    shutil.copyfile(pristine["none"], path)
    with h5py.File(path, "r+") as f:
        f["done"][6:] = False
    code, out = verify_cli(path)
    assert code == 4 and "6 of 8 rows read" in out and "2 row(s) not extracted" in out


def test_a_missing_shard_of_a_virtual_cache_is_named(tmp_path):
    shards = []
    for r in range(2):
        shards.append(extract_tiny(tmp_path / f"s{r}", n=4, seed=r))
    dataset = image_dataset(tmp_path / "all", n=8)
    joined = tmp_path / "s0" / "joined.h5"
    manifest = {"content_key": "x" * 64}
    join_shards(joined, shards, dataset, manifest)
    assert verify_cache(joined).verdict == "ok"
    shards[1].unlink()
    report = verify_cache(joined)
    assert report.verdict == "corrupt" and any("shard file missing" in p for p in report.file_problems)
    assert report.corrupt_rows == [4, 5, 6, 7]    # HDF5 reads zeros there; the checksums say so


def _replace(f, key, data):
    del f[key]
    f.create_dataset(key, data=data)


@pytest.mark.parametrize("breakage,message", [
    (lambda f: f.__delitem__("labels"), "missing key(s) ['labels']"),
    (lambda f: _replace(f, "feature_map", f["feature_map"][:, 0]), "feature_map has shape (8, 2, 2)"),
    (lambda f: _replace(f, "labels", f["labels"][()] + 10), "outside the 4 classes of att"),
    (lambda f: _replace(f, "test_unseen_loc", np.r_[f["test_unseen_loc"][()], f["trainval_loc"][:1]]),
     "are both seen (trainval_loc) and unseen (test_unseen_loc)"),
    (lambda f: (_replace(f, "att", f["att"][()].T), _replace(f, "original_att", f["original_att"][()].T),
                f.__delitem__("w2v_att")), "looks transposed"),
])
def test_a_file_training_would_refuse_is_not_ok(pristine, tmp_path, breakage, message):
    path = tmp_path / "f.h5"
    shutil.copyfile(pristine["lzf"], path)
    with h5py.File(path, "r+") as f:
        breakage(f)
    report = verify_cache(path)
    assert report.verdict == "unusable" and report.exit_code == 1
    code, out = verify_cli(path)
    lines = out.strip().splitlines()
    assert code == 1 and len(lines) == 1, out
    assert lines[0].startswith(f"{path}: NOT USABLE for training: ") and message in lines[0]
    assert "Traceback" not in out
