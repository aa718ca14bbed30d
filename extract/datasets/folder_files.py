"""Readers for the folder dataset's tables (classes.csv, attributes.csv, images.csv, attribute vectors)
and its image folders; every malformed row is one DatasetError naming the file and the row as a
spreadsheet numbers it (the header is row 1). The layout and protocol: extract/datasets/folder.py."""
from __future__ import annotations

import csv
import hashlib
import math
import posixpath
import unicodedata
from pathlib import Path

import numpy as np

from .base import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CLASS_SPLITS = ("seen", "unseen", "val")
IMAGE_SPLITS = ("train", "test")
CLASSES, ATTRIBUTES, IMAGES = "classes.csv", "attributes.csv", "images.csv"
VECTORS_CSV, VECTORS_NPY = "attribute_vectors.csv", "attribute_vectors.npy"
LAYOUT = "DIR/images/<class>/<file>, DIR/classes.csv, DIR/attributes.csv"
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _fail(path: Path, row: int | None, message: str) -> DatasetError:
    return DatasetError(f"{path}: {'' if row is None else f'row {row}: '}{message}")


def _read_csv(path: Path, tables: dict, required: bool = True) -> list[tuple[int, list[str]]]:
    """(row number as a spreadsheet shows it, stripped cells) of every non-blank row; records the
    file's sha256 in `tables`."""
    if not path.is_file():
        if required:
            raise _fail(path, None, f"file not found (the folder dataset needs {LAYOUT})")
        return []
    data = path.read_bytes()
    tables[path.name] = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8-sig")  # a spreadsheet's UTF-8 export starts with a BOM
    except UnicodeDecodeError as err:
        raise _fail(path, _text_row(data, err.start), "not UTF-8 text (save the table as CSV UTF-8)") from None
    try:
        rows = [(number, [same_name(cell) for cell in cells])
                for number, cells in enumerate(csv.reader(text.splitlines()), start=1)]
    except csv.Error as err:
        raise _fail(path, None, f"not a CSV file ({err})") from None
    rows = [(number, cells) for number, cells in rows if any(cells)]
    if not rows:
        raise _fail(path, None, "file is empty")
    return rows


def same_name(text: str) -> str:
    """A name as tables and folders are compared: Unicode NFC (macOS writes folder names decomposed,
    spreadsheets composed), without leading or trailing spaces."""
    return unicodedata.normalize("NFC", text).strip()


def _text_row(data: bytes, offset: int) -> int:
    return data[:offset].count(b"\n") + 1


def _header(path: Path, rows: list, columns: tuple[str, ...]) -> dict[str, int]:
    """Positions of the named columns (case-insensitive) in the header row."""
    number, header = rows[0]
    if len(header) == 1 and any(sep in header[0] for sep in ";\t"):
        raise _fail(path, number, f"expected comma-separated columns, got {header[0]!r}")
    lower = [h.lower() for h in header]
    for column in columns:
        if column not in lower:
            raise _fail(path, number, f"missing column {column!r} (the header is {','.join(header)!r}; "
                                      f"expected {','.join(columns)})")
    return {column: lower.index(column) for column in columns}


def _cell(cells: list[str], index: int) -> str:
    return cells[index] if index < len(cells) else ""


def read_classes(path: Path, tables: dict) -> tuple[list[str], list[str], list[int]]:
    rows = _read_csv(path, tables)
    where = _header(path, rows, ("class", "split"))
    names, splits, numbers, first = [], [], [], {}
    for number, cells in rows[1:]:
        name, split = _cell(cells, where["class"]), _cell(cells, where["split"]).lower()
        if not name:
            raise _fail(path, number, "the class name is empty")
        if name in first:
            raise _fail(path, number, f"duplicate class {name!r} (also on row {first[name]})")
        if split not in CLASS_SPLITS:
            raise _fail(path, number, f"unknown split {_cell(cells, where['split'])!r} for class {name!r}; "
                                      f"expected one of {', '.join(CLASS_SPLITS)}")
        first[name] = number
        names.append(name)
        splits.append(split)
        numbers.append(number)
    if not names:
        raise _fail(path, None, "no class rows below the header")
    if "unseen" not in splits:
        raise _fail(path, None, "no unseen classes (zero-shot learning needs at least one class with split 'unseen')")
    if sum(s in ("seen", "val") for s in splits) < 2:
        raise _fail(path, None, "fewer than 2 seen classes (split 'seen' or 'val'): one must train while "
                                "another validates")
    if "seen" not in splits:
        raise _fail(path, None, "every seen class has split 'val'; at least one must be 'seen' (trained on "
                                "in the validation run)")
    return names, splits, numbers


def class_folders(root: Path, class_names: list[str], class_rows: list[int]) -> dict[str, Path]:
    images = root / "images"
    if not images.is_dir():
        raise DatasetError(f"{images}: folder not found (the folder dataset needs {LAYOUT})")
    present = {}
    for folder in sorted(images.iterdir()):
        if folder.is_dir() and not folder.name.startswith("."):
            name = same_name(folder.name)
            if name in present:
                raise DatasetError(f"{folder}: folders {present[name].name!r} and {folder.name!r} are the same class "
                                   f"name {name!r} once compared (Unicode NFC, spaces stripped); keep one")
            present[name] = folder
    for name, row in zip(class_names, class_rows):
        if name not in present:
            raise _fail(root / CLASSES, row, f"class {name!r} has no images folder {images / name} (names compared "
                                             "after Unicode NFC normalisation, leading/trailing spaces stripped)")
    extra = sorted(set(present) - set(class_names))
    if extra:
        raise DatasetError(f"{present[extra[0]]}: folder has no row in {root / CLASSES}"
                           + (f" (nor have {len(extra) - 1} more: {', '.join(extra[1:4])})" if len(extra) > 1 else "")
                           + "; add it there or move it out of images/")
    return present


def scan_images(root: Path, class_names: list[str], class_rows: list[int],
                 folders: dict[str, Path]) -> tuple[list[str], np.ndarray]:
    paths, labels = [], []
    for c, (name, row) in enumerate(zip(class_names, class_rows)):
        found = sorted(p.relative_to(root / "images").as_posix() for p in folders[name].rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(folders[name]).parts))
        if not found:
            raise _fail(root / CLASSES, row, f"class {name!r}: its folder {folders[name]} holds no image files "
                                             f"({' '.join(IMAGE_EXTENSIONS)})")
        paths += found
        labels += [c] * len(found)
    return paths, np.array(labels, dtype=np.int64)


def read_images_csv(root: Path, class_names: list[str], class_split: list[str], class_rows: list[int],
                     tables: dict, folders: dict[str, Path] | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """`folders` (class_folders): each class's folder as named on disk, which may differ from the
    table's name by Unicode normalisation or spaces."""
    path = root / IMAGES
    rows = _read_csv(path, tables)
    where = _header(path, rows, ("path", "split"))
    position = {n: i for i, n in enumerate(class_names)}
    paths, labels, flags, first = [], [], [], {}
    for number, cells in rows[1:]:
        raw, split = _cell(cells, where["path"]), _cell(cells, where["split"]).lower()
        rel = posixpath.normpath(raw.replace("\\", "/")) if raw else ""
        if not rel or rel.startswith(("/", "../")) or rel == "..":
            raise _fail(path, number, f"image path {raw!r} must be relative to {root / 'images'}")
        if rel in first:
            raise _fail(path, number, f"duplicate image {rel!r} (also on row {first[rel]})")
        first[rel] = number
        if "/" not in rel or rel.split("/", 1)[0] not in position:
            raise _fail(path, number, f"image {rel!r} is not inside a class folder of {CLASSES} (<class>/<file>)")
        c = position[rel.split("/", 1)[0]]
        if folders is not None:
            rel = f"{folders[class_names[c]].name}/{rel.split('/', 1)[1]}"
        if not (root / "images" / rel).is_file():
            raise _fail(path, number, f"image file {root / 'images' / rel} not found")
        if class_split[c] == "unseen":
            if split not in ("", "test"):
                raise _fail(path, number, f"split {_cell(cells, where['split'])!r} for an image of unseen class "
                                          f"{class_names[c]!r}; unseen classes' images are all test (leave it empty)")
        elif split not in IMAGE_SPLITS:
            raise _fail(path, number, f"unknown split {_cell(cells, where['split'])!r} for an image of seen class "
                                      f"{class_names[c]!r}; expected train or test")
        paths.append(rel)
        labels.append(c)
        flags.append(split == "train")
    labels_arr, flags_arr = np.array(labels, dtype=np.int64), np.array(flags, dtype=bool)
    for c, (name, row) in enumerate(zip(class_names, class_rows)):
        if not np.any(labels_arr == c):
            raise _fail(root / CLASSES, row, f"class {name!r} has no image in {path}")
        if class_split[c] != "unseen" and not np.any(flags_arr[labels_arr == c]):
            raise _fail(path, None, f"seen class {name!r} has no training image (split 'train')")
    return paths, labels_arr, flags_arr


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(path: Path, row: int, column: str, text: str) -> float:
    if not text:
        raise _fail(path, row, f"column {column!r}: empty value")
    try:
        value = float(text)
    except ValueError:
        raise _fail(path, row, f"column {column!r}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise _fail(path, row, f"column {column!r}: {text} (every value must be a finite number)")
    return value


def read_attributes(path: Path, class_names: list[str], class_rows: list[int],
                     tables: dict) -> tuple[list[str], np.ndarray]:
    rows = _read_csv(path, tables)
    number, header = rows[0]
    names = header[1:]
    if not names:
        raise _fail(path, number, "the header names no attribute (expected: class,<attribute 1>,<attribute 2>,...)")
    if all(_is_number(name) for name in names):
        raise _fail(path, number, "the first row holds numbers, not attribute names: it must be the header "
                                  "(class,<attribute 1>,<attribute 2>,...)")
    seen_at = {}
    for i, name in enumerate(names, start=2):
        if not name:
            raise _fail(path, number, f"column {i} has no attribute name")
        if name in seen_at:
            raise _fail(path, number, f"duplicate attribute {name!r} (columns {seen_at[name]} and {i})")
        seen_at[name] = i
    position = {n: i for i, n in enumerate(class_names)}
    att = np.full((len(class_names), len(names)), np.nan)
    first = {}
    for number, cells in rows[1:]:
        name = cells[0]
        if name not in position:
            raise _fail(path, number, f"class {name!r} is not in {CLASSES}")
        if name in first:
            raise _fail(path, number, f"duplicate class {name!r} (also on row {first[name]})")
        first[name] = number
        if len(cells) != len(header):
            raise _fail(path, number, f"{len(cells)} columns, but the header has {len(header)} "
                                      f"(class name + {len(names)} attributes)")
        values = [_number(path, number, column, text) for column, text in zip(names, cells[1:])]
        if not any(values):
            raise _fail(path, number, f"every attribute of class {name!r} is 0 (the class would have no semantics)")
        for column, value in zip(names, values):
            if abs(value) > _FLOAT32_MAX:  # the cache stores float32: it would be inf
                raise _fail(path, number, f"column {column!r}: {value:g} is beyond float32's range (+-{_FLOAT32_MAX:.3g}); "
                                          "rescale the column")
        att[position[name]] = values
    for name, row in zip(class_names, class_rows):
        if name not in first:
            raise _fail(path, None, f"no row for class {name!r} ({CLASSES} row {row})")
    att = att.astype(np.float32)
    for c, name in enumerate(class_names):  # values below 1.4e-45 are 0 in float32: a row of them has no direction
        if not att[c].any():
            raise _fail(path, first[name], f"class {name!r}: every value rounds to 0 in float32 (magnitudes below "
                                           "1.4e-45), so the class would have no semantics; rescale its row")
    return list(names), att


def read_vectors(root: Path, attribute_names: list[str], tables: dict) -> tuple[np.ndarray, str] | None:
    csv_path, npy_path = root / VECTORS_CSV, root / VECTORS_NPY
    if csv_path.is_file() and npy_path.is_file():
        raise DatasetError(f"{root}: both {VECTORS_CSV} and {VECTORS_NPY}; keep one")
    if npy_path.is_file():
        return _read_vectors_npy(npy_path, attribute_names, tables), str(npy_path)
    if csv_path.is_file():
        return _read_vectors_csv(csv_path, attribute_names, tables), str(csv_path)
    return None


def _read_vectors_npy(path: Path, attribute_names: list[str], tables: dict) -> np.ndarray:
    data = path.read_bytes()
    tables[path.name] = hashlib.sha256(data).hexdigest()
    try:
        vectors = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        # numpy's advice for an object array (allow_pickle=True) would run whatever the pickle holds
        what = "it holds Python objects (a pickle)" if "Object arrays" in str(err) else f"{err}"
        raise _fail(path, None, f"not a plain numeric .npy array ({what}); save the vectors with "
                                "np.save(path, np.asarray(vectors, dtype=np.float32))") from None
    a = len(attribute_names)
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2 or vectors.shape[0] != a or vectors.shape[1] < 1:
        raise _fail(path, None, f"shape {getattr(vectors, 'shape', None)}, expected ({a}, D): one row per attribute "
                                f"of {ATTRIBUTES}")
    if vectors.dtype.kind not in "iuf":
        raise _fail(path, None, f"dtype {vectors.dtype}, expected numbers")
    vectors = vectors.astype(np.float64)
    for i, row in enumerate(vectors):
        if not np.isfinite(row).all():
            raise _fail(path, i + 1, f"attribute {attribute_names[i]!r}: the vector holds NaN or inf")
    return vectors.astype(np.float32)


def _read_vectors_csv(path: Path, attribute_names: list[str], tables: dict) -> np.ndarray:
    rows = _read_csv(path, tables)
    first = rows[0][1]
    if first[0] not in attribute_names and not all(_is_number(c) for c in first[1:]):
        rows = rows[1:]  # a header row (`attribute,d1,d2,...`)
    a, dim, vectors = len(attribute_names), None, []
    for i, (number, cells) in enumerate(rows):
        if i >= a:
            raise _fail(path, number, f"more rows than the {a} attributes of {ATTRIBUTES} (extra: {cells[0]!r})")
        if cells[0] != attribute_names[i]:
            raise _fail(path, number, f"attribute {cells[0]!r}, expected {attribute_names[i]!r}: rows follow the "
                                      f"order of {ATTRIBUTES}'s header")
        if dim is None:
            dim = len(cells) - 1
            if dim < 1:
                raise _fail(path, number, "no vector values after the attribute name")
        elif len(cells) - 1 != dim:
            raise _fail(path, number, f"wrong vector length {len(cells) - 1}, expected {dim} (as on row {rows[0][0]})")
        values = [_number(path, number, f"d{j}", text) for j, text in enumerate(cells[1:], start=1)]
        vectors.append(values)
    if len(vectors) < a:
        raise _fail(path, None, f"{len(vectors)} attribute rows, but {ATTRIBUTES} has {a} attributes "
                                f"(first missing: {attribute_names[len(vectors)]!r})")
    return np.array(vectors, dtype=np.float32)
