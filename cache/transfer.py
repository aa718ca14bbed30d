"""Copy store entries between stores: `msdn cache push KEY DEST` and `msdn cache pull KEY SRC`.

A store on the other side is a directory (local disk, NFS, a mounted bucket) or, when fsspec is
installed, any fsspec URL (s3://, gs://, sftp://, memory:// ...). Each file of the entry is copied in
blocks into `<dest>/staging/copy-<key>/<file>.part`; an interrupted copy continues from the size
already there (where the filesystem can append; object stores restart the file). Then every file's
size and crc32 are checked against the source's entry record and, on a local destination, every row
against its checksum (cache/verify.py); only then is the entry published: one directory rename on a
local destination (under the key's lock, as in cache/store.py); on an fsspec destination the files
are moved into `entries/<key>/` and `entry.json` is written last, so readers that go by the record
never see a partial entry.

The source's record is checked before any byte moves (cache/record.py): every file name in it must be
one the store writes and lead inside the entry; a shared store's `../../x` or `/abs/x` is refused in
one line on pull and on push, and nothing is written outside the destination's staging folder.

Test hooks (documented, not for users): MSDN_TRANSFER_BLOCK (bytes per block) and
MSDN_TRANSFER_THROTTLE_S (sleep after each block) make a copy slow enough to interrupt.
"""
from __future__ import annotations

import json
import os
import time
import zlib
from pathlib import Path

from cache.record import inside, inside_url, parse_record
from cache.store import FEATURES_FILE, RECORD_FILE, Store, StoreError
from cache.verify import verify_cache

DEFAULT_BLOCK = 8 << 20


class TransferError(StoreError):
    """A copy that cannot be made or does not match its source; the message says what to do."""


def is_url(where: str) -> bool:
    return "://" in str(where) and not str(where).startswith("file://")


def open_store(where: str | Path):
    """A local Store for a path (or file:// URL), a RemoteStore for any other URL."""
    where = str(where)
    return RemoteStore(where) if is_url(where) else Store(where.removeprefix("file://"))


class RemoteStore:
    """The store layout on an fsspec filesystem (same names as cache/store.py)."""

    def __init__(self, url: str):
        try:
            import fsspec
        except ImportError:
            raise TransferError(f"{url}: URLs need fsspec (pip install fsspec); or mount the location and give "
                                "its path") from None
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.root = self.root.rstrip("/")

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def keys(self) -> list[str]:
        entries = self._path("entries")
        if not self.fs.exists(entries):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(entries, detail=False)]
        return sorted(k for k in names if self.fs.exists(self._path("entries", k, RECORD_FILE)))

    def has(self, key: str) -> bool:
        return self.fs.exists(self._path("entries", key, RECORD_FILE))

    def record(self, key: str) -> dict:
        """The entry's record, checked (cache/record.py); RecordError when it is damaged."""
        if not self.has(key):
            raise TransferError(f"{self.url}: no entry {key}")
        return parse_record(self.fs.cat_file(self._path("entries", key, RECORD_FILE)), key,
                            self._where("entries", key, RECORD_FILE))

    def _where(self, *parts: str) -> str:
        return "/".join([self.url.rstrip("/"), *parts])

    def resolve(self, prefix: str) -> str:
        found = [k for k in self.keys() if k.startswith(prefix.lower())]
        if len(found) != 1:
            raise TransferError(f"{self.url}: {'no' if not found else 'more than one'} entry with key {prefix!r}")
        return found[0]

    def open_entry_file(self, key: str, name: str):
        where = self._where("entries", key, RECORD_FILE)
        return self.fs.open(inside_url(self._path("entries", key), name, where), "rb")


def copy_entry(key: str, source, dest, *, log=print) -> dict:
    """Copy entry `key` from `source` to `dest` (Store or RemoteStore); returns the record."""
    key = source.resolve(key)
    record = source.record(key)  # checked: every file name is one the store writes (cache/record.py)
    if dest.has(key):
        log(f"{_where(dest)}: entry {key[:12]}... is already there")
        return record
    if isinstance(dest, Store):
        with dest.lock(key, log):
            if dest.has(key):
                log(f"{_where(dest)}: entry {key[:12]}... arrived meanwhile")
                return record
            stage = dest.staging("copy", key)
            for name, meta in record["files"].items():
                _copy_file(source, key, name, meta, _LocalPart(inside(stage, name, stage)), log)
            report = verify_cache(stage / FEATURES_FILE, record)
            if report.verdict in ("corrupt", "damaged"):
                for name in record["files"]:  # start those files again on the next try
                    (stage / name).unlink(missing_ok=True)
                raise TransferError("\n".join([f"copy of {key[:12]}... does not match its source; rerun to copy "
                                               "it again:"] + report.lines()))
            dest.publish(stage, key, record["manifest"], files=record["files"])
    else:
        stage = dest._path("staging", f"copy-{key}")
        for name, meta in record["files"].items():
            _copy_file(source, key, name, meta, _RemotePart(dest.fs, inside_url(stage, name, stage)), log)
        dest.fs.makedirs(dest._path("entries", key), exist_ok=True)
        for name, meta in record["files"].items():
            dest.fs.mv(inside_url(stage, name, stage), inside_url(dest._path("entries", key), name, dest.url))
        dest.fs.pipe_file(dest._path("entries", key, RECORD_FILE), json.dumps(record, indent=1).encode())
    log(f"{_where(dest)}: entry {key[:12]}... copied and verified ({len(record['files'])} file(s))")
    return record


def _copy_file(source, key: str, name: str, meta: dict, part, log) -> None:
    """Copy one entry file into `part` (resuming), then check its size and crc32."""
    if part.final_size() == meta["bytes"] and part.final_crc() == meta["crc32"]:
        return  # copied and checked by an earlier, interrupted run
    block = int(os.environ.get("MSDN_TRANSFER_BLOCK", DEFAULT_BLOCK))
    throttle = float(os.environ.get("MSDN_TRANSFER_THROTTLE_S", 0))
    have = part.size()
    if have > meta["bytes"]:
        part.reset()
        have = 0
    out, have = part.open_append(have)
    if have:
        log(f"resuming {name} at {have} of {meta['bytes']} bytes")
    try:
        with source.open_entry_file(key, name) as src, out:
            src.seek(have)
            while have < meta["bytes"]:
                data = src.read(min(block, meta["bytes"] - have))
                if not data:
                    raise TransferError(f"{name}: source ended at {have} of {meta['bytes']} bytes")
                out.write(data)
                out.flush()
                have += len(data)
                if throttle:
                    time.sleep(throttle)
    except OSError as err:  # a full disk: name the partial copy, which the rerun resumes from
        if err.filename is not None or not err.errno:
            raise
        raise OSError(err.errno, err.strerror, str(getattr(part, "path", name))) from None
    crc = part.crc()
    if crc != meta["crc32"]:
        part.reset()
        raise TransferError(f"{name}: the copy's crc32 differs from the source's record; the partial copy was "
                            "removed, rerun to copy it again")
    part.finish()


class _LocalPart:
    """`<final>.part` on a local filesystem, renamed to `<final>` once checked."""

    def __init__(self, final: Path):
        self.final, self.path = final, final.with_name(final.name + ".part")
        self.final.parent.mkdir(parents=True, exist_ok=True)

    def final_size(self):
        return self.final.stat().st_size if self.final.is_file() else None

    def final_crc(self):
        return _crc(open(self.final, "rb"))

    def size(self) -> int:
        return self.path.stat().st_size if self.path.is_file() else 0

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)

    def open_append(self, have: int):
        """(stream positioned at `have`, have)."""
        out = open(self.path, "ab")
        out.truncate(have)
        return out, have

    def crc(self) -> int:
        return _crc(open(self.path, "rb"))

    def finish(self) -> None:
        os.replace(self.path, self.final)


class _RemotePart(_LocalPart):
    def __init__(self, fs, final: str):
        self.fs, self.final, self.path = fs, final, final + ".part"
        fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)  # a no-op on object stores; needed on file://

    def final_size(self):
        return self.fs.size(self.final) if self.fs.exists(self.final) else None

    def final_crc(self):
        return _crc(self.fs.open(self.final, "rb"))

    def size(self) -> int:
        return self.fs.size(self.path) if self.fs.exists(self.path) else 0

    def reset(self) -> None:
        if self.fs.exists(self.path):
            self.fs.rm(self.path)

    def open_append(self, have: int):
        if have:
            try:
                return self.fs.open(self.path, "ab"), have
            except (NotImplementedError, ValueError, OSError):  # object stores cannot append
                pass
        return self.fs.open(self.path, "wb"), 0

    def crc(self) -> int:
        return _crc(self.fs.open(self.path, "rb"))

    def finish(self) -> None:
        self.fs.mv(self.path, self.final)


def _crc(stream) -> int:
    crc = 0
    with stream:
        while chunk := stream.read(DEFAULT_BLOCK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _where(store) -> str:
    return str(getattr(store, "root", "")) if isinstance(store, Store) else store.url
