"""Stream a dataset's images through a frozen backbone into one HDF5 feature cache (docs/method.md).

    extract_features(dataset, spec, "cub.h5")

1. Preflight (before any work): image files exist, weights resolve, the output is not already there
   with other inputs. A finished file with the same content key is up to date: nothing is done.
2. The rows still to do go through a DataLoader (decoding in worker processes where cores allow)
   and the backbone (CUDA: autocast, channels_last, pinned memory, non_blocking copies; one batch
   in flight while the previous one is written; rows compressed in threads, ChunkCodec in cache/writer.py),
   and each batch is written and flushed as it comes: memory stays flat.
3. Work happens in `<out>.partial`, renamed to `<out>` when every row is done or skipped, so `<out>`
   only ever appears complete. An interrupted run (Ctrl-C, kill -9) continues with resume=True.
   The whole run holds `<out>.lock` (cache/writer.py: output_lock): a second extraction of the
   same file refuses while the first runs, so only a partial file whose lock could be taken (its
   writer is gone) is ever recovered and continued.

An unreadable image stops the run with an error naming the file (the good rows of its batch and all
before are kept); with skip_bad=True its row is recorded in `skipped` (features zero, done False, so
the cache is not `complete` and readers must use `done_splits()`), the finished file's split
locations leave it out (for MSDN/TransZero's own loaders, which read them as they are), and
resume=True retries it.

Test hook (documented, not for users): MSDN_EXTRACT_THROTTLE_S (sleep after each written batch) makes
an extraction slow enough to run a second one against it.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from cache.layout import (
    COMPRESSIONS,
    DTYPES,
    LIBVER,
    SKIPPED,
    create_cache_file,
    dropped_counts,
    partial_path,
    usable_locations,
    write_locations,
)
from cache.store import human_bytes
from cache.writer import CacheWriter, ExtractError, output_lock
from extract.backbones import BackboneSpec, build_backbone, build_transform, default_image_size, describe, feature_shape
from extract.datasets.base import DatasetError, ImageDataset
from extract.devices import resolve_device
from extract.loader import ImageRows, default_batch_size, default_num_workers, make_loader
from extract.manifest import build_manifest, image_file_sizes
from extract.progress import progress_bar
from extract.reuse import check_existing

_SHOW_MISSING = 5
# The dtypes features are stored in, as torch dtypes (cache/layout.py DTYPES has them as numpy).
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def extract_features(dataset: ImageDataset, spec: BackboneSpec, out_path: str | Path, *,
                     batch_size: int | None = None, device: str = "auto", dtype: str = "float16",
                     compression: str = "lzf", resume: bool = False, skip_bad: bool = False,
                     overwrite: bool = False, num_workers: int | None = None, num_threads: int | None = None,
                     progress: bool = True, flip: bool = False, log=None) -> Path:
    """Extract `dataset` with backbone `spec` into `out_path`; returns the path of the finished file.
    `flip`: also store each image's horizontally flipped map (`feature_map_flipped`; the heads treat
    regions as a set, so only a flipped IMAGE through the backbone gives a different map).
    `num_threads`: torch CPU threads during the run (default: the current count less the decoding
    workers, so that the two never fight over the cores)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out, partial = Path(out_path), partial_path(out_path)
    if dtype not in DTYPES or compression not in COMPRESSIONS:
        raise ExtractError(f"dtype must be one of {sorted(DTYPES)} and compression one of {COMPRESSIONS}, "
                           f"got {dtype!r} and {compression!r}")
    device = resolve_device(device)
    if batch_size is None:  # --flip runs each batch with its flip: half the images give the same forward size
        batch_size = max(1, default_batch_size(spec.name, spec.image_size, device) // (2 if flip else 1))
    num_workers = default_num_workers(device) if num_workers is None else num_workers
    if batch_size < 1 or num_workers < 0:
        raise ExtractError(f"batch size must be >= 1 and workers >= 0, got {batch_size} and {num_workers}")

    preflight_images(dataset)
    amp = autocast_dtype(device, dtype)
    image_bytes = image_file_sizes(dataset)
    manifest = build_manifest(dataset, spec, dtype=dtype, compression=compression, compute={
        "device": device.type, "autocast": str(amp).replace("torch.", "") if amp else None,
        "channels_last": True, "batch_size": batch_size}, backbone_description=describe(spec),
        image_sizes=image_bytes, flipped=flip)
    with output_lock(out, log):  # held until `out` is renamed into place: one writer per file
        return _extract_locked(dataset, spec, out, partial, manifest, image_bytes, batch_size=batch_size,
                               device=device, amp=amp, dtype=dtype, compression=compression, resume=resume,
                               skip_bad=skip_bad, overwrite=overwrite, num_workers=num_workers,
                               num_threads=num_threads, progress=progress, flip=flip, log=log)


def _extract_locked(dataset, spec, out: Path, partial: Path, manifest: dict, image_bytes, *, batch_size, device,
                    amp, dtype, compression, resume, skip_bad, overwrite, num_workers, num_threads, progress,
                    flip, log) -> Path:
    """The extraction proper, with `out`'s lock held (cache/writer.py: output_lock)."""
    if check_existing(out, partial, manifest, image_bytes, resume=resume, overwrite=overwrite, log=log):
        return out
    if not partial.exists():
        try:
            create_cache_file(partial, dataset=dataset, feature_shape=feature_shape(spec), dtype=dtype,
                              compression=compression, manifest=manifest, image_bytes=image_bytes,
                              flipped=flip)
        except BaseException:  # a full disk or Ctrl-C while creating: leave no half-made file behind
            partial.with_name(partial.name + ".creating").unlink(missing_ok=True)
            raise

    with CacheWriter(partial, codec_threads=_codec_threads(device)) as writer:
        todo = writer.todo_rows()
        if len(todo):
            log(size_line(spec, writer.num_images, dtype, compression, flip))
            log(f"extracting {len(todo)} of {writer.num_images} images of {dataset.name} with {spec.name} "
                f"@{spec.image_size}px on {device} (batch {batch_size}, {num_workers} workers"
                f"{', autocast ' + str(amp).replace('torch.', '') if amp else ''}) -> {partial}")
            try:
                with _torch_threads(num_threads or max(1, torch.get_num_threads() - num_workers)):
                    _run(dataset, spec, writer, todo, batch_size=batch_size, device=device, amp=amp,
                         dtype=TORCH_DTYPES[dtype], num_workers=num_workers, skip_bad=skip_bad,
                         progress=progress)
            except KeyboardInterrupt:
                log(f"interrupted: {int(writer.done.sum())} rows done are kept in {partial}; continue with --resume")
                raise
        skipped = int(writer.skipped.sum())
        finished = bool((writer.done | writer.skipped).all())
    if not finished:  # cannot happen unless rows changed under us; keep the partial for --resume
        raise ExtractError(f"{partial}: extraction stopped before every row was done; rerun with --resume")
    dropped = _write_usable_locations(partial, dataset.splits)
    os.replace(partial, out)
    if skipped:
        log(f"warning: {skipped} unreadable image(s) recorded as skipped (features zero, done=False) and left "
            f"out of the split locations ({dropped or 'no split held them'}); fix them and rerun with --resume "
            "to fill those rows")
    log(f"wrote {out}")
    return out


def size_line(spec: BackboneSpec, num_images: int, dtype: str, compression: str, flip: bool = False) -> str:
    """The image size (and whether it is the backbone's default) and the file size to expect, said
    before the work starts; the size is before compression (lzf/gzip store post-ReLU maps in less)."""
    channels, height, width = feature_shape(spec)
    default, why = default_image_size(spec.name)
    origin = f"{spec.name}'s default, {why}" if spec.image_size == default else f"{spec.name}'s default is {default}"
    stored = num_images * channels * height * width * np.dtype(DTYPES[dtype]).itemsize * (2 if flip else 1)
    return (f"image size {spec.image_size} px ({origin}; --image-size sets it): maps {channels} x {height} x "
            f"{width}, {num_images} images{' and their flips' if flip else ''} -> about {human_bytes(stored)} of "
            f"{dtype} features before {compression} compression")


def _write_usable_locations(partial: Path, splits: dict) -> str:
    """The dataset's split locations without the skipped rows into the finished file (all of them
    again once --resume has filled those rows); returns the rows each split lost, in words."""
    with h5py.File(partial, "r") as f:
        usable = usable_locations(splits, f[SKIPPED][()])
        stale = any(key not in f or not np.array_equal(f[key][()], rows) for key, rows in usable.items())
    if stale:  # only then opened for writing: most extractions skip nothing and change nothing here
        with h5py.File(partial, "r+", libver=LIBVER) as f:
            write_locations(f, usable)
    return dropped_counts(splits, usable)


def _run(dataset, spec, writer: CacheWriter, todo: np.ndarray, *, batch_size, device, amp, dtype,
         num_workers, skip_bad, progress) -> None:
    """The loop: decode (workers) -> forward (device) -> write + flush + mark done (this process)."""
    model = build_backbone(spec).to(device).to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest kernels once
    images = ImageRows(dataset.root, dataset.image_paths, todo, build_transform(spec), spec.image_size)
    loader = make_loader(images, batch_size, num_workers, device)
    # a bar on a terminal; in a log file, a line every $MSDN_PROGRESS_INTERVAL s (extract/progress.py)
    bar = progress_bar(len(todo), "extract", unit="img", enabled=progress, dynamic_ncols=True, smoothing=0.1)
    pending = None  # the previous batch: written while the device computes the next one
    throttle = float(os.environ.get("MSDN_EXTRACT_THROTTLE_S", 0))
    try:
        for rows, batch, errors in loader:
            maps, finite, ready = forward_batch(model, batch, device, amp, dtype, flip=writer.flipped is not None)
            if pending is not None:
                _store(writer, *pending, images, skip_bad, bar)
                if throttle:
                    time.sleep(throttle)
            pending = (rows.numpy(), maps, finite, ready, list(errors))
        if pending is not None:
            _store(writer, *pending, images, skip_bad, bar)
    finally:
        bar.close()


def forward_batch(model, batch: torch.Tensor, device, amp, dtype, flip: bool = False):
    """Run the backbone; on CUDA only enqueue it, with a copy of the maps into pinned host memory,
    and return the event that says when that copy has landed. Also returns, per image, whether its
    maps are finite as stored: the cast to float16 turns values above 65504 into inf (a float32
    sum per image is non-finite exactly when some value is; copied back with the maps, no wait).
    `flip`: one forward of the batch and its horizontal flip (width axis); the maps of the flipped
    images follow the originals' (2n rows), and an image is finite only when both of its maps are."""
    autocast = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        x = batch.to(device, non_blocking=True)
        x = torch.cat([x, torch.flip(x, dims=[3])]) if flip else x
        maps = model(x.contiguous(memory_format=torch.channels_last)).to(dtype).contiguous()  # NCHW rows, as stored
        finite = torch.isfinite(maps.flatten(1).sum(1, dtype=torch.float32))
        if flip:
            finite = finite[:len(batch)] & finite[len(batch):]
        if device.type != "cuda":
            return maps, finite, None
        host = torch.empty(maps.shape, dtype=maps.dtype, pin_memory=True)
        host.copy_(maps, non_blocking=True)
        host_finite = torch.empty(finite.shape, dtype=finite.dtype, pin_memory=True)
        host_finite.copy_(finite, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, host_finite, ready


def _store(writer: CacheWriter, rows: np.ndarray, maps: torch.Tensor, finite: torch.Tensor, ready,
           errors: list[str], images: ImageRows, skip_bad: bool, bar) -> None:
    if ready is not None:
        ready.synchronize()  # this batch's copy has landed; the next batch may still be computing
    read = np.array([not e for e in errors], dtype=bool)
    good = read & finite.numpy()
    if good.any():
        stored = maps.numpy()
        flipped = stored[len(rows):][good] if writer.flipped is not None else None
        writer.write(rows[good], stored[:len(rows)][good], flipped)
    bar.update(int(good.sum()))
    if good.all():
        return
    if not (read <= good).all():  # an image was read but its features cannot be stored as they are
        first = int(np.flatnonzero(read & ~good)[0])
        raise ExtractError(_nonfinite_message(images.path(int(rows[first])), maps[first], writer.path))
    bad_rows = rows[~good]
    first = int(np.flatnonzero(~good)[0])
    if not skip_bad:
        raise ExtractError(f"{images.path(int(rows[first]))}: cannot read image ({errors[first]}); fix or remove it, "
                           f"or pass --skip-bad to record it as skipped and go on (rows done so far are kept: "
                           f"rerun with --resume)")
    writer.mark_skipped(bad_rows)
    for k in np.flatnonzero(~good):  # stderr, like every other message: stdout stays clean for pipes
        bar.write(f"skipped {images.path(int(rows[k]))}: {errors[k]}", file=sys.stderr)
    bar.update(len(bad_rows))


def _nonfinite_message(image, maps: torch.Tensor, partial: Path) -> str:
    if maps.dtype == torch.float16 and not bool(torch.isnan(maps).any()):
        return (f"{image}: its features exceed float16's range (a value above 65504 would be stored as inf); "
                "extract with --dtype float32 instead (a new file: another --out, or --overwrite)")
    return (f"{image}: the backbone gave NaN or inf features for this image (damaged weights?); nothing of it "
            f"was stored (rows done so far are kept in {partial}: rerun with --resume once fixed)")


@contextlib.contextmanager
def _torch_threads(n: int):
    """Leave cores to the decoding workers: oversubscribed OpenMP threads stall each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _codec_threads(device: torch.device) -> int:
    """Compression keeps pace with a GPU only on several cores; on a CPU the forward pass dominates."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(2, min(8, cores // 2)) if device.type == "cuda" else 1


def autocast_dtype(device: torch.device, dtype: str):
    """bf16 autocast where the GPU has it, else fp16; none on CPU or when float32 maps are asked for."""
    if device.type != "cuda" or dtype != "float16":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def preflight_images(dataset: ImageDataset) -> None:
    missing = dataset.check_files()
    if missing:
        shown = ", ".join(missing[:_SHOW_MISSING]) + (", ..." if len(missing) > _SHOW_MISSING else "")
        raise DatasetError(f"dataset {dataset.name!r}: {len(missing)} of {dataset.num_images} image files missing "
                           f"under {dataset.root} (wrong --data-root?): {shown}")
