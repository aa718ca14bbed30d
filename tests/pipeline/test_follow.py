"""Following a training run (issue 11): the log a batch job leaves, `--tensorboard`, and what every
config.json records about the code and machine that produced the run. Real subprocesses, real
caches (the tiny learnable cache of conftest.py), real git repositories."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch

from pipeline.provenance import environment, git_state
from pipeline.runlog import read_metrics
from tests.fixtures.caches import tiny_config

REPO = Path(__file__).resolve().parents[2]
QUICK = ["--set", "iterations=60", "--set", "eval_every=20", "--set", "log_every=10", "--set", "batch_size=8",
         "--set", "lr=3e-3", "--set", "eval_batch_size=16", "--set", "select_iterations=true"]


def train_cli(tiny_cache, out, *extra, env=None, cwd=REPO, log: Path | None = None):
    """`python3 cli.py train ...` with stdout and stderr into one file (as `> log 2>&1`), or captured."""
    args = [sys.executable, "cli.py", "train", "--recipe", "demo", "--cache", str(tiny_cache), "--out", str(out),
            *QUICK, *extra]
    env = {**os.environ, **(env or {})}
    if log is None:
        return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    with log.open("w") as sink:
        return subprocess.run(args, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT, timeout=300, env=env)


@pytest.fixture(scope="module")
def logged_run(tiny_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("follow")
    done = train_cli(tiny_cache, root / "run", "--tensorboard", log=root / "train.log",
                     env={"MSDN_PROGRESS_INTERVAL": "0"})
    text = (root / "train.log").read_text()
    assert done.returncode == 0, text
    return root, text


def test_a_run_logged_to_a_file_reads_as_short_lines(logged_run):
    root, text = logged_run
    lines = text.splitlines()
    assert "\r" not in text
    assert all(len(line) <= 200 for line in lines), max(lines, key=len)
    validation = [line for line in lines if line.startswith("validation step ")]
    assert [line.split(":")[0] for line in validation] == [f"validation step {s}/60" for s in (20, 40, 60)]
    records = [r for r in read_metrics(root / "run" / "metrics.jsonl") if r["phase"] == "val"]
    for line, record in zip(validation, records):  # the numbers the selection reads: best-gamma U, S, H
        assert f"ZSL {100 * record['ZSL']:.2f}, U {100 * record['best']['U']:.2f}" in line
        assert f"H {100 * record['best']['H']:.2f}" in line and "loss " in line
    summary = json.loads((root / "run" / "summary.json").read_text())
    sel = summary["selection"]
    selected = [line for line in lines if line.startswith("selected on validation: ")]
    assert selected == [f"selected on validation: step {sel['iteration']}, gamma {sel['gamma']:.3g}, validation H "
                        f"{100 * sel['validation']['best']['H']:.2f} (ZSL {100 * sel['validation']['ZSL']:.2f}); "
                        f"final run on trainval: {sel['iteration']} steps, then the test split"]
    # printed before the final run starts, after the last validation evaluation
    assert lines.index(validation[-1]) < lines.index(selected[0]) < max(
        i for i, line in enumerate(lines) if line.startswith("final run: "))
    for run, steps in (("validation run", 60), ("final run", sel["iteration"])):
        progress = [line for line in lines if line.startswith(f"{run}: ")]
        assert any("steps/s" in line and "ETA " in line and "loss=" in line for line in progress), progress
        assert progress[-1].startswith(f"{run}: done {steps}/{steps} steps in ")
    assert "validation (selected)" in text and "run folder: " in text  # the results table, as on a terminal


def test_tensorboard_event_files_hold_the_logged_tags(logged_run):
    if os.environ.get("CI") != "true":
        pytest.importorskip("tensorboard", reason='the tb extra: pip install -e ".[tb]"')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = logged_run
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert summary["tensorboard"] == str(root / "run" / "tensorboard")
    events = EventAccumulator(str(root / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    chosen = summary["selection"]["iteration"]
    steps = lambda tag: [e.step for e in events.Scalars(tag)]  # noqa: E731
    for name in ("loss", "samples_per_s"):
        assert steps(f"validation_run/{name}") == list(range(10, 61, 10))  # each log_every read-back, no more
        assert steps(f"final_run/{name}") == list(range(10, chosen + 1, 10))
    records = [r for r in read_metrics(root / "run" / "metrics.jsonl") if r["phase"] == "val"]
    for metric in ("ZSL", "U", "S", "H", "gamma", "AUSUC"):
        assert f"validation/{metric}" in tags and f"test/{metric}" in tags
        assert steps(f"validation/{metric}") == [20, 40, 60] and steps(f"test/{metric}") == [chosen]
    # percent, as the console prints them (the JSON files keep fractions); gamma as is
    assert [e.value for e in events.Scalars("validation/H")] == pytest.approx([100 * r["best"]["H"] for r in records])
    assert events.Scalars("test/H")[0].value == pytest.approx(100 * summary["test"]["H"])
    assert events.Scalars("test/gamma")[0].value == pytest.approx(summary["selection"]["gamma"])
    losses = [r["losses"]["loss"] for r in records]  # the mean of the interval before each evaluation
    assert [e.value for e in events.Scalars("validation_run/loss")][1::2] == pytest.approx(losses)


def test_missing_tensorboard_is_one_line_before_any_work(tiny_cache, tmp_path):
    args = ["train", "--recipe", "demo", "--cache", str(tiny_cache), "--out", "tb", "--tensorboard", *QUICK]
    code = f"import sys; sys.modules['tensorboard'] = None\nfrom cli import main; main({args!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1
    assert done.stderr.strip() == ('Error: --tensorboard needs the tensorboard package: pip install "msdn-zsl[tb]" '
                                   '(or pip install tensorboard)')
    assert not (tmp_path / "tb").exists()


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_config_json_records_versions_and_the_commit(logged_run):
    root, _ = logged_run
    env = json.loads((root / "run" / "config.json").read_text())["environment"]
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["torch"] == torch.__version__ and env["numpy"] == numpy.__version__
    assert env["msdn_zsl"] == "0.1.0" and env["platform"]
    try:  # the tests normally run from a checkout of the project (CI: a fresh clone)
        head = _git(REPO, "rev-parse", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        assert env["git"] is None
        return
    assert env["git"]["commit"] == head and isinstance(env["git"]["dirty"], bool)


def test_git_state_of_a_checkout_clean_dirty_and_not_ours(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = _git(repo, "rev-parse", "HEAD")
    assert git_state(repo) == {"commit": head, "dirty": False}
    (repo / "notes.txt").write_text("untracked files do not make a tree dirty\n")
    assert git_state(repo) == {"commit": head, "dirty": False}
    (repo / "a.py").write_text("x = 2\n")
    assert git_state(repo) == {"commit": head, "dirty": True}
    (repo / "vendored").mkdir()  # a folder inside someone else's checkout is not a checkout of ours
    assert git_state(repo / "vendored") is None
    assert git_state(tmp_path / "plain") is None  # no checkout at all (the folder does not even exist)
    assert environment(tmp_path / "plain")["git"] is None


def test_without_git_on_path_the_run_records_no_commit_and_still_runs(tiny_cache, tmp_path):
    bare = tmp_path / "bin"  # a PATH where no git can be found; python is called by its full path
    bare.mkdir()
    done = train_cli(tiny_cache, tmp_path / "run", "--quiet", env={"PATH": str(bare)})
    assert done.returncode == 0, done.stderr
    env = json.loads((tmp_path / "run" / "config.json").read_text())["environment"]
    assert env["git"] is None and env["torch"] == torch.__version__ and env["msdn_zsl"] == "0.1.0"


def test_a_copy_outside_any_checkout_records_no_commit(tiny_cache, tmp_path):
    """The code copied out of the checkout (as an unpacked sdist would be): versions, no commit."""
    copy = tmp_path / "msdn-copy"
    copy.mkdir()
    for name in ("cli.py", "pyproject.toml"):
        shutil.copy(REPO / name, copy / name)
    for package in ("cache", "extract", "heads", "pipeline"):
        shutil.copytree(REPO / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    done = train_cli(tiny_cache, tmp_path / "run", "--quiet", cwd=copy, env={"PYTHONPATH": str(copy)})
    assert done.returncode == 0, done.stderr
    env = json.loads((tmp_path / "run" / "config.json").read_text())["environment"]
    assert env["git"] is None and env["msdn_zsl"] == "0.1.0"


def test_baseline_and_evaluate_runs_record_the_environment_too(tiny_cache, tmp_path):
    from pipeline.commands.baseline import run_baseline
    from pipeline.evaluate import evaluate
    from pipeline.train import train

    run_baseline(tiny_cache, tmp_path / "eszsl")
    train(tiny_config(iterations=20, eval_every=10), tiny_cache, tmp_path / "run", progress=False, log=lambda m: None)
    evaluate(tmp_path / "run" / "best.pt", tiny_cache, out_dir=tmp_path / "eval")
    for name in ("eszsl", "run", "eval"):
        env = json.loads((tmp_path / name / "config.json").read_text())["environment"]
        assert set(env) == {"python", "torch", "numpy", "msdn_zsl", "platform", "git"}
