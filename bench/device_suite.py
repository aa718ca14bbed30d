"""One prepared run that proves the GPU path: correctness, stage-1 and stage-2 speed, the demo.

    python bench/device_suite.py --budget-s 420 --json device_suite.json      # on a CUDA machine
    python bench/device_suite.py --device cpu --quick                         # CI: the same code, miniature

Sections, in order (correctness first: a fast wrong answer is worth nothing):
  heads     losses and gradients of the MSDN heads on one batch: CPU float32 vs the device in
            float32 and under bf16 autocast, within stated tolerances;
  extract   rows of 8 demo images, ResNet101 on the device (bf16 autocast, stored float16) vs CPU
            float32, within a stated tolerance;
  resnet101, efficientnet_lite0
            stage 1 at 448 px (random init: weights do not change the speed): `extract_features`
            images/s with decoding overlapped vs the bare forward of the same model in this run
            (target >= 0.9), peak GPU memory;
  stage2    a full CUB-shaped recipe (312 attributes, 200 classes, 2048 x 14 x 14, 4,234 steps of
            50, synthetic features resident on the device) and the CUB test set (4,731 images)
            evaluation, timed; the achieved share of the device's measured bf16 matmul rate;
  demo      `msdn demo` end to end on the device: its table and wall time.
One JSON holds every figure, the device name and the versions; it is rewritten after each
section. `--budget-s` is hard: when it runs out the current section is stopped (a SIGALRM), the
rest are marked `not run: budget`, and what was measured is printed and written. Exit status: 0 all ran and
passed, 1 a check failed or a section raised, 3 the budget ran out.
"""
from __future__ import annotations

import time

_STARTED = time.monotonic()  # the budget counts the imports too

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `msdn` does (cli.py), before torch loads
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import device_checks as checks  # noqa: E402
from pipeline.precision import cpu_bf16  # noqa: E402

SECTIONS = ("heads", "extract", "resnet101", "efficientnet_lite0", "stage2", "demo")


class BudgetExhausted(Exception):
    pass


def _on_alarm(signum, frame):
    raise BudgetExhausted()


def environment(device: torch.device) -> dict:
    import h5py
    import numpy
    import torchvision
    info = {"device": str(device), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__, "h5py": h5py.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "cpu_bf16": cpu_bf16().describe(), "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                    device_memory_gb=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    else:
        info["device_name"] = info["cpu"]
    return info


def run_section(name: str, device: torch.device, shape, workdir: Path, deadline: float) -> dict:
    if name == "heads":
        return checks.check_heads(device, shape, workdir)
    if name == "extract":
        return checks.check_extract(device, shape, workdir)
    if name in ("resnet101", "efficientnet_lite0"):
        return checks.stage1(device, shape, workdir, name)
    if name == "stage2":
        return checks.stage2(device, shape, workdir)
    return checks.demo(device, shape, workdir, timeout_s=deadline - time.monotonic())


def print_summary(report: dict) -> None:
    env = report["environment"]
    print(f"\n== device suite: {env['device_name']} ({env['device']}), torch {env['torch']}, "
          f"CUDA {env['cuda']}, budget {report['budget_s']:.0f} s, {report['seconds']:.0f} s used")
    for name, section in report["sections"].items():
        figures = {k: v for k, v in section.items() if k not in ("status", "seconds", "error", "demo_table")}
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
        print(f"[{section['status']}] {name} ({section.get('seconds', 0):.1f} s) {shown}")
        if section.get("error"):
            print(f"    {section['error']}")
        if section.get("demo_table"):
            print("    " + section["demo_table"].replace("\n", "\n    "))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="miniature sizes: the same code and JSON fields")
    parser.add_argument("--budget-s", type=float, default=420.0, help="hard limit for the whole suite")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--json", type=Path, default=Path("device_suite.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch build sees no CUDA device (use --device cpu --quick)")
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    shape = checks.Shape.quick() if args.quick else checks.Shape()
    start = _STARTED
    deadline = start + args.budget_s
    report = {"suite": "bench/device_suite.py", "quick": args.quick, "budget_s": args.budget_s,
              "shape": {k: v for k, v in vars(shape).items()}, "tolerances": checks.TOLERANCE,
              "environment": environment(device), "sections": {name: {"status": "not run"} for name in SECTIONS
                                                              if name in args.sections.split(",")}}
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, deadline - time.monotonic()))
    exhausted = False
    try:
        with tempfile.TemporaryDirectory(prefix="msdn_device_suite_") as tmp:
            for name in report["sections"]:
                section_start = time.monotonic()
                print(f"-- {name} ...", flush=True)
                try:
                    figures = run_section(name, device, shape, Path(tmp), deadline)
                    ok = all(v for k, v in figures.items() if k.endswith("_ok"))
                    report["sections"][name] = {"status": "ok" if ok else "FAILED", **figures}
                except BudgetExhausted:
                    report["sections"][name] = {"status": "stopped: budget"}
                    exhausted = True
                except Exception as err:  # a broken section must not hide the others' figures
                    traceback.print_exc()
                    report["sections"][name] = {"status": "error", "error": f"{type(err).__name__}: {err}"}
                report["sections"][name]["seconds"] = time.monotonic() - section_start
                report["seconds"] = time.monotonic() - start
                args.json.write_text(json.dumps(report, indent=1, default=str))
                if exhausted:
                    break
    except BudgetExhausted:  # the alarm fired while cleaning up: what was measured is already written
        exhausted = True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if exhausted:
        for section in report["sections"].values():
            if section["status"] == "not run":
                section["status"] = "not run: budget"
    report["seconds"] = time.monotonic() - start
    args.json.write_text(json.dumps(report, indent=1, default=str))
    print_summary(report)
    print(f"JSON: {args.json}")
    if exhausted:
        return 3
    return 0 if all(s["status"] == "ok" for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
