"""`msdn ablate --preset causal`: which reading of MSDN++'s causal attention helps, measured.

The screen trains MSDN (no causal term) and each causal variant at every weight of a small grid,
each with the same seeds. Runs of one seed share their batches and initial weights (common random
numbers, tests/pipeline/test_paired_runs.py), so a variant's difference to MSDN on a seed is a
paired comparison. The weight of each variant is chosen on VALIDATION (mean validation H over the
seeds, ties to the smaller weight); the test numbers of that weight are then reported beside the
paired differences to MSDN. The test set never chooses anything.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from heads.config import HeadConfig
from pipeline.commands.ablate.grid import Ablation, AblationError, plan_cells
from pipeline.commands.tables import mean_std
from pipeline.metrics import SCORES

BASELINE = "msdn"
WEIGHT_KEY = "lambda_causal"


# The first reading's switches, put under every cell's --set: a recipe that ships a causal term of its
# own (CUB100: attribute level) must not turn "cal" into another reading; a user's --set still wins.
CAL_READING = tuple(f"{key}={getattr(HeadConfig(), key)}" for key in (
    "causal_level", "counterfactual", "causal_grad", "causal_classes", "causal_subnets", "causal_warmup", "causal_ramp"))


def causal_variants() -> dict[str, Ablation]:
    """The readings of the causal attention under test; the grid sets lambda_causal on all but MSDN.
    Each changes one switch of the first reading ("cal"), so a difference names its cause."""
    return {
        BASELINE: Ablation("MSDN: no causal term (lambda_causal = 0)", {"lambda_causal": 0.0}),
        "cal": Ablation("CAL reading: CE of the class-score effect over all classes, random counterfactual, "
                        "gradient through both branches", {}),
        "cal_factual": Ablation("counterfactual branch as a constant baseline (causal_grad = factual)",
                                {"causal_grad": "factual"}),
        "cal_seen": Ablation("effect CE over seen classes only (causal_classes = seen)", {"causal_classes": "seen"}),
        "attribute": Ablation("attribute-level effect reproduces the class's attributes (causal_level = attribute)",
                              {"causal_level": "attribute"}),
        "remove": Ablation("counterfactual removes the most-attended region / attribute (counterfactual = remove)",
                           {"counterfactual": "remove"}),
        "warmup": Ablation("200 steps of plain MSDN, then the causal weight ramps in over 100 steps",
                           {"causal_warmup": 200, "causal_ramp": 100}),
    }


def plan_screen(recipe: str, out_dir: str | Path, *, weights, seeds, overrides=(), variants=None) -> list:
    """MSDN once per seed plus every causal variant x weight x seed, seed-major: an interrupted
    screen has whole seeds finished, so its paired table is usable. `weights`: a grid for every
    variant, or {variant: weight} (a confirmation at weights an earlier screen chose)."""
    registry = causal_variants()
    unknown = [n for n in (variants or ()) if n not in registry]
    if unknown:  # before the weights: a misspelt or non-causal name is not a missing weight
        raise AblationError(f"unknown ablation(s) {unknown}; --preset causal runs {BASELINE} (always) and the "
                            f"readings {', '.join(n for n in registry if n != BASELINE)}")
    names = [n for n in (registry if variants is None else variants) if n != BASELINE]
    overrides = [*CAL_READING, *overrides]
    cells = plan_cells(recipe, out_dir, ablations=[BASELINE], seeds=seeds, overrides=overrides, registry=registry)
    for name in names:
        if isinstance(weights, dict) and name not in weights:
            raise AblationError(f"no chosen weight for variant {name!r} (the screen chose: {sorted(weights)})")
        grid = [weights[name]] if isinstance(weights, dict) else weights
        cells += plan_cells(recipe, out_dir, ablations=[name], grid=[(WEIGHT_KEY, [str(w) for w in grid])],
                            seeds=seeds, overrides=overrides, registry=registry)
    order = {seed: i for i, seed in enumerate(seeds)}
    return sorted(cells, key=lambda c: order[c.seed])  # stable: variant order kept within a seed


def chosen_weights(paired_csv: str | Path) -> dict[str, float]:
    """{variant: lambda_causal} that a screen chose on validation, read from its paired.csv."""
    try:
        table = pd.read_csv(paired_csv, index_col="variant")
        return {str(name): float(w) for name, w in table[WEIGHT_KEY].items() if name != BASELINE}
    except (OSError, ValueError, KeyError) as err:
        raise AblationError(f"{paired_csv}: not a causal screen's paired.csv ({err})") from None


def select_weights(runs: pd.DataFrame) -> pd.DataFrame:
    """Per causal variant: the weight with the highest mean validation H over its finished seeds
    (ties: the smaller weight), with that mean. Returns columns ablation, weight, val_H."""
    done = runs[runs["status"].eq("done") & runs["ablation"].ne(BASELINE)].copy()
    if done.empty:
        return pd.DataFrame(columns=["ablation", "weight", "val_H"])
    done["weight"] = pd.to_numeric(done[WEIGHT_KEY])
    means = done.groupby(["ablation", "weight"], sort=False)["val_H"].mean().reset_index()
    means = means.sort_values(["ablation", "val_H", "weight"], ascending=[True, False, True])
    return means.drop_duplicates("ablation").reset_index(drop=True)


def paired_table(runs: pd.DataFrame, metrics=SCORES) -> pd.DataFrame:
    """One row per variant (MSDN first, then each causal variant at its validation-chosen weight):
    mean ± std of the test metrics, and for H and ZSL the mean paired difference to MSDN over the
    seeds both finished, its std, and how many of those seeds improve."""
    done = runs[runs["status"].eq("done")]
    base = done[done["ablation"].eq(BASELINE)].set_index("seed")
    rows = [_row(BASELINE, None, None, base, None, metrics)]
    order = list(dict.fromkeys(runs["ablation"]))
    chosen = select_weights(runs).set_index("ablation")
    for name in [n for n in order if n != BASELINE and n in chosen.index]:
        weight = chosen.loc[name, "weight"]
        picked = done[done["ablation"].eq(name) & (pd.to_numeric(done[WEIGHT_KEY]) == weight)].set_index("seed")
        rows.append(_row(name, weight, chosen.loc[name, "val_H"], picked, base, metrics))
    return pd.DataFrame(rows).set_index("variant")


def _row(name, weight, val_h, runs, base, metrics) -> dict:
    row = {"variant": name, WEIGHT_KEY: weight if weight is not None else 0.0, "seeds": len(runs),
           "val_H": val_h if val_h is not None else runs["val_H"].mean() if len(runs) else math.nan}
    for m in (*metrics, "cpu_s"):
        values = pd.to_numeric(runs[m]) if m in runs else pd.Series(dtype=float)
        row[f"{m}_mean"], row[f"{m}_std"] = values.mean(), values.std(ddof=1) if len(values) > 1 else math.nan
    for m in ("H", "ZSL"):
        if base is None:
            row[f"d{m}_mean"] = row[f"d{m}_std"] = math.nan
            row[f"d{m}_better"] = ""
            continue
        seeds = runs.index.intersection(base.index)
        diff = pd.to_numeric(runs.loc[seeds, m]) - pd.to_numeric(base.loc[seeds, m])
        row[f"d{m}_mean"] = diff.mean()
        row[f"d{m}_std"] = diff.std(ddof=1) if len(diff) > 1 else math.nan
        row[f"d{m}_better"] = f"{int((diff > 0).sum())}/{len(diff)}"
    return row


def to_markdown(table: pd.DataFrame, metrics=SCORES) -> str:
    """The paired table as Markdown: accuracies in %, differences in points."""
    header = ["variant", "weight", "seeds", "val H", *metrics, "ΔH vs MSDN", "H better", "ΔZSL vs MSDN",
              "ZSL better", "CPU s"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, r in table.iterrows():
        cells = [name, f"{r[WEIGHT_KEY]:g}", str(r["seeds"]), f"{r['val_H']:.2f}"]
        cells += [mean_std(r[f"{m}_mean"], r[f"{m}_std"]) for m in metrics]
        cells += [_signed(r["dH_mean"], r["dH_std"]), r["dH_better"] or "-",
                  _signed(r["dZSL_mean"], r["dZSL_std"]), r["dZSL_better"] or "-",
                  mean_std(r["cpu_s_mean"], r["cpu_s_std"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _signed(mean: float, std: float) -> str:
    if mean is None or math.isnan(mean):
        return "-"
    return f"{mean:+.2f}" + ("" if std is None or math.isnan(std) else f" ± {std:.2f}")


def results_rows(table: pd.DataFrame, runs: pd.DataFrame) -> dict[str, str]:
    """{paired.md row: the results.md row of the same cells}: paired.md names a reading ("attribute")
    and gives its chosen weight in a column; results.md names each weight's cells
    ("attribute|lambda_causal=0.3")."""
    rows = {}
    for name, weight in table[WEIGHT_KEY].items():
        same = runs["ablation"].eq(name)
        if name != BASELINE:
            same &= pd.to_numeric(runs[WEIGHT_KEY], errors="coerce").eq(weight)
        rows[name] = runs.loc[same, "variant"].iloc[0] if same.any() else name
    return rows


def write_screen_tables(runs: pd.DataFrame, out_dir: str | Path) -> dict:
    """paired.csv (unrounded) and paired.md beside the ablation's own tables."""
    out_dir = Path(out_dir)
    table = paired_table(runs)
    paths = {"paired": out_dir / "paired.csv", "paired_markdown": out_dir / "paired.md"}
    table.to_csv(paths["paired"])
    paths["paired_markdown"].write_text(to_markdown(table))
    return paths
