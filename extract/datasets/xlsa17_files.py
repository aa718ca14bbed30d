"""Readers for the xlsa17 split files and the attribute word vectors (docs/method.md)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..safe_pickle import UnsafePickleError, load_numpy_pickle
from .base import DatasetError

LOCATION_KEYS = ("trainval_loc", "test_seen_loc", "test_unseen_loc", "train_loc", "val_loc")
# AWA1 has the same 85 predicates (identical att matrix) as AWA2, so AWA2's word vectors apply.
W2V_NAMES = {"AWA1": ["AWA1", "AWA2"]}
# FLO (sentence embeddings) and APY have no published attribute word vectors (docs/method.md).
W2V_OPTIONAL = ("FLO", "APY")


@dataclass
class AttSplits:
    path: Path
    att: np.ndarray                     # (C, A): xlsa17 `att` transposed
    original_att: np.ndarray            # (C, A); equals att where the file has no original_att (FLO)
    class_names: list[str] | None       # allclasses_names order; None when the file has none (FLO)
    locations: dict[str, np.ndarray] = field(default_factory=dict)  # 0-based

    @property
    def num_classes(self) -> int:
        return self.att.shape[0]


@dataclass
class Semantics:
    """Everything of one xlsa17 benchmark that does not depend on the images."""
    splits: AttSplits
    class_names: list[str]
    w2v_att: np.ndarray | None
    w2v_path: str | None
    attribute_names: list[str] | None


def resolve_roots(data_root: Path, xlsa17_root, w2v_root) -> tuple[Path, Path | None]:
    """Defaults follow TransZero's layout (data/xlsa17/data, w2v/) and the test-data folder's (xlsa17, attribute_w2v)."""
    data_root = Path(data_root)
    xlsa17_root = Path(xlsa17_root) if xlsa17_root else (
        first_existing(data_root / "xlsa17" / "data", data_root / "xlsa17") or data_root / "xlsa17")
    w2v_root = Path(w2v_root) if w2v_root else first_existing(
        data_root / "w2v", data_root / "attribute_w2v", data_root.parent / "w2v")
    return xlsa17_root, w2v_root


def load_semantics(name: str, xlsa17_root: Path, w2v_root: Path | None, w2v: str = "auto") -> Semantics:
    """att_splits.mat + word vectors + attribute names; `w2v`: "auto" (find them) or "none"."""
    if w2v not in ("auto", "none"):
        raise DatasetError(f"w2v {w2v!r}: expected 'auto' or 'none'")
    att_path = Path(xlsa17_root) / name / "att_splits.mat"
    if not att_path.is_file():
        raise DatasetError(f"{att_path}: xlsa17 split file not found; pass --xlsa17-root <folder holding "
                           f"{name}/att_splits.mat> (xlsa17_root= in Python; xlsa17.zip unpacks to xlsa17/data)")
    splits = load_att_splits(att_path)
    class_names = splits.class_names or [f"class_{i + 1:03d}" for i in range(splits.num_classes)]
    num_attributes = splits.att.shape[1]
    w2v_att, w2v_path = (None, None) if w2v == "none" else load_word_vectors(
        w2v_root, W2V_NAMES.get(name, [name]), num_attributes, required=name not in W2V_OPTIONAL)
    return Semantics(splits, class_names, w2v_att, w2v_path,
                     load_attribute_names(w2v_root, name, num_attributes))


def load_mat(path: Path, keys: list[str] | None = None) -> dict:
    import scipy.io  # imported here: only the xlsa17 adapters need scipy

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        mat = scipy.io.loadmat(str(path), variable_names=keys)
    except Exception as err:  # scipy raises several types for corrupt / v7.3 files
        raise DatasetError(f"{path}: cannot read as a MATLAB v5 file ({type(err).__name__}: {err})") from None
    return {k: v for k, v in mat.items() if not k.startswith("__")}


def mat_strings(cells: np.ndarray) -> list[str]:
    """A MATLAB cell array of strings (loadmat: object array of 1-element str arrays) -> list[str]."""
    return [str(np.asarray(cell).ravel()[0]) if np.asarray(cell).size else "" for cell in np.ravel(cells)]


def load_att_splits(path: Path) -> AttSplits:
    mat = load_mat(path)
    for key in ("att", "trainval_loc", "test_seen_loc", "test_unseen_loc"):
        if key not in mat:
            raise DatasetError(f"{path}: key {key!r} is missing (found {sorted(mat)})")
    att = np.asarray(mat["att"], dtype=np.float64).T
    original = np.asarray(mat["original_att"], dtype=np.float64).T if "original_att" in mat else att
    names = mat_strings(mat["allclasses_names"]) if "allclasses_names" in mat else None
    if names is not None and len(names) != att.shape[0]:
        raise DatasetError(f"{path}: {len(names)} allclasses_names for {att.shape[0]} classes in att")
    locations = {key: matlab_locations(mat[key], path, key) for key in LOCATION_KEYS if key in mat}
    return AttSplits(Path(path), att, original, names, locations)


def matlab_locations(values: np.ndarray, path: Path, key: str) -> np.ndarray:
    """1-based MATLAB indices -> 0-based int64."""
    loc = np.asarray(values).astype(np.int64).ravel()
    if loc.size and loc.min() < 1:
        raise DatasetError(f"{path}: {key} holds index {loc.min()}; MATLAB locations are 1-based")
    return loc - 1


def read_class_list(path: Path) -> list[str]:
    if not Path(path).is_file():
        raise DatasetError(f"{path}: file not found")
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def load_word_vectors(w2v_root: Path | None, names: list[str], num_attributes: int,
                      required: bool) -> tuple[np.ndarray | None, str | None]:
    """Find `<name>_attribute_w2v.npy` or `<name>_attribute.pkl` for the first name that has one.

    Returns (array (A, D) float64, path) or (None, None) when none exists and not `required`.
    """
    tried = []
    for name in names:
        for file in (f"{name}_attribute_w2v.npy", f"{name}_attribute.pkl"):
            path = Path(w2v_root) / file if w2v_root is not None else None
            if path is None or not path.is_file():
                tried.append(file)
                continue
            try:
                w2v = load_numpy_pickle(path)
            except UnsafePickleError as err:
                raise DatasetError(str(err)) from None
            if w2v.ndim != 2 or w2v.shape[0] != num_attributes:
                raise DatasetError(f"{path}: word vectors have shape {w2v.shape}, expected ({num_attributes}, D) "
                                   f"for the {num_attributes} attributes of att")
            return w2v.astype(np.float64), str(path)
    if required:
        raise DatasetError(f"{w2v_root}: no attribute word vectors ({', '.join(tried)}); pass --w2v-root <folder>, "
                           "or --w2v none to learn the attribute embeddings from a random init instead (in "
                           "Python: w2v_root=, w2v='none')")
    return None, None


def load_attribute_names(w2v_root: Path | None, dataset: str, num_attributes: int) -> list[str] | None:
    """Attribute names from DAZLE's `attribute_names/<DS>/` lists when present (purely descriptive)."""
    if w2v_root is None:
        return None
    folder = Path(w2v_root) / "attribute_names" / ("AWA2" if dataset == "AWA1" else dataset)
    names = None
    for file in ("attributes.txt", "predicates.txt"):
        if (folder / file).is_file():
            names = [line.split(None, 1)[1].strip() for line in (folder / file).read_text().splitlines()
                     if len(line.split(None, 1)) == 2]
            break
    if names is None and (folder / "attributes.mat").is_file():
        names = mat_strings(load_mat(folder / "attributes.mat", ["attributes"]).get("attributes", np.empty(0)))
    return names if names is not None and len(names) == num_attributes else None


def first_existing(*candidates: Path | None) -> Path | None:
    for path in candidates:
        if path is not None and Path(path).exists():
            return Path(path)
    return None
