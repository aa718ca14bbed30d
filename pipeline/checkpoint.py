"""Checkpoints: plain tensors and dicts only (loadable with torch.load(weights_only=True)), tied
to the cache they were trained on by its content key and class split, written atomically.

Each checkpoint carries `checksum`: sha256 over its fields (config, cache identity, gamma, iteration,
metrics, as canonical JSON) and its weights (every tensor's name, dtype, shape and bytes, by sorted
name), checked on load, so a flipped byte is refused instead of evaluated. A checkpoint without one
(written before the checksum existed, or with the field removed) is refused unless the caller trusts
it explicitly (`--trust-unverified`), and then loads with a warning. Whatever its age, every field the
code uses is checked (types; class indices within the classes; the weights' names, shapes and dtypes
against the model the cache builds; finite weights; the class-index buffers equal to the cache's
split). Every malformed checkpoint (damaged, crafted, a pickle that would run code, not a checkpoint
at all) is one CheckpointError line naming the file.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

from cache.errors import UserError
from pipeline.runlog import to_jsonable

FORMAT = "msdn-zsl-checkpoint"
VERSION = 1
CHECKSUM_PREFIX = "sha256:"
_FIELDS = ("format", "version", "config", "cache", "gamma", "iteration", "metrics")
_CACHE_FIELDS = {"content_key": str, "num_classes": int, "feature_shape": list, "seen_classes": list,
                 "unseen_classes": list}


class CheckpointError(UserError, ValueError):
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
    payload["checksum"] = checkpoint_digest(payload)
    # Serialised in memory, written by Python: a full disk is then an OSError naming the file (torch's
    # own writer reports it as a RuntimeError from its C++ stream, a traceback), and no .tmp stays.
    data = io.BytesIO()
    torch.save(payload, data)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.getbuffer())
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from None  # Python's write error names no file
    os.replace(tmp, path)
    return path


def checkpoint_digest(payload: dict) -> str:
    """"sha256:<hex>" over the payload's fields and weights (see the module docstring)."""
    h = hashlib.sha256()
    for field in _FIELDS:
        h.update(json.dumps([field, payload.get(field)], sort_keys=True).encode())
    for name in sorted(payload["model"]):
        tensor = payload["model"][name].detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return CHECKSUM_PREFIX + h.hexdigest()


def load_checkpoint(path: str | Path, warn=None, *, trust_unverified: bool = False) -> dict:
    """The checkpoint at `path`, checked (format, fields, checksum); CheckpointError otherwise. One
    without a checksum is refused unless `trust_unverified`, when `warn` (default: stderr) hears of it."""
    path = Path(path)
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated / foreign / malicious files
        raise CheckpointError(_refusal(path, err)) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an msdn-zsl checkpoint (no '{FORMAT}' format tag)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')} is not supported "
                              f"(this code reads version {VERSION})")
    _check_fields(payload, path)
    checksum = payload.get("checksum")
    try:
        digest = checkpoint_digest(payload)
    except (TypeError, ValueError) as err:  # e.g. a crafted config holding a tensor
        raise CheckpointError(f"{path}: malformed checkpoint: {_first_line(str(err))}") from None
    if checksum is None and not trust_unverified:
        raise CheckpointError(f"{path}: has no checksum (written by an older version, or the field was removed), "
                              "so damage or edits cannot be detected; pass --trust-unverified to load it anyway")
    if checksum is None:
        warn(f"warning: {path}: written without a checksum (by an older version, or the field was removed), so "
             "damage to its weights cannot be detected; loading it anyway (--trust-unverified)")
    elif checksum != digest:
        raise CheckpointError(f"{path}: its contents do not match its checksum (damaged or edited file); "
                              "do not use it: train again or restore it from a copy")
    return payload


def load_weights(model: torch.nn.Module, checkpoint: dict, path) -> None:
    """model.load_state_dict(checkpoint["model"]), with names and shapes checked first: a checkpoint
    that does not fit the model its config builds is one CheckpointError line."""
    mine = model.state_dict()
    theirs = checkpoint["model"]
    missing = [k for k in mine if k not in theirs]
    extra = [k for k in theirs if k not in mine]
    if missing or extra:
        raise CheckpointError(f"{path}: weights do not fit the model its config builds: "
                              + "; ".join(part for part in (
                                  f"missing {_names(missing)}" if missing else "",
                                  f"unexpected {_names(extra)}" if extra else "") if part))
    for name, tensor in mine.items():
        if tuple(theirs[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: weight {name} has shape {tuple(theirs[name].shape)}, the model built "
                                  f"from its config and cache needs {tuple(tensor.shape)}")
        if theirs[name].dtype != tensor.dtype:  # load_state_dict would cast it without a word
            raise CheckpointError(f"{path}: weight {name} has dtype {theirs[name].dtype}, the model needs {tensor.dtype}")
        if tensor.is_floating_point() and not bool(torch.isfinite(theirs[name]).all()):
            raise CheckpointError(f"{path}: weight {name} holds NaN or inf (a diverged or damaged checkpoint)")
    for name in ("seen_classes", "unseen_classes"):  # class indices: the cache's split, not the file's word
        if name in mine and not torch.equal(theirs[name], mine[name]):
            raise CheckpointError(f"{path}: its {name} {_short(theirs[name].tolist())} are not the cache's "
                                  f"{_short(mine[name].tolist())} (edited or damaged checkpoint)")
    try:
        model.load_state_dict(theirs)
    except RuntimeError as err:  # e.g. a dtype torch cannot copy
        raise CheckpointError(f"{path}: weights do not load ({_first_line(str(err))})") from None


def _check_fields(payload: dict, path: Path) -> None:
    """Every field the code reads, with its type: a crafted file is one line, not a KeyError."""
    def bad(what: str):
        raise CheckpointError(f"{path}: malformed checkpoint: {what}")

    model = payload.get("model")
    if not isinstance(model, dict) or not model:
        bad("no 'model' weights")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        bad("'model' must map names to tensors")
    config = payload.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("head"), dict) or not _is_int(config.get("seed")):
        bad("'config' must be an object with 'head' and 'seed'")
    cache = payload.get("cache")
    if not isinstance(cache, dict):
        bad("no 'cache' identity")
    for key, kind in _CACHE_FIELDS.items():
        value = cache.get(key)
        ok = _is_int(value) if kind is int else isinstance(value, kind)
        if ok and kind is list:
            ok = all(_is_int(x) for x in value)
        if not ok:
            bad(f"cache identity lacks '{key}'" if key not in cache else f"cache identity '{key}' has the wrong type")
    classes = cache["num_classes"]
    if classes < 1 or len(cache["feature_shape"]) != 3 or min(cache["feature_shape"]) < 1:
        bad(f"cache identity: {classes} classes, feature shape {cache['feature_shape']}")
    for key in ("seen_classes", "unseen_classes"):
        outside = [c for c in cache[key] if not 0 <= c < classes]
        if outside:
            bad(f"cache identity '{key}' holds class {outside[0]}, outside the {classes} classes")
    gamma = payload.get("gamma")
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not math.isfinite(gamma):
        bad("'gamma' must be a finite number")
    if not _is_int(payload.get("iteration")):
        bad("'iteration' must be an integer")
    if not isinstance(payload.get("metrics", {}), dict):
        bad("'metrics' must be an object")
    if "checksum" in payload and not isinstance(payload["checksum"], str):
        bad("'checksum' must be a string")
    from heads.config import HeadConfig
    from pipeline.config import TrainConfig
    try:  # what evaluate and visualize build from it
        TrainConfig.from_dict(config, where="embedded config")
        HeadConfig.from_dict(config["head"])
    except (ValueError, TypeError) as err:
        bad(_first_line(str(err)))


def _refusal(path: Path, err: Exception) -> str:
    """One line for what torch.load refused. A pickle that would call something is named as such;
    torch's advice to retry with weights_only=False (which would run it) is not repeated."""
    text = str(err)
    called = re.search(r"GLOBAL ([\w.]+)", text)
    if called:
        return (f"{path}: refused: loading this file would call {called.group(1)} (a pickle that runs code, "
                "not plain tensors); do not load it")
    if "Weights only load failed" in text:
        detail = re.search(r"(Unsupported operand \d+|WeightsUnpickler error: [^\n]+)", text)
        return (f"{path}: not a readable checkpoint (not a torch checkpoint of plain tensors, or damaged"
                + (f": {detail.group(1).strip()}" if detail else "") + ")")
    return f"{path}: not a readable checkpoint ({type(err).__name__}: {_first_line(text)})"


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
