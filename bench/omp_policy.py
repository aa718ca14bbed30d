"""OpenMP wait policy and thread count for extraction and training, idle vs loaded, in one run.

    python bench/omp_policy.py [--seconds 3] [--json omp_policy.json]

OMP_WAIT_POLICY is read once, when torch's OpenMP runtime starts, so every configuration runs in a
fresh child process: one torch thread (no OpenMP team: the policy cannot matter) and two threads
with OMP_WAIT_POLICY unset / PASSIVE / ACTIVE, each with the
machine as it is ("idle": whatever else runs on it, whose CPU share is printed) and with a
synthetic load (one busy-looping process per core, started before the child and stopped after it).
Workloads, each the project's real code path:
  extract   the extraction forward: EfficientNet-Lite0 at 224 px (random init: same arithmetic),
            channels_last, inference_mode, batches of 8, as extract/extractor.py runs it on CPU;
  train     one training step of the engine (bench/train.py's Project: ResidentFeatures,
            the recipe's sampler, engine.train_step, float32) on a CUB-shaped synthetic cache
            (2048 x 7 x 7, 312 attributes, batch 50).
Per configuration: wall seconds and CPU seconds (all of the child's threads) per image / step.
On a loaded machine spinning OpenMP threads burn CPU that a neighbour could use, and a
descheduled spinner delays its team: the two figures say which policy wastes less and which
finishes sooner.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORKLOADS = ("extract", "train")
EXTRACT_BATCH = 8


def run_child(workload: str, threads: int, seconds: float, cache: str) -> dict:
    """Inside the child: build the workload, warm it up, time it for >= `seconds`."""
    import torch

    torch.set_num_threads(threads)
    if workload == "extract":
        from extract.backbones import BackboneSpec, build_backbone
        model = build_backbone(BackboneSpec("efficientnet_lite0", 224, "random"))
        model = model.to(memory_format=torch.channels_last)
        x = torch.randn(EXTRACT_BATCH, 3, 224, 224).contiguous(memory_format=torch.channels_last)

        def step():
            with torch.inference_mode():
                model(x)
        per_call = EXTRACT_BATCH
    else:
        from bench.train import Project
        from cache.reader import FeatureCache
        from heads.runtime import keep_freed_memory
        keep_freed_memory(True)
        feature_cache = FeatureCache(cache)
        project = Project(feature_cache, torch.device("cpu"), "none", seed=0)
        step, per_call = project.train_step, 1
    step()
    step()
    calls, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while calls < 3 or time.perf_counter() - wall0 < seconds:
        step()
        calls += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"items": calls * per_call, "wall_s_per_item": wall / (calls * per_call),
            "cpu_s_per_item": cpu / (calls * per_call)}


def start_load(cores: int) -> list[subprocess.Popen]:
    """One pure-Python busy loop per core: a neighbour that always wants the CPUs."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]


def stop_load(load: list[subprocess.Popen]) -> None:
    for proc in load:
        proc.kill()
    for proc in load:
        proc.wait()


def measure(workload: str, policy: str, threads: int, loaded: bool, args, cache: str) -> dict:
    from bench.cpu_meter import CpuMeter
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy != "unset":
        env["OMP_WAIT_POLICY"] = policy
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    load = start_load(os.cpu_count() or 1) if loaded else []
    try:
        with CpuMeter() as meter:
            done = subprocess.run([sys.executable, __file__, "--child", workload, "--threads", str(threads),
                                   "--seconds", str(args.seconds), "--cache", cache],
                                  capture_output=True, text=True, env=env, timeout=600)
    finally:
        stop_load(load)
    if done.returncode != 0:
        raise SystemExit(f"{workload} child (OMP_WAIT_POLICY={policy}, {threads} threads) failed:\n"
                         f"{done.stderr[-2000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    # foreign = everyone else, our synthetic load included; only meaningful for the idle runs
    return {"workload": workload, "policy": policy, "threads": threads, "loaded": loaded, **row,
            "others_cpu_share": round(meter.foreign_share, 3)}


def print_table(rows: list[dict]) -> None:
    print("| workload | machine | threads | OMP_WAIT_POLICY | wall s/item | CPU s/item | others' CPU share |")
    print("|---|---|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workload']} | {'loaded' if r['loaded'] else 'as is'} | {r['threads']} | {r['policy']} "
              f"| {r['wall_s_per_item']:.4f} | {r['cpu_s_per_item']:.4f} | {r['others_cpu_share']:.2f} |")


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per configuration")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--configs", default="1:unset,2:unset,2:PASSIVE,2:ACTIVE",
                        help="THREADS:POLICY pairs, comma-separated")
    parser.add_argument("--threads", default="1", help=argparse.SUPPRESS)  # the child's
    parser.add_argument("--json", type=Path, default=Path("omp_policy.json"))
    parser.add_argument("--child", choices=WORKLOADS, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, int(args.threads), args.seconds, args.cache)))
        return None

    from bench.train import write_cache
    rows = []
    with tempfile.TemporaryDirectory(prefix="msdn_omp_") as tmp:
        cache = str(write_cache(Path(tmp) / "cub_like_7x7.h5", 300, 2048, 7, 200, 312))
        # interleaved so that a change of the machine's own load spreads over every policy
        configs = [(int(t), p) for t, p in (c.split(":") for c in args.configs.split(","))]
        for loaded, workload, (threads, policy) in itertools.product(
                (False, True), args.workloads.split(","), configs):
            rows.append(measure(workload, policy, threads, loaded, args, cache))
            r = rows[-1]
            print(f"{workload:7} {'loaded' if loaded else 'as is':6} {threads} thr {policy:7}: "
                  f"{r['wall_s_per_item']:.4f} s/item wall, {r['cpu_s_per_item']:.4f} CPU s/item "
                  f"(others {r['others_cpu_share']:.0%})", flush=True)
    print_table(rows)
    report = {"cpu_count": os.cpu_count(), "seconds": args.seconds, "rows": rows}
    args.json.write_text(json.dumps(report, indent=1))
    print(f"JSON: {args.json}")
    return report


if __name__ == "__main__":
    main()
