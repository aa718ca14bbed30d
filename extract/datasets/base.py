"""The one in-memory description of a ZSL image dataset that every adapter returns.

Row order is the cache's row order: `image_paths[i]`, `labels[i]` and every `*_loc` index refer to
the same row i of `feature_map` in the HDF5 cache (cache/layout.py).
"""
from __future__ import annotations

import hashlib
import json
import os.path
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache.errors import UserError
from cache.layout import REQUIRED_SPLITS
from cache.semantics import att_problem, w2v_problem


class DatasetError(UserError, ValueError):
    """Bad dataset input; the message names the file and the problem."""


@dataclass
class ImageDataset:
    name: str                      # "CUB", "SUN", "AWA2", "APY", "FLO", "CUB100", "demo"
    root: Path                     # image_paths are relative to this folder
    image_paths: list[str]         # N relative paths, cache row order
    labels: np.ndarray             # (N,) int64, 0-based index into the class axis of `att`
    class_names: list[str]         # C names, in `att` class order (never sorted)
    att: np.ndarray                # (C, A) float32, as stored in the cache (xlsa17 `att` transposed)
    original_att: np.ndarray       # (C, A) float32, raw values (AWA: -1 = missing)
    w2v_att: np.ndarray | None     # (A, D) float32 attribute word vectors; None = learn V from random init
    splits: dict[str, np.ndarray]  # REQUIRED_SPLITS (+ OPTIONAL_SPLITS), 0-based int64 row indices
    attribute_names: list[str] | None = None
    boxes: np.ndarray | None = None   # (N, 4) float32 x0, y0, x1, y1 in image pixels (demo only)
    source: dict = field(default_factory=dict)  # where it came from, for the manifest (paths, options)
    # sha256 of the files an adapter read its tables from (the folder adapter's CSVs): part of the
    # fingerprint, so an edited table gives a new content key even where the arrays above do not change
    tables: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.att = np.asarray(self.att, dtype=np.float32)
        self.original_att = np.asarray(self.original_att, dtype=np.float32)
        if self.w2v_att is not None:
            self.w2v_att = np.asarray(self.w2v_att, dtype=np.float32)
        self.splits = {k: np.asarray(v, dtype=np.int64) for k, v in self.splits.items()}
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        n, c = len(self.image_paths), len(self.class_names)
        where = f"dataset {self.name!r}"
        if self.labels.shape != (n,):
            raise DatasetError(f"{where}: {len(self.labels)} labels for {n} images")
        if n and (self.labels.min() < 0 or self.labels.max() >= c):
            raise DatasetError(f"{where}: labels must lie in [0, {c}), got [{self.labels.min()}, {self.labels.max()}]")
        if self.att.ndim != 2 or self.att.shape[0] != c:
            raise DatasetError(f"{where}: att has shape {self.att.shape}, expected ({c}, A)")
        if self.original_att.shape != self.att.shape:
            raise DatasetError(f"{where}: original_att shape {self.original_att.shape} != att shape {self.att.shape}")
        a = self.att.shape[1]
        if self.w2v_att is not None and (self.w2v_att.ndim != 2 or self.w2v_att.shape[0] != a):
            raise DatasetError(f"{where}: word vectors have shape {self.w2v_att.shape}, expected ({a}, D) for {a} attributes")
        problem = att_problem(self.att)
        if problem is not None:  # refused before hours of extraction; the reader would refuse the cache
            raise DatasetError(f"{where}: att row {problem[0]} (class {self.class_names[problem[0]]!r}) {problem[1]}")
        if self.attribute_names is not None and len(self.attribute_names) != a:
            raise DatasetError(f"{where}: {len(self.attribute_names)} attribute names for {a} attributes")
        problem = w2v_problem(self.w2v_att)
        if problem is not None:
            name = self.attribute_names[problem[0]] if self.attribute_names else problem[0]
            raise DatasetError(f"{where}: word vector row {problem[0]} (attribute {name!r}) {problem[1]}")
        if self.boxes is not None and self.boxes.shape != (n, 4):
            raise DatasetError(f"{where}: boxes shape {self.boxes.shape}, expected ({n}, 4)")
        for key in REQUIRED_SPLITS:
            if key not in self.splits:
                raise DatasetError(f"{where}: split {key!r} is missing")
        for key, loc in self.splits.items():
            if loc.ndim != 1 or (loc.size and (loc.min() < 0 or loc.max() >= n)):
                raise DatasetError(f"{where}: split {key!r} indexes outside [0, {n})")

    # ------------------------------------------------------------------ derived
    @property
    def num_images(self) -> int:
        return len(self.image_paths)

    @property
    def seen_classes(self) -> np.ndarray:
        return np.unique(self.labels[self.splits["trainval_loc"]])

    @property
    def unseen_classes(self) -> np.ndarray:
        return np.unique(self.labels[self.splits["test_unseen_loc"]])

    def image_file(self, i: int) -> Path:
        return self.root / self.image_paths[i]

    def check_files(self) -> list[str]:
        """Preflight for the extractor: the full paths of every image file that does not exist."""
        # os.path.isfile on str is the cheapest per-file check (37k AWA2 paths in ~0.1 s).
        root = str(self.root)
        return [p for p in (os.path.join(root, rel) for rel in self.image_paths) if not os.path.isfile(p)]

    def fingerprint(self) -> dict[str, str]:
        """sha256 hashes of everything that defines the dataset's content (for the manifest). `tables`
        enters only when an adapter sets it, so the keys of the other datasets' caches stay as they were."""
        hashes = {
            "images": _sha256_json([self.image_paths, self.labels.tolist()]),
            "splits": _sha256_json({k: v.tolist() for k, v in sorted(self.splits.items())}),
            "att": _sha256_array(self.att),
            "original_att": _sha256_array(self.original_att),
            "w2v_att": _sha256_array(self.w2v_att) if self.w2v_att is not None else "none",
        }
        if self.tables:
            hashes["tables"] = _sha256_json(dict(sorted(self.tables.items())))
        return hashes


def check_image_files(dataset: ImageDataset) -> list[str]:
    """Missing image files of `dataset` (full paths); empty when all exist."""
    return dataset.check_files()


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _sha256_array(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()
