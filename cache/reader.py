"""Read a feature cache: ours (manifest, done mask, float16/32, lzf/gzip) or one laid out exactly as
TransZero's `preprocessing.py` writes it (float32, gzip, 0-based locations, no manifest, no mask).

Keys and shapes are checked on open; every problem is a CacheError naming the file. Small arrays
(labels, splits, attributes) are read at once; the feature maps are read on demand, either all
into one preallocated tensor (`features`) or row by row (`lazy`). Layout: cache/layout.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cache import layout as L
from cache.errors import UserError
from cache.semantics import att_problem, w2v_problem

_CHUNK_BYTES = 64 << 20  # rows read per h5py call: ~64 MiB of stored data


class CacheError(UserError, ValueError):
    """Missing keys, bad shapes, incomplete or damaged cache file; the message names the file."""


class FeatureCache:
    """Open feature cache (context manager). See `features` and `lazy` for the maps."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CacheError(f"{self.path}: feature cache not found")
        try:
            self.file = L.open_readonly(self.path)
        except OSError as err:
            raise CacheError(f"{self.path}: not a readable HDF5 file (truncated or damaged?): {err}") from None
        try:
            self._load_metadata()
        except CacheError:
            self.close()
            raise
        except (OSError, KeyError, ValueError, TypeError) as err:
            self.close()
            raise CacheError(f"{self.path}: cannot read the cache metadata ({err})") from None

    # ------------------------------------------------------------------ metadata
    def _load_metadata(self) -> None:
        f = self.file
        missing = [k for k in (L.FEATURES, L.LABELS, *L.REQUIRED_SPLITS, L.ATT, L.ORIGINAL_ATT) if k not in f]
        if missing:
            raise CacheError(f"{self.path}: missing key(s) {missing}; a feature cache needs "
                             f"{[L.FEATURES, L.LABELS, *L.REQUIRED_SPLITS, L.ATT, L.ORIGINAL_ATT]}")
        fm = f[L.FEATURES]
        if fm.ndim != 4:
            raise CacheError(f"{self.path}: {L.FEATURES} has shape {fm.shape}, expected (N, C, H, W)")
        if fm.dtype.kind != "f":
            raise CacheError(f"{self.path}: {L.FEATURES} has dtype {fm.dtype}, expected a float type")
        n = fm.shape[0]
        flipped = f.get(L.FLIPPED_FEATURES)
        if flipped is not None and (flipped.shape, flipped.dtype) != (fm.shape, fm.dtype):
            raise CacheError(f"{self.path}: {L.FLIPPED_FEATURES} has shape {flipped.shape} {flipped.dtype}, expected "
                             f"{fm.shape} {fm.dtype} as {L.FEATURES}")
        self.has_flipped = flipped is not None  # `msdn extract --flip`: the flipped images' maps too
        self.num_images, self.feature_shape = n, tuple(int(x) for x in fm.shape[1:])
        self.labels = self._vector(L.LABELS, n)
        self.att = self._float_matrix(L.ATT)
        self.original_att = self._float_matrix(L.ORIGINAL_ATT)
        if self.original_att.shape != self.att.shape:
            raise CacheError(f"{self.path}: {L.ORIGINAL_ATT} shape {self.original_att.shape} != {L.ATT} shape {self.att.shape}")
        num_classes, num_att = self.att.shape
        if n and (self.labels.min() < 0 or self.labels.max() >= num_classes):
            raise CacheError(f"{self.path}: labels lie in [{self.labels.min()}, {self.labels.max()}], "
                             f"outside the {num_classes} classes of {L.ATT}")
        named = int(self.labels.max()) + 1 if n else num_classes
        if num_classes != named and num_att == named:  # without w2v_att nothing else would notice
            raise CacheError(f"{self.path}: {L.ATT} has shape {self.att.shape} but the labels name {named} classes: "
                             f"it looks transposed (expected (classes, attributes) = ({named}, {num_classes}))")
        self.splits = {}
        for key in L.REQUIRED_SPLITS + L.OPTIONAL_SPLITS:
            if key in f:
                loc = self._vector(key, None)
                if loc.size and (loc.min() < 0 or loc.max() >= n):
                    raise CacheError(f"{self.path}: {key} indexes rows outside [0, {n}) (1-based locations?)")
                self.splits[key] = loc
        both = np.intersect1d(self.labels[self.splits["trainval_loc"]], self.labels[self.splits["test_unseen_loc"]])
        if both.size:
            shown = ", ".join(map(str, both[:10].tolist())) + (", ..." if both.size > 10 else "")
            raise CacheError(f"{self.path}: classes [{shown}] are both seen (trainval_loc) and unseen "
                             "(test_unseen_loc); zero-shot splits must keep them apart")
        self.w2v_att = self._float_matrix(L.W2V) if L.W2V in f else None
        if self.w2v_att is not None and self.w2v_att.shape[0] != num_att:
            raise CacheError(f"{self.path}: {L.W2V} has shape {self.w2v_att.shape}, expected ({num_att}, D)")
        # as the heads will use them (cache/semantics.py): else a class scores 0 without a word
        for key, problem in ((L.ATT, att_problem(self.att)), (L.W2V, w2v_problem(self.w2v_att))):
            if problem is not None:
                what = "class" if key == L.ATT else "attribute"
                raise CacheError(f"{self.path}: {key} row {problem[0]} ({what} {problem[0]}) {problem[1]}; "
                                 "extract the cache again from fixed inputs")
        self.done = self._mask(L.DONE, n, default=True)       # TransZero files: every row is done
        self.skipped = self._mask(L.SKIPPED, n, default=False)
        self.image_paths = [p.decode() if isinstance(p, bytes) else str(p) for p in f[L.IMAGE_PATHS][:]] \
            if L.IMAGE_PATHS in f else None
        self.class_names = self._names(L.CLASS_NAMES, num_classes)
        self.attribute_names = self._names(L.ATTRIBUTE_NAMES, num_att)
        raw = f.attrs.get(L.MANIFEST_ATTR)
        self.manifest = json.loads(raw) if raw is not None else None
        key = f.attrs.get(L.CONTENT_KEY_ATTR)
        self.content_key = str(key) if key is not None else None

    def _names(self, key: str, n: int) -> list[str] | None:
        """Stored display names, or None (older and TransZero files have none; a list of the wrong
        length is ignored: names are for display only)."""
        if key not in self.file:
            return None
        names = [p.decode() if isinstance(p, bytes) else str(p) for p in self.file[key][()].reshape(-1)]
        return names if len(names) == n else None

    def _vector(self, key: str, n: int | None) -> np.ndarray:
        ds = self.file[key]
        data = np.asarray(ds[()]).reshape(-1) if ds.ndim == 2 and 1 in ds.shape else np.asarray(ds[()])
        if data.ndim != 1 or (n is not None and data.shape[0] != n):
            raise CacheError(f"{self.path}: {key} has shape {ds.shape}, expected ({n if n is not None else 'n'},)")
        if data.dtype.kind not in "iuf" or (data.dtype.kind == "f" and not np.all(data == np.round(data))):
            raise CacheError(f"{self.path}: {key} must hold integer row/class indices, found {data.dtype}")
        return data.astype(np.int64)

    def _float_matrix(self, key: str) -> np.ndarray:
        ds = self.file[key]
        if ds.ndim != 2:
            raise CacheError(f"{self.path}: {key} has shape {ds.shape}, expected a 2-D matrix")
        return np.asarray(ds[()], dtype=np.float32)

    def _mask(self, key: str, n: int, default: bool) -> np.ndarray:
        if key not in self.file:
            return np.full(n, default)
        mask = np.asarray(self.file[key][()], dtype=bool)
        if mask.shape != (n,):
            raise CacheError(f"{self.path}: {key} has shape {mask.shape}, expected ({n},)")
        return mask

    @property
    def stored_dtype(self) -> torch.dtype:
        """The torch dtype of the stored feature maps (reading in it is a plain copy)."""
        return torch.from_numpy(np.empty(0, self.file[L.FEATURES].dtype)).dtype

    @property
    def complete(self) -> bool:
        """Every row holds valid features (False while extracting, or when rows were skipped)."""
        return bool(self.done.all())

    @property
    def seen_classes(self) -> np.ndarray:
        return np.unique(self.labels[self.splits["trainval_loc"]])

    @property
    def unseen_classes(self) -> np.ndarray:
        return np.unique(self.labels[self.splits["test_unseen_loc"]])

    def done_splits(self) -> dict[str, np.ndarray]:
        """The splits without rows that hold no valid features (skipped or not yet extracted)."""
        return {k: v[self.done[v]] for k, v in self.splits.items()}

    # ------------------------------------------------------------------ feature maps
    def features(self, rows=None, device="cpu", dtype: torch.dtype = torch.float16, *,
                 allow_incomplete: bool = False, out: torch.Tensor | None = None,
                 flipped: bool = False) -> torch.Tensor:
        """Feature maps of `rows` (default: all) as one (n, C, H, W) tensor on `device`; `flipped`:
        the flipped images' maps instead (a --flip cache; same checks).

        Read in chunks of rows straight into a preallocated tensor (pinned staging when the target
        is CUDA); the stored dtype is converted by torch, never through float64. `out`: a CPU
        tensor of the stored dtype to read into instead (a reader that reuses one buffer: a fresh
        ~32 MB tensor per call fragments glibc's heap, which then keeps several of them mapped).
        """
        rows = np.arange(self.num_images) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        if flipped and not self.has_flipped:
            raise CacheError(f"{self.path}: holds no flipped feature maps; extract it again with `msdn extract --flip`")
        key = L.FLIPPED_FEATURES if flipped else L.FEATURES
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_images):
            raise CacheError(f"{self.path}: rows outside [0, {self.num_images}) requested")
        not_done = rows[~self.done[rows]]
        if not_done.size and not allow_incomplete:
            raise CacheError(f"{self.path}: {not_done.size} requested row(s) hold no valid features "
                             f"(first: row {not_done[0]}; skipped images or an unfinished extraction — "
                             "finish it with `msdn extract --resume`)")
        if out is not None:
            if out.dtype != self.stored_dtype or out.device.type != "cpu" or \
                    tuple(out.shape) != (rows.size, *self.feature_shape) or not out.is_contiguous():
                raise ValueError(f"FeatureCache.features: out must be a contiguous CPU "
                                 f"{(rows.size, *self.feature_shape)} tensor of {self.stored_dtype}")
            self._read_rows(rows, out.numpy(), key)
            return out
        device = torch.device(device)
        out = torch.empty((rows.size, *self.feature_shape), dtype=dtype, device=device)
        stored = self.file[L.FEATURES].dtype
        step = max(1, _CHUNK_BYTES // (int(np.prod(self.feature_shape)) * stored.itemsize))
        if device.type == "cpu" and torch.from_numpy(np.empty(0, stored)).dtype == dtype:
            for begin in range(0, rows.size, step):  # same dtype: h5py writes into the tensor itself
                self._read_rows(rows[begin:begin + step], out[begin:begin + step].numpy(), key)
            return out
        buffer = np.empty((min(step, max(rows.size, 1)), *self.feature_shape), dtype=stored)
        staging = torch.empty(buffer.shape, dtype=dtype, pin_memory=True) if device.type == "cuda" else None
        for begin in range(0, rows.size, step):
            block = rows[begin:begin + step]
            host = torch.from_numpy(buffer[:block.size])
            self._read_rows(block, buffer[:block.size], key)
            if staging is None:
                out[begin:begin + block.size].copy_(host)
            else:
                # Blocking copy on purpose: the pinned buffer is refilled by the next iteration.
                staging[:block.size].copy_(host)
                out[begin:begin + block.size].copy_(staging[:block.size])
        return out

    def _read_rows(self, rows: np.ndarray, into: np.ndarray, key: str = L.FEATURES) -> None:
        """into[k] = <key>[rows[k]], contiguous runs in one call each; errors name the row. No rows:
        nothing to read (h5py cannot make an empty read)."""
        if not rows.size:
            return
        ds = self.file[key]
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, rows.size]):
            start = int(rows[lo])
            try:
                ds.read_direct(into, np.s_[start:start + hi - lo], np.s_[lo:hi])
            except (OSError, RuntimeError) as err:
                bad = self._first_unreadable(ds, range(start, start + hi - lo))
                raise CacheError(f"{self.path}: cannot read {key} row {bad} (damaged file?): {err}") from None

    def _first_unreadable(self, ds, rows) -> int | None:
        for row in rows:
            try:
                ds[row]
            except (OSError, RuntimeError):
                return row
        return None

    def lazy(self) -> "LazyFeatures":
        return LazyFeatures(self)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        if getattr(self, "file", None) is not None and self.file.id.valid:
            self.file.close()

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"{int(self.done.sum())}/{self.num_images} rows done"
        return f"FeatureCache({str(self.path)!r}, {self.num_images} x {self.feature_shape}, {state})"


class LazyFeatures:
    """Indexable view that reads rows on access: `lazy[i]` -> (C, H, W), `lazy[rows]` -> (n, C, H, W)
    float tensors in the stored dtype. Rows without valid features raise CacheError."""

    def __init__(self, cache: FeatureCache):
        self.cache = cache

    def __len__(self) -> int:
        return self.cache.num_images

    def __getitem__(self, index) -> torch.Tensor:
        cache = self.cache
        rows = np.arange(cache.num_images)[index]
        single = np.ndim(rows) == 0
        rows = np.atleast_1d(rows).astype(np.int64)
        if not cache.done[rows].all():
            raise CacheError(f"{cache.path}: row {rows[~cache.done[rows]][0]} holds no valid features")
        out = np.empty((rows.size, *cache.feature_shape), dtype=cache.file[L.FEATURES].dtype)
        order = np.argsort(rows, kind="stable")
        sorted_out = np.empty_like(out)
        cache._read_rows(rows[order], sorted_out)
        out[order] = sorted_out
        tensor = torch.from_numpy(out)
        return tensor[0] if single else tensor
