"""ESZSL baseline: the closed form against direct solves on hand-made cases, perfect recovery on
noiseless data, and the whole job (validation selection, metrics, run folder, CLI) on a small cache."""
import itertools
import json
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from pipeline.commands.baseline import ESZSL, BaselineConfig, baseline_rows, eszsl_solutions, run_baseline
from pipeline.metrics import SeenUnseenCurve
from pipeline.runlog import RunFolderError, format_table
from tests.fixtures.caches import NUM_UNSEEN


def _signed_labels(labels, z):
    y = -np.ones((len(labels), z))
    y[np.arange(len(labels)), labels] = 1.0
    return y


def test_closed_form_equals_the_direct_solve_of_the_paper_formula():
    rng = np.random.default_rng(0)
    n, d, a, z = 9, 4, 3, 5
    x, s = rng.normal(size=(n, d)), rng.normal(size=(a, z))  # x is the paper's X^T
    labels = rng.integers(0, z, n)
    gamma, lam = 0.7, 2.5
    y = _signed_labels(labels, z)
    direct = np.linalg.solve(x.T @ x + gamma * np.eye(d), x.T @ y @ s.T) @ np.linalg.inv(s @ s.T + lam * np.eye(a))
    model = ESZSL(reg_features=gamma, reg_attributes=lam).fit(x, labels, s)
    np.testing.assert_allclose(model.V_, direct, rtol=1e-10, atol=1e-12)


def test_closed_form_is_the_least_squares_solution_of_the_regularised_objective():
    """||X^T V S - Y||^2 + g||VS||^2 + l||X^T V||^2 + g*l||V||^2 is ||A vec(V) - b||^2 for a stacked A:
    numpy's lstsq on it must give the same V (the paper's beta = gamma * lambda)."""
    rng = np.random.default_rng(1)
    n, d, a, z = 7, 3, 2, 4
    x, s, labels = rng.normal(size=(n, d)), rng.normal(size=(a, z)), rng.integers(0, z, n)
    gamma, lam = 0.3, 1.7
    y = _signed_labels(labels, z)
    # vec(P V Q) = (Q^T kron P) vec(V) with column-major vec
    blocks = [np.kron(s.T, x), np.sqrt(gamma) * np.kron(s.T, np.eye(d)),
              np.sqrt(lam) * np.kron(np.eye(a), x), np.sqrt(gamma * lam) * np.eye(d * a)]
    rhs = np.concatenate([y.flatten(order="F"), np.zeros(d * z + n * a + d * a)])
    vec_v = np.linalg.lstsq(np.concatenate(blocks), rhs, rcond=None)[0]
    model = ESZSL(gamma, lam).fit(x, labels, s)
    np.testing.assert_allclose(model.V_, vec_v.reshape(d, a, order="F"), rtol=1e-8, atol=1e-10)


def test_grid_gives_each_pair_its_own_solution():
    rng = np.random.default_rng(2)
    x, s, labels = rng.normal(size=(20, 6)), rng.normal(size=(4, 3)), rng.integers(0, 3, 20)
    solutions = dict(eszsl_solutions(x, labels, s, [0.1, 10.0], [0.01, 1.0]))
    assert set(solutions) == {(0.1, 0.01), (0.1, 1.0), (10.0, 0.01), (10.0, 1.0)}
    for (g, l), V in solutions.items():
        np.testing.assert_allclose(V, ESZSL(g, l).fit(x, labels, s).V_, rtol=1e-10)
    assert not np.allclose(solutions[(0.1, 0.01)], solutions[(10.0, 1.0)])


def test_noiseless_data_recognises_every_unseen_class():
    """A case where perfect recovery is provable: the 8 seen classes are the half fraction
    a4 = a1*a2*a3 of the {-1,1}^4 attribute vectors (rows of S orthogonal, S S^T = 8I, S 1 = 0), the
    8 unseen classes the other half, features a linear image of the attributes. With vanishing
    regularisers V maps x(s_y) to s_y / 4, so an unseen image scores class c by s_u . s_c / 4, which
    is largest (4 vs at most 2) for c = u."""
    codes = np.array(list(itertools.product([-1.0, 1.0], repeat=3)))
    seen_att = np.column_stack([codes, codes.prod(1)]).T          # (4, 8)
    unseen_att = np.column_stack([codes, -codes.prod(1)]).T       # (4, 8)
    att = np.concatenate([seen_att, unseen_att], axis=1)
    projection = np.random.default_rng(3).normal(size=(12, 4))    # d = 12 channels, full column rank
    labels = np.repeat(np.arange(16), 5)
    features = (projection @ att[:, labels]).T
    train = labels < 8
    model = ESZSL(1e-8, 1e-8).fit(features[train], labels[train], seen_att)
    np.testing.assert_allclose(model.scores(features[train], seen_att)[:5, 0], 1.0, rtol=1e-5)
    scores = model.scores(features[~train], unseen_att)
    np.testing.assert_array_equal(scores.argmax(1) + 8, labels[~train])
    assert np.all(np.sort(scores, axis=1)[:, -1] - np.sort(scores, axis=1)[:, -2] > 0.4)


@pytest.fixture(scope="module")
def baseline_run(tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline") / "eszsl"
    return out, run_baseline(tiny_cache, out, BaselineConfig(grid=(0.01, 1.0, 100.0)))


def test_baseline_job_selects_on_validation_and_beats_chance(baseline_run):
    out, summary = baseline_run
    for name in ("config.json", "metrics.jsonl", "summary.json", "curve.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records].count("val") == 9 and records[-1]["phase"] == "test"
    val = [r for r in records if r["phase"] == "val"]
    best_val_h = max(r["best"]["H"] for r in val)
    sel = summary["selection"]
    assert sel["validation"]["best"]["H"] == best_val_h
    assert summary["test"]["gamma"] == sel["gamma"] == sel["validation"]["best"]["gamma"]
    assert summary["test"]["ZSL"] > 2.5 / NUM_UNSEEN  # chance is 1/4 on the tiny cache
    assert 0 < summary["test"]["H"] <= 1 and 0 < summary["test"]["AUSUC"] <= 1
    curve = json.loads((out / "curve.json").read_text())
    redrawn = SeenUnseenCurve(np.array(curve["gamma"]), np.array(curve["S"]), np.array(curve["U"]))
    assert redrawn.ausuc == pytest.approx(summary["test"]["AUSUC"])
    table = format_table(baseline_rows(summary))
    assert "validation (selected)" in table and "test, gamma=0 (uncalibrated)" in table


def test_baseline_refuses_an_existing_run_folder(baseline_run, tiny_cache):
    out, _ = baseline_run
    with pytest.raises(RunFolderError):
        run_baseline(tiny_cache, out)


def test_msdn_baseline_cli_prints_the_train_table(tiny_cache, tmp_path):
    done = subprocess.run(["msdn", "baseline", "--cache", str(tiny_cache), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    header = done.stdout.splitlines()[0].split()
    assert header == ["ZSL", "U", "S", "H", "AUSUC", "gamma"]
    assert "test " in done.stdout and (tmp_path / "run" / "summary.json").is_file()


def test_msdn_baseline_on_a_missing_cache_is_one_error_line(tmp_path):
    result = CliRunner().invoke(main, ["baseline", "--cache", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {tmp_path / 'missing.h5'}: feature cache not found")
    assert not (tmp_path / "x").exists()
