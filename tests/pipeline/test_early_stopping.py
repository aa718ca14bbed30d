"""Early stopping of the validation run (TrainConfig.patience): it stops once `patience` evaluations in
a row bring no better validation H, says so, records it in config.json and summary.json; patience 0
(the paper recipes, or --set patience=0) runs every step; the folder recipe has it on."""
import json

from pipeline.config import load_recipe
from pipeline.train import should_stop, train
from tests.fixtures.caches import tiny_config


def record(step, h, ausuc=0.5):
    return {"step": step, "best": {"H": h}, "AUSUC": ausuc}


def test_stops_after_patience_evaluations_without_a_better_h():
    config = tiny_config(patience=2)
    rising = [record(10, 0.3), record(20, 0.4), record(30, 0.5)]
    assert not should_stop(rising, config)
    assert not should_stop([record(10, 0.5), record(20, 0.4)], config)
    assert should_stop([record(10, 0.5), record(20, 0.4), record(30, 0.5)], config)  # equal is not better
    assert not should_stop([record(10, 0.5), record(20, 0.4), record(30, 0.5, ausuc=0.6)], config)
    assert not should_stop([record(10, 0.5), record(20, 0.4), record(30, 0.4)], tiny_config(patience=0))
    assert not should_stop([record(10, 0.5), record(20, 0.4), record(30, 0.4)],
                           tiny_config(patience=2, select_iterations=False))  # the recipe's step is kept


def test_a_run_that_no_longer_improves_stops_early(tiny_cache, tmp_path):
    # lr so small that nothing changes: validation H is flat, so the run stops at the third evaluation
    messages = []
    summary = train(tiny_config(patience=2, lr=1e-12, iterations=100, eval_every=10), tiny_cache, tmp_path / "run",
                    device="cpu", progress=False, log=messages.append)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["phase"] == "val"]
    assert steps == [10, 20, 30]
    assert summary["selection"]["stopped_early"] and summary["selection"]["validation_steps"] == 30
    assert json.loads((tmp_path / "run" / "config.json").read_text())["patience"] == 2
    assert any(m.startswith("early stop at step 30: no better validation H in 2 evaluations") for m in messages)


def test_only_recipes_that_bound_steps_from_above_stop_early():
    assert load_recipe("folder").patience > 0
    assert all(load_recipe(name).patience == 0 for name in ("CUB", "SUN", "AWA2", "APY", "FLO", "CUB100", "demo"))
