"""`msdn extract --flip`: the flipped images' maps beside the originals in one file, on small real
JPEGs and the real EfficientNet-Lite0 (as tests/extract/test_extractor.py)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import cli

from cache.layout import partial_path
from cache.reader import CacheError, FeatureCache
from cache.store import Store
from cache.shards import export_cache, join_shards
from cache.verify import verify_cache
from extract.backbones import build_backbone, build_transform
from extract.manifest import build_manifest
from extract.reuse import ReuseError
from tests.extract.test_extractor import SPEC, run
from tests.extract.test_extractor_cli import done_rows
from tests.fixtures.folder import cub_folder_dataset
from tests.fixtures.images import image_dataset
from tests.fixtures.processes import reaped

REPO = Path(__file__).resolve().parents[2]
CONTENT_KEYS = {"format_version", "backbone", "feature_shape", "dtype", "dataset"}  # main's, before --flip


@pytest.fixture
def tiny(tmp_path):
    return image_dataset(tmp_path / "images", n=8)


def test_flipped_rows_are_the_backbone_maps_of_the_flipped_images(tiny, tmp_path):
    out, logs = run(tiny, tmp_path / "f.h5", dtype="float32", flip=True)
    model, transform = build_backbone(SPEC), build_transform(SPEC)
    with torch.inference_mode():
        images = torch.stack([transform(Image.open(tiny.root / p)) for p in tiny.image_paths])
        expected, expected_flipped = model(images), model(torch.flip(images, dims=[3]))
    with FeatureCache(out) as cache:
        assert cache.complete and cache.has_flipped
        assert torch.allclose(cache.features(dtype=torch.float32), expected, atol=1e-4, rtol=1e-4)
        flipped = cache.features(dtype=torch.float32, flipped=True)
        assert torch.allclose(flipped, expected_flipped, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(flipped, expected, atol=1e-2)  # a real second map, not a copy
    with h5py.File(out, "r") as f:
        fm, ff = f["feature_map"], f["feature_map_flipped"]
        assert (ff.shape, ff.dtype, ff.chunks, ff.compression) == (fm.shape, fm.dtype, fm.chunks, fm.compression)
        assert f["row_crc32_flipped"].shape == (8,)
    assert any("and their flips" in line for line in logs)
    assert verify_cache(out).verdict == "ok"


def test_the_content_key_changes_only_with_flip(tiny, tmp_path):
    plain, flipped = build_manifest(tiny, SPEC), build_manifest(tiny, SPEC, flipped=True)
    assert set(plain["content"]) == CONTENT_KEYS  # every existing cache keeps its key
    assert flipped["content"] == {**plain["content"], "flipped": True}
    assert flipped["content_key"] != plain["content_key"]
    out, _ = run(tiny, tmp_path / "f.h5")
    with FeatureCache(out) as cache:
        assert cache.content_key == plain["content_key"] and not cache.has_flipped
        with pytest.raises(CacheError, match="msdn extract --flip"):
            cache.features(flipped=True)
    with pytest.raises(ReuseError, match="other inputs"):  # reuse: a flipped cache is other content
        run(tiny, out, flip=True)


def test_verify_names_a_corrupted_flipped_row_and_export_refuses_to_drop_them(tiny, tmp_path):
    out, _ = run(tiny, tmp_path / "f.h5", flip=True)
    with h5py.File(out, "r+") as f:
        f["feature_map_flipped"][5] = f["feature_map_flipped"][5] + 1
    report = verify_cache(out)
    assert report.verdict == "corrupt" and report.exit_code == 1
    assert any("feature_map_flipped: checksum mismatch in 1 row(s): 5" in line for line in report.lines())
    with pytest.raises(CacheError, match="feature_map_flipped"):
        export_cache(out, tmp_path / "export.h5")
    with pytest.raises(CacheError, match=f"{out}: holds flipped maps"):
        join_shards(tmp_path / "joined.h5", [out], tiny, build_manifest(tiny, SPEC, flipped=True))
    assert not (tmp_path / "export.h5").exists() and not (tmp_path / "joined.h5").exists()


_KILLED_RUN = """
import sys
from pathlib import Path
from extract.extractor import extract_features
from tests.extract.test_extractor import SPEC
from tests.fixtures.images import image_dataset
extract_features(image_dataset(Path(sys.argv[1]), n=8), SPEC, sys.argv[2], batch_size=1, num_workers=0,
                 progress=False, flip=True)
"""


def test_a_killed_flip_extraction_resumes_and_matches_an_uninterrupted_one(tiny, tmp_path):
    reference, _ = run(tiny, tmp_path / "ref.h5", flip=True)
    out = tmp_path / "f.h5"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(tiny.root), str(out)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "MSDN_EXTRACT_THROTTLE_S": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    with reaped(proc):
        while done_rows(partial_path(out)) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "extraction made no progress"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    with FeatureCache(partial_path(out)) as cache:  # both maps of a done row are there after the kill
        done = np.flatnonzero(cache.done)
        assert 2 <= len(done) < 8
        with FeatureCache(reference) as ref:
            assert torch.equal(cache.features(rows=done, flipped=True), ref.features(rows=done, flipped=True))
    _, logs = run(tiny, out, flip=True, resume=True)
    assert any(f"extracting {8 - len(done)} of 8" in line for line in logs)
    with FeatureCache(out) as cache, FeatureCache(reference) as ref:
        assert cache.complete and cache.content_key == ref.content_key
        assert torch.equal(cache.features(), ref.features())
        assert torch.equal(cache.features(flipped=True), ref.features(flipped=True))
    assert verify_cache(out).verdict == "ok"



def test_msdn_extract_flip_into_the_store_prints_the_flipped_key_and_verify_checks_both(shared_data, tmp_path,
                                                                                        monkeypatch):
    """The command line end to end: --flip reaches the extraction and the store's expected key."""
    folder = cub_folder_dataset(tmp_path / "birds", shared_data, seen=4, unseen=2, per_class=3)
    store = tmp_path / "store"

    def extract(*extra, code=0):
        result = CliRunner().invoke(cli.main, [
            "extract", "--dataset", "folder", "--data-root", str(folder), "--backbone", "efficientnet_lite0",
            "--image-size", "64", "--device", "cpu", "--workers", "0", "--no-progress", "--cache-dir", str(store),
            *extra])
        assert result.exit_code == code, result.output
        return result.output.strip().splitlines()[-1]

    flipped, plain = extract("--flip"), extract()
    assert flipped != plain
    with FeatureCache(Store(store).features_path(flipped)) as cache:
        assert cache.has_flipped and cache.complete and cache.content_key == flipped
    with FeatureCache(Store(store).features_path(plain)) as cache:
        assert not cache.has_flipped
    verified = CliRunner().invoke(cli.main, ["cache", "verify", flipped, "--cache-dir", str(store)])
    assert verified.exit_code == 0, verified.output
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: shards are joined without flipped maps, so refused
    refusal = extract("--flip", code=1)
    assert refusal.endswith(f"{store}: --flip is not supported under torchrun yet (shards are joined without "
                            "flipped maps); extract with --flip in one process")
