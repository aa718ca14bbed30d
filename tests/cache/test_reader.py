"""FeatureCache on real HDF5 files: TransZero's layout, ours, and broken ones."""
import json

import h5py
import numpy as np
import pytest
import torch

from cache import layout as L
from cache.reader import CacheError, FeatureCache
from cache.writer import CacheWriter
from extract.datasets.base import ImageDataset

N, C, H, W = 12, 8, 3, 3


def write_transzero_file(path, features, labels, splits, att, original_att, w2v):
    """Written the way TransZero's preprocessing.py does it: every key gzip-compressed, float32 maps,
    float64 attributes and word vectors, uint16 locations (scipy's loadmat dtype, minus 1)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("feature_map", data=features, compression="gzip")
        f.create_dataset("labels", data=labels, compression="gzip")
        for key in ("trainval_loc", "test_seen_loc", "test_unseen_loc"):
            f.create_dataset(key, data=splits[key], compression="gzip")
        f.create_dataset("att", data=att, compression="gzip")
        f.create_dataset("original_att", data=original_att, compression="gzip")
        f.create_dataset("w2v_att", data=w2v, compression="gzip")


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 3).astype(np.int64)            # classes 0,1 seen; 2,3 unseen
    return {
        "features": rng.random((N, C, H, W), dtype=np.float32),
        "labels": labels,
        "splits": {"trainval_loc": np.array([0, 1, 3, 4], np.uint16), "test_seen_loc": np.array([2, 5], np.uint16),
                   "test_unseen_loc": np.arange(6, 12, dtype=np.uint16)},
        "att": rng.random((4, 5)), "original_att": rng.random((4, 5)) * 100, "w2v": rng.random((5, 7)),
    }


@pytest.fixture
def transzero_file(tmp_path, arrays):
    path = tmp_path / "feature_map_ResNet_101_CUB.hdf5"
    write_transzero_file(path, arrays["features"], arrays["labels"], arrays["splits"], arrays["att"],
                         arrays["original_att"], arrays["w2v"])
    return path


def tiny_dataset(tmp_path, arrays) -> ImageDataset:
    return ImageDataset(name="tiny", root=tmp_path, image_paths=[f"img{i}.jpg" for i in range(N)],
                        labels=arrays["labels"], class_names=list("abcd"), att=arrays["att"],
                        original_att=arrays["original_att"], w2v_att=arrays["w2v"],
                        splits={k: v.astype(np.int64) for k, v in arrays["splits"].items()})


def our_file(tmp_path, arrays, rows_done, compression="lzf", dtype="float16"):
    path = tmp_path / f"ours_{compression}_{dtype}.h5"
    manifest = {"content_key": "k" * 64, "dtype": dtype}
    L.create_cache_file(path, dataset=tiny_dataset(tmp_path, arrays), feature_shape=(C, H, W), dtype=dtype,
                        compression=compression, manifest=manifest)
    with CacheWriter(path) as writer:
        rows = np.asarray(rows_done)
        writer.write(rows, arrays["features"][rows].astype(L.DTYPES[dtype]))
    return path


def test_reads_a_transzero_file_as_is(transzero_file, arrays):
    with FeatureCache(transzero_file) as cache:
        assert cache.manifest is None and cache.content_key is None and cache.image_paths is None
        assert cache.complete and cache.num_images == N and cache.feature_shape == (C, H, W)
        assert cache.labels.dtype == np.int64 and np.array_equal(cache.labels, arrays["labels"])
        assert all(v.dtype == np.int64 for v in cache.splits.values())
        assert np.array_equal(cache.splits["test_unseen_loc"], np.arange(6, 12))
        assert cache.att.dtype == np.float32 and np.allclose(cache.att, arrays["att"])
        assert np.allclose(cache.original_att, arrays["original_att"]) and cache.w2v_att.shape == (5, 7)
        assert cache.seen_classes.tolist() == [0, 1] and cache.unseen_classes.tolist() == [2, 3]
        full = cache.features(dtype=torch.float32)
        assert torch.equal(full, torch.from_numpy(arrays["features"]))
        half = cache.features(rows=[7, 2, 3])
        assert half.dtype == torch.float16
        assert torch.equal(half, torch.from_numpy(arrays["features"][[7, 2, 3]]).half())
        assert torch.equal(cache.lazy()[4], torch.from_numpy(arrays["features"][4]))
        assert torch.equal(cache.lazy()[[5, 1]], torch.from_numpy(arrays["features"][[5, 1]]))
        empty = torch.empty((0, C, H, W), dtype=cache.stored_dtype)  # e.g. an all-flipped bank chunk's originals
        assert cache.features(rows=[], out=empty) is empty and cache.features(rows=[]).shape == (0, C, H, W)


@pytest.mark.parametrize("compression,dtype", [("lzf", "float16"), ("gzip", "float32"), ("none", "float16")])
def test_our_layout_round_trips(tmp_path, arrays, compression, dtype):
    path = our_file(tmp_path, arrays, np.arange(N), compression, dtype)
    with h5py.File(path, "r") as f:
        fm = f["feature_map"]
        assert fm.chunks == (1, C, H, W) and fm.dtype == L.DTYPES[dtype]
        assert fm.compression == (None if compression == "none" else compression)
        assert set(f) == {"feature_map", "labels", "trainval_loc", "test_seen_loc", "test_unseen_loc", "att",
                          "original_att", "w2v_att", "image_paths", "image_bytes", "done", "skipped", "row_crc32",
                          "class_names"}
        assert json.loads(f.attrs["manifest"])["content_key"] == f.attrs["content_key"]
    with FeatureCache(path) as cache:
        assert cache.complete and cache.image_paths[3] == "img3.jpg" and cache.content_key == "k" * 64
        expected = torch.from_numpy(arrays["features"].astype(L.DTYPES[dtype]))
        assert torch.equal(cache.features(dtype=expected.dtype), expected)


def test_msdn_style_plain_h5py_access_reads_our_file(tmp_path, arrays):
    """MSDN/TransZero loaders do np.array(hf.get(key)) and index features by the locations."""
    path = our_file(tmp_path, arrays, np.arange(N), "lzf", "float32")
    with h5py.File(path, "r") as hf:
        features = np.array(hf.get("feature_map"))
        trainval = np.array(hf.get("trainval_loc"))
        train = torch.from_numpy(features[trainval]).float()
        labels = torch.from_numpy(np.array(hf.get("labels"))[trainval]).long()
        att = torch.from_numpy(np.array(hf.get("att"))).float()
        w2v = torch.from_numpy(np.array(hf.get("w2v_att"))).float()
    assert torch.equal(train, torch.from_numpy(arrays["features"][[0, 1, 3, 4]]))
    assert labels.tolist() == [0, 0, 1, 1] and att.shape == (4, 5) and w2v.shape == (5, 7)


def test_incomplete_file_is_refused_unless_allowed(tmp_path, arrays):
    path = our_file(tmp_path, arrays, [0, 1, 2, 3, 4, 5])
    with FeatureCache(path) as cache:
        assert not cache.complete
        with pytest.raises(CacheError, match="row 6"):
            cache.features()
        assert cache.features(rows=[0, 5]).shape == (2, C, H, W)   # done rows are fine
        partial = cache.features(allow_incomplete=True)
        assert torch.all(partial[6:] == 0)                          # never written: fill value
        assert cache.done_splits()["test_unseen_loc"].size == 0
        with pytest.raises(CacheError, match="row 7"):
            cache.lazy()[7]


@pytest.mark.parametrize("breakage,message", [
    (lambda f: f.__delitem__("att"), "missing key"),
    (lambda f: (f.__delitem__("labels"), f.create_dataset("labels", data=np.zeros(N - 1, int))), "labels has shape"),
    (lambda f: (f.__delitem__("test_seen_loc"), f.create_dataset("test_seen_loc", data=np.array([N]))),
     "outside"),
    (lambda f: (f.__delitem__("w2v_att"), f.create_dataset("w2v_att", data=np.zeros((6, 7)))), "w2v_att"),
    (lambda f: (f.__delitem__("feature_map"), f.create_dataset("feature_map", data=np.zeros((N, C)))),
     "expected \\(N, C, H, W\\)"),
])
def test_bad_keys_and_shapes_name_the_file(transzero_file, breakage, message):
    with h5py.File(transzero_file, "r+") as f:
        breakage(f)
    with pytest.raises(CacheError, match=message) as err:
        FeatureCache(transzero_file)
    assert str(transzero_file) in str(err.value)


def test_a_transposed_att_without_word_vectors_is_refused(transzero_file, arrays):
    """(attributes, classes) instead of (classes, attributes): 5 x 4 would read as 5 classes of 4
    attributes, although the labels name 4 classes."""
    with h5py.File(transzero_file, "r+") as f:
        for key in ("att", "original_att"):
            data = f[key][()]
            del f[key]
            f.create_dataset(key, data=data.T)
        del f["w2v_att"]
    with pytest.raises(CacheError, match=r"att has shape \(5, 4\) but the labels name 4 classes.*transposed") as err:
        FeatureCache(transzero_file)
    assert str(transzero_file) in str(err.value)


def test_overlapping_seen_and_unseen_classes_are_refused(transzero_file):
    with h5py.File(transzero_file, "r+") as f:
        unseen = f["test_unseen_loc"][()]
        del f["test_unseen_loc"]
        f.create_dataset("test_unseen_loc", data=np.r_[unseen, [0, 3]])   # rows of seen classes 0 and 1
    with pytest.raises(CacheError, match=r"classes \[0, 1\] are both seen \(trainval_loc\) and unseen") as err:
        FeatureCache(transzero_file)
    assert str(transzero_file) in str(err.value)


def test_truncated_and_non_hdf5_files_are_detected(tmp_path, transzero_file):
    data = transzero_file.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match="truncated.h5"):
        with FeatureCache(truncated) as cache:
            cache.features()
    text = tmp_path / "notes.h5"
    text.write_text("not an hdf5 file")
    with pytest.raises(CacheError, match="not a readable HDF5 file"):
        FeatureCache(text)
    with pytest.raises(CacheError, match="not found"):
        FeatureCache(tmp_path / "missing.h5")


def test_damaged_chunk_is_reported_with_its_row(tmp_path, arrays):
    path = our_file(tmp_path, arrays, np.arange(N), "gzip", "float32")
    with h5py.File(path, "r") as f:
        info = f["feature_map"].id.get_chunk_info_by_coord((9, 0, 0, 0))
    with open(path, "r+b") as raw:                  # overwrite row 9's compressed bytes with garbage
        raw.seek(info.byte_offset)
        raw.write(b"\xff" * info.size)
    with FeatureCache(path) as cache:
        assert torch.equal(cache.features(rows=[8], dtype=torch.float32),
                           torch.from_numpy(arrays["features"][[8]]))
        with pytest.raises(CacheError, match="row 9"):
            cache.features()
        with pytest.raises(CacheError, match="row 9"):
            cache.lazy()[9]
