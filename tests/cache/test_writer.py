"""Rows compressed by ChunkCodec threads are the chunks HDF5's own filters would read back exactly."""
import h5py
import numpy as np
import pytest

from cache import writer as chunk_codec
from cache.layout import LIBVER, compression_options, create_cache_file
from cache.reader import FeatureCache
from cache.writer import CacheWriter, ChunkCodec
from tests.fixtures.images import image_dataset

SHAPE = (6, 64, 5, 5)


@pytest.fixture
def rows():
    rng = np.random.default_rng(0)
    data = np.maximum(rng.standard_normal(SHAPE), 0).astype(np.float16)   # ReLU-like: compressible
    data[1] = rng.random(SHAPE[1:]).astype(np.float16)                    # noise: lzf cannot shrink it
    data[2] = 0
    return data


@pytest.mark.parametrize("compression", ["lzf", "gzip", "none"])
def test_direct_chunks_read_back_through_hdf5_filters(tmp_path, rows, compression):
    path = tmp_path / "c.h5"
    with h5py.File(path, "w", libver=LIBVER) as f:
        ds = f.create_dataset("x", SHAPE, np.float16, chunks=(1, *SHAPE[1:]), **compression_options(compression))
        codec = ChunkCodec(ds, threads=3)
        assert codec.direct
        order = [4, 0, 5, 2, 1, 3]
        for row, (mask, chunk) in zip(order, codec.encode_rows(rows[order])):
            ds.id.write_direct_chunk((row, 0, 0, 0), chunk, mask)
        codec.close()
    with h5py.File(path, "r") as f:
        ds = f["x"]
        assert np.array_equal(ds[:], rows)
        info = [ds.id.get_chunk_info_by_coord((i, 0, 0, 0)) for i in range(SHAPE[0])]
    if compression == "lzf":
        assert info[1].filter_mask == 1 and info[1].size == rows[1].nbytes   # stored raw, filter skipped
        assert info[2].filter_mask == 0 and info[2].size < rows[2].nbytes // 10
    if compression == "none":
        assert all(i.size == rows[0].nbytes for i in info)


@pytest.mark.parametrize("lzf_exported", [True, False])
def test_cache_writer_stores_rows_either_way(tmp_path, rows, monkeypatch, lzf_exported):
    if not lzf_exported:
        monkeypatch.setattr(chunk_codec, "_LZF", None)    # as on an h5py build without the symbol
    dataset = image_dataset(tmp_path / "images", n=SHAPE[0])
    path = create_cache_file(tmp_path / "c.h5", dataset=dataset, feature_shape=SHAPE[1:], dtype="float16",
                             compression="lzf", manifest={"content_key": "0" * 64})
    with CacheWriter(path, codec_threads=2) as writer:
        assert writer.codec.direct == lzf_exported
        writer.write(np.array([3, 4, 5]), rows[3:])
        writer.write(np.array([0, 2, 1]), rows[[0, 2, 1]])
    with FeatureCache(path) as cache:
        assert cache.complete and np.array_equal(cache.features().numpy(), rows)
