"""Check a feature cache byte for byte: `msdn cache verify KEY|PATH`.

1. Entry files (store entries only): each file's size and crc32 against the entry record, which
   catches any changed byte, metadata included, and missing shard files.
2. Rows: every done row is decoded from its stored chunk (in threads, cache/chunk_check.py; other
   layouts through h5py) and its crc32 compared with `row_crc32`, naming each row that differs or
   cannot be decoded. A virtual (sharded) cache is read shard by shard against the joined file's
   checksums; a missing shard is named (HDF5 would silently read zeros). A --flip file's
   `feature_map_flipped` is checked the same way against `row_crc32_flipped`.
Files without `row_crc32` (TransZero's, older ones) can only be read through: "readable, no checksums".
Before the rows, the file is opened as training opens it (cache/reader.py: keys, shapes, labels within
`att`'s classes, disjoint seen and unseen classes, `att` and `w2v_att` rows the heads can normalise:
cache/semantics.py); a file training would refuse is "unusable", in one line. A store entry whose record is damaged or names files the store never writes is "damaged", in
one line, and none of its files is opened (cache/record.py).

Verdicts and exit codes: ok 0, corrupt 1, damaged 1, unusable 1, no-checksums 3, incomplete 4 (rows
not extracted yet, or skipped; the done rows checked out).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from cache import chunk_check
from cache import layout as L
from cache.reader import CacheError, FeatureCache
from cache.record import RecordError, inside, parse_record
from cache.store import RECORD_FILE, file_crc32

EXIT_CODES = {"ok": 0, "corrupt": 1, "damaged": 1, "unusable": 1, "no-checksums": 3, "incomplete": 4}
_BLOCK_BYTES = 64 << 20
_SHOW = 10


@dataclass
class VerifyReport:
    path: Path
    rows: int = 0
    rows_checked: int = 0
    rows_not_done: int = 0
    has_checksums: bool = False
    corrupt_rows: list[int] = field(default_factory=list)      # decoded, but the crc32 differs
    unreadable_rows: list[int] = field(default_factory=list)   # HDF5 could not decode the chunk
    file_problems: list[str] = field(default_factory=list)     # entry files, shards, metadata
    damaged_record: str | None = None  # the entry record cannot be trusted (nothing else was read)
    unusable: str | None = None        # readable, but training would refuse it: why
    bytes_read: int = 0        # decoded feature bytes compared
    file_bytes: int = 0        # bytes on disk read for file checksums
    seconds: float = 0.0

    @property
    def verdict(self) -> str:
        if self.damaged_record:
            return "damaged"
        if self.corrupt_rows or self.unreadable_rows or self.file_problems:
            return "corrupt"
        if self.unusable:
            return "unusable"
        if not self.has_checksums:
            return "no-checksums"
        return "incomplete" if self.rows_not_done else "ok"

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def lines(self) -> list[str]:
        if self.verdict == "damaged":
            record = self.path.parent / RECORD_FILE
            return [f"{record}: DAMAGED entry record: {_without(self.damaged_record, record)}; remove the entry "
                    "(msdn cache rm KEY) and pull or extract it again"]
        if self.verdict == "unusable":
            return [f"{self.path}: NOT USABLE for training: {_without(self.unusable, self.path)}"]
        out = [f"{self.path}: {self.verdict.upper()}: {self.rows_checked} of {self.rows} rows read"
               + (" and matched their checksums" if self.has_checksums else " (no row checksums in this file: "
                  "readable, not verified)")
               + (f"; {self.rows_not_done} row(s) not extracted" if self.rows_not_done else "")
               + f" ({self.bytes_read / 1e9:.2f} GB in {self.seconds:.1f}s)"]
        out += [f"  {p}" for p in self.file_problems]
        for label, rows in (("checksum mismatch", self.corrupt_rows), ("cannot decode", self.unreadable_rows)):
            if rows:
                shown = ", ".join(map(str, rows[:_SHOW])) + (", ..." if len(rows) > _SHOW else "")
                out.append(f"  {label} in {len(rows)} row(s): {shown}")
        return out


def verify_cache(path: str | Path, record: dict | None = None) -> VerifyReport:
    """Verify the cache file at `path`; with an entry `record` (or an entry.json beside it), its
    files too."""
    path = Path(path)
    report = VerifyReport(path)
    start = time.perf_counter()
    try:
        if record is None and (path.parent / RECORD_FILE).is_file():
            record_path = path.parent / RECORD_FILE
            try:
                text = record_path.read_bytes()
            except OSError as err:
                raise RecordError(f"{record_path}: unreadable ({err.strerror or err})") from None
            record = parse_record(text, path.parent.name, record_path)
        if record is not None:
            _check_files(path.parent, record, report)
    except RecordError as err:
        report.damaged_record = str(err)
        report.seconds = time.perf_counter() - start
        return report
    try:
        f = L.open_readonly(path)
    except OSError as err:
        report.file_problems.append(f"{path}: not a readable HDF5 file ({err})")
        report.seconds = time.perf_counter() - start
        return report
    with f:
        report.unusable = _training_refusal(path)
        if report.unusable is None:  # else one line says why; its rows would not be read by anyone
            _check_rows(f, report, None if record is None else set(record["files"]))
    report.seconds = time.perf_counter() - start
    return report


def _training_refusal(path: Path) -> str | None:
    """Why the reader that training uses refuses the file (None: it opens)."""
    try:
        FeatureCache(path).close()
    except CacheError as err:
        return str(err)
    return None


def _without(message: str, prefix) -> str:
    """`message` without a leading "<prefix>: " (the line names the path already)."""
    head = f"{prefix}: "
    return message[len(head):] if message.startswith(head) else message


def _check_files(folder: Path, record: dict, report: VerifyReport) -> None:
    for name, meta in record["files"].items():
        file = inside(folder, name, folder / RECORD_FILE)
        if not file.is_file():
            report.file_problems.append(f"{file}: missing")
            continue
        size = file.stat().st_size
        if size != meta["bytes"]:
            report.file_problems.append(f"{file}: {size} bytes, the record says {meta['bytes']}")
            continue
        report.file_bytes += size
        if file_crc32(file) != meta["crc32"]:
            report.file_problems.append(f"{file}: bytes differ from the record (crc32)")


def _check_rows(f, report: VerifyReport, entry_files: set[str] | None = None) -> None:
    ds = f[L.FEATURES]
    n = report.rows = int(ds.shape[0])
    done = np.asarray(f[L.DONE][()], dtype=bool) if L.DONE in f else np.ones(n, dtype=bool)
    report.rows_not_done = int((~done).sum())
    report.has_checksums = L.ROW_CRC32 in f
    expected = np.asarray(f[L.ROW_CRC32][()], dtype=np.uint32) if report.has_checksums else None
    if L.FLIPPED_FEATURES in f:
        _check_flipped(f, np.flatnonzero(done), report)
    if not ds.is_virtual:
        return _check_dataset(ds, np.flatnonzero(done), 0, expected, report)
    # A virtual cache: each shard's rows against the joined file's checksums. HDF5 would read a
    # missing shard as zeros: name the file, and its rows count as corrupt.
    base = Path(f.filename).parent
    for source in ds.virtual_sources():
        first, last = (int(b[0]) for b in source.vspace.get_select_bounds())
        rows = np.flatnonzero(done[first:last + 1])
        if entry_files is not None and source.file_name not in entry_files:  # a store entry reads only its own files
            report.file_problems.append(f"{base}: feature_map reads {source.file_name!r}, which is not a file of "
                                        "the entry's record")
            report.corrupt_rows.extend((first + rows).tolist())
            continue
        path = base / source.file_name
        if not path.is_file():
            report.file_problems.append(f"{path}: shard file missing")
            report.corrupt_rows.extend((first + rows).tolist())
            continue
        with h5py.File(path, "r") as shard:
            _check_dataset(shard[source.dset_name], rows, first, expected, report)


def _check_flipped(f, rows: np.ndarray, report: VerifyReport) -> None:
    """The flipped images' maps (`msdn extract --flip`) against their own checksums; bad rows are
    named with the key, as file problems (the row counts stay those of feature_map)."""
    flipped = VerifyReport(report.path)
    expected = np.asarray(f[L.FLIPPED_ROW_CRC32][()], dtype=np.uint32) if L.FLIPPED_ROW_CRC32 in f else None
    _check_dataset(f[L.FLIPPED_FEATURES], rows, 0, expected, flipped)
    report.bytes_read += flipped.bytes_read
    for label, bad in (("checksum mismatch", flipped.corrupt_rows), ("cannot decode", flipped.unreadable_rows)):
        if bad:
            shown = ", ".join(map(str, bad[:_SHOW])) + (", ..." if len(bad) > _SHOW else "")
            report.file_problems.append(f"{L.FLIPPED_FEATURES}: {label} in {len(bad)} row(s): {shown}")


def _check_dataset(ds, rows: np.ndarray, offset: int, expected, report: VerifyReport) -> None:
    """Rows `rows` of dataset `ds`, which holds the cache's rows from `offset` on."""
    if chunk_check.applies(ds):
        return chunk_check.check_rows(ds, rows, offset, expected, report)
    row_bytes = int(np.prod(ds.shape[1:])) * ds.dtype.itemsize
    step = max(1, _BLOCK_BYTES // max(row_bytes, 1))
    buffer = np.empty((min(step, max(len(rows), 1)), *ds.shape[1:]), dtype=ds.dtype)
    for lo, hi in _runs(rows, step):
        block = buffer[:hi - lo]
        try:
            ds.read_direct(block, np.s_[lo:hi])
            good = range(lo, hi)
        except (OSError, RuntimeError):  # one damaged chunk fails the whole read: find which rows
            good = []
            for row in range(lo, hi):
                try:
                    ds.read_direct(block[row - lo:row - lo + 1], np.s_[row:row + 1])
                    good.append(row)
                except (OSError, RuntimeError):
                    report.unreadable_rows.append(offset + row)
        for row in good:
            report.rows_checked += 1
            report.bytes_read += row_bytes
            if expected is not None and L.row_crc32(block[row - lo]) != expected[offset + row]:
                report.corrupt_rows.append(offset + row)


def _runs(rows: np.ndarray, step: int):
    """(lo, hi) ranges of consecutive rows, at most `step` long."""
    if len(rows) == 0:
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
        for lo in range(int(rows[a]), int(rows[b - 1]) + 1, step):
            yield lo, min(lo + step, int(rows[b - 1]) + 1)
