"""One convention across the commands (issue 20): --quiet and --no-progress on every long-running
command, `train --help` naming the recipes that exist, a warning for a validation split of fewer than
3 classes, and no test-chosen gamma in summary.json outside --paper-protocol. (Percent in TensorBoard:
tests/pipeline/test_follow.py; evaluate reading the run's cache: tests/pipeline/test_run_cache.py.)"""
import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import cli
from pipeline.config import RECIPE_DIR
from pipeline.train import train
from tests.fixtures.caches import tiny_config, write_tiny_cache

LONG_RUNNING = [["extract"], ["train"], ["evaluate"], ["predict"], ["demo"], ["ablate"], ["baseline"], ["visualize"],
                ["cache", "push"], ["cache", "pull"], ["cache", "export"]]


@pytest.mark.parametrize("command", LONG_RUNNING, ids=" ".join)
def test_every_long_running_command_takes_quiet_and_no_progress(command):
    result = CliRunner().invoke(cli.main, [*command, "--help"])
    assert result.exit_code == 0 and "--quiet, --no-progress" in result.output


def test_train_help_lists_every_recipe():
    text = " ".join(CliRunner().invoke(cli.main, ["train", "--help"]).output.split())
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))
    assert "folder" in names and f"Recipe name ({', '.join(names)})" in text


def test_fewer_than_three_validation_classes_warn(tmp_path):
    cache = write_tiny_cache(tmp_path / "two_val.h5")
    with h5py.File(cache, "r+") as f:  # validation classes 18 and 19 only
        labels, trainval = f["labels"][()], f["trainval_loc"][()]
        for key in ("train_loc", "val_loc"):
            del f[key]
        f["train_loc"] = trainval[labels[trainval] < 18]
        f["val_loc"] = trainval[labels[trainval] >= 18]
    messages = []
    train(tiny_config(iterations=10, eval_every=10), cache, tmp_path / "run", progress=False, log=messages.append)
    said = [m for m in messages if m.startswith("validation: 2 validation classes")]
    assert len(said) == 1 and "warning: 2 validation class(es): validation ZSL is trivial there" in said[0]
    warned = []
    train(tiny_config(iterations=10, eval_every=10), write_tiny_cache(tmp_path / "six.h5"), tmp_path / "six",
          progress=False, log=warned.append)
    assert not any("warning" in m for m in warned)


def test_a_test_chosen_gamma_is_kept_only_with_the_paper_protocol(tmp_path):
    cache, config = write_tiny_cache(tmp_path / "tiny.h5"), tiny_config(iterations=20, eval_every=10)
    plain = train(config, cache, tmp_path / "plain", progress=False, log=lambda m: None)
    stored = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert "best_gamma_on_test" not in json.dumps(stored) and "paper_protocol" not in plain
    paper = train(config, cache, tmp_path / "paper", progress=False, log=lambda m: None, paper_protocol=True)
    assert set(paper["paper_protocol"]["best_gamma_on_test"]) >= {"gamma", "H"}
    assert "best_gamma_on_test" not in paper["test"]
    assert np.isfinite(paper["paper_protocol"]["best_gamma_on_test"]["gamma"])
