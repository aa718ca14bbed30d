"""Scale-out and verify throughput: `msdn extract` in one process vs under torchrun, and `msdn cache verify`.

    python bench/scale_out.py                        # efficientnet_lite0 @224 on CPU, 1 vs 2 ranks, 1 thread each
    python bench/scale_out.py --ranks 1 --threads 0  # the one-process default (all cores) for comparison
    python bench/scale_out.py --device cuda --ranks 1,8 --per-class 8   # on an 8-GPU machine

1. Two CUB-style folders of real CUB-100 photos (shared data; images symlinked): `per_class` and
   `scale * per_class` images per species.
2. For each rank count: the real CLI in a subprocess (`torchrun --standalone --nproc-per-node W
   cli.py extract ...` when W > 1) on both folders. Rate = marginal rate (scale-1)*N / (T(big) -
   T(small)), so start-up (imports, weights, process group) cancels out; images per CPU-second of
   the process tree the same way (the cost of sharding, independent of free cores). CPU timings
   carry the share of the CPUs other processes used meanwhile (bench/cpu_meter.py): on a shared
   box, say so.
3. Verify: the big one-process cache's real rows tiled to `verify_rows` rows into a fresh cache (same
   dtype and lzf compression, through the real writer), then `verify_cache` timed: GB/s of decoded
   feature bytes checked and of file bytes read.
Writes the numbers as JSON (--json).
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.cpu_meter import CpuMeter  # noqa: E402
from bench.extract import make_cub_subset  # noqa: E402
from cache import layout as L  # noqa: E402
from cache.reader import FeatureCache  # noqa: E402
from cache.verify import verify_cache  # noqa: E402
from cache.writer import CacheWriter  # noqa: E402
from tests.fixtures.shared_data import find_shared_data  # noqa: E402


def timed_extract(folder: Path, shared: Path, out: Path, ranks: int, args) -> dict:
    launcher = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    cmd = launcher + ["cli.py", "extract", "--dataset", "CUB100", "--data-root", str(folder.parent),
                      "--xlsa17-root", str(shared / "xlsa17"), "--w2v-root", str(shared / "attribute_w2v"),
                      "--backbone", args.backbone, "--image-size", str(args.image_size), "--device", args.device,
                      "--out", str(out), "--no-progress", "--overwrite"]
    env = dict(os.environ)
    if args.threads:  # torchrun keeps an OMP_NUM_THREADS that is already set (else it sets 1)
        env["OMP_NUM_THREADS"] = str(args.threads)
    start, cpu_before = time.perf_counter(), _children_cpu_seconds()
    with CpuMeter() as meter:
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    seconds, cpu = time.perf_counter() - start, _children_cpu_seconds() - cpu_before
    if result.returncode != 0:
        raise SystemExit(f"extraction failed:\n{result.stderr[-3000:]}")
    return {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
            "foreign_cpu_share": round(meter.foreign_share, 3)}


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _children_cpu_seconds() -> float:
    """CPU time of finished child process trees (torchrun and its ranks included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tiled_cache(source: Path, dest: Path, rows: int) -> Path:
    """A cache of `rows` rows repeating the real rows of `source` (lzf, as extracted)."""
    from types import SimpleNamespace

    with FeatureCache(source) as cache:
        features = cache.features().numpy()
        manifest = dict(cache.manifest)
        n = cache.num_images
        index = np.arange(rows) % n
        meta = SimpleNamespace(num_images=rows, labels=cache.labels[index],
                               splits={k: np.arange(0) for k in L.REQUIRED_SPLITS}, att=cache.att,
                               original_att=cache.original_att, w2v_att=cache.w2v_att,
                               image_paths=[cache.image_paths[i] for i in index])
    L.create_cache_file(dest, dataset=meta, feature_shape=features.shape[1:], dtype=str(features.dtype),
                        compression="lzf", manifest=manifest)
    with CacheWriter(dest, codec_threads=2) as writer:
        for start in range(0, rows, n):
            block = np.arange(start, min(start + n, rows))
            writer.write(block, features[:len(block)])
    return dest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ranks", default="1,2", help="comma-separated world sizes")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per process (OMP_NUM_THREADS) for every run; 0 = each launcher's "
                             "default (one process: all cores; torchrun: 1 per rank)")
    parser.add_argument("--per-class", type=int, default=1)
    parser.add_argument("--scale", type=int, default=3)
    parser.add_argument("--verify-rows", type=int, default=2000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    shared = find_shared_data()
    work = Path(tempfile.mkdtemp(prefix="msdn-scale-"))
    sizes = {}
    for name, per_class in (("small", args.per_class), ("big", args.per_class * args.scale)):
        sizes[name] = make_cub_subset(shared / "cub100_subset", work / name / "cub100_subset", per_class)
    report = {"machine": {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()}, "images": sizes,
              "backbone": f"{args.backbone}@{args.image_size}", "device": args.device,
              "threads_per_process": args.threads or "default", "extract": {}}
    for ranks in [int(r) for r in args.ranks.split(",")]:
        runs = {name: timed_extract(work / name / "cub100_subset", shared, work / f"{name}-{ranks}.h5", ranks, args)
                for name in ("small", "big")}
        extra = sizes["big"] - sizes["small"]
        rate = extra / max(runs["big"]["seconds"] - runs["small"]["seconds"], 1e-9)
        per_cpu = extra / max(runs["big"]["cpu_seconds"] - runs["small"]["cpu_seconds"], 1e-9)
        report["extract"][ranks] = {**runs, "images_per_s": round(rate, 2), "images_per_cpu_s": round(per_cpu, 2)}
        print(f"{ranks} rank(s): {rate:6.2f} img/s marginal ({runs})", flush=True)
    base = report["extract"].get(1, {}).get("images_per_s")
    for ranks, row in report["extract"].items():
        if base:
            row["speedup_vs_1"] = round(row["images_per_s"] / base, 2)

    one = work / f"big-{min(report['extract'])}.h5"
    tiled = tiled_cache(one, work / "verify.h5", args.verify_rows)
    verify_cache(tiled)  # first pass warms the page cache: the figure is decode + checksum speed
    cpu_before = _own_cpu_seconds()
    result = verify_cache(tiled)
    cpu = _own_cpu_seconds() - cpu_before
    assert result.verdict == "ok", result.lines()
    file_bytes = tiled.stat().st_size
    report["verify"] = {"rows": result.rows_checked, "feature_bytes": result.bytes_read, "file_bytes": file_bytes,
                        "seconds": round(result.seconds, 3),
                        "decoded_GB_per_s": round(result.bytes_read / result.seconds / 1e9, 3),
                        "file_GB_per_s": round(file_bytes / result.seconds / 1e9, 3),
                        "cpu_seconds": round(cpu, 3), "decoded_GB_per_cpu_s": round(result.bytes_read / cpu / 1e9, 3)}
    print(f"verify: {report['verify']}", flush=True)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
