"""Readers for CUB-200-2011-style index files (`images.txt`, `image_class_labels.txt`, `classes.txt`,
`train_test_split.txt`), shared by the xlsa17 CUB adapter and the CUB-style folder adapter.

Each file maps an integer id to one value per line. The original CUB release separates the two
columns with a space (`1 001.Black_footed_Albatross/...jpg`); some copies use `0, name`. The
separator is detected per file from its first line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import DatasetError


def read_id_table(path: Path) -> dict[int, str]:
    """`<int id><sep><value>` per line -> {id: value}, keeping file order; sep is ',' or whitespace."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise DatasetError(f"{path}: file is empty")
    comma = "," in lines[0]
    table: dict[int, str] = {}
    for number, line in enumerate(lines, start=1):
        parts = line.split(",", 1) if comma else line.split(None, 1)
        if len(parts) != 2 or not parts[0].strip().lstrip("-").isdigit():
            raise DatasetError(f"{path}: line {number} is not '<id>{', ' if comma else ' '}<value>': {line[:80]!r}")
        key = int(parts[0])
        if key in table:
            raise DatasetError(f"{path}: line {number}: id {key} appears twice")
        table[key] = parts[1].strip()
    return table


@dataclass
class CubIndex:
    """One row per image, in `images.txt` order."""
    image_ids: np.ndarray           # (N,) int64 ids as written in images.txt
    image_paths: list[str]          # relative to the `images/` folder
    class_ids: np.ndarray           # (N,) int64 class ids as written in image_class_labels.txt
    class_names: dict[int, str]     # class id -> name, classes.txt order
    is_train: np.ndarray | None     # (N,) bool flag of train_test_split.txt (None when not read)


def read_cub_index(folder: Path, with_split: bool = False) -> CubIndex:
    folder = Path(folder)
    images = read_id_table(folder / "images.txt")
    labels = read_id_table(folder / "image_class_labels.txt")
    classes = read_id_table(folder / "classes.txt")
    ids = np.fromiter(images.keys(), dtype=np.int64, count=len(images))
    _require_same_ids(ids, labels, folder / "image_class_labels.txt")
    try:
        class_ids = np.array([int(labels[i]) for i in ids], dtype=np.int64)
    except ValueError:
        raise DatasetError(f"{folder / 'image_class_labels.txt'}: class ids must be integers") from None
    unknown = sorted(set(class_ids.tolist()) - set(classes))
    if unknown:
        raise DatasetError(f"{folder / 'image_class_labels.txt'}: class ids {unknown[:5]} are not in classes.txt")
    is_train = None
    if with_split:
        flags = read_id_table(folder / "train_test_split.txt")
        _require_same_ids(ids, flags, folder / "train_test_split.txt")
        bad = sorted({v for v in flags.values() if v not in ("0", "1")})
        if bad:
            raise DatasetError(f"{folder / 'train_test_split.txt'}: flags must be 0 or 1, found {bad[:5]}")
        is_train = np.array([flags[i] == "1" for i in ids], dtype=bool)
    return CubIndex(ids, list(images.values()), class_ids, classes, is_train)


def _require_same_ids(ids: np.ndarray, table: dict[int, str], path: Path) -> None:
    missing = [int(i) for i in ids if int(i) not in table]
    if missing:
        raise DatasetError(f"{path}: no entry for image ids {missing[:5]} (of {len(missing)} missing) listed in images.txt")
