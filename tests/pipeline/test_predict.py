"""`msdn predict` on real CUB-100 photos: a checkpoint trained on a small CUB-100 cache (3 photos per
species, EfficientNet-Lite0 at 96 px, 100 steps) must rank the cache's own test photos exactly as
`msdn evaluate`'s scorer ranks their cache rows (ZSL over the unseen classes; GZSL over all classes
with the run's gamma), and refuse missing weights, unreadable images and a foreign cache in one line."""
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
from cache.reader import FeatureCache
from extract.backbones import BackboneSpec
from extract.datasets import build_dataset
from extract.extractor import extract_features
from heads.config import HeadConfig
from pipeline.checkpoint import load_checkpoint, load_weights
from pipeline.commands.predict import image_maps, load_predictor
from pipeline.config import TrainConfig, apply_overrides, load_recipe
from pipeline.engine import build_model, predict_scores, resolve_amp
from pipeline.features import ResidentFeatures, bank_dtype
from pipeline.metrics import calibrated_stacking
from pipeline.tasks import benchmark_task, usable_splits
from pipeline.train import train

from tests.fixtures.images import write_png_bomb

from .conftest import write_tiny_cache

PER_CLASS, IMAGE_SIZE = 3, 96
# fixed selection with a gamma that offsets the heads' +-1 bias, so that seen classes compete under --all (a validation
# run would select one too, at twice the training time)
QUICK = {"selection": "fixed", "iterations": 100, "eval_every": 100, "lr": 1e-3, "gamma": -2.0}


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    dataset = build_dataset("CUB100", data_root=shared_data, max_per_class=PER_CLASS)
    cache = extract_features(dataset, BackboneSpec("efficientnet_lite0", IMAGE_SIZE), root / "cub100.h5",
                             device="cpu", progress=False, log=lambda msg: None)
    train(apply_overrides(load_recipe("CUB100"), QUICK), cache, root / "run", device="cpu", progress=False,
          log=lambda msg: None)
    with FeatureCache(cache) as fc:  # 3 unseen-class and 3 seen-class test photos
        rows = np.concatenate([fc.splits["test_unseen_loc"][:3], fc.splits["test_seen_loc"][:3]])
        images = [str(dataset.root / fc.image_paths[r]) for r in rows]
    return {"root": root, "cache": cache, "checkpoint": root / "run" / "best.pt", "rows": rows, "images": images,
            "class_names": dataset.class_names}


def evaluate_predictions(checkpoint, cache_path, rows):
    """Per-row ZSL and GZSL top-1 of the cache rows, with the code `msdn evaluate` scores them with
    (pipeline/evaluate.py: the resident store, predict_scores, zsl_accuracy's argmax over the sorted
    unseen classes, calibrated stacking at the checkpoint's gamma), and the scores themselves."""
    ckpt = load_checkpoint(checkpoint)
    config = TrainConfig.from_dict(ckpt["config"])
    device = torch.device("cpu")
    amp = resolve_amp(config.amp, device)
    with FeatureCache(cache_path) as cache:
        task = benchmark_task(np.asarray(cache.labels), usable_splits(cache)[0], num_classes=int(cache.att.shape[0]))
        store = ResidentFeatures(cache, rows, device, bank_dtype(config.feature_dtype, amp))
        model = build_model(HeadConfig.from_dict(ckpt["config"]["head"]), cache, task, device, config.seed)
        load_weights(model, ckpt, checkpoint)
        scores = predict_scores(model, store, np.asarray(rows), batch_size=config.eval_batch_size, amp=amp)
    unseen = torch.unique(torch.as_tensor(task.unseen))
    zsl = unseen[scores[:, unseen].argmax(1)].numpy()
    gzsl = calibrated_stacking(scores, task.seen, ckpt["gamma"]).argmax(1).numpy()
    return zsl, gzsl, scores, ckpt["gamma"]


def run(*args):
    return CliRunner().invoke(cli.main, ["predict", *map(str, args)])


def predictions(trained, *extra):
    result = run("--checkpoint", trained["checkpoint"], "--device", "cpu", "--json", *extra, *trained["images"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(trained["images"])
    return [json.loads(line) for line in lines]


def test_photos_get_the_cache_rows_bits(trained):
    """Decoding, preprocessing and backbone as extraction ran them: the maps are the cache rows, bit
    for bit, for a batch of all six and for each photo alone."""
    predictor = load_predictor(trained["checkpoint"], device="cpu")
    with FeatureCache(trained["cache"]) as cache:
        expected = cache.features(rows=trained["rows"])
    assert torch.equal(image_maps(predictor, [Path(p) for p in trained["images"]]), expected)
    alone = image_maps(predictor, [Path(trained["images"][0])])
    assert torch.equal(alone, expected[:1])


def test_zsl_top1_is_evaluates_per_row_prediction(trained):
    zsl, _, scores, _ = evaluate_predictions(trained["checkpoint"], trained["cache"], trained["rows"])
    results = predictions(trained)
    assert [r["prediction"]["class"] for r in results] == zsl.tolist()
    for r, row_scores in zip(results, scores):
        assert r["setting"] == "ZSL" and r["gamma"] is None
        assert all(not t["seen"] for t in r["top"])                 # unseen classes only
        assert r["top"][0] == r["prediction"] and len(r["top"]) == 5
        ranked = [t["score"] for t in r["top"]]
        assert ranked == sorted(ranked, reverse=True)
        for t in r["top"]:                                           # evaluate's fused, biased scores
            assert t["score"] == pytest.approx(float(row_scores[t["class"]]), abs=1e-4)


def test_all_gives_the_calibrated_gzsl_top1(trained):
    _, gzsl, scores, gamma = evaluate_predictions(trained["checkpoint"], trained["cache"], trained["rows"])
    assert gamma == QUICK["gamma"]
    results = predictions(trained, "--all", "--top-k", "3")
    assert [r["prediction"]["class"] for r in results] == gzsl.tolist()
    for r, row_scores in zip(results, scores):
        assert r["setting"] == "GZSL" and r["gamma"] == gamma and len(r["top"]) == 3
        for t in r["top"]:  # a seen class's score is its fused score minus gamma
            assert t["score"] == pytest.approx(float(row_scores[t["class"]]) - (gamma if t["seen"] else 0), abs=1e-4)
    # the 100-step model already names seen classes for some seen-class photos
    assert any(r["prediction"]["seen"] for r in results)


def test_json_fields_and_attribute_contributions_add_up_to_the_score(trained):
    results = predictions(trained, "--all", "--attributes", "4")
    for r in results:
        assert set(r) >= {"image", "setting", "gamma", "prediction", "top", "attributes", "score_parts", "explanation"}
        assert set(r["prediction"]) == {"class", "name", "seen", "score"}
        assert len(r["attributes"]) == 4
        contributions = [a["contribution"] for a in r["attributes"]]
        assert contributions == sorted(contributions, reverse=True)
        for a in r["attributes"]:
            assert a["contribution"] == pytest.approx(a["class_value"] * a["image_score"], rel=1e-5, abs=1e-6)
        parts = r["score_parts"]
        assert parts["attributes"] + parts["bias"] + parts["calibration"] == pytest.approx(
            r["prediction"]["score"], abs=1e-3)
    # names: the dataset's species names (from the cache's image folders) and CUB's attribute list
    assert all(t["name"] == trained["class_names"][t["class"]] for r in results for t in r["top"])
    assert all("::" in a["name"] for r in results for a in r["attributes"])


def test_text_output_names_the_setting_and_the_attributes(trained):
    result = run("--checkpoint", trained["checkpoint"], "--device", "cpu", "--top-k", "2", trained["images"][0])
    assert result.exit_code == 0, result.output
    assert "ZSL: unseen classes only" in result.stdout and "contribution" in result.stdout
    assert "1. " in result.stdout and "2. " in result.stdout and "3. " not in result.stdout


def one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_unreadable_and_missing_images_are_one_line(trained, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all" * 10)
    one_line_error(run("--checkpoint", trained["checkpoint"], "--device", "cpu", trained["images"][0], broken),
                   str(broken), "cannot read image")
    missing = tmp_path / "gone.jpg"
    one_line_error(run("--checkpoint", trained["checkpoint"], "--device", "cpu", missing), str(missing), "not found")


def _cache_with_manifest(trained, tmp_path, **backbone):
    """A copy of the cache whose manifest records other backbone weights (same features, same key)."""
    copy = tmp_path / "copy.h5"
    shutil.copy(trained["cache"], copy)
    with h5py.File(copy, "r+") as f:
        manifest = json.loads(f.attrs["manifest"])
        manifest["backbone"].update(backbone)
        f.attrs["manifest"] = json.dumps(manifest)
    return copy


def test_weights_that_moved_or_differ_are_refused_in_one_line(trained, tmp_path):
    moved = tmp_path / "moved" / "lite0.pth"
    cache = _cache_with_manifest(trained, tmp_path, weights=str(moved), weights_file=str(moved), weights_source="local file")
    one_line_error(run("--checkpoint", trained["checkpoint"], "--cache", cache, "--device", "cpu", trained["images"][0]),
                   str(moved), "not found", "--weights")
    # the file put back where --weights says: accepted (its sha256 is the manifest's)
    moved.parent.mkdir()
    shutil.copy(load_predictor(trained["checkpoint"], device="cpu").weights_file, moved)
    ok = run("--checkpoint", trained["checkpoint"], "--cache", cache, "--weights", moved, "--device", "cpu",
             trained["images"][0])
    assert ok.exit_code == 0, ok.output
    # other weights under that name: refused by sha256
    torch.save({"not": torch.zeros(3)}, moved)
    one_line_error(run("--checkpoint", trained["checkpoint"], "--cache", cache, "--device", "cpu", trained["images"][0]),
                   str(moved), "sha256", "differs")


def test_a_foreign_cache_or_none_at_all_is_refused_in_one_line(trained, tmp_path):
    foreign = write_tiny_cache(tmp_path / "tiny.h5")
    one_line_error(run("--checkpoint", trained["checkpoint"], "--cache", foreign, "--device", "cpu",
                       trained["images"][0]), str(trained["checkpoint"]), "content key")
    alone = tmp_path / "alone" / "best.pt"
    alone.parent.mkdir()
    shutil.copy(trained["checkpoint"], alone)  # no config.json beside it, no store
    one_line_error(CliRunner(env={"MSDN_CACHE_DIR": None}).invoke(
        cli.main, ["predict", "--checkpoint", str(alone), "--device", "cpu", trained["images"][0]]),
        str(alone), "--cache")


def test_readable_photos_are_scored_and_each_bad_one_is_one_line(trained, tmp_path):
    """One bad photo among good ones (issue 21): the others keep their scores, each bad one is one
    "Error:" line naming it (a decompression bomb among them: refused from its header), exit 1 at the end."""
    broken, bomb, missing = tmp_path / "broken.jpg", write_png_bomb(tmp_path / "bomb.png"), tmp_path / "gone.jpg"
    broken.write_bytes(b"not a jpeg at all" * 10)
    good = trained["images"][:2]
    alone = run("--checkpoint", trained["checkpoint"], "--device", "cpu", "--json", *good)
    alone = [json.loads(line) for line in alone.stdout.splitlines() if line.startswith("{")]
    result = run("--checkpoint", trained["checkpoint"], "--device", "cpu", "--json", good[0], broken, bomb, missing,
                 good[1])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["image"] for r in records] == [good[0], str(broken), str(bomb), str(missing), good[1]]
    assert [records[0], records[4]] == alone                                    # same scores as without the bad ones
    assert "cannot read image" in records[1]["error"] and "DecompressionBombError" in records[2]["error"]
    assert records[3]["error"] == f"{missing}: image not found"
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == [f"Error: {records[k]['error']}" for k in (1, 2, 3)]
    text = run("--checkpoint", trained["checkpoint"], "--device", "cpu", good[0], bomb)
    assert text.exit_code == 1 and f"{good[0]}  ->  " in text.stdout and "Traceback" not in text.output
    assert [line for line in text.output.splitlines() if line.startswith("Error: ")] == [f"Error: {records[2]['error']}"]
