"""The full CUB-100 protocol on real photos (not CI): extract, train MSDN++ (CUB100 recipe), ESZSL.

    python bench/cub100.py --work /work/msdn_cache/cub100 --image-size 448 --json cub100_448.json
    python bench/cub100.py --work runs/cub100_lite2 --backbone efficientnet_lite2 --json lite2_448.json

Runs the three real console commands (this checkout's cli.py, i.e. `msdn`) one after the other and
records each one's wall time, CPU seconds (the command and its children: comparable when other jobs
share the machine) and the results from the run folders' summary.json:
    msdn extract --dataset CUB100 --backbone B --image-size S --out <cache>
    msdn train --recipe CUB100 --cache <cache> --out <work>/msdn_S
    msdn baseline --cache <cache> --out <work>/eszsl_S
An up-to-date cache is not extracted again (msdn extract checks its content key), so its time is
then only the check; pass --cache to reuse a cache made elsewhere. Results are "CUB-100, <backbone>":
never comparable to the paper's CUB numbers (docs/method.md).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SCORES = ("ZSL", "U", "S", "H", "AUSUC", "gamma")
# This checkout's command line (what the `msdn` console script runs), so a worktree benchmarks itself.
REPO = Path(__file__).resolve().parents[1]
MSDN = [sys.executable, str(REPO / "cli.py")]
sys.path.insert(0, str(REPO))
from tests.fixtures.shared_data import find_shared_data  # noqa: E402  (the CUB-100 photos: test data)

CPU_SECONDS: dict[str, float] = {}


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_step(name: str, args: list[str], log) -> float:
    log(f"$ msdn {' '.join(args)}")
    start, cpu_start = time.perf_counter(), _children_cpu_seconds()
    done = subprocess.run(MSDN + args, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    CPU_SECONDS[name] = _children_cpu_seconds() - cpu_start
    log(done.stdout.rstrip())
    if done.returncode != 0:
        raise SystemExit(f"{name} failed with exit code {done.returncode} after {seconds:.0f} s")
    log(f"[{name}: {seconds:.0f} s wall, {CPU_SECONDS[name]:.0f} CPU s]")
    return seconds


def markdown(results: dict) -> str:
    lines = ["| method | ZSL | U | S | H | AUSUC | gamma | wall time |", "|---|---|---|---|---|---|---|---|"]
    for name, key in (("MSDN++ (CUB100 recipe)", "msdn"), ("ESZSL (pooled features)", "eszsl")):
        test = results[key]["test"]
        cells = [f"{100 * test[k]:.1f}" for k in SCORES[:-1]] + [f"{test['gamma']:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {results[key]['seconds']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="Folder for the cache and the run folders.")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--backbone", default="efficientnet_lite0",
                        help="Any `msdn extract --backbone` value [default: efficientnet_lite0].")
    parser.add_argument("--cache", type=Path, default=None,
                        help="Feature cache to write or reuse [default: <work>/CUB100_<backbone>_<S>.h5].")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Override for msdn train (repeatable), e.g. iterations=200 for a quick look.")
    parser.add_argument("--json", type=Path, default=None, help="Write the results here.")
    opts = parser.parse_args()

    opts.work.mkdir(parents=True, exist_ok=True)
    size = opts.image_size
    backbone = opts.backbone
    cache = opts.cache or opts.work / f"CUB100_{backbone.replace(':', '_')}_{size}.h5"
    msdn_dir, eszsl_dir = opts.work / f"msdn_{size}", opts.work / f"eszsl_{size}"
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    results = {"dataset": "CUB-100 (real photos)", "backbone": backbone, "image_size": size,
               "cache": str(cache), "cpu_count": os.cpu_count(), "note": "not comparable to the paper's CUB numbers"}
    results["extract_seconds"] = run_step("extract", [
        "extract", "--dataset", "CUB100", "--data-root", str(find_shared_data()), "--backbone", backbone, "--image-size", str(size),
        "--out", str(cache), "--device", opts.device, "--no-progress"], log)
    results["extract_cpu_seconds"] = CPU_SECONDS["extract"]
    results["extract_images_per_s"] = _images(cache) / results["extract_seconds"]
    sets = [arg for item in opts.overrides for arg in ("--set", item)]
    seconds = run_step("train", ["train", "--recipe", "CUB100", "--cache", str(cache), "--out", str(msdn_dir),
                                 "--device", opts.device, "--quiet", "--overwrite", *sets], log)
    results["msdn"] = {"seconds": seconds, "cpu_seconds": CPU_SECONDS["train"], **_summary(msdn_dir)}
    seconds = run_step("baseline", ["baseline", "--cache", str(cache), "--out", str(eszsl_dir), "--overwrite"],
                       log)
    results["eszsl"] = {"seconds": seconds, "cpu_seconds": CPU_SECONDS["baseline"], **_summary(eszsl_dir)}
    log(markdown(results))
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=2) + "\n")


def _images(cache: Path) -> int:
    import h5py
    with h5py.File(cache, "r") as f:
        return int(f["labels"].shape[0])


def _summary(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"test": {k: summary["test"][k] for k in SCORES}, "selection": summary["selection"],
            "timing": summary.get("timing"), "run": str(run_dir)}


if __name__ == "__main__":
    sys.exit(main())
