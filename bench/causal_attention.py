"""Does the causal attention look at the right thing? On the demo set, where each image's object box
is known, the share of attribute→visual attention mass inside the box for MSDN and each causal
reading of `msdn ablate --preset causal`, over several seeds, beside accuracy.

    python bench/causal_attention.py --out runs/causal_attention \
        [--paired results/causal/cub100_224/paired.csv] [--weight 0.3] [--seeds 0,1,2]

Each causal variant trains at the weight that the CUB-100 screen chose on validation (`--paired`),
or at `--weight` when no screen is given. Mass is averaged over (test image, object attribute of
its class: shape and colour) pairs; "box share" is what uniform attention would put there, so
mass / box share > 1 means attention on the object. Writes attention.csv and attention.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.reader import FeatureCache  # noqa: E402
from extract.datasets import build_dataset  # noqa: E402
from pipeline.commands.ablate.causal import BASELINE, WEIGHT_KEY, causal_variants, chosen_weights  # noqa: E402
from pipeline.commands.attention import attention_on_objects, load_trained  # noqa: E402
from pipeline.commands.demo import DEMO_BACKBONE, DEMO_IMAGE_SIZE  # noqa: E402
from pipeline.commands.extract import ExtractOptions, run_extract  # noqa: E402
from pipeline.commands.tables import mean_std  # noqa: E402
from pipeline.config import apply_overrides, load_recipe  # noqa: E402
from pipeline.train import train  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/causal_attention")
    parser.add_argument("--paired", default=None, help="paired.csv of a causal screen: its chosen weights")
    parser.add_argument("--weight", type=float, default=0.3, help="lambda_causal where --paired names none")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=None, help="comma-separated subset of the screen's variants")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override (repeatable)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    registry = causal_variants()
    names = args.variants.split(",") if args.variants else list(registry)
    weights = chosen_weights(args.paired) if args.paired else {}

    cache = run_extract(ExtractOptions(dataset="demo", data_root=str(out / "data"), backbone=DEMO_BACKBONE,
                                       image_size=DEMO_IMAGE_SIZE, out=str(out / "demo.h5"), device="cpu",
                                       progress=False), log=lambda m: None)
    dataset = build_dataset("demo", root=out / "data")
    rows = []
    for name in names:
        overrides = dict(registry[name].overrides)
        if name != BASELINE:
            overrides[WEIGHT_KEY] = weights.get(name, args.weight)
        for seed in seeds:
            config = apply_overrides(apply_overrides(load_recipe("demo"), args.overrides), {**overrides, "seed": seed})
            run_dir = out / name / f"seed{seed}"
            start = time.process_time()
            summary = train(config, cache, run_dir, device="cpu", progress=False, overwrite=True)
            with FeatureCache(cache) as features:
                trained = load_trained(run_dir / "best.pt", features, torch.device("cpu"))
                mass, area = attention_on_objects(trained.model, trained.task, features, dataset,
                                                  dataset.attribute_names, DEMO_IMAGE_SIZE)
            rows.append({"variant": name, WEIGHT_KEY: overrides.get(WEIGHT_KEY, 0.0), "seed": seed,
                         "ZSL": 100 * summary["test"]["ZSL"], "H": 100 * summary["test"]["H"],
                         "box_mass": mass.mean(), "box_share": area.mean(), "mass_ratio": mass.mean() / area.mean(),
                         "cpu_s": time.process_time() - start})
            print(f"{name} seed {seed}: ZSL {rows[-1]['ZSL']:.2f} H {rows[-1]['H']:.2f} "
                  f"box mass {rows[-1]['box_mass']:.3f} (share {rows[-1]['box_share']:.3f})", flush=True)
    runs = pd.DataFrame(rows)
    runs.to_csv(out / "attention.csv", index=False)
    lines = ["| variant | weight | seeds | box mass | mass / box share | ZSL | H |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, group in runs.groupby("variant", sort=False):
        cell = {m: mean_std(group[m].mean(), group[m].std(ddof=1) if len(group) > 1 else None,
                            3 if m in ("box_mass", "mass_ratio") else 2) for m in ("box_mass", "mass_ratio", "ZSL", "H")}
        lines.append(f"| {name} | {group[WEIGHT_KEY].iloc[0]:g} | {len(group)} | {cell['box_mass']} | "
                     f"{cell['mass_ratio']} | {cell['ZSL']} | {cell['H']} |")
    (out / "attention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
