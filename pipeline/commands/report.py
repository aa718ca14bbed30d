"""`msdn report`: our runs across datasets, laid out like the papers' tables (one row per method,
per dataset ZSL | U S H), with the published numbers (PUBLISHED below) above ours in the
columns whose dataset and backbone match the papers' (ResNet101 features on CUB, SUN, AWA2, FLO).

Runs are `msdn train` folders (summary.json with a selection record), found under the given paths;
ablation cells carry their variant name. Seeds of one method are averaged (mean ± std).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from cache.errors import UserError
from pipeline.commands.tables import aggregate, latex_escape, mean_std, to_markdown
from pipeline.metrics import SCORES

# Published numbers (docs/method.md), as data: ZSL top-1 and GZSL U, S, H in %, on the xlsa17
# proposed split with ResNet101 features. Shown beside our runs only where the dataset and the
# backbone match; a blank is a number the paper (or its abstract) does not give.
BACKBONE = "resnet101"
SOURCE = "the papers, as listed in docs/method.md (ResNet101 features; ZSL top-1 / GZSL U, S, H in %)"
METRICS = SCORES[:4]  # what the papers report: ZSL and GZSL U, S, H


def _row(zsl, u, s, h) -> dict:
    return dict(zip(METRICS, (zsl, u, s, h)))


PUBLISHED: dict[str, dict[str, dict[str, float | None]]] = {
    "DAZLE (CVPR20)": {"CUB": _row(66.0, 56.7, 59.6, 58.1), "SUN": _row(59.4, 52.3, 24.3, 33.2),
                       "AWA2": _row(67.9, 60.3, 75.7, 67.1)},
    "TransZero (AAAI22)": {"CUB": _row(76.8, 69.3, 68.3, 68.8), "SUN": _row(65.6, 52.6, 33.4, 40.8),
                           "AWA2": _row(70.1, 61.3, 82.3, 70.2)},
    "MSDN (CVPR22)": {"CUB": _row(76.1, 68.7, 67.5, 68.1), "SUN": _row(65.8, 52.2, 34.2, 41.3),
                      "AWA2": _row(70.1, 62.0, 74.5, 67.7)},
    "TransZero++": {"CUB": _row(78.3, 67.5, 73.6, 70.4), "SUN": _row(67.6, 48.6, 37.8, 42.5),
                    "AWA2": _row(72.6, 64.6, 82.7, 72.5)},
    # the MSDN++ abstract gives ZSL and H only (and U on FLO)
    "MSDN++ (2026)": {"CUB": _row(78.5, None, None, 70.6), "SUN": _row(67.5, None, None, 42.1),
                      "AWA2": _row(73.4, None, None, 72.5), "FLO": _row(None, 69.2, None, None)},
}


def published_for(dataset: str, backbone: str) -> dict[str, dict[str, float | None]]:
    """{method: {metric: value}} for a dataset, when `backbone` is the papers' backbone."""
    if backbone != BACKBONE:
        return {}
    return {method: numbers[dataset] for method, numbers in PUBLISHED.items() if dataset in numbers}


class ReportError(UserError, ValueError):
    """No runs found, or a run folder that cannot be read."""


def find_runs(paths) -> list[Path]:
    """Training run folders under `paths` (evaluation-only folders are left out)."""
    found = []
    for root in map(Path, paths):
        summaries = [root / "summary.json"] if (root / "summary.json").is_file() else sorted(root.rglob("summary.json"))
        summaries.sort(key=_plan_order(root))
        for summary in summaries:
            data = _read(summary)
            if "selection" in data and "test" in data:
                found.append(summary.parent)
    if not found:
        raise ReportError(f"no training runs (summary.json of `msdn train`) under {', '.join(map(str, paths))}")
    return found


def _plan_order(root: Path):
    """Sort key: an ablation folder's cells in the order it planned them (its runs.csv), so that
    the report lists variants as the ablation did; anything else after them, by path."""
    try:
        planned = [Path(d).resolve() for d in pd.read_csv(root / "runs.csv")["dir"]]
    except (OSError, KeyError, ValueError):
        planned = []
    rank = {d: i for i, d in enumerate(planned)}
    return lambda summary: (rank.get(summary.parent.resolve(), len(rank)), str(summary))


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ReportError(f"{path}: cannot read ({err})") from None


def run_record(run_dir: Path) -> dict:
    """Dataset, backbone, method label, seed and test scores (percent) of one run."""
    summary, config = _read(run_dir / "summary.json"), _read(run_dir / "config.json")
    cell = _read(run_dir / "cell.json") if (run_dir / "cell.json").is_file() else None
    info = cell if cell and "dataset" in cell else _cache_info(config.get("run", {}).get("cache"), config)
    head = config.get("head", {})
    if cell:
        method = f"ours: {cell['variant']}"
    elif "method" in config:  # `msdn baseline` runs name their method (e.g. "eszsl")
        method = f"ours: {config['method'].upper()} baseline"
    else:
        method = "ours: MSDN++" if head.get("lambda_causal", 0) > 0 else "ours: MSDN (no causal)"
    # the environment (versions, git commit) says what produced a run, not which settings it used
    settings = {k: v for k, v in config.items() if k not in ("seed", "run", "environment")}
    return {"method": method, "dataset": info["dataset"], "backbone": info["backbone"],
            "image_size": info.get("image_size"), "seed": config.get("seed"), "status": "done",
            "config_hash": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8],
            **{m: 100 * summary["test"][m] for m in (*METRICS, "AUSUC")}, "dir": str(run_dir)}


def _cache_info(cache: str | None, config: dict) -> dict:
    if cache and Path(cache).is_file():
        from pipeline.commands.ablate import cache_info
        try:
            return cache_info(cache)
        except ValueError:
            pass
    return {"dataset": config.get("recipe", "unknown"), "backbone": "unknown", "image_size": None}


def runs_frame(paths) -> pd.DataFrame:
    frame = pd.DataFrame([run_record(d) for d in find_runs(paths)])
    # one label per configuration: plain runs with the same label but other settings get their folder
    clash = frame.groupby(["dataset", "backbone", "method"])["config_hash"].transform("nunique") > 1
    frame.loc[clash, "method"] += " (" + frame.loc[clash, "dir"].map(lambda d: Path(d).name) + ")"
    return frame


def column_label(dataset: str, backbone: str, image_size) -> str:
    return f"{dataset} ({backbone}{f' {image_size} px' if image_size else ''})"


def build_report(paths, *, out_dir=None, published: bool = True) -> dict:
    """{"long": DataFrame (one row per method x dataset column), "markdown", "latex"}; with
    `out_dir`, also report.md, report.tex and report.csv there."""
    frame = runs_frame(paths)
    frame["column"] = [column_label(*k) for k in zip(frame["dataset"], frame["backbone"], frame["image_size"])]
    agg = aggregate(frame, by=["column", "method"], metrics=(*METRICS, "AUSUC")).reset_index()
    agg["source"] = "ours"
    rows = [agg]
    columns = list(dict.fromkeys(frame["column"]))
    matched = []
    if published:
        for column in columns:
            first = frame[frame["column"] == column].iloc[0]
            numbers = published_for(first["dataset"], first["backbone"])
            matched += [column] if numbers else []
            rows.append(pd.DataFrame([{"column": column, "method": method, "source": "published", "runs": None,
                                       **{f"{m}_mean": values[m] for m in METRICS}}
                                      for method, values in numbers.items()]))
    long = pd.concat([r for r in rows if not r.empty], ignore_index=True)
    methods = list(dict.fromkeys(list(long.loc[long["source"] == "published", "method"]) +
                                 list(long.loc[long["source"] == "ours", "method"])))
    wide = pd.DataFrame(index=pd.Index(methods, name="method"))
    for column in columns:
        part = long[long["column"] == column].set_index("method")
        for m in METRICS:
            wide[(column, m)] = [_cell(part.loc[k], m) if k in part.index else "" for k in methods]
    note = (f"Published: {SOURCE}; shown only for {', '.join(matched)}." if matched else
            "No published numbers match these datasets and backbones (the papers use ResNet101 on CUB/SUN/AWA2/FLO).")
    flat = wide.copy()
    flat.columns = [f"{c}: {m}" for c, m in wide.columns]
    markdown = to_markdown(flat.replace("", "-")) + f"\n{note}\n"
    latex = _paper_latex(wide, columns, n_published=len(long.loc[long["source"] == "published", "method"].unique()), note=note)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(markdown)
        (out / "report.tex").write_text(latex)
        long.to_csv(out / "report.csv", index=False)
    return {"long": long, "markdown": markdown, "latex": latex}


def _cell(row: pd.Series, metric: str) -> str:
    """Ours: mean ± std to 2 decimals; published: the paper's 1 decimal."""
    published = row["source"] == "published"
    return mean_std(row[f"{metric}_mean"], None if published else row.get(f"{metric}_std"), 1 if published else 2)


def _paper_latex(wide: pd.DataFrame, columns: list[str], n_published: int, note: str) -> str:
    """Method rows; per dataset a ZSL column, then U S H (the papers' layout)."""
    spec = "l" + "|".join("r" * len(METRICS) for _ in columns)
    head1 = ["method"] + [r"\multicolumn{%d}{c}{%s}" % (len(METRICS), latex_escape(c)) for c in columns]
    rules = " ".join(r"\cmidrule(lr){%d-%d}" % (2 + i * len(METRICS), 1 + (i + 1) * len(METRICS))
                     for i in range(len(columns)))
    lines = [r"\begin{tabular}{l" + spec[1:] + "}", r"\toprule", " & ".join(head1) + r" \\", rules,
             " & ".join([""] + list(METRICS) * len(columns)) + r" \\", r"\midrule"]
    for i, (method, row) in enumerate(wide.iterrows()):
        if i == n_published and n_published:
            lines.append(r"\midrule")
        cells = [mean_std_latex(v) for v in row]
        lines.append(" & ".join([latex_escape(method)] + cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", "% " + note]
    return "\n".join(lines) + "\n"


def mean_std_latex(text: str) -> str:
    """"82.03 ± 1.20" -> "$82.03 \\pm 1.20$"; "" and "-" -> "-"."""
    return "$" + text.replace(" ± ", r" \pm ") + "$" if text not in ("", "-") else "-"
