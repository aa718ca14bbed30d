"""Checkpoints: plain tensors and dicts only (loadable with torch.load(weights_only=True)), tied
to the cache they were trained on by its content key and class split, written atomically."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from pipeline.runlog import to_jsonable

FORMAT = "msdn-zsl-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """An unreadable checkpoint, or one that does not belong to the given cache."""


def cache_identity(cache) -> dict:
    """What a model depends on in a cache. Files written by TransZero's script carry no content
    key: the labels, splits and attribute matrices stand in for it."""
    key = cache.content_key
    if not key:
        h = hashlib.sha256()
        arrays = [cache.labels, cache.att] + [cache.splits[k] for k in sorted(cache.splits)]
        for a in arrays:
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        key = "data-sha256:" + h.hexdigest()
    return {"content_key": key,
            "num_classes": int(cache.att.shape[0]),
            "feature_shape": [int(x) for x in cache.feature_shape],
            "seen_classes": [int(c) for c in cache.seen_classes],
            "unseen_classes": [int(c) for c in cache.unseen_classes]}


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, config: dict, identity: dict,
                    gamma: float, iteration: int, metrics: dict | None = None) -> Path:
    path = Path(path)
    payload = {
        "format": FORMAT, "version": VERSION,
        "model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        "config": to_jsonable(config), "cache": to_jsonable(identity),
        "gamma": float(gamma), "iteration": int(iteration), "metrics": to_jsonable(metrics or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an msdn-zsl checkpoint (no '{FORMAT}' format tag)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')} is not supported "
                              f"(this code reads version {VERSION})")
    return payload


def check_compatible(checkpoint: dict, identity: dict, checkpoint_path, cache_path) -> None:
    """Refuse a cache other than the one the checkpoint was trained on."""
    trained = checkpoint["cache"]
    for key, what in (("content_key", "content key"), ("feature_shape", "feature shape"),
                      ("num_classes", "number of classes"), ("seen_classes", "seen classes"),
                      ("unseen_classes", "unseen classes")):
        if trained[key] != identity[key]:
            mine, theirs = _short(trained[key]), _short(identity[key])
            raise CheckpointError(f"{checkpoint_path}: trained on a cache with {what} {mine}, but {cache_path} "
                                  f"has {theirs}; evaluate it with the cache it was trained on")


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."
