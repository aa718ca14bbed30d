"""`msdn report`: runs of two datasets in one paper-style table; published numbers only where the
dataset and backbone match the papers' (ResNet101)."""
import json
import re
import subprocess

import h5py
import numpy as np
import pytest

from pipeline.commands.report import PUBLISHED, ReportError, build_report, published_for
from tests.fixtures.caches import tiny_config, write_tiny_cache


def cache_claiming(path, dataset, backbone, size, key):
    """The tiny cache with a manifest naming a dataset and backbone (what `msdn extract` records)."""
    write_tiny_cache(path, content_key=key)
    with h5py.File(path, "a") as f:
        f.attrs["manifest"] = json.dumps({"dataset": {"name": dataset}, "backbone": {"name": backbone, "image_size": size}})
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from pipeline.train import train

    root = tmp_path_factory.mktemp("report")
    cub = cache_claiming(root / "cub.h5", "CUB", "resnet101", 448, "k-cub")
    lite = cache_claiming(root / "cub100.h5", "CUB100", "efficientnet_lite0", 224, "k-cub100")
    quick = dict(iterations=20, eval_every=10, selection="fixed")
    summaries = {}
    for name, cache, extra in (("cub-s0", cub, dict(seed=0, lambda_causal=0.5)),
                               ("cub-s1", cub, dict(seed=1, lambda_causal=0.5)),
                               ("cub-msdn", cub, dict(seed=0)),
                               ("lite-s0", lite, dict(seed=0, lambda_causal=0.5))):
        summaries[name] = train(tiny_config(**quick, **extra), cache, root / "runs" / name, progress=False)
    from pipeline.commands.baseline import run_baseline
    run_baseline(lite, root / "runs" / "lite-eszsl")
    (root / "runs" / "eval-only").mkdir()  # an evaluation folder is not a training run
    (root / "runs" / "eval-only" / "summary.json").write_text(json.dumps({"test": {}, "checkpoint": "x"}))
    return root, summaries


def test_report_lays_out_methods_by_dataset_with_published_numbers_where_they_match(runs):
    root, summaries = runs
    result = build_report([root / "runs"], out_dir=root / "report")
    long = result["long"]
    ours = long[long["source"] == "ours"].set_index(["column", "method"])
    cub_col, lite_col = "CUB (resnet101 448 px)", "CUB100 (efficientnet_lite0 224 px)"
    assert set(ours.index) == {(cub_col, "ours: MSDN++"), (cub_col, "ours: MSDN (no causal)"), (lite_col, "ours: MSDN++"),
                               (lite_col, "ours: ESZSL baseline")}
    h = [100 * summaries[n]["test"]["H"] for n in ("cub-s0", "cub-s1")]
    assert ours.at[(cub_col, "ours: MSDN++"), "runs"] == 2
    assert ours.at[(cub_col, "ours: MSDN++"), "H_mean"] == pytest.approx(np.mean(h))
    assert ours.at[(cub_col, "ours: MSDN++"), "H_std"] == pytest.approx(np.std(h, ddof=1))
    published = long[long["source"] == "published"]
    assert set(published["column"]) == {cub_col}  # EfficientNet-Lite0 / CUB100 has no published counterpart
    assert set(published["method"]) == set(PUBLISHED)
    md = result["markdown"]
    msdn_row = next(line for line in md.splitlines() if line.startswith("| MSDN (CVPR22)"))
    assert [c.strip() for c in msdn_row.split("|")[2:10]] == ["76.1", "68.7", "67.5", "68.1", "-", "-", "-", "-"]
    ours_row = next(line for line in md.splitlines() if line.startswith("| ours: MSDN++ |"))
    assert f"{np.mean(h):.2f} ± {np.std(h, ddof=1):.2f}" in ours_row
    assert "shown only for CUB (resnet101 448 px)" in md
    tex = result["latex"]
    assert r"\multicolumn{4}{c}{CUB (resnet101 448 px)}" in tex and r"\cmidrule(lr){2-5}" in tex
    lines = tex.splitlines()
    assert lines.index(r"\midrule", lines.index(r"\midrule") + 1) > max(
        i for i, ln in enumerate(lines) if ln.startswith("TransZero++"))  # published rows first, then ours
    assert re.search(r"ours: MSDN\+\+ & \$[\d.]+ \\pm [\d.]+\$", tex) and "$-$" not in tex
    assert r"MSDN++ (2026) & $78.5$ & - & - & $70.6$" in tex
    for name in ("report.md", "report.tex", "report.csv"):
        assert (root / "report" / name).is_file()


def test_published_numbers_need_the_papers_backbone():
    assert published_for("CUB", "resnet101")["MSDN (CVPR22)"] == {"ZSL": 76.1, "U": 68.7, "S": 67.5, "H": 68.1}
    assert published_for("SUN", "resnet101")["MSDN++ (2026)"] == {"ZSL": 67.5, "U": None, "S": None, "H": 42.1}
    assert published_for("CUB", "efficientnet_lite0") == {} and published_for("CUB100", "resnet101") == {}


def test_report_cli_and_an_empty_folder(runs, tmp_path):
    root, _ = runs
    done = subprocess.run(["msdn", "report", str(root / "runs"), "--no-published"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ours: MSDN++" in done.stdout and "DAZLE" not in done.stdout
    with pytest.raises(ReportError, match="no training runs"):
        build_report([tmp_path])
