"""xlsa17 benchmarks (CUB, SUN, AWA2, AWA1, APY, FLO; "proposed split", docs/method.md).

Class order, attributes and locations come from `<xlsa17_root>/<DS>/att_splits.mat`. The image list
(order + labels) comes from the first source found, in this order (or the one named by
`image_source`):
  "res101"      `<xlsa17_root>/<DS>/res101.mat` (`image_files`, 1-based `labels`): the xlsa17 order,
                so the xlsa17 locations apply as they are;
  "image_index" `<index_root>/<DS>_image_files.txt` + `<DS>_image_index.npz` (the metadata half of
                res101.mat that MSDN/TransZero ship): same order, locations checked against att_splits;
  "cub_index"   CUB only, the dataset's own `CUB_200_2011/images.txt` etc.: images are mapped onto
                xlsa17 classes by name and the locations are re-derived from the xlsa17 class split
                (trainvalclasses.txt / testclasses.txt), so rows are NOT the xlsa17 rows.
Images live under `<image_root>` (default `<data_root>/<DS>`, TransZero's layout); nothing here needs
them to exist: `ImageDataset.check_files()` is the extractor's preflight.
"""
from __future__ import annotations

import posixpath
from pathlib import Path

import numpy as np

from cache.layout import make_validation_split

from .base import DatasetError, ImageDataset
from .cub_files import read_cub_index
from .splits import rows_of_classes, split_seen_images
from .xlsa17_files import (
    AttSplits,
    load_att_splits,
    load_mat,
    load_semantics,
    mat_strings,
    read_class_list,
    resolve_roots,
)

XLSA17_DATASETS = ("CUB", "SUN", "AWA2", "AWA1", "APY", "FLO")
IMAGE_SOURCES = ("auto", "res101", "image_index", "cub_index")
# First folder of the kept relative path in res101.mat's absolute server paths (docs/method.md).
SERVER_PATH_ANCHORS = {"CUB": "CUB_200_2011/images/", "SUN": "images/", "AWA2": "Animals_with_Attributes2/"}


def load_xlsa17(name: str, data_root: str | Path = "data", xlsa17_root: str | Path | None = None,
                w2v_root: str | Path | None = None, index_root: str | Path | None = None,
                image_root: str | Path | None = None, image_source: str = "auto", w2v: str = "auto",
                path_anchor: str | None = None, test_seen_fraction: float = 0.2,
                split_seed: int = 0) -> ImageDataset:
    """Load one xlsa17 benchmark. `w2v`: "auto" (find the word vectors) or "none" (w2v_att=None)."""
    if name not in XLSA17_DATASETS:
        raise DatasetError(f"unknown xlsa17 dataset {name!r}; expected one of {', '.join(XLSA17_DATASETS)}")
    if image_source not in IMAGE_SOURCES:
        raise DatasetError(f"image_source {image_source!r}: expected one of {', '.join(IMAGE_SOURCES)}")
    data_root = Path(data_root)
    xlsa17_root, w2v_root = resolve_roots(data_root, xlsa17_root, w2v_root)
    index_root = Path(index_root) if index_root else data_root / "xlsa17_image_index"
    image_root = Path(image_root) if image_root else data_root / name
    semantics = load_semantics(name, xlsa17_root, w2v_root, w2v)
    splits, split_dir = semantics.splits, xlsa17_root / name

    candidates = {"res101": split_dir / "res101.mat", "image_index": index_root / f"{name}_image_files.txt",
                  "cub_index": image_root / "CUB_200_2011" / "images.txt"}
    if image_source == "auto":
        usable = [k for k in candidates if k != "cub_index" or name == "CUB"]
        found = [k for k in usable if candidates[k].is_file()]
        if not found:
            raise DatasetError(f"{name}: no image list found (looked for "
                               f"{', '.join(str(candidates[k]) for k in usable)}); pass --data-root <folder holding "
                               f"{name}/ and xlsa17_image_index/> or --xlsa17-root (in Python also index_root=, "
                               "image_root=)")
        image_source = found[0]
    if image_source == "res101":
        image_paths, labels = _from_res101(candidates["res101"], name, path_anchor)
        locations = _xlsa17_locations(splits, len(labels), candidates["res101"])
    elif image_source == "image_index":
        image_paths, labels = _from_image_index(index_root, name, splits)
        locations = _xlsa17_locations(splits, len(labels), candidates["image_index"])
    else:
        if name != "CUB":
            raise DatasetError(f"image_source 'cub_index' is for CUB only, not {name}")
        image_paths, labels, locations = _from_cub_index(image_root / "CUB_200_2011", split_dir,
                                                         semantics.class_names, test_seen_fraction, split_seed)
    _check_labels(labels, locations, splits, candidates[image_source])

    train_val = _train_val(name, splits, split_dir, labels, locations, image_source, split_seed)
    source = {"adapter": "xlsa17", "dataset": name, "att_splits": str(splits.path), "image_source": image_source,
              "image_list": str(candidates[image_source]), "image_root": str(image_root),
              "train_val": train_val.pop("_source"), "w2v_att": semantics.w2v_path,
              "class_names": "allclasses_names" if splits.class_names else "class ids (file has no names)"}
    if image_source == "cub_index":
        source["locations"] = (f"derived: xlsa17 class split, seen-class images split "
                               f"{1 - test_seen_fraction:.2f}/{test_seen_fraction:.2f} with seed {split_seed}")
    return ImageDataset(name=name, root=image_root, image_paths=image_paths, labels=labels,
                        class_names=semantics.class_names, att=splits.att, original_att=splits.original_att,
                        w2v_att=semantics.w2v_att, splits={**locations, **train_val},
                        attribute_names=semantics.attribute_names, source=source)


def _check_labels(labels: np.ndarray, locations: dict, splits: AttSplits, image_list: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= splits.num_classes):
        raise DatasetError(f"{image_list}: labels span [{labels.min()}, {labels.max()}] (0-based) but "
                           f"{splits.path} has {splits.num_classes} classes")
    both = np.intersect1d(labels[locations["trainval_loc"]], labels[locations["test_unseen_loc"]])
    if both.size:
        raise DatasetError(f"{image_list}: classes {both[:5].tolist()} have images in both trainval_loc and "
                           f"test_unseen_loc of {splits.path} (image list and split do not belong together)")


def strip_server_prefix(path: str, anchor: str, where: Path) -> str:
    """'/BS/.../CUB_200_2011/images/x/y.jpg' -> 'CUB_200_2011/images/x/y.jpg' (anchor kept)."""
    clean = posixpath.normpath(path.replace("\\", "/"))
    if clean.startswith(anchor):
        return clean
    cut = clean.rfind("/" + anchor)
    if cut < 0:
        raise DatasetError(f"{where}: image path {path!r} does not contain {anchor!r}")
    return clean[cut + 1:]


def _from_res101(path: Path, name: str, path_anchor: str | None) -> tuple[list[str], np.ndarray]:
    anchor = path_anchor or SERVER_PATH_ANCHORS.get(name)
    if anchor is None:
        raise DatasetError(f"{path}: no known server-path rule for {name}; pass path_anchor='<first folder "
                           "of the relative path to keep>'")
    mat = load_mat(path, ["image_files", "labels"])
    if "image_files" not in mat or "labels" not in mat:
        raise DatasetError(f"{path}: needs keys 'image_files' and 'labels' (found {sorted(mat)})")
    files = mat_strings(mat["image_files"])
    labels = np.asarray(mat["labels"]).astype(np.int64).ravel() - 1
    if len(files) != len(labels):
        raise DatasetError(f"{path}: {len(files)} image_files but {len(labels)} labels")
    return [strip_server_prefix(f, anchor, path) for f in files], labels


def _from_image_index(index_root: Path, name: str, splits: AttSplits) -> tuple[list[str], np.ndarray]:
    files_path, npz_path = index_root / f"{name}_image_files.txt", index_root / f"{name}_image_index.npz"
    if not npz_path.is_file():
        raise DatasetError(f"{npz_path}: file not found (it goes with {files_path.name})")
    files = [posixpath.normpath(line.strip()) for line in files_path.read_text().splitlines() if line.strip()]
    with np.load(npz_path, allow_pickle=False) as npz:
        index = {k: npz[k].astype(np.int64) for k in npz.files}
    if "labels" not in index or len(index["labels"]) != len(files):
        raise DatasetError(f"{npz_path}: needs 'labels' with one entry per line of {files_path.name} ({len(files)})")
    for key, loc in splits.locations.items():
        if key in index and not np.array_equal(index[key], loc):
            raise DatasetError(f"{npz_path}: {key} differs from {splits.path} (different xlsa17 version?)")
    return files, index["labels"]


def _xlsa17_locations(splits: AttSplits, n: int, image_list: Path) -> dict[str, np.ndarray]:
    locations = {k: splits.locations[k] for k in ("trainval_loc", "test_seen_loc", "test_unseen_loc")}
    for key, loc in locations.items():
        if loc.size and loc.max() >= n:
            raise DatasetError(f"{splits.path}: {key} indexes row {loc.max()} but {image_list} lists {n} images")
    return locations


def _from_cub_index(folder: Path, split_dir: Path, class_names: list[str], test_seen_fraction: float,
                    seed: int) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    index = read_cub_index(folder)
    position = {n: i for i, n in enumerate(class_names)}
    unknown = sorted({n for n in index.class_names.values() if n not in position})
    if unknown:
        raise DatasetError(f"{folder / 'classes.txt'}: classes {unknown[:3]} are not xlsa17 CUB classes")
    labels = np.array([position[index.class_names[int(c)]] for c in index.class_ids], dtype=np.int64)
    seen_names = read_class_list(split_dir / "trainvalclasses.txt")
    unseen_names = read_class_list(split_dir / "testclasses.txt")
    bad = [n for n in seen_names + unseen_names if n not in position]
    if bad or set(seen_names) & set(unseen_names):
        raise DatasetError(f"{split_dir}: trainvalclasses.txt/testclasses.txt are not a split of the xlsa17 classes "
                           f"({bad[:3] or 'overlap'})")
    seen = [position[n] for n in seen_names]
    trainval, test_seen = split_seen_images(labels, seen, test_seen_fraction, seed)
    locations = {"trainval_loc": trainval, "test_seen_loc": test_seen,
                 "test_unseen_loc": rows_of_classes(labels, [position[n] for n in unseen_names])}
    return [f"CUB_200_2011/images/{p}" for p in index.image_paths], labels, locations


def _train_val(name: str, splits: AttSplits, split_dir: Path, labels: np.ndarray, locations: dict,
               image_source: str, seed: int) -> dict:
    """xlsa17 train_loc/val_loc (class-disjoint halves of the seen-class images) where they apply."""
    if image_source != "cub_index":
        sent = split_dir / "sent_splits.mat"
        if "train_loc" not in splits.locations and name == "CUB" and sent.is_file():
            other = load_att_splits(sent)  # same layout; the CUB att_splits.mat copies lost train/val
            if not np.array_equal(other.locations.get("trainval_loc"), locations["trainval_loc"]):
                raise DatasetError(f"{sent}: trainval_loc differs from {splits.path}; cannot use its train/val split")
            if "train_loc" in other.locations and "val_loc" in other.locations:
                return {"train_loc": other.locations["train_loc"], "val_loc": other.locations["val_loc"],
                        "_source": f"xlsa17 {sent}"}
        if "train_loc" in splits.locations and "val_loc" in splits.locations:
            return {"train_loc": splits.locations["train_loc"], "val_loc": splits.locations["val_loc"],
                    "_source": f"xlsa17 {splits.path}"}
    train, val = make_validation_split(labels, locations["trainval_loc"], seed=seed)
    return {"train_loc": train, "val_loc": val, "_source": f"make_validation_split(fraction=0.2, seed={seed})"}
