"""Image decoding for the extractor: a torch Dataset over the rows still to do, and loader defaults.

Decoding runs in DataLoader worker processes, so JPEG decoding and resizing overlap the forward pass.
An unreadable image does not kill the batch: its row comes back with a zero image and the error text,
and the engine decides (stop and name the file, or record the row as skipped with --skip-bad).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

# CPU choices measured on 2 cores with CUB photos (EfficientNet-Lite0 @224, 1 thread): decoding +
# resizing costs ~2.6 ms/image against a ~20-28 ms forward, and batches of 2-4 ran faster per image
# than 16. So on a small CPU the cores go to the forward (no worker: it would take a core for ~10%
# of the work); larger CPUs give 1 worker per 8 cores, which keeps decoding off the critical path.
CPU_CORES_PER_WORKER = 8
CUDA_MAX_WORKERS = 16


# What PIL raises for a file that is not a decodable image. SyntaxError: PIL's parsers raise it for
# some malformed headers. DecompressionBombError: a header declaring more than 2 x
# Image.MAX_IMAGE_PIXELS (a 60000 x 60000 PNG of 437 KB would decode to 3.6 GB), refused before any
# pixel is decoded.
UNREADABLE = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


class ImageRows(Dataset):
    """Item k = (row, image tensor, error) for rows[k]; error is "" when the image decoded."""

    def __init__(self, root: str | Path, image_paths: list[str], rows: np.ndarray, transform, image_size: int):
        self.root, self.image_paths = str(root), image_paths
        self.rows = np.asarray(rows, dtype=np.int64)
        self.transform, self.image_size = transform, image_size

    def __len__(self) -> int:
        return len(self.rows)

    def path(self, row: int) -> str:
        return os.path.join(self.root, self.image_paths[row])

    def __getitem__(self, k: int):
        row = int(self.rows[k])
        try:
            with Image.open(self.path(row)) as image:
                image.load()  # decode fully here: a truncated file must fail now, not half-decoded
                tensor = self.transform(image)
            return row, tensor, ""
        except UNREADABLE as err:
            blank = torch.zeros(3, self.image_size, self.image_size)
            return row, blank, f"{type(err).__name__}: {err}"


def default_num_workers(device: torch.device) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(1, min(CUDA_MAX_WORKERS, cores - 1))
    return 0 if cores <= 2 else max(1, cores // CPU_CORES_PER_WORKER)


def default_batch_size(backbone: str, image_size: int, device: torch.device) -> int:
    """Large batches on a GPU; small ones on a CPU, where they ran faster per image (see above)."""
    pixels = (image_size / 224) ** 2
    if device.type == "cuda":
        return max(8, int((256 if _is_lite(backbone) else 128) / pixels))
    return max(1, round((4 if _is_lite(backbone) else 8) / pixels))


def _is_lite(backbone: str) -> bool:
    """EfficientNet-Lite0/Lite2: depthwise blocks whose expanded activations favour small CPU batches."""
    return backbone.startswith("efficientnet_lite")


def make_loader(images: ImageRows, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    return DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=device.type == "cuda", drop_last=False,
                      prefetch_factor=4 if num_workers > 0 else None,
                      persistent_workers=False)
