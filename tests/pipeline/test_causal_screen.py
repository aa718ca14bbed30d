"""`msdn ablate --preset causal`: the plan (MSDN once, each causal reading x weight, seed-major),
the weight chosen on validation and the paired differences to MSDN, by hand and end to end on the
tiny cache (real `msdn train` workers)."""
import math
import re
import subprocess

import pandas as pd
import pytest

from pipeline.commands.ablate import PRESETS, AblateOptions, run_ablate
from pipeline.commands.ablate.causal import (
    BASELINE,
    causal_variants,
    chosen_weights,
    paired_table,
    plan_screen,
    select_weights,
)
from pipeline.commands.ablate.grid import AblationError
from pipeline.config import load_recipe
from tests.fixtures.caches import write_tiny_cache

QUICK = ["iterations=20", "eval_every=10", "log_every=10", "batch_size=8", "lr=3e-3", "eval_batch_size=16"]


def test_the_preset_plans_msdn_and_six_readings_at_each_weight(tmp_path):
    preset = PRESETS["causal"]
    cells = plan_screen("CUB100", tmp_path, weights=preset.causal_weights, seeds=preset.seeds,
                        overrides=list(preset.overrides))
    readings = [n for n in causal_variants() if n != BASELINE]
    assert len(readings) >= 6 and len(preset.seeds) >= 3
    assert len(cells) == len(preset.seeds) * (1 + len(readings) * len(preset.causal_weights))
    assert [c.seed for c in cells] == sorted(c.seed for c in cells)  # seed-major
    for cell in cells:
        head = cell.config.head
        if cell.factors["ablation"] == BASELINE:
            assert head.lambda_causal == 0.0
        else:
            assert head.lambda_causal == float(cell.factors["lambda_causal"]) > 0
    by_name = {c.factors["ablation"]: c.config.head for c in cells}
    assert by_name["cal_factual"].causal_grad == "factual" and by_name["cal"].causal_grad == "all"
    assert by_name["remove"].counterfactual == "remove" and by_name["attribute"].causal_level == "attribute"
    assert by_name["cal_seen"].causal_classes == "seen" and by_name["warmup"].causal_warmup > 0
    # CUB100 ships the attribute-level term: the screen's readings still differ from CAL by one switch
    assert load_recipe("CUB100").head.causal_level == "attribute" and by_name["cal"].causal_level == "class"
    assert all(h.causal_level == "class" for n, h in by_name.items() if n not in ("attribute", BASELINE))
    user = plan_screen("CUB100", tmp_path, weights=[0.3], seeds=[0], overrides=["causal_subnets=ava"])
    assert {c.config.head.causal_subnets for c in user} == {"ava"}  # a --set still applies to every reading


def frame(rows):
    columns = ["ablation", "lambda_causal", "seed", "val_H", "ZSL", "U", "S", "H", "AUSUC", "cpu_s"]
    runs = pd.DataFrame(rows, columns=columns)
    runs["status"] = "done"
    return runs


def test_weight_is_chosen_on_validation_and_differences_are_paired():
    runs = frame([
        (BASELINE, None, 0, 50, 40, 30, 60, 40.0, 30, 10), (BASELINE, None, 1, 52, 42, 32, 62, 44.0, 32, 10),
        # weight 0.3 has the better TEST H, 0.03 the better VALIDATION H: 0.03 must be chosen
        ("cal", "0.03", 0, 55, 41, 30, 60, 41.0, 30, 12), ("cal", "0.03", 1, 55, 40, 30, 60, 43.0, 30, 12),
        ("cal", "0.3", 0, 50, 60, 50, 70, 60.0, 50, 12), ("cal", "0.3", 1, 52, 60, 50, 70, 60.0, 50, 12),
        # a tie on validation goes to the smaller weight
        ("remove", "0.3", 0, 51, 39, 0, 0, 40.0, 0, 9), ("remove", "0.03", 0, 51, 45, 0, 0, 41.0, 0, 9),
    ])
    chosen = select_weights(runs).set_index("ablation")
    assert chosen.loc["cal", "weight"] == 0.03 and chosen.loc["cal", "val_H"] == 55
    assert chosen.loc["remove", "weight"] == 0.03
    table = paired_table(runs)
    cal = table.loc["cal"]
    assert cal["H_mean"] == 42.0 and cal["dH_mean"] == 0.0  # (41 - 40) and (43 - 44)
    assert cal["dH_std"] == pytest.approx(math.sqrt(2)) and cal["dH_better"] == "1/2"
    assert cal["dZSL_mean"] == pytest.approx(-0.5) and cal["dZSL_better"] == "1/2"
    remove = table.loc["remove"]  # finished only seed 0: paired on that seed alone
    assert remove["dH_mean"] == 1.0 and remove["dH_better"] == "1/1" and math.isnan(remove["dH_std"])
    assert table.index[0] == BASELINE and math.isnan(table.loc[BASELINE, "dH_mean"])


def test_screen_end_to_end_on_the_tiny_cache(tmp_path):
    write_tiny_cache(tmp_path / "tiny.h5")
    out = tmp_path / "screen"
    log = []
    result = run_ablate(AblateOptions(out=str(out), preset="causal", recipe="demo", cache=str(tmp_path / "tiny.h5"),
                                      ablations=["msdn", "cal_factual", "remove"], seeds=[0, 1],
                                      overrides=QUICK + ["amp=none"], workers=2, device="cpu"), log=log.append)
    runs = result["runs"]
    assert len(runs) == 2 * (1 + 2 * 2) and runs["status"].eq("done").all()
    assert runs["val_H"].notna().all()
    paired = pd.read_csv(out / "paired.csv", index_col="variant")
    assert list(paired.index) == [BASELINE, "cal_factual", "remove"]
    assert paired.loc["remove", "lambda_causal"] in (0.03, 0.3) and paired["seeds"].eq(2).all()
    text = (out / "paired.md").read_text()
    assert "ΔH vs MSDN" in text and "cal_factual" in text
    # the cells' schedule and precision on the console and above the tables, not only in ablation.json
    assert log[0].endswith("; cells: 20 steps, validation every 10, selection val, amp none")
    assert "20 steps, validation every 10, selection val, amp none" in (out / "results.md").read_text().splitlines()[0]
    assert "amp none" in (out / "results.tex").read_text()
    # paired.md names a reading, results.md each weight's cells: the console says which is which
    weight = paired.loc["remove", "lambda_causal"]
    mapping = next(line for line in log if line.startswith("paired.md has each reading at its chosen weight"))
    assert f"remove = remove|lambda_causal={weight:g}" in mapping
    assert f"remove|lambda_causal={weight:g}" in pd.read_csv(out / "results.csv", index_col=0).index


def test_a_confirmation_trains_each_variant_at_the_weight_its_screen_chose(tmp_path):
    paired = tmp_path / "paired.csv"
    pd.DataFrame({"variant": [BASELINE, "cal_factual", "remove"], "lambda_causal": [0.0, 0.3, 0.03]}).to_csv(
        paired, index=False)
    weights = chosen_weights(paired)
    assert weights == {"cal_factual": 0.3, "remove": 0.03}
    cells = plan_screen("CUB100", tmp_path, weights=weights, seeds=[0, 1, 2], variants=list(weights))
    assert len(cells) == 3 * 3
    assert {(c.factors["ablation"], c.config.head.lambda_causal) for c in cells} == {
        (BASELINE, 0.0), ("cal_factual", 0.3), ("remove", 0.03)}
    with pytest.raises(AblationError, match="no chosen weight for variant 'cal'"):
        plan_screen("CUB100", tmp_path, weights=weights, seeds=[0], variants=["cal"])
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(AblationError, match="not a causal screen's paired.csv"):
        chosen_weights(tmp_path / "bad.csv")


def test_options_the_screen_would_ignore_are_errors_before_anything_runs(tmp_path):
    write_tiny_cache(tmp_path / "tiny.h5")
    paired = tmp_path / "paired.csv"
    pd.DataFrame({"variant": [BASELINE, "remove"], "lambda_causal": [0.0, 0.3]}).to_csv(paired, index=False)
    common = dict(out=str(tmp_path / "screen"), recipe="demo", cache=str(tmp_path / "tiny.h5"), device="cpu")
    cases = [
        (dict(preset="causal", grid=["lambda_cal=0.05,0.1"]), "--grid does not apply to --preset causal"),
        (dict(weights_from=str(paired), ablations=["full"]), "--weights-from applies to --preset causal only"),
        (dict(preset="causal", weights_from=str(paired), ablations=["no_causal"]), "unknown ablation(s) ['no_causal']"),
        (dict(preset="causal", weights_from=str(paired), ablations=["remvoe"]), "unknown ablation(s) ['remvoe']"),
        (dict(preset="causal", ablations=["full"]), "unknown ablation(s) ['full']"),
    ]
    for extra, message in cases:
        with pytest.raises(AblationError, match=re.escape(message)):
            run_ablate(AblateOptions(**common, **extra), log=lambda m: None)
    assert not (tmp_path / "screen").exists()
    # a reading the screen did not choose a weight for is still "no chosen weight"
    with pytest.raises(AblationError, match="no chosen weight for variant 'cal'"):
        run_ablate(AblateOptions(**common, preset="causal", weights_from=str(paired), ablations=["cal"]))


def test_help_separates_the_name_sets_and_the_last_line_names_the_paired_tables(tmp_path):
    from click.testing import CliRunner

    from cli import main

    text = " ".join(CliRunner().invoke(main, ["ablate", "--help"]).output.split())
    assert "Under --preset causal the names are the causal readings instead: cal, cal_factual" in text
    assert "msdn (the baseline) always runs, 'none' runs only it" in text
    write_tiny_cache(tmp_path / "tiny.h5")
    sets = [a for q in QUICK + ["amp=none"] for a in ("--set", q)]
    done = subprocess.run(["msdn", "ablate", "--preset", "causal", "--recipe", "demo", "--cache", "tiny.h5",
                           "--out", "screen", "--ablation", "none", "--seeds", "0", *sets, "--workers", "1",
                           "--device", "cpu"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("tables: screen/results.{md,tex,csv}, runs.csv, paired.{md,csv}")
    assert pd.read_csv(tmp_path / "screen" / "runs.csv")["ablation"].tolist() == [BASELINE]
