"""What to do with an output that already exists: nothing (up to date), continue it, or refuse.

    finished <out>, same content key        -> up to date: no work, file untouched
                                               (with skipped rows and resume: retry those rows)
    finished or partial, only image files   -> resume: recompute just the rows whose image changed
      changed size since extraction            without resume: error saying so
    finished <out> of other inputs          -> error (overwrite replaces it: a finished file is kept)
    <out>.partial of other inputs           -> replaced, after one line that says so (with or without
                                               resume: its rows cannot serve this command, e.g. after a
                                               wrong --weights)
    <out>.partial, same inputs              -> resume continues it; without resume: error

A finished file that goes back to work is renamed to `<out>.partial` first, so `<out>` never names
a file that is being written.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from cache import layout as L
from cache.reader import CacheError, FeatureCache
from cache.writer import ExtractError, open_for_writing


class ReuseError(ExtractError):
    """An existing output blocks the extraction; the message names it and the way out."""


def check_existing(out: Path, partial: Path, manifest: dict, image_bytes: np.ndarray, *, resume: bool,
                   overwrite: bool, log) -> bool:
    """True when `out` is up to date. Otherwise leaves `partial` ready to (re)start or continue."""
    if overwrite:
        if partial.exists():
            partial.unlink()
        return False
    if out.exists():
        changed, skipped = _compare(out, manifest, image_bytes)
        if changed == 0 and not (resume and skipped):
            log(f"{out}: up to date (content key {manifest['content_key'][:12]}...), nothing to do"
                + (f"; {skipped} row(s) were skipped, --resume retries them" if skipped else ""))
            return True
        if not resume:
            raise ReuseError(f"{out}: {changed} image file(s) changed since it was extracted; pass --resume to "
                             "recompute just those rows, or --overwrite to start again")
        _adopt(out, manifest, image_bytes, log)
        os.replace(out, partial)
        return False
    if partial.exists():
        other = _other_inputs(partial, manifest, image_bytes)
        if other is not None:
            log(f"{partial}: an unfinished extraction of other inputs ({other}) is replaced by this one")
            partial.unlink()
            return False
        if not resume:
            raise ReuseError(f"{partial}: an unfinished extraction of the same inputs is there; pass --resume to "
                             "continue it or --overwrite to start again")
        _compare(partial, manifest, image_bytes)
        _adopt(partial, manifest, image_bytes, log)
        log(f"resuming {partial}")
    return False


def _compare(path: Path, manifest: dict, image_bytes: np.ndarray) -> tuple[int, int]:
    """(images whose size changed, rows skipped); raises ReuseError when other inputs differ."""
    try:
        with FeatureCache(path) as cache:
            stored, skipped = cache.manifest, int(cache.skipped.sum())
            stored_bytes = cache.file[L.IMAGE_BYTES][()] if L.IMAGE_BYTES in cache.file else None
    except CacheError as err:
        raise ReuseError(f"{path}: exists but cannot be read ({err}); delete it or pass --overwrite") from None
    if stored is None or _inputs(stored) != _inputs(manifest) or stored_bytes is None \
            or stored_bytes.shape != image_bytes.shape:
        key = (stored or {}).get("content_key", "none")
        raise ReuseError(f"{path}: holds features of other inputs (content key {key[:12]}... != "
                         f"{manifest['content_key'][:12]}...); pass --overwrite to replace it or choose another --out")
    return int((stored_bytes != image_bytes).sum()), skipped


def _other_inputs(partial: Path, manifest: dict, image_bytes: np.ndarray) -> str | None:
    """None when `partial` holds these inputs (or cannot be read: _compare says so), else in words
    what it holds: its content key and rows done."""
    try:
        with FeatureCache(partial) as cache:
            stored, done = cache.manifest, int(cache.done.sum())
            bytes_shape = cache.file[L.IMAGE_BYTES].shape if L.IMAGE_BYTES in cache.file else None
    except CacheError:
        return None
    if stored is not None and "content" in stored and _inputs(stored) == _inputs(manifest) \
            and bytes_shape == image_bytes.shape:
        return None
    key = (stored or {}).get("content_key", "none")
    return f"content key {key[:12]}... != {manifest['content_key'][:12]}..., {done} of {len(cache.done)} rows done"


def _adopt(path: Path, manifest: dict, image_bytes: np.ndarray, log) -> None:
    """Mark rows whose image changed as not done and take on the new manifest (a no-op when nothing
    changed). Done before writing starts: attributes cannot change in SWMR mode."""
    with open_for_writing(path) as f:
        changed = f[L.IMAGE_BYTES][()] != image_bytes
        if not changed.any():
            return
        done = f[L.DONE][()]
        log(f"{path}: {int(changed.sum())} image file(s) changed since extraction "
            f"({int((changed & done).sum())} of them done): recomputing those rows")
        f[L.DONE][...] = done & ~changed
        f.flush()  # rows un-done before the file claims the new key
        f[L.IMAGE_BYTES][...] = image_bytes
        f.attrs[L.MANIFEST_ATTR] = json.dumps(manifest, sort_keys=True)
        f.attrs[L.CONTENT_KEY_ATTR] = manifest["content_key"]


def _inputs(manifest: dict) -> dict:
    """The content-defining part without the image sizes (those are compared row by row)."""
    content = json.loads(json.dumps(manifest["content"]))
    content["dataset"].pop("image_sizes", None)
    return content
