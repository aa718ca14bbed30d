"""The content key: one sha256 over what defines a cache's stored values, so that two caches with
the same key hold the same maps (extract/manifest.py builds the manifest it hashes).

Hashed: the backbone description without where the weights file lies, the feature shape, dtype,
dataset name and fingerprint, the image file sizes (a cheap guard against an image replaced under
the same name) and, only when on, that the flipped images' maps are stored too (`--flip`).
Package versions, timestamps, paths and compression are left out, so asking again with the same
inputs finds the finished file, and any input change gives a different key.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from cache.layout import DTYPES, FORMAT_VERSION

# describe() fields that say where the weights came from, not what they are (weights_sha256 is kept),
# and facts that follow from the backbone's name (native_resolution) or are package versions
# (timm_version, like torch's): recorded, not hashed, so adding such a record keeps old keys valid.
_PROVENANCE_FIELDS = ("weights", "weights_source", "weights_file", "native_resolution", "timm_version")


def sizes_sha256(sizes: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(sizes, dtype="<i8").tobytes()).hexdigest()


def content_part(backbone: dict, feature_shape, dtype: str, dataset_name: str, fingerprint: dict,
                 image_sizes: str, flipped: bool = False) -> dict:
    """The content-defining part of a manifest (what `content_key` hashes); image_sizes = sizes_sha256.
    `flipped` (the file also holds the flipped images' maps) is recorded only when true, so every
    cache without them keeps the key it always had."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    part = {
        "format_version": FORMAT_VERSION,
        "backbone": {k: v for k, v in backbone.items() if k not in _PROVENANCE_FIELDS},
        "feature_shape": [int(x) for x in feature_shape],
        "dtype": dtype,
        "dataset": {"name": dataset_name, "fingerprint": dict(fingerprint), "image_sizes": image_sizes},
    }
    if flipped:
        part["flipped"] = True
    return part


def content_key(manifest: dict) -> str:
    """sha256 over the content-defining part of a manifest built by `build_manifest`."""
    return hashlib.sha256(json.dumps(manifest["content"], sort_keys=True).encode()).hexdigest()
