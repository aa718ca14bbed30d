"""`msdn extract`: map command-line options onto a dataset, a backbone spec and the extraction engine
(extract/extractor.py), into a plain --out file, into the team store, and/or across torchrun ranks.

    store, one process   : entry there -> nothing to do; else take the key's lock (a second asker
                           waits, then reuses), extract into staging/extract-<key>/ (always resumable:
                           same key, same inputs), publish with one rename.
    no store, W ranks    : rank 0 checks --out (up to date / other inputs), every rank extracts its
                           shard beside --out, rank 0 joins (extract/distributed.py).
    store, W ranks       : rank 0 holds the key's lock for the whole job; the shards are written in
                           the staging folder; rank 0 joins and publishes.
Returns the content key (store) or the output path.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from cache import layout as L
from cache.reader import FeatureCache
from cache.store import FEATURES_FILE, Store, StoreError, store_root
from extract.backbone_weights import OFFLINE_ENV
from extract.backbones import BackboneSpec, check_backbone_name, default_image_size, feature_shape  # noqa: F401
from extract.datasets import build_dataset, canonical_name
from extract.distributed import broadcast, dist_env, extract_sharded, process_group, torchrun_world
from extract.extractor import ExtractError, extract_features
from extract.manifest import build_manifest
from extract.reuse import ReuseError


@dataclass
class ExtractOptions:
    dataset: str = "demo"
    out: str | None = None              # default: <dataset>_<backbone>_<size>.h5 in the working folder
    data_root: str | None = None        # default per dataset, see default_data_root
    xlsa17_root: str | None = None      # default <data_root>/xlsa17
    w2v_root: str | None = None         # default <data_root>/attribute_w2v (or w2v/)
    w2v: str = "auto"                   # "none": no word vectors in the cache (random-init embeddings)
    backbone: str = "resnet101"
    image_size: int | None = None       # default per backbone: extract.backbones.default_image_size
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
    offline: bool = False               # no weight download (sets HF_HUB_OFFLINE for this process)
    flip: bool = False                  # also store the horizontally flipped images' maps
    dataset_options: dict = field(default_factory=dict)  # adapter options, e.g. the demo's images_per_class


def default_data_root(dataset: str) -> str | None:
    """TransZero's layout under ./data (the demo is rendered into ./data/demo on first use); CUB100 in
    $MSDN_SHARED_DATA when set (the test-data folder, which holds cub100_subset/). A `folder` dataset
    has no default: the adapter asks for --data-root."""
    if dataset == "folder":
        return None
    if dataset == "CUB100" and os.environ.get("MSDN_SHARED_DATA"):
        return os.environ["MSDN_SHARED_DATA"]
    return "data"


def default_out(options: ExtractOptions) -> Path:
    backbone = options.backbone.replace(":", "-")  # timm:<model> -> timm-<model>: no colon in file names
    return Path(f"{options.dataset}_{backbone}_{image_size_of(options)}.h5")


def image_size_of(options: ExtractOptions) -> int:
    """--image-size, else the backbone's default (extract/backbones.py: default_image_size)."""
    return options.image_size if options.image_size is not None else default_image_size(options.backbone)[0]


def build_inputs(options: ExtractOptions):
    """(dataset, backbone spec, output path) that `options` describe."""
    name = canonical_name(options.dataset)
    data_root = options.data_root or default_data_root(name)
    dataset = build_dataset(name, data_root=data_root, xlsa17_root=options.xlsa17_root, w2v_root=options.w2v_root,
                            w2v=options.w2v, **options.dataset_options)
    try:
        spec = BackboneSpec(options.backbone, image_size_of(options), options.weights)
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
                            num_workers=options.workers, progress=options.progress, flip=options.flip, log=log)


# Files a finished staging folder may still hold from an earlier, different attempt.
_LEFTOVER_SUFFIXES = (".partial", ".creating", ".joining", ".recovering", ".lock")


def run(options: ExtractOptions, *, cache_dir: str | None = None, materialize: bool = False,
        log=print) -> str | None:
    """`msdn extract`: into a plain --out file, or into the store and/or across torchrun ranks.
    Returns the content key to print (once, on rank 0) when the result went into a store, else None."""
    if options.offline:
        os.environ[OFFLINE_ENV] = "1"  # read where a download would start (extract/backbone_weights.py)
    if uses_store(options, cache_dir) or torchrun_world() > 1:
        key = run_extract_scaled(options, cache_dir=cache_dir, materialize=materialize, log=log)
        if uses_store(options, cache_dir) and os.environ.get("RANK", "0") == "0":
            return str(key)
        return None
    run_extract(options, log=log)
    return None


def uses_store(options: ExtractOptions, cache_dir: str | None) -> bool:
    """--cache-dir, or MSDN_CACHE_DIR when no --out names a plain file."""
    return bool(cache_dir) or (not options.out and store_root() is not None)


def run_extract_scaled(options: ExtractOptions, *, cache_dir: str | None = None, materialize: bool = False,
                       log=print) -> str | Path:
    if cache_dir and options.out:
        raise StoreError("pass either --out (a plain file) or --cache-dir (the store), not both")
    dataset, spec, out = build_inputs(options)
    store = Store(store_root(cache_dir)) if uses_store(options, cache_dir) else None
    engine = dict(batch_size=options.batch_size, dtype=options.dtype, compression=options.compression,
                  skip_bad=options.skip_bad, num_workers=options.workers, progress=options.progress,
                  flip=options.flip)
    if torchrun_world() <= 1:
        if store is None:
            return extract_features(dataset, spec, out, device=options.device, resume=options.resume,
                                    overwrite=options.overwrite, log=log, **engine)
        return _into_store(store, dataset, spec, options, engine, log)
    if options.flip:  # the shard join (cache/shards.py) carries feature_map only: never drop the flips
        raise ExtractError(f"{out if store is None else store.root}: --flip is not supported under torchrun yet "
                           "(shards are joined without flipped maps); extract with --flip in one process")
    env = dist_env(options.device)
    with process_group(env), contextlib.ExitStack() as held:
        decision, failure = None, None
        if env.rank == 0:  # decides for everyone; its errors reach the others as a message
            try:
                key = _expected_key(dataset, spec, options)
                decision = _plain_decision(out, key, options.overwrite) if store is None else \
                    _store_decision(store, key, held, log)
            except Exception as err:  # noqa: BLE001
                decision, failure = ("error", None, str(err)), err
        verdict, key, message = broadcast(decision, env)
        if failure is not None:
            raise failure
        if verdict != "run":
            if env.rank == 0:
                log(message)
            if verdict == "error":
                raise ReuseError(message)
            return out if store is None else key
        target = out if store is None else _staging(store, "extract", key) / FEATURES_FILE
        extract_sharded(dataset, spec, target, env, materialize=materialize, log=log,
                        overwrite=options.overwrite, **engine)
        if store is None:
            return out
        if env.rank == 0:
            _publish(store, target.parent, key, log)
        return key


def _into_store(store: Store, dataset, spec, options: ExtractOptions, engine: dict, log) -> str:
    key = _expected_key(dataset, spec, options)
    if store.has(key):
        log(f"entry {key} is already in {store.root}: nothing to do")
        store.touch_used(key)
        return key
    with store.lock(key, log):
        if store.has(key):
            log(f"entry {key} was published by another process meanwhile: reusing it")
            store.touch_used(key)
            return key
        stage = store.staging("extract", key)
        extract_features(dataset, spec, stage / FEATURES_FILE, device=options.device, resume=True,
                         overwrite=options.overwrite, log=log, **engine)
        _publish(store, stage, key, log)
    return key


def _expected_key(dataset, spec, options: ExtractOptions) -> str:
    return build_manifest(dataset, spec, dtype=options.dtype, compression=options.compression,
                          flipped=options.flip)["content_key"]


def _store_decision(store: Store, key: str, held: contextlib.ExitStack, log):
    """Rank 0: (verdict, key, message); "run" with the key's lock held until the job ends."""
    if not store.has(key):
        held.enter_context(store.lock(key, log))
        if not store.has(key):
            return "run", key, ""
    store.touch_used(key)
    return "skip", key, f"entry {key} is already in {store.root}: nothing to do"


def _plain_decision(out: Path, key: str, overwrite: bool):
    if not out.exists():
        return "run", key, ""
    try:
        with FeatureCache(out) as cache:
            same, complete = cache.content_key == key, cache.complete
    except Exception as err:  # noqa: BLE001 - reported as one line on every rank
        return "error", key, f"{out}: exists but cannot be read ({err}); delete it or pass --overwrite"
    if same and complete:
        return "skip", key, f"{out}: up to date (content key {key[:12]}...), nothing to do"
    if overwrite or same:  # same inputs, rows missing: the shards complete them
        out.unlink()
        return "run", key, ""
    return "error", key, (f"{out}: holds features of other inputs; pass --overwrite to replace it or choose "
                          "another --out")


def _staging(store: Store, kind: str, key: str) -> Path:
    path = store.root / "staging" / f"{kind}-{key}"
    path.mkdir(parents=True, exist_ok=True)  # every rank: the first one creates it
    return path


def _publish(store: Store, stage: Path, key: str, log) -> None:
    with FeatureCache(stage / FEATURES_FILE) as cache:
        manifest, virtual = cache.manifest, cache.file[L.FEATURES].is_virtual
        sources = {Path(s.file_name).name for s in cache.file[L.FEATURES].virtual_sources()} if virtual else set()
    if manifest["content_key"] != key:
        raise StoreError(f"{stage}: holds content key {manifest['content_key'][:12]}..., expected {key[:12]}... "
                         "(inputs changed during the run?); rerun")
    for path in stage.iterdir():  # leftovers of an earlier attempt that took another route
        if path.name.endswith(_LEFTOVER_SUFFIXES) or (".shard-" in path.name and path.name not in sources):
            path.unlink()
    store.publish(stage, key, manifest, log=log)
