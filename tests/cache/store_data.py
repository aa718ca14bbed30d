"""Real inputs for the store tests: caches extracted by the real engine from small JPEG folders with
the real EfficientNet-Lite0 at 64 px (1280 x 2 x 2 maps), published into real store folders, and the
command line run as a subprocess the way a user runs it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py

from cache.store import FEATURES_FILE, Store
from extract.backbones import BackboneSpec
from extract.engine import extract_features
from tests.extract.engine_data import image_dataset

REPO = Path(__file__).resolve().parents[2]
SPEC = BackboneSpec("efficientnet_lite0", 64, "imagenet")


def extract_tiny(folder: Path, *, n: int = 8, compression: str = "none", name: str = "tiny", seed: int = 0) -> Path:
    """A finished cache file of n real images (features.h5 in `folder`)."""
    dataset = image_dataset(folder / "images", n=n, name=name, seed=seed)
    return extract_features(dataset, SPEC, folder / FEATURES_FILE, batch_size=4, num_workers=0, device="cpu",
                            compression=compression, progress=False, log=lambda msg: None)


def publish_tiny(store_root: Path, work: Path, **kw) -> tuple[Store, str]:
    """Extract a tiny cache and publish it as an entry of the store at `store_root`."""
    path = extract_tiny(work, **kw)
    with h5py.File(path, "r") as f:
        manifest = json.loads(f.attrs["manifest"])
    store = Store(store_root)
    key = manifest["content_key"]
    stage = store.staging("extract", key)
    path.rename(stage / FEATURES_FILE)
    store.publish(stage, key, manifest)
    return store, key


def chunk_offset(path: Path, row: int) -> tuple[int, int]:
    """(byte offset, stored size) of row `row`'s chunk of feature_map in the file."""
    with h5py.File(path, "r") as f:
        info = f["feature_map"].id.get_chunk_info_by_coord((row, 0, 0, 0))
        return info.byte_offset, info.size


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def run_cli(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)
