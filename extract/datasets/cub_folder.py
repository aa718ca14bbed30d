"""CUB-style image folders with an xlsa17 seen/unseen split, e.g. the CUB-100 test-data subset ("CUB100").

Files in `root`: images.txt, image_class_labels.txt, classes.txt, train_test_split.txt (space- or
comma-separated), images/<path in images.txt>, and a split JSON (default `zsl_split_xlsa17_PS.json`)
with `seen_subset_class_ids`, `unseen_subset_class_ids` and `subset_to_xlsa17_class_index`: the
latter picks each folder class's column of CUB's xlsa17 `att`. Protocol (docs/method.md): trainval =
seen-class images with flag 1, test_seen = seen-class images with flag 0, test_unseen = every
unseen-class image; train/val = seen classes with a fixed part held out as pseudo-unseen.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from cache.layout import make_validation_split

from .base import DatasetError, ImageDataset
from .cub_files import read_cub_index
from .splits import rows_of_classes
from .xlsa17_files import load_semantics, read_class_list, resolve_roots

DEFAULT_SPLIT_JSON = "zsl_split_xlsa17_PS.json"
DEFAULT_FOLDER = "cub100_subset"


def load_cub_folder(root: str | Path | None = None, data_root: str | Path | None = None,
                    xlsa17_root: str | Path | None = None, w2v_root: str | Path | None = None,
                    split_json: str | Path | None = None, max_per_class: int | None = None,
                    val_fraction: float = 0.2, split_seed: int = 0, w2v: str = "auto",
                    name: str = "CUB100") -> ImageDataset:
    """`root`: the folder with images.txt (default `<data_root>/cub100_subset`); xlsa17/word-vector
    folders default to the layout around it (`<data_root>/xlsa17`, `<data_root>/attribute_w2v`)."""
    if root is None and data_root is None:
        raise DatasetError(f"{name}: pass root=<folder with images.txt> or data_root=<folder holding {DEFAULT_FOLDER}/>")
    root = Path(root) if root is not None else Path(data_root) / DEFAULT_FOLDER
    data_root = Path(data_root) if data_root is not None else root.parent
    if not (root / "images.txt").is_file():
        raise DatasetError(f"{root / 'images.txt'}: file not found (is {root} a CUB-style folder?)")
    if max_per_class is not None and max_per_class < 1:
        raise DatasetError(f"max_per_class must be >= 1 or None, got {max_per_class}")
    xlsa17_root, w2v_root = resolve_roots(data_root, xlsa17_root, w2v_root)
    semantics = load_semantics("CUB", xlsa17_root, w2v_root, w2v)
    index = read_cub_index(root, with_split=True)
    num_classes = len(index.class_names)
    if sorted(index.class_names) != list(range(num_classes)):
        raise DatasetError(f"{root / 'classes.txt'}: class ids must be 0..{num_classes - 1} (the split JSON indexes them)")
    split_path = Path(split_json) if split_json is not None else root / DEFAULT_SPLIT_JSON
    seen, unseen, to_xlsa17 = _read_split_json(split_path, num_classes, len(semantics.class_names))
    class_names = [index.class_names[c] for c in range(num_classes)]
    _check_names(class_names, [semantics.class_names[i] for i in to_xlsa17], root / "classes.txt", split_path)
    _check_seen_are_xlsa17_seen(seen, to_xlsa17, semantics.class_names, xlsa17_root / "CUB", split_path)

    labels, is_train = index.class_ids, index.is_train
    rows = np.arange(len(labels))
    if max_per_class is not None:
        rows = _subsample(labels, is_train, max_per_class, split_seed)
    labels, is_train = labels[rows], is_train[rows]
    seen_rows = np.isin(labels, seen)
    trainval = np.flatnonzero(seen_rows & is_train)
    test_seen = np.flatnonzero(seen_rows & ~is_train)
    empty = [int(c) for c in seen if not np.any(labels[trainval] == c)]
    if empty:
        raise DatasetError(f"{root / 'train_test_split.txt'}: seen classes {empty[:5]} have no training (flag 1) image")
    train, val = make_validation_split(labels, trainval, fraction=val_fraction, seed=split_seed)
    splits = {"trainval_loc": trainval, "test_seen_loc": test_seen,
              "test_unseen_loc": rows_of_classes(labels, unseen), "train_loc": train, "val_loc": val}
    source = {"adapter": "cub_folder", "root": str(root), "split_json": str(split_path),
              "att_splits": str(semantics.splits.path), "w2v_att": semantics.w2v_path,
              "max_per_class": max_per_class, "split_seed": split_seed, "val_fraction": val_fraction,
              "protocol": "trainval = seen & flag 1, test_seen = seen & flag 0, test_unseen = unseen; "
                          "train/val = make_validation_split over trainval"}
    return ImageDataset(name=name, root=root / "images", image_paths=[index.image_paths[i] for i in rows],
                        labels=labels, class_names=class_names, att=semantics.splits.att[to_xlsa17],
                        original_att=semantics.splits.original_att[to_xlsa17], w2v_att=semantics.w2v_att,
                        splits=splits, attribute_names=semantics.attribute_names, source=source)


def _read_split_json(path: Path, num_classes: int, num_xlsa17: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"{path}: split file not found (pass split_json=)")
    try:
        spec = json.loads(path.read_text())
        seen = np.array(spec["seen_subset_class_ids"], dtype=np.int64)
        unseen = np.array(spec["unseen_subset_class_ids"], dtype=np.int64)
        to_xlsa17 = np.array(spec["subset_to_xlsa17_class_index"], dtype=np.int64)
    except (ValueError, KeyError, TypeError) as err:
        raise DatasetError(f"{path}: not a seen/unseen split JSON ({type(err).__name__}: {err})") from None
    if sorted(np.concatenate([seen, unseen]).tolist()) != list(range(num_classes)):
        raise DatasetError(f"{path}: seen and unseen ids must split the {num_classes} classes of classes.txt exactly once")
    if to_xlsa17.shape != (num_classes,) or to_xlsa17.min() < 0 or to_xlsa17.max() >= num_xlsa17:
        raise DatasetError(f"{path}: subset_to_xlsa17_class_index needs {num_classes} indices in [0, {num_xlsa17})")
    if len(np.unique(to_xlsa17)) != num_classes:
        raise DatasetError(f"{path}: subset_to_xlsa17_class_index maps two classes to the same xlsa17 class")
    return seen, unseen, to_xlsa17


def _check_names(names: list[str], xlsa17_names: list[str], classes_path: Path, split_path: Path) -> None:
    bad = [(n, x) for n, x in zip(names, xlsa17_names) if n != re.sub(r"^\d+\.", "", x)]
    if bad:
        raise DatasetError(f"{classes_path}: {len(bad)} class names differ from the xlsa17 names that {split_path.name} "
                           f"maps them to, e.g. {bad[0][0]!r} -> {bad[0][1]!r}")


def _check_seen_are_xlsa17_seen(seen: np.ndarray, to_xlsa17: np.ndarray, xlsa17_names: list[str],
                                cub_dir: Path, split_path: Path) -> None:
    """A folder seen class that is unseen in xlsa17 would leak test classes into training."""
    if not (cub_dir / "trainvalclasses.txt").is_file():
        return
    xlsa17_seen = set(read_class_list(cub_dir / "trainvalclasses.txt"))
    wrong = [int(c) for c in seen if xlsa17_names[to_xlsa17[c]] not in xlsa17_seen]
    if wrong:
        raise DatasetError(f"{split_path}: seen classes {wrong[:5]} are not xlsa17 trainval classes")


def _subsample(labels: np.ndarray, is_train: np.ndarray, k: int, seed: int) -> np.ndarray:
    """At most k rows per class, keeping each class's train/test flag ratio (and >= 1 of each flag)."""
    keep = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) <= k:
            keep.append(rows)
            continue
        flagged, unflagged = rows[is_train[rows]], rows[~is_train[rows]]
        n_flag = int(round(k * len(flagged) / len(rows)))
        n_flag = min(len(flagged), max(n_flag, 1 if len(flagged) else 0, k - len(unflagged)))
        if k > 1 and len(unflagged) and n_flag == k:
            n_flag = k - 1
        rng = np.random.default_rng([seed, int(c)])
        keep += [rng.permutation(flagged)[:n_flag], rng.permutation(unflagged)[:k - n_flag]]
    return np.sort(np.concatenate(keep))
