"""`msdn extract`: map command-line options onto a dataset, a backbone spec and the extraction engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cache.reader import CacheError
from extract.backbones import BackboneSpec, BackboneWeightsError, feature_shape
from extract.datasets import DatasetError, build_dataset, canonical_name
from extract.engine import ExtractError, extract_features

# Errors that mean "bad input or state, say it in one line" (no traceback in the CLI).
EXTRACT_ERRORS = (DatasetError, BackboneWeightsError, ExtractError, CacheError)


@dataclass
class ExtractOptions:
    dataset: str = "demo"
    out: str | None = None              # default: <dataset>_<backbone>_<size>.h5 in the working folder
    data_root: str | None = None        # default per dataset, see default_data_root
    xlsa17_root: str | None = None      # default <data_root>/xlsa17
    w2v_root: str | None = None         # default <data_root>/attribute_w2v (or w2v/)
    backbone: str = "resnet101"
    image_size: int = 448
    weights: str = "imagenet"
    batch_size: int | None = None       # default per device and backbone (extract/loader.py)
    device: str = "auto"
    dtype: str = "float16"
    compression: str = "lzf"
    workers: int | None = None          # default per device (extract/loader.py)
    resume: bool = False
    skip_bad: bool = False
    overwrite: bool = False
    progress: bool = True
    dataset_options: dict = field(default_factory=dict)  # adapter options, e.g. the demo's images_per_class


def default_data_root(dataset: str) -> str:
    """CUB100 lives in the shared data folder when there is one; everything else follows TransZero's
    layout under ./data (the demo is rendered into ./data/demo on first use)."""
    if dataset == "CUB100":
        try:
            from extract.datasets.shared_data import find_shared_data
            return str(find_shared_data())
        except FileNotFoundError:
            pass
    return "data"


def default_out(options: ExtractOptions) -> Path:
    backbone = options.backbone.replace(":", "-")  # timm:<model> -> timm-<model>: no colon in file names
    return Path(f"{options.dataset}_{backbone}_{options.image_size}.h5")


def build_inputs(options: ExtractOptions):
    """(dataset, backbone spec, output path) that `options` describe."""
    name = canonical_name(options.dataset)
    data_root = options.data_root or default_data_root(name)
    dataset = build_dataset(name, data_root=data_root, xlsa17_root=options.xlsa17_root, w2v_root=options.w2v_root,
                            **options.dataset_options)
    try:
        spec = BackboneSpec(options.backbone, options.image_size, options.weights)
        feature_shape(spec)  # timm:<model>: timm installed, knows the model, gives a map at this size
    except ValueError as err:
        raise ExtractError(str(err)) from None
    return dataset, spec, Path(options.out) if options.out else default_out(options)


def run_extract(options: ExtractOptions, log=None) -> Path:
    """Build the dataset and backbone spec from `options` and extract; returns the finished file."""
    dataset, spec, out = build_inputs(options)
    return extract_features(dataset, spec, out, batch_size=options.batch_size, device=options.device,
                            dtype=options.dtype, compression=options.compression, resume=options.resume,
                            skip_bad=options.skip_bad, overwrite=options.overwrite,
                            num_workers=options.workers, progress=options.progress, log=log)
