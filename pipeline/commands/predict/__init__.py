"""`msdn predict`: apply a trained checkpoint to new photos.

Everything the model saw at training time is rebuilt from the checkpoint and the cache it was
trained on (tied to it by content key): the cache's manifest names the backbone, the image size, the
weights file and its sha256, and the preprocessing; the cache holds the class-attribute matrix and
the seen/unseen split; the checkpoint holds the heads and the calibration gamma the run selected.

An image then takes the path of a cache row: decoded and transformed as extraction decodes it
(extract/loader.py ImageRows + extract/backbones.py build_transform), through the same frozen
backbone the same way (extract/extractor.py `forward_batch`, so the maps are those a cache row would
hold, in the cache's dtype), into region rows as the feature bank makes them (pipeline/features.py
RegionBank -> heads/regions.py normalise_into), and through the heads under the run's autocast
(the scorer of pipeline/engine.py predict_scores). So an image of the cache gets the scores
`msdn evaluate` computes for its row.

Settings: ZSL (default) ranks the unseen classes only; GZSL (`all_classes`) ranks every class with
calibrated stacking at the run's gamma (seen-class scores minus gamma), as evaluate's U/S/H.

Why a class wins: its fused score decomposes over attributes. With attribute scores psi (AVA) and
omega (VAA) of the image, the unit-length class-attribute vector z_c and fusion weights (w1, w2):
    score_c = sum_a z_c[a] * (w1 psi[a] + w2 omega[a]) + (w1 + w2) * bias_c  [- gamma if seen, GZSL]
so `contribution[a] = z_c[a] * (w1 psi[a] + w2 omega[a])` (one sub-net: z_c[a] times its score).
The attributes shown are the predicted class's largest contributions.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cache.reader import FeatureCache
from extract.backbones import BackboneSpec, build_backbone, build_transform
from extract.devices import resolve_device
from extract.extractor import TORCH_DTYPES, autocast_dtype, forward_batch  # the extractor's own: the cache's bits
from extract.loader import ImageRows, default_batch_size
from heads.config import HeadConfig
from pipeline.checkpoint import cache_identity, check_compatible, load_checkpoint, load_weights
from pipeline.config import TrainConfig
from pipeline.engine import autocast, build_model, resolve_amp
from pipeline.features import DTYPES, RegionBank, bank_dtype
from pipeline.metrics import calibrated_stacking
from pipeline.tasks import benchmark_task, usable_splits

from .inputs import PredictError, backbone_for, class_and_attribute_names, describe_shape, find_cache

CONTRIBUTION = ("contribution = class attribute value z_c[a] x the image's attribute score "
                "(w1 psi[a] + w2 omega[a]); a class's contributions plus its bias term sum to its score")


@dataclass
class Predictor:
    """A checkpoint's heads and its cache's backbone, ready to score photos."""
    checkpoint: Path
    cache_path: Path
    spec: BackboneSpec
    weights_file: Path | None
    cache_dtype: str
    device: torch.device
    amp: str
    gamma: float
    model: torch.nn.Module
    backbone: torch.nn.Module
    seen: np.ndarray
    unseen: np.ndarray
    class_names: list[str]
    attribute_names: list[str]
    bank_dtype: torch.dtype
    batch_size: int


def load_predictor(checkpoint: str | Path, *, cache: str | Path | None = None, cache_dir: str | None = None,
                   weights: str | Path | None = None, device: str = "auto",
                   trust_unverified: bool = False) -> Predictor:
    """Checkpoint + its cache + the backbone that made the cache; every mismatch is one UserError line."""
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint, trust_unverified=trust_unverified)
    config = TrainConfig.from_dict(ckpt["config"], where=f"{checkpoint} (embedded config)")
    cache_path = find_cache(checkpoint, ckpt, cache, cache_dir)
    device = resolve_device(device)
    amp = resolve_amp(config.amp, device)
    with FeatureCache(cache_path) as fc:
        check_compatible(ckpt, cache_identity(fc), checkpoint, cache_path)
        manifest = fc.manifest
        if not manifest or "backbone" not in manifest:
            raise PredictError(f"{cache_path}: the cache has no manifest (written by another tool?), so the backbone "
                               "and preprocessing that made its features are unknown; predict needs a cache from "
                               "`msdn extract`")
        if manifest.get("dtype", "float16") not in TORCH_DTYPES:
            raise PredictError(f"{cache_path}: manifest dtype {manifest.get('dtype')!r} is not one extraction "
                               f"writes ({', '.join(TORCH_DTYPES)})")
        spec, weights_file = backbone_for(manifest, cache_path, weights)
        if tuple(fc.feature_shape) != tuple(describe_shape(manifest)):
            raise PredictError(f"{cache_path}: features of shape {tuple(fc.feature_shape)} but its manifest "
                               f"describes {describe_shape(manifest)}")
        task = benchmark_task(np.asarray(fc.labels), usable_splits(fc)[0], num_classes=int(fc.att.shape[0]))
        model = build_model(HeadConfig.from_dict(ckpt["config"]["head"]), fc, task, device, config.seed)
        load_weights(model, ckpt, checkpoint)
        classes, attributes = class_and_attribute_names(fc)
    backbone = build_backbone(spec, download=False).to(device).to(memory_format=torch.channels_last)
    return Predictor(checkpoint=checkpoint, cache_path=cache_path, spec=spec, weights_file=weights_file,
                     cache_dtype=manifest.get("dtype", "float16"), device=device, amp=amp, gamma=float(ckpt["gamma"]),
                     model=model.eval(), backbone=backbone, seen=np.sort(task.seen), unseen=np.sort(task.unseen),
                     class_names=classes, attribute_names=attributes,
                     bank_dtype=DTYPES[bank_dtype(config.feature_dtype, amp)],
                     batch_size=default_batch_size(spec.name, spec.image_size, device))


def image_maps(predictor: Predictor, images: list[Path], failures: dict[int, str] | None = None) -> torch.Tensor:
    """(N, C, H, W) backbone maps of the images, in the cache's dtype, as extraction computes them.
    With `failures` (a dict), an image that cannot be scored is recorded there ({index: one line
    naming it}) and left out of the maps instead of stopping everything with a PredictError."""
    def fail(k: int, message: str) -> None:
        if failures is None:
            raise PredictError(message)
        failures[k] = message

    for k, path in enumerate(images):
        if not path.is_file():
            fail(k, f"{path}: image not found")
    spec = predictor.spec
    rows = ImageRows("", [str(p) for p in images], np.arange(len(images)), build_transform(spec), spec.image_size)
    amp = autocast_dtype(predictor.device, predictor.cache_dtype)
    todo = [k for k in range(len(images)) if failures is None or k not in failures]
    out = []
    for start in range(0, len(todo), predictor.batch_size):
        items = [rows[k] for k in todo[start:start + predictor.batch_size]]
        for k, _, error in items:
            if error:
                fail(int(k), f"{images[k]}: cannot read image ({error})")
        items = [item for item in items if not item[2]]
        if not items:
            continue
        batch = torch.stack([tensor for _, tensor, _ in items])
        # A lone image goes through as a batch of two (itself twice): on the CPU, convolution for a
        # batch of one takes other kernels, whose float16 maps differed in the last bit (measured),
        # while batches of 2..22 gave the cache's bits exactly.
        maps, finite, ready = forward_batch(predictor.backbone, batch.repeat(2, 1, 1, 1) if len(batch) == 1 else batch,
                                       predictor.device, amp, TORCH_DTYPES[predictor.cache_dtype])
        maps, finite = maps[:len(batch)], finite[:len(batch)]
        if ready is not None:
            ready.synchronize()
        finite = finite.cpu().numpy()
        for i in np.flatnonzero(~finite):
            fail(int(items[i][0]), f"{images[items[i][0]]}: the backbone gave non-finite features (not storable as "
                                   f"{predictor.cache_dtype}); its scores would be meaningless")
        out.append(maps.cpu()[torch.from_numpy(finite)])
    return torch.cat(out) if out else torch.empty(0)


@torch.inference_mode()
def head_outputs(predictor: Predictor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fused biased class scores (N, K) float32, image attribute scores w1 psi + w2 omega (N, A))
    from maps as a cache holds them: region rows as the feature bank builds them, the heads under
    the run's autocast, as pipeline/engine.py predict_scores scores cache rows."""
    model, device = predictor.model, predictor.device
    bank = RegionBank(maps, dtype=predictor.bank_dtype, device=device)
    scores, attribute_scores = [], []
    for start in range(0, len(bank), predictor.batch_size):
        with autocast(predictor.amp, device):
            out = model(bank.slice(start, min(start + predictor.batch_size, len(bank))))
            scores.append(model.fused_scores(out).float())
        attribute_scores.append(fused_attribute_scores(model, out))
    return torch.cat(scores).cpu(), torch.cat(attribute_scores).cpu()


def fused_attribute_scores(model, out) -> torch.Tensor:
    """w1 psi + w2 omega (or the one present sub-net's scores): fused_scores before Z and the bias."""
    if out.omega is None:
        return out.psi.float()
    if out.psi is None:
        return out.omega.float()
    w1, w2 = model.cfg.fusion
    return w1 * out.psi.float() + w2 * out.omega.float()


def bias_term(model) -> torch.Tensor:
    """(K,) what fused_scores adds to Z @ (fused attribute scores): the sub-nets' +-bias, fused."""
    weight = sum(model.cfg.fusion) if model.use_ava and model.use_vaa else 1.0
    return weight * model.score_bias.float().cpu()


def predict(checkpoint: str | Path, images: list[str | Path], *, cache: str | Path | None = None,
            cache_dir: str | None = None, weights: str | Path | None = None, device: str = "auto",
            top_k: int = 5, all_classes: bool = False, num_attributes: int = 5, trust_unverified: bool = False,
            log: Callable[[str], None] | None = None) -> list[dict]:
    """One result per image, in order (see `image_result`); ZSL over the unseen classes, or GZSL with the run's
    gamma. An image that cannot be scored gets {"image", "error": one line naming it} instead."""
    if top_k < 1 or num_attributes < 0:
        raise PredictError(f"--top-k must be >= 1 and --attributes >= 0, got {top_k} and {num_attributes}")
    images = [Path(p) for p in images]
    if not images:
        raise PredictError("no IMAGE given")
    if not any(path.is_file() for path in images):  # before the (slow) model build
        raise PredictError(f"{images[0]}: image not found" + (f" (nor any of the other {len(images) - 1})"
                                                              if len(images) > 1 else ""))
    predictor = load_predictor(checkpoint, cache=cache, cache_dir=cache_dir, weights=weights, device=device,
                               trust_unverified=trust_unverified)
    if log is not None:
        log(f"{predictor.checkpoint}: cache {predictor.cache_path}, backbone {predictor.spec.name}"
            f"@{predictor.spec.image_size}px ({predictor.weights_file or 'random init'}), "
            + (f"GZSL, all classes, gamma {predictor.gamma:.4g}" if all_classes else "ZSL, unseen classes")
            + f", on {predictor.device}")
    failures: dict[int, str] = {}  # one bad photo must not cost the others their scores
    maps = image_maps(predictor, images, failures)
    scores, attribute_scores = head_outputs(predictor, maps) if len(maps) else (None, None)
    results, i = [], 0
    for k, path in enumerate(images):
        if k in failures:
            results.append({"image": str(path), "error": failures[k]})
            continue
        results.append(image_result(predictor, str(path), scores[i], attribute_scores[i], top_k=top_k,
                                    all_classes=all_classes, num_attributes=num_attributes))
        i += 1
    return results


def ranked_classes(predictor: Predictor, scores: torch.Tensor, all_classes: bool) -> tuple[np.ndarray, np.ndarray]:
    """(class ids, their scores) best first. ZSL: unseen classes, fused scores (evaluate's zsl_accuracy);
    GZSL: all classes, seen scores minus gamma (evaluate's calibrated stacking). Ties: lower class id,
    as argmax over the class axis."""
    if all_classes:
        candidates = np.arange(scores.shape[0])
        values = calibrated_stacking(scores[None], predictor.seen, predictor.gamma)[0]
    else:
        candidates = predictor.unseen
        values = scores[torch.as_tensor(candidates)]
    order = torch.sort(values, descending=True, stable=True).indices.numpy()
    return candidates[order], values.numpy()[order]


def image_result(predictor: Predictor, image: str, scores: torch.Tensor, attribute_scores: torch.Tensor, *,
                 top_k: int, all_classes: bool, num_attributes: int) -> dict:
    classes, values = ranked_classes(predictor, scores, all_classes)
    seen = set(predictor.seen.tolist())

    def entry(c: int, value: float) -> dict:
        return {"class": int(c), "name": predictor.class_names[c], "seen": c in seen, "score": float(value)}

    best = int(classes[0])
    z = predictor.model.Z[best].float().cpu()
    contribution = z * attribute_scores
    bias = float(bias_term(predictor.model)[best])
    calibration = -predictor.gamma if all_classes and best in seen else 0.0
    order = torch.sort(contribution, descending=True, stable=True).indices[:num_attributes].tolist()
    return {
        "image": image,
        "setting": "GZSL" if all_classes else "ZSL",
        "candidates": "all classes" if all_classes else "unseen classes",
        "gamma": predictor.gamma if all_classes else None,
        "prediction": entry(best, values[0]),
        "top": [entry(c, v) for c, v in zip(classes[:top_k], values[:top_k])],
        "attributes": [{"attribute": a, "name": predictor.attribute_names[a], "contribution": float(contribution[a]),
                        "class_value": float(z[a]), "image_score": float(attribute_scores[a])} for a in order],
        "score_parts": {"attributes": float(contribution.sum()), "bias": bias, "calibration": calibration},
        "explanation": CONTRIBUTION,
    }


def format_results(results: list[dict]) -> str:
    """Human-readable lines: per image the ranking, then the attributes behind the top class."""
    lines = []
    for r in results:
        if "error" in r:  # reported on stderr by the command, one line each
            continue
        p = r["prediction"]
        setting = (f"GZSL: all classes, seen-class scores - gamma {r['gamma']:.4g}" if r["setting"] == "GZSL"
                   else "ZSL: unseen classes only")
        lines.append(f"{r['image']}  ->  {p['name']} (class {p['class']}, {'seen' if p['seen'] else 'unseen'})  "
                     f"[{setting}]")
        for rank, t in enumerate(r["top"], 1):
            kind = "" if r["setting"] == "ZSL" else ("  (seen)" if t["seen"] else "  (unseen)")
            lines.append(f"  {rank:>2}. {t['score']:>9.4f}  {t['name']}{kind}")
        if r["attributes"]:
            parts = r["score_parts"]
            lines.append(f"  why {p['name']}: its top {len(r['attributes'])} attributes by contribution "
                         f"(class attribute value x image attribute score); all contributions sum to "
                         f"{parts['attributes']:.4f}, + bias {parts['bias']:+.4f}"
                         + (f" - gamma ({-parts['calibration']:.4g})" if parts["calibration"] else "")
                         + f" = score {p['score']:.4f}")
            for a in r["attributes"]:
                lines.append(f"      {a['contribution']:+.4f}  {a['name']}  (class {a['class_value']:.3f} x image "
                             f"{a['image_score']:+.3f})")
    return "\n".join(lines)
