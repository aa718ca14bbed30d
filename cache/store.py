"""A content-addressed store of feature caches that a team can share on one filesystem.

    <store>/entries/<key>/features.h5        the cache (a plain file, or a virtual dataset over the
    <store>/entries/<key>/features.h5.shard-r-of-W.h5   shard files beside it: cache/shards.py)
    <store>/entries/<key>/entry.json         record: manifest, files with byte size and crc32, shape
    <store>/staging/<kind>-<key>/            an entry being built (extraction or copy); resumable
    <store>/locks/<key>.lock                 per-key lock (fcntl.flock)
    <store>/used/<key>                       touched when an entry is resolved (gc's "last used")
    <store>/trash/                           entries being deleted

The key is the manifest's content key (extract/manifest.py): same backbone, preprocessing, dtype and
images give the same key on every machine. An entry is published by one os.rename of its finished
staging directory, atomic on POSIX within one filesystem, so a reader sees an entry whole or not at
all, and any number of readers may read while another process builds a different entry. Whoever builds
or copies an entry holds its lock: a second process asking for the same key waits, then finds the
entry published and reuses it, so the work is done once.

Locks on shared filesystems: Linux NFS clients implement flock with NFS byte-range locks (NFSv4, or
NFSv3 with lockd running), which work across machines; a mount with `nolock` or `local_lock=all`
only locks within one machine. Lustre needs the `flock` mount option; GPFS/BeeGFS support it. Where
locking is unsupported the store says so instead of silently computing twice.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import socket
import time
import uuid
import zlib
from datetime import datetime, timezone
from pathlib import Path

from cache.locks import lock_exclusive, lock_holder, same_file
from cache.reader import CacheError
from cache.record import FEATURES_FILE, RECORD_FORMAT, RecordError, check_file_name, check_files, inside, parse_record

ENV = "MSDN_CACHE_DIR"
RECORD_FILE = "entry.json"
MIN_PREFIX = 4
_BLOCK = 8 << 20


class StoreError(CacheError):
    """A store problem (unknown or ambiguous key, unsupported locking); the message names the path."""


class LockBusy(StoreError):
    """The key's lock is held by another process (raised when a wait times out)."""


def store_root(cache_dir: str | Path | None = None) -> Path | None:
    """--cache-dir, else $MSDN_CACHE_DIR, else None (no store configured)."""
    value = cache_dir if cache_dir else os.environ.get(ENV)
    return Path(value).expanduser() if value else None


def file_crc32(path: Path, block: int = _BLOCK) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            crc = zlib.crc32(chunk, crc)
    return crc


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root}: the cache store must be a directory")

    def _dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ------------------------------------------------------------------ reading
    def entry_dir(self, key: str) -> Path:
        return self.root / "entries" / key

    def features_path(self, key: str) -> Path:
        return self.entry_dir(key) / FEATURES_FILE

    def has(self, key: str) -> bool:
        return (self.entry_dir(key) / RECORD_FILE).is_file()

    def keys(self) -> list[str]:
        entries = self.root / "entries"
        if not entries.is_dir():
            return []
        return sorted(p.name for p in entries.iterdir() if (p / RECORD_FILE).is_file())

    def record(self, key: str) -> dict:
        """The entry's record, checked (cache/record.py); RecordError when it is damaged."""
        path = self.entry_dir(key) / RECORD_FILE
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{self.root}: no entry {key}") from None
        except OSError as err:
            raise RecordError(f"{path}: unreadable entry record ({err.strerror or err})") from None
        return parse_record(text, key, path)

    def resolve(self, key_or_prefix: str) -> str:
        """The full key of an entry named by its key or a unique prefix (>= 4 characters)."""
        wanted = key_or_prefix.strip().lower()
        if len(wanted) < MIN_PREFIX:
            raise StoreError(f"{key_or_prefix!r}: give at least {MIN_PREFIX} characters of a key")
        found = [k for k in self.keys() if k.startswith(wanted)]
        if not found:
            raise StoreError(f"{self.root}: no entry with key {key_or_prefix!r} (see `msdn cache ls`)")
        if len(found) > 1:
            raise StoreError(f"{self.root}: key prefix {key_or_prefix!r} is ambiguous: "
                             + ", ".join(k[:16] for k in found))
        return found[0]

    def open_entry_file(self, key: str, name: str):
        folder = self.entry_dir(key)
        return open(inside(folder, name, folder / RECORD_FILE), "rb")

    def touch_used(self, key: str) -> None:
        with contextlib.suppress(OSError):  # a read-only store can still be read
            (self._dir("used") / key).touch()

    def last_used(self, key: str) -> float:
        for path in (self.root / "used" / key, self.entry_dir(key) / RECORD_FILE):
            with contextlib.suppress(OSError):
                return path.stat().st_mtime
        return 0.0

    def entry_bytes(self, key: str) -> int:
        """The entry's size by its record; by the files in its folder when the record is damaged."""
        try:
            return sum(f["bytes"] for f in self.record(key)["files"].values())
        except RecordError:
            folder = self.entry_dir(key)
            return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())

    # ------------------------------------------------------------------ writing
    def staging(self, kind: str, key: str) -> Path:
        """The fixed staging directory for building `key` (the same on rerun, so work resumes)."""
        path = self._dir("staging") / f"{kind}-{key}"
        path.mkdir(exist_ok=True)
        return path

    @contextlib.contextmanager
    def lock(self, key: str, log=None, timeout: float | None = None):
        """Hold the key's lock. Waits (saying so once) while another process holds it."""
        path = self._dir("locks") / f"{key}.lock"
        deadline = None if timeout is None else time.monotonic() + timeout
        said = False
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                if _try_flock(fd, path):
                    # gc may have unlinked the file between our open and our lock: then the lock
                    # guards nothing, so take it again on the current file.
                    if same_file(fd, path):
                        break
                elif deadline is not None and time.monotonic() > deadline:
                    raise LockBusy(f"{path}: still locked after {timeout:.0f}s by {lock_holder(path)}")
                else:
                    if not said and log:
                        log(f"waiting for {lock_holder(path)}, which is building entry {key[:12]}... ({path})")
                        said = True
                    time.sleep(0.2)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            yield path
        finally:
            os.close(fd)  # releases the flock

    def publish(self, staged: Path, key: str, manifest: dict, log=None, files: dict | None = None) -> Path:
        """Write the record of `staged` (a finished entry directory) and move it into place with one
        rename. When the key is already there (someone else published it), `staged` is dropped.
        `files`: sizes and crc32s already checked (a verified copy), else computed here."""
        if self.has(key):
            shutil.rmtree(staged, ignore_errors=True)
            return self.entry_dir(key)
        record = describe_entry(staged, key, manifest, files)
        _write_atomic(staged / RECORD_FILE, json.dumps(record, indent=1, sort_keys=True))
        for name in record["files"]:
            _fsync(inside(staged, name, staged / RECORD_FILE))
        _fsync(staged)
        target = self.entry_dir(key)
        self._dir("entries")
        try:
            os.rename(staged, target)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not self.has(key):
                raise
            shutil.rmtree(staged, ignore_errors=True)  # lost a race to an identical entry
            return target
        _fsync(target.parent)
        if log:
            log(f"published entry {key} ({human_bytes(sum(f['bytes'] for f in record['files'].values()))}) in {self.root}")
        return target

    def remove(self, key: str) -> None:
        """Delete an entry: renamed out of entries/ first, so no reader finds half of it."""
        if not self.has(key):
            raise StoreError(f"{self.root}: no entry {key}")
        trash = self._dir("trash") / f"{key}-{uuid.uuid4().hex[:8]}"
        os.rename(self.entry_dir(key), trash)
        shutil.rmtree(trash, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.root / "used" / key).unlink()


def describe_entry(folder: Path, key: str, manifest: dict, files: dict | None = None) -> dict:
    """The record of an entry directory: every file's size and crc32 (what transfers check), and
    the cache's shape, dtype and completeness (what `msdn cache ls` shows without opening HDF5)."""
    from cache.reader import FeatureCache

    with FeatureCache(folder / FEATURES_FILE) as cache:
        info = {"rows": cache.num_images, "rows_done": int(cache.done.sum()),
                "complete": cache.complete, "feature_shape": list(cache.feature_shape),
                "dtype": str(cache.file["feature_map"].dtype),
                "virtual": bool(cache.file["feature_map"].is_virtual),
                "row_checksums": "row_crc32" in cache.file}
    if files is None:
        files = {path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size, "crc32": file_crc32(path)}
                 for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != RECORD_FILE)}
        for name in files:  # only what the store itself writes is published
            check_file_name(name, folder)
    check_files(files, folder)
    for name in files:
        inside(folder, name, folder)
    return {"format": RECORD_FORMAT, "key": key, "manifest": manifest, "files": files, **info,
            "published": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _try_flock(fd: int, path: Path) -> bool:
    try:
        lock_exclusive(fd)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise StoreError(f"{path}: no file locks here ({err.strerror}); the feature store needs them: "
                             "mount it with locking enabled (NFS: lockd / no 'nolock'; Lustre: 'flock'), "
                             "use a store on a local disk, or on Windows work without a store (--out files)") from None
        raise


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def parse_size(text: str) -> int:
    """'500M', '20G', '1.5T' or bytes -> bytes (>= 0; negative, NaN and infinite sizes are refused)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = text.strip().upper().removesuffix("B")
    scale = units.get(value[-1:], 1)
    try:
        number = float(value[:-1] if scale > 1 else value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise StoreError(f"{text!r}: not a size >= 0 (e.g. 500M, 20G)")
    return int(number * scale)


def resolve_cache(value: str | Path, cache_dir: str | None = None, *, check_record: bool = True) -> Path:
    """A feature cache named by path, by entry folder, or by store key (or unique key prefix). A
    store entry whose record is damaged is refused (unless `check_record` is False: verify reports it)."""
    path = Path(value)
    if path.is_file():
        return path
    if path.is_dir() and (path / FEATURES_FILE).is_file():
        return path / FEATURES_FILE
    root = store_root(cache_dir)
    if root is None or "/" in str(value) or str(value).endswith(".h5"):
        raise CacheError(f"{value}: feature cache not found" + ("" if root else
                         " (to name a store key, pass --cache-dir or set MSDN_CACHE_DIR)"))
    store = Store(root)
    key = store.resolve(str(value))
    if check_record:
        store.record(key)  # a damaged record, or one of another key (a folder renamed by hand), is refused
    store.touch_used(key)
    return store.features_path(key)
