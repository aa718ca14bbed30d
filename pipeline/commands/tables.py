"""Results tables: mean ± std over seeds, written as CSV, Markdown and LaTeX (booktabs).

The printed tables carry the same numbers as the CSV, rounded to `DIGITS` (2 for accuracies,
1 for seconds), so a table pasted into a paper can be traced back to the CSV.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from pipeline.metrics import SCORES

# train_s: wall seconds in the training loops; cpu_s: CPU seconds of the whole cell (the honest cost
# on a shared machine, where the wall clock measures the neighbours too)
METRICS = (*SCORES, "train_s", "cpu_s")
DIGITS = {"train_s": 1, "cpu_s": 1}  # everything else: 2
HEADERS = {"train_s": "train s", "cpu_s": "CPU s"}
TEXT_COLUMNS = ("description",)  # left-aligned; everything else is a number
LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "→": r"$\rightarrow$", "±": r"$\pm$", "λ": r"$\lambda$", "γ": r"$\gamma$"}


def aggregate(runs: pd.DataFrame, by: str | list[str] = "variant", metrics=METRICS) -> pd.DataFrame:
    """One row per group (first-appearance order): `runs` (finished seeds), `failed`, and
    `<metric>_mean` / `<metric>_std` (sample std, ddof=1; NaN with one seed) over finished runs."""
    by = [by] if isinstance(by, str) else list(by)
    ok = runs["status"].eq("done")
    rows = []
    for key, group in runs.groupby(by, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        done = group[ok.loc[group.index]]
        row = dict(zip(by, key), runs=len(done), failed=int((group["status"] == "failed").sum()))
        if "description" in group:
            row["description"] = group["description"].iloc[0]
        for m in metrics:
            values = pd.to_numeric(done[m], errors="coerce") if m in done else pd.Series(dtype=float)
            row[f"{m}_mean"] = values.mean() if len(values) else math.nan
            row[f"{m}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows).set_index(by)


def mean_std(mean: float, std: float, digits: int = 2, latex: bool = False) -> str:
    """"82.03 ± 1.20"; "82.03" for a single run; "-" for none."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    text = f"{mean:.{digits}f}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += (r" \pm " if latex else " ± ") + f"{std:.{digits}f}"
    return f"${text}$" if latex else text


def display_frame(agg: pd.DataFrame, metrics=METRICS, latex: bool = False, text_columns=("description",)) -> pd.DataFrame:
    """Strings for printing: text columns, seeds (with failures), then one mean ± std per metric."""
    out = pd.DataFrame(index=agg.index)
    for col in text_columns:
        if col in agg:
            out[col] = agg[col].fillna("")
    out["seeds"] = [f"{r}" + (f" ({f} failed)" if f else "") for r, f in zip(agg["runs"], agg["failed"])]
    for m in metrics:
        out[HEADERS.get(m, m)] = [mean_std(a, b, DIGITS.get(m, 2), latex) for a, b in
                                  zip(agg[f"{m}_mean"], agg[f"{m}_std"])]
    return out


def to_markdown(display: pd.DataFrame) -> str:
    header = [_md(" / ".join(map(str, display.index.names)) if any(display.index.names) else "")] + \
        [_md(str(c)) for c in display.columns]
    align = ["---" if c in TEXT_COLUMNS else "---:" for c in display.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + align) + "|"]
    for key, row in display.iterrows():
        label = " / ".join(map(str, key)) if isinstance(key, tuple) else str(key)
        lines.append("| " + " | ".join([_md(label)] + [_md(str(v)) for v in row]) + " |")
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", r"\|").replace("\n", " ")


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def to_latex(display: pd.DataFrame, caption: str | None = None, raw_columns=None) -> str:
    """A booktabs tabular. Cells of `raw_columns` (default: every metric-looking cell starting
    with "$" or "-") are written as is; everything else is escaped."""
    names = " / ".join(map(str, display.index.names)) if any(display.index.names) else ""
    spec = "l" + "".join("l" if c in TEXT_COLUMNS else "r" for c in display.columns)
    lines = [r"\begin{tabular}{" + spec + "}", r"\toprule",
             " & ".join([latex_escape(names)] + [latex_escape(c) for c in display.columns]) + r" \\", r"\midrule"]
    for key, row in display.iterrows():
        label = " / ".join(map(str, key)) if isinstance(key, tuple) else str(key)
        cells = [latex_escape(label)]
        for col, value in row.items():
            raw = col in raw_columns if raw_columns is not None else str(value).startswith(("$", "-"))
            cells.append(str(value) if raw else latex_escape(value))
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines = [r"\begin{table}[t]", r"\centering", *lines, r"\caption{" + latex_escape(caption) + "}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_tables(runs: pd.DataFrame, out_dir: str | Path, *, by="variant", caption: str | None = None) -> dict:
    """runs.csv (every run), results.csv (mean/std per group, unrounded), results.md, results.tex
    (`caption` above the Markdown table and as the LaTeX table's caption)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    agg = aggregate(runs, by)
    paths = {"runs": out_dir / "runs.csv", "results": out_dir / "results.csv",
             "markdown": out_dir / "results.md", "latex": out_dir / "results.tex"}
    runs.to_csv(paths["runs"], index=False)
    agg.to_csv(paths["results"])
    paths["markdown"].write_text((f"{caption}\n\n" if caption else "") + to_markdown(display_frame(agg)))
    paths["latex"].write_text(to_latex(display_frame(agg, latex=True), caption=caption))
    return paths
