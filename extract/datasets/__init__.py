"""Image dataset adapters; each returns an ImageDataset. `build_dataset(name, **options)` picks one."""
from __future__ import annotations

import dataclasses
import functools
import inspect
from pathlib import Path
from typing import Callable

from .base import DatasetError, ImageDataset, check_image_files
from .cub_folder import load_cub_folder
from .demo import DemoConfig, load_demo, render_demo
from .folder import load_folder
from .xlsa17 import XLSA17_DATASETS, load_xlsa17


def _demo(root: str | Path | None = None, data_root: str | Path | None = None, seed: int = 0,
          **options) -> ImageDataset:
    if root is None and data_root is None:
        raise DatasetError("demo: pass root=<folder to render the demo into> (or data_root=, which uses <data_root>/demo)")
    return load_demo(Path(root) if root is not None else Path(data_root) / "demo", seed=seed, **options)


# One factory per kind of source; the xlsa17 benchmarks share theirs.
DATASETS: dict[str, Callable[..., ImageDataset]] = {
    **{name: functools.partial(load_xlsa17, name) for name in XLSA17_DATASETS},
    "CUB100": load_cub_folder,
    "demo": _demo,
    "folder": load_folder,
}
OPTION_ALIASES = {"splits_root": "xlsa17_root"}
W2V_CHOICES = ("auto", "none")
W2V_NONE_NOTE = "none (--w2v none): no word vectors stored; training learns the attribute embeddings from a random init"


# Options of `msdn extract` that a dataset has no use for, and where that dataset takes the same from.
UNUSED_HINTS = {("folder", "w2v_root"): "its word vectors are attribute_vectors.csv or .npy in --data-root",
                ("folder", "xlsa17_root"): "its splits are classes.csv and images.csv in --data-root"}
CLI_OPTIONS = ("data_root", "xlsa17_root", "w2v_root", "w2v")  # the dataset options `msdn extract` has


def _option(key: str) -> str:
    """How a user passed `key`: --w2v-root on the command line, else the keyword."""
    return "--" + key.replace("_", "-") if key in CLI_OPTIONS else f"{key}="


def valid_options(name: str) -> list[str]:
    factory = DATASETS[canonical_name(name)]
    params = [p for p in inspect.signature(factory).parameters.values()
              if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    names = [p.name for p in params]
    if factory is _demo:
        names += [f for f in DemoConfig.__dataclass_fields__ if f != "seed"]
    return names + ["w2v"] * ("w2v" not in names)


def canonical_name(name: str) -> str:
    """Exact registry name for `name` (case-insensitive), or DatasetError listing the valid ones."""
    if name in DATASETS:
        return name
    matches = [key for key in DATASETS if key.lower() == str(name).lower()]
    if not matches:
        raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return matches[0]


def build_dataset(name: str, **options) -> ImageDataset:
    """Load dataset `name` (see DATASETS). Options left as None are dropped, so a CLI can pass every
    option it has; `splits_root` is accepted for `xlsa17_root`. Every dataset takes `w2v`: "auto"
    (its word vectors, where it has them) or "none" (no word vectors: w2v_att = None, and training
    learns the attribute embeddings from a random init); adapters that read word vectors skip
    them, the others' are dropped after loading."""
    name = canonical_name(name)
    options = {OPTION_ALIASES.get(k, k): v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(valid_options(name)))
    if unknown:
        raise DatasetError(f"--dataset {name}: {', '.join(map(_option, unknown))} does not apply to it "
                           f"({UNUSED_HINTS.get((name, unknown[0]), 'it takes ' + ', '.join(map(_option, valid_options(name))))})")
    w2v = options.get("w2v", "auto")
    if w2v not in W2V_CHOICES:
        raise DatasetError(f"{name}: w2v {w2v!r}: expected one of {', '.join(W2V_CHOICES)}")
    factory = DATASETS[name]
    if "w2v" not in inspect.signature(factory).parameters:
        options.pop("w2v", None)
    dataset = factory(**options)
    if w2v == "none":
        dataset = dataclasses.replace(dataset, w2v_att=None, source={**dataset.source, "w2v_att": W2V_NONE_NOTE})
    return dataset


__all__ = ["DATASETS", "DatasetError", "ImageDataset", "build_dataset", "canonical_name", "check_image_files",
           "load_cub_folder", "load_demo", "load_folder", "load_xlsa17", "render_demo", "valid_options"]
