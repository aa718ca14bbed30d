"""The one place where a store entry's record (`entry.json`) is checked before anything uses it.

A store is shared: its records are written by other people's processes, copied from other stores, or
edited by hand. Nothing a record says is trusted until `check_record` has accepted it:
- every field the store writes is there, with its type (`files`: name -> {bytes, crc32});
- `key` is the name of the folder the record lies in (an entry renamed by hand is not used under the
  key of its record);
- every file name is one the store itself writes (`features.h5`, and the shard files
  `features.h5.shard-<r>-of-<W>.h5` beside it): no directories, no `..`, no absolute paths.
`inside` then joins such a name to a folder and refuses any result outside the folder (a symlink
planted in an entry, say). Whoever reads or writes an entry file goes through both.
"""
from __future__ import annotations

import json
import posixpath
import re
from pathlib import Path

from cache.reader import CacheError

RECORD_FORMAT = "msdn-store-entry"
FEATURES_FILE = "features.h5"
ENTRY_FILE_NAME = re.compile(r"features\.h5(\.shard-[0-9]{1,6}-of-[0-9]{1,6}\.h5)?")

# field -> (types, description); bool is checked before int (bool is an int in Python).
_FIELDS = {
    "format": (str, "a string"),
    "key": (str, "a string"),
    "manifest": (dict, "an object"),
    "files": (dict, "an object"),
    "rows": (int, "an integer"),
    "rows_done": (int, "an integer"),
    "complete": (bool, "true or false"),
    "feature_shape": (list, "a list"),
    "dtype": (str, "a string"),
    "virtual": (bool, "true or false"),
    "row_checksums": (bool, "true or false"),
}


def check_file_name(name, where) -> str:
    """`name` when it is a file name the store writes into an entry; else RecordError naming `where`."""
    if not isinstance(name, str) or not ENTRY_FILE_NAME.fullmatch(name):
        raise RecordError(f"{where}: refused file name {name!r}: an entry holds only {FEATURES_FILE} and its "
                          f"shard files {FEATURES_FILE}.shard-R-of-W.h5 (no folders, '..' or absolute paths)")
    return name


def check_files(files, where) -> dict:
    """The `files` mapping of a record (name -> {"bytes": int >= 0, "crc32": uint32}), checked."""
    if not isinstance(files, dict) or not files:
        raise RecordError(f"{where}: 'files' must name at least {FEATURES_FILE}")
    for name, meta in files.items():
        check_file_name(name, where)
        if not isinstance(meta, dict) or not all(_is_int(meta.get(k)) for k in ("bytes", "crc32")) \
                or meta["bytes"] < 0 or not 0 <= meta["crc32"] < 1 << 32:
            raise RecordError(f"{where}: file {name!r} needs an integer 'bytes' >= 0 and 'crc32' in [0, 2^32)")
    if FEATURES_FILE not in files:
        raise RecordError(f"{where}: 'files' does not name {FEATURES_FILE}")
    return files


def check_record(record, key: str, where) -> dict:
    """The record of the entry in folder `key`, checked (see the module docstring); RecordError
    (one line naming `where`) otherwise."""
    if not isinstance(record, dict):
        raise RecordError(f"{where}: not a JSON object")
    missing = [f for f in _FIELDS if f not in record]
    if missing:
        raise RecordError(f"{where}: missing field(s) {', '.join(missing)}")
    for field, (kind, what) in _FIELDS.items():
        value = record[field]
        ok = _is_int(value) if kind is int else isinstance(value, kind)
        if not ok:
            raise RecordError(f"{where}: field {field!r} must be {what}, found {type(value).__name__}")
    if record["format"] != RECORD_FORMAT:
        raise RecordError(f"{where}: format {record['format']!r} is not {RECORD_FORMAT!r}")
    if record["key"] != key:
        raise RecordError(f"{where}: the record is of key {record['key'][:16]!r}... but lies in folder {key!r} "
                          "(renamed by hand?)")
    if not all(_is_int(x) and x > 0 for x in record["feature_shape"]):
        raise RecordError(f"{where}: 'feature_shape' must be a list of positive integers")
    if record["rows"] < 0 or not 0 <= record["rows_done"] <= record["rows"]:
        raise RecordError(f"{where}: 'rows' and 'rows_done' must satisfy 0 <= rows_done <= rows")
    check_files(record["files"], where)
    return record


def parse_record(text, key: str, where) -> dict:
    """`check_record` of the JSON text (str or bytes) of an entry.json."""
    try:
        record = json.loads(text)
    except ValueError as err:
        raise RecordError(f"{where}: not valid JSON ({err})") from None
    return check_record(record, key, where)


def inside(folder: str | Path, name: str, where) -> Path:
    """folder / name, refused unless the resolved path lies inside the resolved folder."""
    check_file_name(name, where)
    folder = Path(folder)
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise RecordError(f"{where}: {path} resolves to {path.resolve()}, outside {folder}")
    return path


def inside_url(root: str, name: str, where) -> str:
    """The same for a path on an fsspec filesystem ('/'-separated, no symlinks to follow)."""
    check_file_name(name, where)
    root = root.rstrip("/")
    path = posixpath.normpath(f"{root}/{name}")
    if posixpath.dirname(path) != posixpath.normpath(root):
        raise RecordError(f"{where}: {name!r} leads outside {root}")
    return path


class RecordError(CacheError):
    """A damaged or hostile entry record; the message names the record and what is wrong."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
