"""Training that diverges stops at once, names the step, and leaves nothing that counts as a result;
the validation split is announced with where it came from."""
import json

import numpy as np
import pytest
import torch

from cache.reader import FeatureCache
from pipeline import engine
from pipeline.commands.report import ReportError, find_runs
from pipeline.engine import DivergedError, build_model, evaluate_task
from pipeline.features import ResidentFeatures
from pipeline.tasks import benchmark_task, usable_splits
from pipeline.train import train
from tests.fixtures.caches import tiny_config, write_tiny_cache


def _diverge(cache, out, **kw):
    with pytest.raises(DivergedError) as err:
        train(tiny_config(lr=1e10), cache, out, device="cpu", progress=False, log=lambda msg: None, **kw)
    return str(err.value)


def test_the_step_is_named_with_and_without_a_check_per_step(tiny_cache, tmp_path, monkeypatch):
    each_step = _diverge(tiny_cache, tmp_path / "a")
    assert "validation run: non-finite loss at step 2 of 60 (" in each_step and "loss=nan" in each_step
    assert "lr=1e+10 is too large" in each_step and "no summary.json" in each_step
    # the GPU route (no read-back per step): found at the next logging point, the same step named
    monkeypatch.setattr(engine, "CHECK_EACH_STEP_ON", ())
    assert _diverge(tiny_cache, tmp_path / "b") == each_step


def test_a_diverged_run_records_a_failure_and_no_result(tiny_cache, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(iterations=20, eval_every=10), tiny_cache, run, device="cpu", progress=False,
          log=lambda msg: None)
    assert find_runs([tmp_path]) == [run]
    _diverge(tiny_cache, run, overwrite=True)  # the same folder: the earlier result must not stand
    assert not (run / "summary.json").exists()
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["phase"] == "failed" and "non-finite loss at step 2" in last["error"]
    with pytest.raises(ReportError, match="no training runs"):
        find_runs([tmp_path])


def test_non_finite_scores_stop_an_evaluation(tiny_cache):
    with FeatureCache(tiny_cache) as cache:
        labels = np.asarray(cache.labels)
        task = benchmark_task(labels, usable_splits(cache)[0], num_classes=int(cache.att.shape[0]))
        store = ResidentFeatures(cache, np.concatenate([task.eval_seen_rows, task.eval_unseen_rows]), "cpu", "float32")
        model = build_model(tiny_config().head, cache, task, torch.device("cpu"), seed=0)
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        with pytest.raises(DivergedError, match="non-finite class scores for 40 of 40 seen-class images"):
            evaluate_task(model, store, task, labels, gamma=0.0, batch_size=16, amp="none")


@pytest.mark.parametrize("with_val_split, expected", [
    (True, "split: the cache's own train_loc/val_loc"),
    (False, "split: derived, 20% of the seen classes picked as validation classes"),
])
def test_the_validation_split_is_announced(tmp_path, with_val_split, expected):
    cache = write_tiny_cache(tmp_path / "c.h5", with_val_split=with_val_split)
    lines = []
    train(tiny_config(iterations=10, eval_every=10), cache, tmp_path / "run", device="cpu", progress=False,
          log=lines.append)
    announced = [line for line in lines if line.startswith("validation: ")]  # beside the features line
    assert len(announced) == 1 and expected in announced[0]
