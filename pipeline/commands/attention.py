"""Attention of a trained head, in image pixels (no plotting here; pictures: pipeline/commands/visualize.py).

The attribute→visual attention beta (B, A, R) is a distribution over the R = H x W cells of the
backbone's feature grid. The grid covers the centre crop the backbone saw: Resize(S) on the shorter
side, then CenterCrop(S) (extract/backbones.py build_transform). `heat_in_image` undoes that
geometry: it upsamples a grid to the crop's extent in original pixels and places it there; pixels
outside the crop were never seen and get 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cache.reader import FeatureCache
from heads.config import HeadConfig
from heads.msdn import MSDN
from pipeline.checkpoint import cache_identity, check_compatible, load_checkpoint, load_weights
from pipeline.engine import build_model
from pipeline.tasks import Task, benchmark_task, usable_splits


def crop_region(width: int, height: int, size: int) -> tuple[float, float, float]:
    """(left, top, side) in original pixels of the square the backbone saw: torchvision's
    Resize(size) (shorter side -> size, longer side truncated) then CenterCrop(size)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    scale = size / short
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return left / scale, top / scale, size / scale


def heat_in_image(grid: np.ndarray | torch.Tensor, width: int, height: int, size: int) -> np.ndarray:
    """(H, W) attention grid -> (height, width) map over the original image (bilinear; 0 outside
    the centre crop). Values keep the grid's scale (a cell's weight spread over its pixels)."""
    grid = torch.as_tensor(np.asarray(grid), dtype=torch.float32)
    left, top, side = crop_region(width, height, size)
    x0, y0 = int(round(left)), int(round(top))
    x1, y1 = min(width, int(round(left + side))), min(height, int(round(top + side)))
    patch = F.interpolate(grid[None, None], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[0, 0]
    heat = np.zeros((height, width), dtype=np.float32)
    heat[y0:y1, x0:x1] = patch.clamp_min(0).numpy()
    return heat


def box_mass(heat: np.ndarray, box) -> float:
    """Share of a heat map's total inside box (x0, y0, x1, y1), pixel-inclusive."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    total = float(heat.sum())
    return float(heat[max(0, y0):y1 + 1, max(0, x0):x1 + 1].sum()) / total if total > 0 else 0.0


def cell_box_overlap(box, width: int, height: int, size: int, grid: tuple[int, int]) -> np.ndarray:
    """(H*W,) share of each feature-grid cell inside `box` (x0, y0, x1, y1 in image pixels, x1/y1
    exclusive). The grid tiles the square the backbone saw: Resize(size), CenterCrop(size)."""
    left, top, side = crop_region(width, height, size)
    x0, y0, x1, y1 = box

    def along(lo, hi, origin, cells):
        edges = origin + side * np.arange(cells + 1) / cells
        return np.clip(np.minimum(hi, edges[1:]) - np.maximum(lo, edges[:-1]), 0, None) * cells / side

    return np.outer(along(y0, y1, top, grid[0]), along(x0, x1, left, grid[1])).reshape(-1)


OBJECT_GROUPS = ("shape", "colour")  # demo attributes of the object itself (size is judged against the image)


def attention_on_objects(model: MSDN, task: Task, cache: FeatureCache, dataset, names, image_size: int,
                         image_side: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Demo set (boxes known): per (test image, object attribute of its class), the AVA attention
    mass on the object's box and the box's share of the grid (what uniform attention puts there)."""
    rows = np.concatenate([task.eval_unseen_rows, task.eval_seen_rows])
    grid = tuple(cache.feature_shape[1:])
    with torch.inference_mode():
        beta = model.eval()(cache.features(rows=rows, dtype=torch.float32)).beta.float().numpy()
    mass, area = [], []
    for i, row in enumerate(rows):
        with_box = cell_box_overlap(dataset.boxes[row], image_side, image_side, image_size, grid)
        for a in np.flatnonzero(dataset.original_att[dataset.labels[row]] > 0):
            if names[a].split(":")[0] in OBJECT_GROUPS:
                mass.append(float(beta[i, a] @ with_box))
                area.append(float(with_box.mean()))
    return np.array(mass), np.array(area)


@dataclass
class TrainedHead:
    model: MSDN
    task: Task
    checkpoint: dict


def load_trained(checkpoint: str | Path, cache: FeatureCache, device: torch.device, *,
                 trust_unverified: bool = False) -> TrainedHead:
    """The checkpoint's model over the cache's benchmark task (refuses a foreign cache)."""
    ckpt = load_checkpoint(checkpoint, trust_unverified=trust_unverified)
    check_compatible(ckpt, cache_identity(cache), checkpoint, cache.path)
    task = benchmark_task(np.asarray(cache.labels), usable_splits(cache)[0], num_classes=int(cache.att.shape[0]))
    model = build_model(HeadConfig.from_dict(ckpt["config"]["head"]), cache, task, device, ckpt["config"]["seed"])
    load_weights(model, ckpt, checkpoint)
    return TrainedHead(model.eval(), task, ckpt)


@dataclass
class ImageAttention:
    row: int
    attributes: np.ndarray  # (k,) attribute indices, highest attribute score first
    scores: np.ndarray      # (k,) AVA attribute scores psi
    grids: np.ndarray       # (k, H, W) attention over the feature grid, each sums to 1
    predicted: int          # GZSL prediction (class id), fused scores


@torch.inference_mode()
def top_attribute_attention(head: TrainedHead, cache: FeatureCache, rows, top_k: int = 3) -> list[ImageAttention]:
    """For each cache row: its top-k attributes by AVA score and their attention grids."""
    model = head.model
    if not model.use_ava:
        raise ValueError("this head has no attribute→visual sub-net (subnets = 'vaa'): it has no region "
                         "attention per attribute to show")
    device = next(model.parameters()).device
    rows = np.asarray(rows, dtype=np.int64)
    h, w = cache.feature_shape[1:]
    features = cache.lazy()[rows].to(device=device, dtype=torch.float32)
    out = model(features)
    predicted = model.fused_scores(out).argmax(1).cpu().numpy()
    k = min(top_k, model.num_attributes)
    top = out.psi.topk(k, dim=1).indices                                   # (n, k)
    grids = out.beta.gather(1, top[:, :, None].expand(-1, -1, out.beta.shape[2]))  # (n, k, R)
    return [ImageAttention(int(r), top[i].cpu().numpy(), out.psi[i, top[i]].float().cpu().numpy(),
                           grids[i].float().cpu().numpy().reshape(k, h, w), int(head.task.classes[predicted[i]]))
            for i, r in enumerate(rows)]


@torch.inference_mode()
def attribute_features(head: TrainedHead, store, rows, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(N, A) attribute-based features of the rows (AVA psi; VAA omega for a VAA-only head) and
    (N, C) fused, biased class scores, both float32."""
    model = head.model
    feats, scores = [], []
    for batch in store.batches(store.positions(np.asarray(rows)), batch_size):
        out = model(batch.float())
        feats.append((out.psi if out.psi is not None else out.omega).float().cpu())
        scores.append(model.fused_scores(out).float().cpu())
    return torch.cat(feats).numpy(), torch.cat(scores).numpy()
