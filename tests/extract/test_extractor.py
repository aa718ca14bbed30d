"""The extraction engine in process, on small real JPEG folders and the real EfficientNet-Lite0."""
import dataclasses
import os

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from cache.layout import partial_path
from cache.reader import FeatureCache
from cache.writer import output_lock
from extract.backbones import BackboneSpec, build_backbone, build_transform
from extract.datasets.base import DatasetError
from extract.extractor import ExtractError, extract_features
from tests.fixtures.images import image_dataset, write_jpeg

SPEC = BackboneSpec("efficientnet_lite0", 96, "imagenet")   # 3 x 3 grid: real weights, cheap


def run(dataset, out, spec=SPEC, **kw):
    logs = []
    kw = {"batch_size": 3, "num_workers": 0, "progress": False, **kw}
    path = extract_features(dataset, spec, out, log=logs.append, **kw)
    return path, logs


@pytest.fixture
def tiny(tmp_path):
    return image_dataset(tmp_path / "images", n=8)


def test_rows_are_the_backbone_maps_of_their_images(tiny, tmp_path):
    out, logs = run(tiny, tmp_path / "f.h5", dtype="float32", num_workers=1)
    model, transform = build_backbone(SPEC), build_transform(SPEC)
    with torch.inference_mode():
        images = torch.stack([transform(Image.open(tiny.root / p)) for p in tiny.image_paths])
        expected = model(images)
    with FeatureCache(out) as cache:
        assert cache.complete and cache.feature_shape == (1280, 3, 3)
        got = cache.features(dtype=torch.float32)
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
        assert np.array_equal(cache.labels, tiny.labels) and cache.image_paths == tiny.image_paths
        for key, loc in tiny.splits.items():
            assert np.array_equal(cache.splits[key], loc)
        assert np.allclose(cache.w2v_att, tiny.w2v_att) and np.allclose(cache.att, tiny.att)
        assert cache.manifest["dtype"] == "float32" and cache.manifest["compute"]["device"] == "cpu"
    assert not partial_path(out).exists()
    assert any("extracting 8 of 8" in line for line in logs)


@pytest.mark.parametrize("dtype,compression", [("float16", "lzf"), ("float32", "gzip"), ("float16", "none")])
def test_file_layout(tiny, tmp_path, dtype, compression):
    out, _ = run(tiny, tmp_path / "f.h5", dtype=dtype, compression=compression)
    with h5py.File(out, "r") as f:
        fm = f["feature_map"]
        assert fm.shape == (8, 1280, 3, 3) and fm.chunks == (1, 1280, 3, 3)
        assert fm.dtype == np.dtype(dtype) and fm.compression == (None if compression == "none" else compression)
        assert f["done"][:].all() and not f["skipped"][:].any()
        assert f["labels"].dtype == np.int64 and f["trainval_loc"].dtype == np.int64
        assert f.attrs["content_key"] and f.attrs["format"] == "msdn-feature-cache"


def test_missing_output_folders_are_created(tiny, tmp_path):
    out, _ = run(tiny, tmp_path / "runs" / "new" / "f.h5")
    assert out == tmp_path / "runs" / "new" / "f.h5" and out.is_file()


def test_finished_file_is_up_to_date_and_untouched(tiny, tmp_path):
    out, _ = run(tiny, tmp_path / "f.h5")
    before = out.stat().st_mtime_ns
    again, logs = run(tiny, out, batch_size=5)           # batch size is not an input of the content
    assert again == out and out.stat().st_mtime_ns == before
    assert any("up to date" in line for line in logs) and not partial_path(out).exists()


def test_other_inputs_with_an_existing_file_need_overwrite(tiny, tmp_path):
    out, _ = run(tiny, tmp_path / "f.h5")
    other = dataclasses.replace(tiny, att=tiny.att[:, ::-1].copy())
    with pytest.raises(ExtractError, match="other inputs.*--overwrite"):  # message names the file
        run(other, out)
    with pytest.raises(ExtractError, match="other inputs"):
        run(tiny, out, spec=BackboneSpec("efficientnet_lite0", 64, "imagenet"))
    run(other, out, overwrite=True)
    with FeatureCache(out) as cache:
        assert np.allclose(cache.att, other.att) and cache.complete


def test_missing_images_are_listed_before_any_work(tiny, tmp_path):
    for rel in tiny.image_paths[2:5]:
        (tiny.root / rel).unlink()
    with pytest.raises(DatasetError, match=r"3 of 8 image files missing.*img002\.jpg") as err:
        run(tiny, tmp_path / "f.h5")
    assert str(tiny.root) in str(err.value)
    assert not (tmp_path / "f.h5").exists() and not partial_path(tmp_path / "f.h5").exists()


def test_missing_weights_file_fails_before_any_work(tiny, tmp_path):
    with pytest.raises(Exception, match="nowhere.pth"):
        run(tiny, tmp_path / "f.h5", spec=BackboneSpec("efficientnet_lite0", 96, str(tmp_path / "nowhere.pth")))
    assert not partial_path(tmp_path / "f.h5").exists()


def _break_images(dataset):
    """Row 4: a JPEG cut in half; row 6: a text file named .jpg."""
    good4 = (dataset.root / dataset.image_paths[4]).read_bytes()
    (dataset.root / dataset.image_paths[4]).write_bytes(good4[: len(good4) // 2])
    (dataset.root / dataset.image_paths[6]).write_text("this is not a picture\n")


def test_unreadable_image_stops_and_names_the_file_keeping_done_rows(tiny, tmp_path):
    _break_images(tiny)
    out = tmp_path / "f.h5"
    with pytest.raises(ExtractError, match=r"img004\.jpg: cannot read image.*--skip-bad"):
        run(tiny, out, batch_size=2)
    assert not out.exists()
    with FeatureCache(partial_path(out)) as cache:      # good rows up to the bad one's batch are kept
        assert cache.done.tolist() == [True] * 4 + [False, True, False, False] and not cache.skipped.any()
    with pytest.raises(ExtractError, match="--resume"):
        run(tiny, out, batch_size=2)                    # a partial file is never silently redone


def test_skip_bad_records_skipped_rows_and_resume_fills_them(tiny, tmp_path):
    clean = run(tiny, tmp_path / "clean.h5")[0]
    good4 = (tiny.root / tiny.image_paths[4]).read_bytes()
    good6 = (tiny.root / tiny.image_paths[6]).read_bytes()
    _break_images(tiny)
    out, logs = run(tiny, tmp_path / "f.h5", skip_bad=True)
    assert sum("skipped" in line for line in logs) >= 1
    with FeatureCache(out) as cache:
        assert cache.skipped.tolist() == [False] * 4 + [True, False, True, False]
        assert cache.done.tolist() == [not s for s in cache.skipped.tolist()] and not cache.complete
        assert torch.all(cache.features(rows=[4, 6], allow_incomplete=True) == 0)
        assert 4 not in cache.done_splits()["trainval_loc"]
    (tiny.root / tiny.image_paths[4]).write_bytes(good4)
    (tiny.root / tiny.image_paths[6]).write_bytes(good6)
    with pytest.raises(ExtractError, match="2 image file.*changed.*--resume"):
        run(tiny, out)
    _, logs = run(tiny, out, resume=True)
    assert any("extracting 2 of 8" in line for line in logs)   # only the skipped rows are recomputed
    with FeatureCache(out) as fixed, FeatureCache(clean) as reference:
        assert fixed.complete and not fixed.skipped.any()
        assert torch.equal(fixed.features(), reference.features())


def test_skipped_rows_are_left_out_of_the_split_locations_until_resume_fills_them(tiny, tmp_path):
    """TransZero/MSDN's own loaders read trainval_loc & co. as they are: a skipped row there would
    train them on an all-zero map."""
    good = {r: (tiny.root / tiny.image_paths[r]).read_bytes() for r in (4, 6)}
    _break_images(tiny)
    out, logs = run(tiny, tmp_path / "f.h5", skip_bad=True)
    with h5py.File(out, "r") as f:                                   # as their loaders see the file
        locations = {k: f[k][()].tolist() for k in ("trainval_loc", "test_seen_loc", "test_unseen_loc",
                                                     "train_loc", "val_loc")}
    expected = {k: [r for r in v.tolist() if r not in (4, 6)] for k, v in tiny.splits.items()}
    assert locations == expected and expected["trainval_loc"] != tiny.splits["trainval_loc"].tolist()
    said = [line for line in logs if "left out of the split locations" in line]
    assert len(said) == 1 and "2 unreadable image(s)" in said[0] and "trainval_loc 1" in said[0], logs
    for r, data in good.items():
        (tiny.root / tiny.image_paths[r]).write_bytes(data)
    run(tiny, out, resume=True)
    with h5py.File(out, "r") as f:                                   # filled rows are back in their splits
        assert {k: f[k][()].tolist() for k in locations} == {k: v.tolist() for k, v in tiny.splits.items()}


def test_an_output_another_extraction_holds_is_refused_with_or_without_resume(tiny, tmp_path):
    out = tmp_path / "f.h5"
    with output_lock(out):                       # as a running extraction holds it
        for resume in (False, True):
            with pytest.raises(ExtractError, match=rf"{out}: another process is writing it \(pid {os.getpid()} on "):
                run(tiny, out, resume=resume)
        assert not partial_path(out).exists()    # refused before touching anything
    path, _ = run(tiny, out)                     # free again: the extraction runs
    assert path == out and out.exists() and not out.with_name("f.h5.lock").exists()


def test_image_replaced_after_extraction_is_noticed_and_resume_redoes_only_that_row(tiny, tmp_path):
    out, _ = run(tiny, tmp_path / "f.h5")
    with FeatureCache(out) as cache:
        old_key, old_rows = cache.content_key, cache.features()
    write_jpeg(tiny.root / tiny.image_paths[0], seed=4242, size=(100, 77))
    with pytest.raises(ExtractError, match="1 image file.*changed"):
        run(tiny, out)
    _, logs = run(tiny, out, resume=True)
    assert any("extracting 1 of 8" in line for line in logs)
    with FeatureCache(out) as cache:
        assert cache.complete and cache.content_key != old_key
        new_rows = cache.features()
    assert not torch.equal(new_rows[0], old_rows[0]) and torch.equal(new_rows[1:], old_rows[1:])
