"""Peak memory and speed of `msdn train`, resident bank vs streaming, on CUB-shaped caches of growing size.

For each size a synthetic float16 cache (2048 x 14 x 14 maps, 200 classes, 312 attributes, xlsa17-
style train/val splits; bench/train.py's writer) is written once, then each mode trains in its own
child process (pipeline.train.train, as `msdn train` runs it: the CUB recipe cut to --steps steps
for the validation run and for the final run, one evaluation each) and reports its peak resident
memory (ru_maxrss), the final run's training samples per second and per CPU second (the process's
CPU time, a streaming reader's thread included: the measure a shared machine does not distort),
and the whole run's CPU and wall seconds:
  resident   MSDN_FEATURE_STORE=resident: the bank of normalised regions in memory;
  streaming  MSDN_FEATURE_STORE=streaming: batches read from the file on a background thread.
The runtime's fixed overhead is the resident peak of the smallest cache minus its bank (torch, the
project, the model, the training step's and an evaluation batch's working memory); the target is
peak <= 1.3 x bank + that overhead. The smallest cache needs >= 256 images: with fewer, its
evaluation batches are not full (~90 CUB images, pipeline/engine.py EVAL_HOST_BYTES) and the
overhead comes out ~0.3 GB too small (measured: 64 images gave 1.07 GB). The files were just written, so they sit in the page cache:
streaming's speed here is reading from memory, not from a disk.

    python bench/memory.py [--images 256,512] [--steps 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ORIGINAL_MSDN_PEAK = (2000, 6.9 * (1 << 30))  # images, bytes: the released MSDN code, as measured in issue 14


def write_memory_cache(path: Path, images: int) -> Path:
    """A CUB-shaped cache with xlsa17-style train_loc/val_loc (a fifth of the seen classes validate)."""
    from bench.train import write_cache
    write_cache(path, images, 2048, 14, 200, 312)
    with h5py.File(path, "a") as f:
        labels, trainval = f["labels"][()], f["trainval_loc"][()]
        classes = np.unique(labels[trainval])
        held = np.isin(labels[trainval], classes[-max(1, len(classes) // 5):])
        f["train_loc"], f["val_loc"] = trainval[~held], trainval[held]
    return path


def child(cache: str, mode: str, steps: int, out: str) -> dict:
    """One `msdn train` run in this process; its peak RSS, speed and CPU time."""
    from pipeline.config import apply_overrides, load_recipe
    from pipeline.train import train
    config = apply_overrides(load_recipe("CUB"), {"iterations": steps, "eval_every": steps,
                                                  "log_every": steps, "select_iterations": False})
    bank = _bank_bytes(cache)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    os.environ["MSDN_FEATURE_STORE"] = mode  # a --max-memory below the runtime would be refused
    summary = train(config, cache, out, device="cpu", progress=False, overwrite=True)
    return {"mode": summary["feature_store"]["mode"], "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10,
            "bank_bytes": bank, "limit_bytes": None,  # the store is chosen by MSDN_FEATURE_STORE, not a limit
            "samples_per_s": summary["timing"]["samples_per_s"], "train_seconds": summary["timing"]["final_train_seconds"],
            "samples_per_cpu_s": steps * config.batch_size / summary["timing"]["final_train_cpu_seconds"],
            "wall_s": time.perf_counter() - start_wall, "cpu_s": time.process_time() - start_cpu}


def _bank_bytes(cache: str) -> int:
    with h5py.File(cache, "r") as f:
        n, c, h, w = f["feature_map"].shape
    return n * c * h * w * 2  # float16 bank (CPU runs keep float16 features)


def import_only_rss() -> int:
    code = ("import resource, torch, pipeline.train, pipeline.evaluate; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10)")
    return int(subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.split()[-1])


def run(sizes: list[int], steps: int, folder: Path) -> dict:
    rows = []
    for images in sizes:
        cache = write_memory_cache(folder / f"cub_{images}.h5", images)
        for mode in ("resident", "streaming"):
            done = subprocess.run([sys.executable, __file__, "--child", str(cache), mode, str(steps),
                                   str(folder / f"run_{images}_{mode}")], cwd=ROOT, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"bench/memory.py: the {mode} run on {images} images failed:\n{done.stderr}")
            rows.append({"images": images, **json.loads(done.stdout.strip().splitlines()[-1])})
            print(_line(rows[-1]), flush=True)
        cache.unlink()
    smallest = next(r for r in rows if r["mode"] == "resident" and r["images"] == min(sizes))
    overhead = smallest["peak_bytes"] - smallest["bank_bytes"]
    for r in rows:
        r["over_bank"] = (r["peak_bytes"] - overhead) / r["bank_bytes"]
        resident = next(x for x in rows if x["images"] == r["images"] and x["mode"] == "resident")
        r["speed_vs_resident"] = r["samples_per_s"] / resident["samples_per_s"]
        r["cpu_speed_vs_resident"] = r["samples_per_cpu_s"] / resident["samples_per_cpu_s"]
        r["cpu_vs_resident"] = r["cpu_s"] / resident["cpu_s"]
    return {"overhead_bytes": overhead, "import_bytes": import_only_rss(), "steps": steps, "rows": rows,
            "original_msdn": {"images": ORIGINAL_MSDN_PEAK[0], "peak_bytes": ORIGINAL_MSDN_PEAK[1]}}


def _line(r: dict) -> str:
    return (f"{r['images']:>6} images  {r['mode']:<9}  bank {r['bank_bytes'] / 2**30:5.2f} GB  "
            f"peak {r['peak_bytes'] / 2**30:5.2f} GB  {r['samples_per_s']:6.1f} samples/s  "
            f"{r['samples_per_cpu_s']:6.1f} samples/CPU s  {r['cpu_s']:6.1f} CPU s  {r['wall_s']:6.1f} wall s")


def table(result: dict) -> str:
    gb = lambda b: f"{b / 2**30:.2f}"
    lines = ["| images | bank GB | mode | peak GB | (peak - overhead) / bank | limit GB | samples/s "
             "| x resident | samples/CPU s | x resident | run CPU s | run wall s |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        limit = "-" if r["limit_bytes"] is None else gb(r["limit_bytes"])
        lines.append(f"| {r['images']} | {gb(r['bank_bytes'])} | {r['mode']} | {gb(r['peak_bytes'])} | "
                     f"{r['over_bank']:.2f} | {limit} | {r['samples_per_s']:.1f} | {r['speed_vs_resident']:.2f} | "
                     f"{r['samples_per_cpu_s']:.1f} | {r['cpu_speed_vs_resident']:.2f} | "
                     f"{r['cpu_s']:.0f} | {r['wall_s']:.0f} |")
    original = result["original_msdn"]
    lines.append(f"| {original['images']} | | released MSDN (issue 14) | {gb(original['peak_bytes'])} | | | | | | | | |")
    lines.append(f"\nfixed overhead (smallest cache's resident peak minus its bank): {gb(result['overhead_bytes'])} GB; "
                 f"torch + project imported: {gb(result['import_bytes'])} GB; {result['steps']} steps per run")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        cache, mode, steps, out = sys.argv[2:6]
        print(json.dumps(child(cache, mode, int(steps), out)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="256,512", help="Comma-separated cache sizes (2,000 images = 1.6 GB).")
    parser.add_argument("--steps", type=int, default=3, help="Training steps of each run (validation and final).")
    parser.add_argument("--json", default=None, help="Also write the results here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="msdn-memory-") as folder:
        result = run([int(x) for x in args.images.split(",")], args.steps, Path(folder))
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
