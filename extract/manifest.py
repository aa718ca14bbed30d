"""What produced a feature cache: the manifest records everything (backbone, weights hash,
preprocessing, dtype, storage, dataset fingerprint, package versions, time); its content key
(cache/keys.py) hashes only what defines the stored values.
"""
from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from importlib import metadata

import numpy as np

from cache.keys import content_key, content_part, sizes_sha256
from cache.layout import FORMAT


def image_file_sizes(dataset) -> np.ndarray:
    """Byte size of every image, in row order (stat only: 37k files in well under a second)."""
    root = str(dataset.root)
    return np.array([os.stat(os.path.join(root, rel)).st_size for rel in dataset.image_paths], dtype=np.int64)


def build_manifest(dataset, spec, *, dtype: str = "float16", compression: str = "lzf",
                   compute: dict | None = None, backbone_description: dict | None = None,
                   image_sizes: np.ndarray | None = None, flipped: bool = False) -> dict:
    """Full manifest for extracting `dataset` with backbone `spec`. `compute` records how it ran
    (device, autocast dtype, batch size): provenance only. `image_sizes`: image_file_sizes(dataset),
    when the caller already has them. `flipped`: the file also holds the flipped images' maps (a
    different content key)."""
    from extract.backbones import describe, feature_shape

    backbone = backbone_description if backbone_description is not None else describe(spec)
    content = content_part(backbone, feature_shape(spec), dtype, dataset.name, dataset.fingerprint(),
                           sizes_sha256(image_file_sizes(dataset) if image_sizes is None else image_sizes),
                           flipped=flipped)
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
