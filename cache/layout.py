"""The feature cache file: key names, dataset layout and creation (docs/extracting.md, docs/method.md "Data").

One HDF5 file per (dataset, backbone, image size). N images, C_cls classes, A attributes, D = word
vector size, (C, H, W) = the backbone's feature map shape.

    key              shape          dtype        storage
    feature_map      (N, C, H, W)   float16 | float32   chunks (1, C, H, W) = one image per chunk;
                                                 lzf | gzip (level 4) | none; fill value 0
    labels           (N,)           int64        0-based index into the class axis of `att`
    trainval_loc     (n,)           int64        0-based rows (as TransZero writes them)
    test_seen_loc    (n,)           int64        0-based rows
    test_unseen_loc  (n,)           int64        0-based rows
    train_loc        (n,)           int64        0-based rows (ours: validation protocol)
    val_loc          (n,)           int64        0-based rows (ours: validation classes play unseen)
    att              (C_cls, A)     float32      xlsa17 `att` transposed (class rows L2-normalised)
    original_att     (C_cls, A)     float32      raw class attributes (AWA: -1 = missing)
    w2v_att          (A, D)         float32      attribute word vectors; ABSENT when the dataset has none
    image_paths      (N,)           utf-8 str    image path relative to the dataset root
    class_names      (C_cls,)       utf-8 str    class names, `att` order; ABSENT in older and TransZero files
    attribute_names  (A,)           utf-8 str    attribute names; ABSENT where the dataset has none (and in
                                                 older files): readers fall back to "class i", "attribute i"
    image_bytes      (N,)           int64        image file size when extracted: `--resume` recomputes
                                                 the rows whose image changed since (see engine)
    done             (N,)           bool         row i holds valid features (set only after its data
                                                 was written and flushed)
    skipped          (N,)           bool         row i's image was unreadable under --skip-bad: its
                                                 features stay zero and done[i] stays False, and the
                                                 finished file's split locations leave row i out
                                                 (`--resume` puts it back once its image reads)
    row_crc32        (N,)           uint32       zlib.crc32 of row i's values as stored (C order,
                                                 little-endian, before compression), written with the
                                                 row and flushed before done[i]; `msdn cache verify`
                                                 re-reads every row against it. Independent of the
                                                 compression, so it survives recompression and export.
                                                 ABSENT in TransZero's and older files ("no checksums").
    feature_map_flipped (N, C, H, W) as feature_map: the map of the horizontally flipped image
                                                 (`msdn extract --flip`); ABSENT otherwise. Written
                                                 with feature_map, before done[i]: done covers both.
    row_crc32_flipped (N,)         uint32       row_crc32 of feature_map_flipped; present with it
    attrs["manifest"]     JSON string: see extract/manifest.py (backbone, dtype, dataset fingerprint,
                                       package versions, content_key)
    attrs["content_key"]  sha256 hex of the content-defining part of the manifest
    attrs["format"], attrs["format_version"]  "msdn-feature-cache", FORMAT_VERSION

The first eight keys are exactly TransZero's `preprocessing.py` output, so MSDN/TransZero loaders read
our files (they need `--dtype float32`: their test-time code does not cast float16 features), and
our reader accepts theirs (float32/float64, gzip, no manifest, no done mask = complete).

Files use the HDF5 1.10 format (libver v110, superblock 3): readable by any HDF5 >= 1.10 (h5py >= 2.7
builds), and required for single-writer/multiple-reader (SWMR) writing, which keeps the file
consistent on disk at every moment, so a kill -9 never leaves an unreadable file (cache/writer.py;
`open_readonly` reads such a file, whose 'being written' flag a killed writer could not clear).
`class_names` / `attribute_names` came later too, outside the content key: names are for display and do
not define a stored value (a folder dataset's CSVs, which hold them, are hashed already), and hashing
them would have changed every existing key. `row_crc32` came after FORMAT_VERSION 1 without a bump on purpose: the version is part of the content
key (extract/manifest.py) and the stored values did not change, so older files keep their keys and
stay resumable; the writer fills checksums only where the key exists.

A file is created complete with every key (metadata filled in, done all False) under a temporary
name and renamed into place, so a crash during creation leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import h5py
import numpy as np

FORMAT = "msdn-feature-cache"
FORMAT_VERSION = 1
LIBVER = ("v110", "v110")

FEATURES = "feature_map"
LABELS = "labels"
REQUIRED_SPLITS = ("trainval_loc", "test_seen_loc", "test_unseen_loc")
OPTIONAL_SPLITS = ("train_loc", "val_loc")

ATT = "att"
ORIGINAL_ATT = "original_att"
W2V = "w2v_att"
IMAGE_PATHS = "image_paths"
CLASS_NAMES = "class_names"
ATTRIBUTE_NAMES = "attribute_names"
IMAGE_BYTES = "image_bytes"
DONE = "done"
SKIPPED = "skipped"
ROW_CRC32 = "row_crc32"
FLIPPED_FEATURES = "feature_map_flipped"
FLIPPED_ROW_CRC32 = "row_crc32_flipped"
# Each stored map with its checksum key: the original, and (--flip) the flipped image's.
MAP_KEYS = ((FEATURES, ROW_CRC32), (FLIPPED_FEATURES, FLIPPED_ROW_CRC32))
MANIFEST_ATTR = "manifest"
CONTENT_KEY_ATTR = "content_key"

COMPRESSIONS = ("lzf", "gzip", "none")
DTYPES = {"float16": np.float16, "float32": np.float32}
GZIP_LEVEL = 4  # h5py's and TransZero's default


def make_validation_split(labels: np.ndarray, trainval_loc: np.ndarray, fraction: float = 0.2,
                          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a fixed part of the seen classes as pseudo-unseen validation classes.

    Returns (train_loc, val_loc): images of the remaining seen classes, and images of the held-out
    ones, as xlsa17's train_loc/val_loc. Deterministic in (labels, trainval_loc, fraction, seed).
    The one place this split is made: adapters whose files lack one call it when they build a
    dataset, and training calls it for caches that hold no val_loc.
    """
    seen = np.unique(labels[trainval_loc])
    n_val = max(1, int(round(fraction * len(seen))))
    val_classes = np.sort(np.random.default_rng(seed).permutation(seen)[:n_val])
    is_val = np.isin(labels[trainval_loc], val_classes)
    return np.sort(trainval_loc[~is_val]), np.sort(trainval_loc[is_val])


def partial_path(out: str | Path) -> Path:
    """Where an unfinished extraction lives until it is complete and renamed to `out`."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def compression_options(compression: str) -> dict:
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if compression == "none":
        return {}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": GZIP_LEVEL}
    return {"compression": "lzf"}


def create_cache_file(path: str | Path, *, dataset, feature_shape: tuple[int, int, int], dtype: str,
                      compression: str, manifest: dict, image_bytes: np.ndarray | None = None,
                      flipped: bool = False) -> Path:
    """Create `path` with every key, metadata filled in and no row done. Atomic: the file appears
    under its name only once fully written. `flipped`: also the flipped images' maps (--flip)."""
    path = Path(path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    n, (c, h, w) = dataset.num_images, feature_shape
    tmp = path.with_name(path.name + ".creating")
    path.parent.mkdir(parents=True, exist_ok=True)  # `--out runs/new/cub.h5` makes runs/new
    with h5py.File(tmp, "w", libver=LIBVER) as f:
        for key, _ in MAP_KEYS[:2 if flipped else 1]:
            f.create_dataset(key, shape=(n, c, h, w), dtype=DTYPES[dtype], chunks=(1, c, h, w),
                             fillvalue=0, **compression_options(compression))
        f.create_dataset(LABELS, data=dataset.labels.astype(np.int64))
        for key in REQUIRED_SPLITS + OPTIONAL_SPLITS:
            if key in dataset.splits:
                f.create_dataset(key, data=dataset.splits[key].astype(np.int64))
        f.create_dataset(ATT, data=dataset.att.astype(np.float32))
        f.create_dataset(ORIGINAL_ATT, data=dataset.original_att.astype(np.float32))
        if dataset.w2v_att is not None:
            f.create_dataset(W2V, data=dataset.w2v_att.astype(np.float32))
        f.create_dataset(IMAGE_PATHS, data=list(dataset.image_paths), dtype=h5py.string_dtype("utf-8"))
        for key, names in ((CLASS_NAMES, getattr(dataset, "class_names", None)),
                           (ATTRIBUTE_NAMES, getattr(dataset, "attribute_names", None))):
            if names is not None:
                f.create_dataset(key, data=[str(n) for n in names], dtype=h5py.string_dtype("utf-8"))
        sizes = np.full(n, -1, np.int64) if image_bytes is None else np.asarray(image_bytes, np.int64)
        f.create_dataset(IMAGE_BYTES, data=sizes)
        # Allocated now (data=...), so that marking rows later only rewrites bytes in place.
        f.create_dataset(DONE, data=np.zeros(n, dtype=bool))
        f.create_dataset(SKIPPED, data=np.zeros(n, dtype=bool))
        for _, crc_key in MAP_KEYS[:2 if flipped else 1]:
            f.create_dataset(crc_key, data=np.zeros(n, dtype=np.uint32))
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs[MANIFEST_ATTR] = json.dumps(manifest, sort_keys=True)
        f.attrs[CONTENT_KEY_ATTR] = manifest["content_key"]
    os.replace(tmp, path)
    return path


def usable_locations(splits: dict, skipped: np.ndarray) -> dict:
    """The split locations without the rows recorded as skipped (their maps are all zero): what the
    file's trainval_loc & co. hold, since MSDN/TransZero's own loaders read them as they are."""
    skipped = np.asarray(skipped, dtype=bool)
    return {k: np.asarray(v, dtype=np.int64)[~skipped[np.asarray(v, dtype=np.int64)]] for k, v in splits.items()}


def write_locations(f: h5py.File, splits: dict) -> None:
    """Replace the split keys of an open (not SWMR) file by `splits` where they differ."""
    for key in REQUIRED_SPLITS + OPTIONAL_SPLITS:
        if key not in splits:
            continue
        data = np.asarray(splits[key], dtype=np.int64)
        if key in f and f[key].shape == data.shape and np.array_equal(f[key][()], data):
            continue
        if key in f:
            del f[key]
        f.create_dataset(key, data=data)


def dropped_counts(splits: dict, usable: dict) -> str:
    """'trainval_loc 1, test_unseen_loc 1': rows each split lost."""
    return ", ".join(f"{k} {len(splits[k]) - len(usable[k])}" for k in splits if len(splits[k]) != len(usable[k]))


def row_crc32(row: np.ndarray, dtype=None) -> int:
    """The checksum `row_crc32` holds for one row: crc32 of its bytes in the stored dtype (little-endian)."""
    row = np.ascontiguousarray(row, dtype=np.dtype(dtype or row.dtype).newbyteorder("<"))
    return zlib.crc32(row.view(np.uint8).reshape(-1))


def open_readonly(path: str | Path) -> h5py.File:
    """Open for reading; also opens a file whose SWMR writer was killed (its 'open for writing' flag
    is still set, which makes a plain open fail although the data on disk is consistent)."""
    try:
        return h5py.File(path, "r")
    except OSError as err:
        if not is_writer_flag_error(err):
            raise
    return h5py.File(path, "r", libver=LIBVER, swmr=True)


def is_writer_flag_error(err: OSError) -> bool:
    return "consistency flags" in str(err) or "already open for write" in str(err)
