import json

import pytest
import torch

from pipeline.checkpoint import CheckpointError, load_checkpoint
from pipeline.evaluate import evaluate
from pipeline.runlog import RunFolderError, read_metrics
from pipeline.train import summary_rows, train
from tests.fixtures.caches import tiny_config, write_tiny_cache

SCORES = ("ZSL", "U", "S", "H", "AUSUC", "gamma")


@pytest.fixture(scope="module")
def paper_run(tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "paper"
    return out, train(tiny_config(), tiny_cache, out, progress=False, paper_protocol=True)


def test_train_writes_the_run_folder(paper_run):
    out, summary = paper_run
    for name in ("config.json", "metrics.jsonl", "summary.json", "curve.json", "best.pt", "last.pt"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"] == "demo" and config["iterations"] == 60 and config["head"]["fusion"] == [0.9, 0.1]
    assert config["run"]["device"] == "cpu" and config["run"]["amp"] == "none"
    records = read_metrics(out / "metrics.jsonl")
    phases = [r["phase"] for r in records]
    assert phases.count("val") == 3  # steps 20, 40, 60
    assert "test" in phases and phases.count("test-paper-protocol") == 3
    assert all(set(SCORES) <= set(r) and "loss" in r["losses"] for r in records)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    sel = summary["selection"]
    assert sel["mode"] == "val" and sel["iteration"] in (20, 40, 60)
    assert summary["test"]["iteration"] == sel["iteration"] and summary["test"]["gamma"] == sel["gamma"]
    assert set(summary["paper_protocol"]) == {"best_H", "best_ZSL", "best_gamma_on_test", "note"}
    assert "TEST" in summary["paper_protocol"]["note"]
    assert {"validation (selected)", "test", "paper protocol: best H on test"} <= set(summary_rows(summary))
    curve = json.loads((out / "curve.json").read_text())
    assert curve["S"][0] > 0 and curve["S"][-1] == 0 and curve["U"][0] == 0


def test_evaluate_reproduces_the_training_numbers(paper_run, tiny_cache, tmp_path):
    out, summary = paper_run
    result = evaluate(out / "best.pt", tiny_cache, out_dir=tmp_path / "eval")
    assert {k: result["test"][k] for k in SCORES} == {k: summary["test"][k] for k in SCORES}
    for name in ("config.json", "metrics.jsonl", "summary.json", "curve.json"):
        assert (tmp_path / "eval" / name).is_file()
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["iteration"] == summary["selection"]["iteration"]
    assert load_checkpoint(out / "last.pt")["iteration"] == 60
    # another gamma changes U/S but not the gamma-free numbers
    shifted = evaluate(out / "best.pt", tiny_cache, gamma=100.0)
    assert shifted["test"]["S"] == 0.0 and shifted["test"]["AUSUC"] == result["test"]["AUSUC"]


def test_evaluate_refuses_a_cache_it_was_not_trained_on(paper_run, tmp_path):
    out, _ = paper_run
    other = write_tiny_cache(tmp_path / "other.h5", seed=3, content_key="other-content")
    with pytest.raises(CheckpointError, match="content key"):
        evaluate(out / "best.pt", other)


def test_two_seeded_cpu_runs_are_identical(tiny_cache, tmp_path):
    config = tiny_config(iterations=30, eval_every=10, lambda_causal=0.5)  # causal: random draws too
    a = train(config, tiny_cache, tmp_path / "a", progress=False, deterministic=True)
    b = train(config, tiny_cache, tmp_path / "b", progress=False, deterministic=True)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "losses"} | {"loss": r["losses"]["loss"]} for r in rs]
    assert strip(read_metrics(tmp_path / "a" / "metrics.jsonl")) == strip(read_metrics(tmp_path / "b" / "metrics.jsonl"))
    assert a["test"] == b["test"] and a["selection"]["gamma"] == b["selection"]["gamma"]
    wa, wb = load_checkpoint(tmp_path / "a" / "last.pt")["model"], load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.are_deterministic_algorithms_enabled()  # restored afterwards
    c = train(tiny_config(iterations=30, eval_every=10, lambda_causal=0.5, seed=1), tiny_cache, tmp_path / "c",
              progress=False)
    assert not torch.equal(load_checkpoint(tmp_path / "c" / "last.pt")["model"]["W_1"], wa["W_1"])


def test_training_learns_to_recognise_unseen_classes(tiny_cache, tmp_path):
    # chance: ZSL 1/4 (4 unseen classes), seen-only accuracy 1/20
    summary = train(tiny_config(selection="fixed", iterations=100, eval_every=50), tiny_cache,
                    tmp_path / "learn", progress=False)
    assert summary["selection"] == {"mode": "fixed", "iteration": 100, "gamma": 0.0}
    assert summary["test"]["ZSL"] >= 0.5 and summary["test"]["AUSUC"] > 0.3
    seen_only = evaluate(tmp_path / "learn" / "best.pt", tiny_cache, gamma=-1e3)["test"]["S"]
    assert seen_only >= 0.5


def test_an_existing_run_folder_is_not_overwritten(paper_run, tiny_cache):
    out, _ = paper_run
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(RunFolderError, match="already holds a run"):
        train(tiny_config(iterations=5, eval_every=5), tiny_cache, out, progress=False)
    assert (out / "metrics.jsonl").read_text() == before


def test_a_transzero_layout_cache_trains_with_a_derived_validation_split(tmp_path):
    # TransZero's files: no content key, no train_loc/val_loc, float32 gzip
    cache = write_tiny_cache(tmp_path / "transzero.h5", content_key=None, with_val_split=False)
    summary = train(tiny_config(iterations=10, eval_every=5), cache, tmp_path / "tz", progress=False)
    assert summary["content_key"].startswith("data-sha256:")
    assert "derived" in summary["selection"]["task"]["note"]
    assert evaluate(tmp_path / "tz" / "best.pt", cache)["test"]["H"] == summary["test"]["H"]


def test_selection_prefers_h_then_ausuc_then_the_later_step():
    from pipeline.train import choose_evaluation

    def ev(step, h, ausuc):
        return {"step": step, "best": {"H": h}, "AUSUC": ausuc}
    assert choose_evaluation([ev(10, .5, .9), ev(20, .6, .1), ev(30, .55, .9)])["step"] == 20
    assert choose_evaluation([ev(10, .6, .3), ev(20, .6, .4), ev(30, .6, .35)])["step"] == 20
    assert choose_evaluation([ev(10, 1.0, 1.0), ev(20, 0.9999999999999992, 0.9999999999999984)])["step"] == 20
