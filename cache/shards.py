"""Join per-rank shard files into one cache, and export a cache as one self-contained file.

Distributed extraction (extract/distributed.py) writes rank r's contiguous rows into
`<out>.shard-r-of-W.h5`, each a complete cache file of its rows. `join_shards` then writes `<out>`
with every key of a one-process extraction and the full manifest:
- virtual (default): `feature_map` is an HDF5 virtual dataset whose sources are the shard files,
  named relative to `<out>` so the folder can be moved or copied whole; no feature bytes are copied.
- materialized: the shards' compressed chunks are copied as they are into `<out>` (no
  recompression) and the shard files are deleted.
`done`, `skipped`, `row_crc32` and `image_bytes` are real datasets in `<out>` in both cases, so a
missing or damaged shard shows up in `msdn cache verify` as rows whose checksum fails.

`export_cache` writes any cache (virtual or not) as one plain file in TransZero's key layout,
optionally converting the dtype (float32 for MSDN/TransZero's own loaders) or the compression. Each
source row is checked against its checksum on the way, so an export never carries corruption along,
and rows recorded as skipped are left out of its split locations (those loaders read them as they are).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np

from cache import layout as L
from cache.reader import CacheError, FeatureCache

_BLOCK_BYTES = 32 << 20


def shard_path(out: str | Path, rank: int, world: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.name}.shard-{rank}-of-{world}.h5")


def join_shards(out: str | Path, shards: list[Path], dataset, manifest: dict, *,
                materialize: bool = False) -> Path:
    """Write `out` covering the rows of `shards` in order (see module docstring); atomic."""
    out = Path(out)
    opened = [FeatureCache(p) for p in shards]
    try:
        sizes = [c.num_images for c in opened]
        if sum(sizes) != dataset.num_images:
            raise CacheError(f"{out}: shards hold {sum(sizes)} rows, the dataset has {dataset.num_images}")
        first = opened[0].file[L.FEATURES]
        for cache in opened:
            _refuse_flipped(cache, "joining shards")
            fm = cache.file[L.FEATURES]
            if (fm.shape[1:], fm.dtype, fm.compression) != (first.shape[1:], first.dtype, first.compression):
                raise CacheError(f"{cache.path}: shard layout {fm.shape[1:]} {fm.dtype} {fm.compression} differs "
                                 f"from {opened[0].path}")
        tmp = out.with_name(out.name + ".joining")
        L.create_cache_file(tmp, dataset=dataset, feature_shape=tuple(first.shape[1:]), dtype=str(first.dtype),
                            compression=first.compression or "none", manifest=manifest,
                            image_bytes=np.concatenate([c.file[L.IMAGE_BYTES][()] for c in opened]))
        with h5py.File(tmp, "r+", libver=L.LIBVER) as f:
            for key in (L.DONE, L.SKIPPED, L.ROW_CRC32):
                f[key][...] = np.concatenate([_column(c, key) for c in opened])
            L.write_locations(f, L.usable_locations(dataset.splits, f[L.SKIPPED][()]))  # as extraction does
            if materialize:
                _copy_chunks(opened, f[L.FEATURES])
            else:
                del f[L.FEATURES]
                f.create_virtual_dataset(L.FEATURES, _virtual_layout(opened, out), fillvalue=0)
    finally:
        for cache in opened:
            cache.close()
    os.replace(tmp, out)
    if materialize:
        for path in shards:
            Path(path).unlink()
    return out


def _refuse_flipped(cache: FeatureCache, what: str) -> None:
    """Never drop a --flip cache's flipped maps silently: these paths carry feature_map only."""
    if cache.has_flipped:
        raise CacheError(f"{cache.path}: holds flipped maps ({L.FLIPPED_FEATURES}), which {what} does not carry yet; "
                         "copy the file as it is (msdn cache push/pull carry it whole)")


def _column(cache: FeatureCache, key: str) -> np.ndarray:
    if key in cache.file:
        return cache.file[key][()]
    if key == L.ROW_CRC32:
        raise CacheError(f"{cache.path}: shard has no row checksums (written by an older version); re-extract it")
    return np.zeros(cache.num_images, dtype=bool)


def _virtual_layout(opened: list[FeatureCache], out: Path) -> h5py.VirtualLayout:
    first = opened[0].file[L.FEATURES]
    n = sum(c.num_images for c in opened)
    layout = h5py.VirtualLayout(shape=(n, *first.shape[1:]), dtype=first.dtype)
    start = 0
    for cache in opened:
        fm = cache.file[L.FEATURES]
        # Relative to <out>'s folder: HDF5 looks for relative sources beside the virtual file.
        rel = os.path.relpath(cache.path.resolve(), out.resolve().parent)
        layout[start:start + fm.shape[0]] = h5py.VirtualSource(rel, L.FEATURES, shape=fm.shape, dtype=fm.dtype)
        start += fm.shape[0]
    return layout


def _copy_chunks(opened: list[FeatureCache], target: h5py.Dataset) -> None:
    """Copy each done row's stored chunk as it is (chunks are one row each in both files)."""
    start = 0
    tail = (0,) * (target.ndim - 1)
    for cache in opened:
        source = cache.file[L.FEATURES]
        for row in np.flatnonzero(cache.done):
            mask, chunk = source.id.read_direct_chunk((int(row), *tail))
            target.id.write_direct_chunk((start + int(row), *tail), chunk, mask)
        start += cache.num_images


def export_cache(source: str | Path, dest: str | Path, *, dtype: str | None = None,
                 compression: str | None = None, log=None) -> Path:
    """Write `source` (any of our caches, virtual or not) as one self-contained file `dest`. Rows
    recorded as skipped are left out of the split locations (`log` hears how many); an unfinished
    extraction is refused."""
    from cache.keys import content_key
    from cache.writer import CacheWriter

    dest = Path(dest)
    with FeatureCache(source) as cache:
        unfinished = int((~cache.done & ~cache.skipped).sum())
        if unfinished:
            raise CacheError(f"{cache.path}: {unfinished} rows are not extracted yet (they would be exported as "
                             "all-zero maps); finish the extraction with `msdn extract --resume` first")
        usable = L.usable_locations(cache.splits, cache.skipped)
        if cache.skipped.any() and log:
            log(f"{int(cache.skipped.sum())} skipped row(s) left out of the split locations "
                f"({L.dropped_counts(cache.splits, usable) or 'no split held them'})")
        _refuse_flipped(cache, "export")
        f, fm = cache.file, cache.file[L.FEATURES]
        dtype = dtype or str(fm.dtype)
        compression = compression or (_compression_of(fm) if not fm.is_virtual else _compression_of_sources(cache))
        manifest = json.loads(json.dumps(cache.manifest)) if cache.manifest else _bare_manifest()
        manifest["dtype"], manifest["compression"] = dtype, compression
        if "content" in manifest:
            manifest["content"]["dtype"] = dtype
            manifest["content_key"] = content_key(manifest)
        expected = f[L.ROW_CRC32][()] if L.ROW_CRC32 in f else None
        partial = dest.with_name(dest.name + ".partial")
        L.create_cache_file(partial, dataset=_metadata_of(cache, usable), feature_shape=cache.feature_shape,
                            dtype=dtype, compression=compression, manifest=manifest,
                            image_bytes=f[L.IMAGE_BYTES][()] if L.IMAGE_BYTES in f else None)
        with CacheWriter(partial, codec_threads=max(1, min(8, (os.cpu_count() or 2) // 2))) as writer:
            rows = np.flatnonzero(cache.done)
            step = max(1, _BLOCK_BYTES // (int(np.prod(cache.feature_shape)) * fm.dtype.itemsize))
            for begin in range(0, len(rows), step):
                block_rows = rows[begin:begin + step]
                block = cache.lazy()[block_rows].numpy()
                if expected is not None:
                    bad = [int(r) for r, row in zip(block_rows, block) if L.row_crc32(row) != expected[r]]
                    if bad:
                        raise CacheError(f"{cache.path}: row(s) {bad[:10]} do not match their checksums; "
                                         "run `msdn cache verify` (nothing was exported)")
                writer.write(block_rows, block.astype(L.DTYPES[dtype], copy=False))
            if cache.skipped.any():
                writer.mark_skipped(np.flatnonzero(cache.skipped))
    os.replace(partial, dest)
    return dest


def _metadata_of(cache: FeatureCache, splits: dict) -> SimpleNamespace:
    """What create_cache_file reads from a dataset, taken from an open cache (and `splits`)."""
    return SimpleNamespace(num_images=cache.num_images, labels=cache.labels, splits=splits, att=cache.att,
                           original_att=cache.original_att, w2v_att=cache.w2v_att,
                           image_paths=cache.image_paths or [""] * cache.num_images,
                           class_names=cache.class_names, attribute_names=cache.attribute_names)


def _compression_of(fm: h5py.Dataset) -> str:
    return fm.compression if fm.compression in ("lzf", "gzip") else "none"


def _compression_of_sources(cache: FeatureCache) -> str:
    base = cache.path.resolve().parent
    for source in cache.file[L.FEATURES].virtual_sources():
        with h5py.File(base / source.file_name, "r") as shard:
            return _compression_of(shard[L.FEATURES])
    return "lzf"


def _bare_manifest() -> dict:
    """Files without a manifest (TransZero's) export with a minimal one."""
    return {"format": L.FORMAT, "content_key": "", "note": "exported from a file without a manifest"}
