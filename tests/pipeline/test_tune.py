"""msdn tune: a real Optuna study on the tiny cache (journal file, real trials, real subprocesses)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from click.testing import CliRunner

from cache.reader import FeatureCache
from cli import main
from pipeline.commands.tune import TuneOptions, run_tune
from pipeline.commands.tune.space import SpaceError, load_space
from pipeline.commands.tune.study import StudyError
from pipeline.config import load_recipe
from tests.fixtures.processes import reaped

ROOT = Path(__file__).resolve().parents[2]
QUICK = ("iterations=40", "eval_every=10", "log_every=10", "batch_size=8", "eval_batch_size=16")
SPACE = """
[lr]
low = 1e-3
high = 1e-2
log = true

[lambda_causal]
choices = [0.0, 0.3]

[fusion]
choices = [[0.9, 0.1], [0.5, 0.5]]
"""


@pytest.fixture
def space(tmp_path):
    path = tmp_path / "space.toml"
    path.write_text(SPACE)
    return path


def options(tiny_cache, space, out, **kw) -> TuneOptions:
    return TuneOptions(recipe="demo", cache=str(tiny_cache), space=str(space), out_dir=out, overrides=QUICK,
                       device="cpu", **kw)


def study_of(out: Path) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(out / "study.journal")))
    return optuna.load_study(study_name="msdn-tune", storage=storage)


@pytest.fixture
def rows_read(monkeypatch):
    """Every feature row any FeatureCache reads in this process (the real read, recorded)."""
    seen: list[np.ndarray] = []
    real = FeatureCache._read_rows

    def recording(self, rows, into, *key):
        seen.append(np.asarray(rows).copy())
        return real(self, rows, into, *key)

    monkeypatch.setattr(FeatureCache, "_read_rows", recording)
    return lambda: np.unique(np.concatenate(seen)) if seen else np.array([], dtype=np.int64)


def test_a_study_finishes_reads_no_test_image_and_its_best_toml_trains(tiny_cache, space, tmp_path, rows_read):
    out = tmp_path / "study"
    summary = run_tune(options(tiny_cache, space, out, trials=6), log=lambda _: None)

    with FeatureCache(tiny_cache) as cache:
        test_rows = np.concatenate([cache.splits["test_seen_loc"], cache.splits["test_unseen_loc"]])
        trainval = cache.splits["trainval_loc"]
    read = rows_read()
    assert len(read) and not np.intersect1d(read, test_rows).size  # the study never read a test image
    assert np.isin(read, trainval).all()

    assert summary["trials"] == 6 and summary["states"]["complete"] >= 1
    table = pd.read_csv(out / "trials.csv")
    assert len(table) == 6 and {"param_lr", "param_fusion", "validation_H", "cpu_seconds", "state"} <= set(table)
    assert bool(table.loc[0, "is_recipe"])  # trial 0 is the recipe's own values
    assert table.loc[table.state == "complete", "cpu_seconds"].gt(0).all()
    assert (out / "history.png").stat().st_size > 0 and (out / "slice.png").exists()
    assert not list(out.rglob("*.pt"))  # trials keep no checkpoints

    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--recipe", str(out / "best.toml"), "--cache", str(tiny_cache),
                                       "--out", str(run), "--quiet", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    trained = json.loads((run / "summary.json").read_text())
    # the objective is exactly msdn train's validation selection
    assert trained["selection"]["validation"]["best"]["H"] == pytest.approx(summary["best"]["validation_H"])
    assert np.intersect1d(rows_read(), test_rows).size  # the recorder does see train's test reads


def test_final_pairs_best_and_recipe_per_seed_and_keeps_finished_runs(tiny_cache, space, tmp_path):
    out = tmp_path / "study"
    summary = run_tune(options(tiny_cache, space, out, trials=2, final=True, seeds=(0, 1)), log=lambda _: None)
    paired = json.loads((out / "final" / "paired.json").read_text())
    assert paired["seeds"] == [0, 1] and paired["tuned"]["trial"] == summary["best"]["number"]
    for row in paired["rows"]:
        assert row["delta"]["H"] == pytest.approx(row["tuned"]["H"] - row["recipe"]["H"])
        run = json.loads((out / "final" / f"tuned-seed{row['seed']}" / "summary.json").read_text())
        assert run["test"]["H"] == row["tuned"]["H"]
    assert "tuned ahead" in summary["final_markdown"]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "final").glob("*/summary.json")}
    run_tune(options(tiny_cache, space, out, trials=2, final=True, seeds=(0, 1)), log=lambda _: None)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing trained twice


def test_a_killed_study_continues_where_it_stopped(tiny_cache, space, tmp_path):
    out = tmp_path / "study"
    command = [sys.executable, "-m", "cli", "tune", "--recipe", "demo", "--cache", str(tiny_cache),
               "--space", str(space), "--trials", "6", "--out", str(out), "--device", "cpu", "--pruner", "none",
               *[a for s in ("iterations=400", "eval_every=100", *QUICK[2:]) for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with reaped(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)) as proc:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            done = [t for t in _trials(out) if t.state.is_finished()]
            if len(done) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the study ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {t.number: t.params for t in _trials(out) if t.state.is_finished()}
    assert 2 <= len(before) < 6

    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    study = study_of(out)
    counted = [t for t in study.trials if t.state.is_finished() and not t.user_attrs.get("interrupted")]
    assert len(counted) == 6  # --trials is the study's total
    assert {t.number: t.params for t in study.trials if t.number in before} == before
    # the rerun draws new points: not the first run's startup points again (each would cost a trial)
    assert not [t.number for t in study.trials if t.number not in before and t.params in before.values()]
    interrupted = [t for t in study.trials if t.user_attrs.get("interrupted")]
    assert all(t.state == optuna.trial.TrialState.FAIL for t in interrupted)
    assert len(pd.read_csv(out / "trials.csv")) == len(study.trials)


def _trials(out: Path):
    if not (out / "study.journal").exists():
        return []
    try:
        return study_of(out).trials
    except KeyError:  # the study is being created
        return []


def test_a_pruner_forced_to_prune_prunes_and_a_diverged_trial_fails(tiny_cache, tmp_path):
    space = tmp_path / "space.toml"
    space.write_text("[lambda_cal]\nlow = 0.05\nhigh = 0.2\n")
    out = tmp_path / "pruned"
    summary = run_tune(options(tiny_cache, space, out, trials=3, pruner="threshold:1.01"), log=lambda _: None)
    assert summary["states"]["pruned"] == 3 and summary["best"] is None and not (out / "best.toml").exists()
    assert pd.read_csv(out / "trials.csv")["pruned_at_step"].notna().all()

    space.write_text("[lr]\nlow = 1e6\nhigh = 1e7\nlog = true\n")  # RMSprop at lr 1e6: non-finite at once
    out = tmp_path / "diverged"
    summary = run_tune(options(tiny_cache, space, out, trials=2), log=lambda _: None)
    assert summary["states"]["fail"] == 2
    table = pd.read_csv(out / "trials.csv")
    assert table["validation_H"].isna().all() and table["error"].str.contains("non-finite").all()


def test_two_local_workers_share_one_study(tiny_cache, space, tmp_path):
    out = tmp_path / "study"
    overrides = ("iterations=200", "eval_every=50", *QUICK[2:])
    opts = TuneOptions(recipe="demo", cache=str(tiny_cache), space=str(space), out_dir=out, overrides=overrides,
                       device="cpu", trials=6, workers=2, pruner="none")
    summary = run_tune(opts, log=lambda _: None)
    study = study_of(out)
    assert 6 <= summary["trials"] <= 7  # two workers may both start the last trial
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2
    assert os.getpid() not in {t.user_attrs["pid"] for t in study.trials}


def test_bad_spaces_and_changed_settings_are_one_line_errors(tiny_cache, space, tmp_path):
    config = load_recipe("demo")
    for text, expected in (("[lr_rate]\nlow = 1e-3\nhigh = 1e-2\n", "unknown config key 'lr_rate'"),
                           ("[lr]\nlow = 1e-2\nhigh = 1e-3\n", "low < high"),
                           ("[lr]\nlow = -1.0\nhigh = 1e-3\n", "lr must be a finite number > 0"),
                           ("[sampler]\nchoices = ['uniform', 'balanced']\n", "sampler must be one of"),
                           ("[lr]\nlow = 0.0\nhigh = 1e-3\nlog = true\n", "log range needs low > 0")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises((SpaceError, ValueError), match=expected.replace("(", r"\(")) as err:
            load_space(bad, config)
        assert "\n" not in str(err.value) and str(bad) in str(err.value)

    out = tmp_path / "study"
    run_tune(options(tiny_cache, space, out, trials=1), log=lambda _: None)
    changed = TuneOptions(**{**vars(options(tiny_cache, space, out, trials=2)), "overrides": QUICK + ("lr=0.5",)})
    with pytest.raises(StudyError, match="other settings"):
        run_tune(changed, log=lambda _: None)


def test_a_study_begun_before_a_config_key_existed_continues_at_its_default(tiny_cache, space, tmp_path):
    """A study begun by an older msdn lacks the keys added since (patience came after the first
    studies): at their defaults it continues; set to anything else it is refused as changed."""
    out = tmp_path / "study"
    run_tune(options(tiny_cache, space, out, trials=1), log=lambda _: None)
    study = study_of(out)
    settings = study.user_attrs["settings"]
    del settings["config"]["patience"]
    study.set_user_attr("settings", settings)
    run_tune(options(tiny_cache, space, out, trials=2), log=lambda _: None)
    assert len(study_of(out).trials) == 2
    with pytest.raises(StudyError, match=r"other settings \(config differ\)"):
        run_tune(TuneOptions(**{**vars(options(tiny_cache, space, out, trials=3)),
                                "overrides": QUICK + ("patience=3",)}), log=lambda _: None)


def test_optuna_is_imported_by_tune_only():
    """`msdn train` and every other command run without optuna installed (it is the tune extra)."""
    done = subprocess.run(
        [sys.executable, "-c", "import sys\n"
         "import cli, pipeline.train, pipeline.evaluate, pipeline.commands.extract, pipeline.commands.cache\n"
         "import pipeline.commands.ablate, pipeline.commands.baseline, pipeline.commands.demo, pipeline.launch\n"
         "import pipeline.commands.report, pipeline.commands.predict, pipeline.commands.visualize\n"
         "print(sorted(m for m in sys.modules if m.split('.')[0] in ('optuna', 'matplotlib')))"],
        cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
