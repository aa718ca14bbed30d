"""What produced a feature cache, and the content key that says whether two caches hold the same maps.

The manifest records everything (backbone, weights hash, preprocessing, dtype, storage, dataset
fingerprint, package versions, time). The content key hashes only what defines the stored values:
backbone description (without where the weights file lies), dtype, dataset name and fingerprint, and
the image file sizes (a cheap guard against an image replaced under the same name). Package versions,
timestamps, paths and compression are recorded but left out of the key, so asking again with the same
inputs finds the finished file, and any input change gives a different key.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from datetime import datetime, timezone
from importlib import metadata

import numpy as np

from cache.layout import DTYPES, FORMAT, FORMAT_VERSION

# describe() fields that say where the weights came from, not what they are (weights_sha256 is kept),
# and facts that follow from the backbone's name (native_resolution) or are package versions
# (timm_version, like torch's): recorded, not hashed, so adding such a record keeps old keys valid.
_PROVENANCE_FIELDS = ("weights", "weights_source", "weights_file", "native_resolution", "timm_version")


def image_file_sizes(dataset) -> np.ndarray:
    """Byte size of every image, in row order (stat only: 37k files in well under a second)."""
    root = str(dataset.root)
    return np.array([os.stat(os.path.join(root, rel)).st_size for rel in dataset.image_paths], dtype=np.int64)


def sizes_sha256(sizes: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(sizes, dtype="<i8").tobytes()).hexdigest()


def content_part(backbone: dict, feature_shape, dtype: str, dataset_name: str, fingerprint: dict,
                 image_sizes: str) -> dict:
    """The content-defining part of a manifest (what `content_key` hashes); image_sizes = sizes_sha256."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return {
        "format_version": FORMAT_VERSION,
        "backbone": {k: v for k, v in backbone.items() if k not in _PROVENANCE_FIELDS},
        "feature_shape": [int(x) for x in feature_shape],
        "dtype": dtype,
        "dataset": {"name": dataset_name, "fingerprint": dict(fingerprint), "image_sizes": image_sizes},
    }


def content_key(manifest: dict) -> str:
    """sha256 over the content-defining part of a manifest built by `build_manifest`."""
    return hashlib.sha256(json.dumps(manifest["content"], sort_keys=True).encode()).hexdigest()


def build_manifest(dataset, spec, *, dtype: str = "float16", compression: str = "lzf",
                   compute: dict | None = None, backbone_description: dict | None = None,
                   image_sizes: np.ndarray | None = None) -> dict:
    """Full manifest for extracting `dataset` with backbone `spec`. `compute` records how it ran
    (device, autocast dtype, batch size): provenance only. `image_sizes`: image_file_sizes(dataset),
    when the caller already has them."""
    from extract.backbones import describe, feature_shape

    backbone = backbone_description if backbone_description is not None else describe(spec)
    content = content_part(backbone, feature_shape(spec), dtype, dataset.name, dataset.fingerprint(),
                           sizes_sha256(image_file_sizes(dataset) if image_sizes is None else image_sizes))
    manifest = {
        "format": FORMAT,
        "content": content,
        "backbone": backbone,
        "dtype": dtype,
        "compression": compression,
        "dataset": {
            "name": dataset.name,
            "num_images": dataset.num_images,
            "num_classes": len(dataset.class_names),
            "num_attributes": int(dataset.att.shape[1]),
            "word_vector_dim": None if dataset.w2v_att is None else int(dataset.w2v_att.shape[1]),
            "root": str(dataset.root),
            "source": _jsonable(dataset.source),
        },
        "compute": compute or {},
        "software": package_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    manifest["content_key"] = content_key(manifest)
    return manifest


def package_versions() -> dict:
    """Versions as the modules report them (torch's includes its CUDA build, e.g. 2.4.1+cu121)."""
    import h5py
    import numpy
    import PIL
    import torch
    import torchvision

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "torchvision": torchvision.__version__, "h5py": h5py.__version__,
                "hdf5": h5py.version.hdf5_version, "numpy": numpy.__version__, "pillow": PIL.__version__}
    try:
        versions["msdn-zsl"] = metadata.version("msdn-zsl")
    except metadata.PackageNotFoundError:  # running from a checkout that is not installed
        versions["msdn-zsl"] = None
    return versions


def _jsonable(obj):
    """Dataset `source` records may hold Paths or numpy scalars; keep them readable in JSON."""
    return json.loads(json.dumps(obj, default=str))
