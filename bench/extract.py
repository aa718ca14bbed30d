"""Extraction speed and memory: `msdn extract` against the bare backbone forward, in one run.

    python bench/extract.py                                  # efficientnet_lite0 @224 on CPU, minutes
    python bench/extract.py --backbone resnet101 --image-size 448 --per-class 1 --scale 2
    python bench/extract.py --device cuda --per-class 8      # on a GPU (autocast, channels_last)

1. Two CUB-style folders of real CUB-100 photos (shared data) with `per_class` and `scale * per_class`
   images per species (N and scale*N images), images symlinked, never copied.
2. Bare forward: the first `--bare-images` of those N images decoded once, then timed through the frozen backbone for every
   layout x batch size (inference_mode; autocast on CUDA); the best is the ceiling.
3. `msdn extract` (the real CLI, in a subprocess) on both folders, for each `--workers` setting
   asked (e.g. `--workers default,0,1`): wall time, peak RSS of the largest process and of the
   whole process tree (main + decoding workers).
4. Extraction rate = marginal rate (scale-1)*N / (T(scale*N) - T(N)): start-up (imports, weights,
   dataset index) cancels out. Prints ratio extraction / bare (target >= 0.9) and whether peak RSS
   grows with N; writes everything as JSON.
5. The same ratio in CPU seconds per image (bare: this process; extraction: the CLI's process
   tree, marginal). On a shared, busy machine wall-clock rates are noise while CPU seconds still say
   how much work extraction adds per image; with `--threads 1` (one forward thread, no workers)
   the CPU ratio is what the wall-clock ratio would be on an idle core. Where other processes share
   the cores, OpenMP's default spin-waiting wastes most of them, so `msdn` and this bench (its bare
   forward must run as the extraction does) default to OMP_WAIT_POLICY=PASSIVE; compare with
   OMP_WAIT_POLICY=ACTIVE in the environment (read when torch loads; the subprocess inherits it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `msdn` does (cli.py), before torch loads
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.backbone_forward import memory_format_of, time_batches  # noqa: E402
from bench.cpu_meter import CpuMeter, wait_until_idle  # noqa: E402
from extract.backbones import BackboneSpec, BackboneWeightsError, build_backbone, build_transform, resolve_weights  # noqa: E402
from extract.datasets.cub_files import read_id_table  # noqa: E402
from tests.fixtures.shared_data import find_shared_data  # noqa: E402

# Run in a fresh interpreter per extraction: RUSAGE_CHILDREN then covers that run only (its
# DataLoader workers are reaped by the CLI process, so their peaks roll up into it), and a
# polling thread sums VmRSS over the live process tree for the tree peak.
_MEASURE_CHILD = r"""
import json, os, resource, subprocess, sys, threading, time
def tree_rss_kb(root):
    kids = {}
    for pid in os.listdir('/proc'):
        if pid.isdigit():
            try:
                ppid = int(open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(pid))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            for line in open(f'/proc/{pid}/status'):
                if line.startswith('VmRSS:'):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:])
peak_tree, stop = 0, threading.Event()
def poll():
    global peak_tree
    while not stop.is_set():
        peak_tree = max(peak_tree, tree_rss_kb(proc.pid))
        stop.wait(0.25)
thread = threading.Thread(target=poll, daemon=True)
thread.start()
rc = proc.wait()
wall = time.perf_counter() - start
stop.set(); thread.join()
kids = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "wall_s": wall, "cpu_s": kids.ru_utime + kids.ru_stime, "peak_rss_mb": kids.ru_maxrss / 1024,
                  "peak_tree_rss_mb": peak_tree / 1024}))
"""


def make_cub_subset(src: Path, dst: Path, per_class: int) -> int:
    """CUB-style folder at `dst` with the first `per_class` images of each species (training-flag
    images first, so every seen class keeps a training image); returns the number of images."""
    images, labels = read_id_table(src / "images.txt"), read_id_table(src / "image_class_labels.txt")
    flags = read_id_table(src / "train_test_split.txt")
    by_class: dict[str, list[int]] = {}
    for i in images:
        by_class.setdefault(labels[i], []).append(i)
    keep = []
    for ids in by_class.values():
        train, test = [i for i in ids if flags[i] == "1"], [i for i in ids if flags[i] != "1"]
        keep += sorted((train[:(per_class + 1) // 2] + test + train[(per_class + 1) // 2:])[:per_class])
    dst.mkdir(parents=True)
    (dst / "images").symlink_to(src / "images")
    for name, table in (("images.txt", images), ("image_class_labels.txt", labels), ("train_test_split.txt", flags)):
        (dst / name).write_text("".join(f"{i}, {table[i]}\n" for i in keep))
    for name in ("classes.txt", "zsl_split_xlsa17_PS.json"):
        shutil.copy(src / name, dst / name)
    return len(keep)


def bare_forward(spec: BackboneSpec, paths: list[Path], batch_sizes, layouts, device: torch.device,
                 min_seconds: float, max_wait_s: float, log) -> list[dict]:
    """images/s of the backbone alone over the given images, decoded once beforehand."""
    transform = build_transform(spec)
    images = torch.stack([transform(Image.open(p)) for p in paths])
    model = build_backbone(spec)
    rows = []
    for layout in layouts:
        model = model.to(device=device, memory_format=memory_format_of(layout))
        for batch_size in batch_sizes:
            batches = [images[i:i + batch_size].to(device).contiguous(memory_format=memory_format_of(layout))
                       for i in range(0, len(images) - batch_size + 1, batch_size)]
            if device.type == "cpu" and max_wait_s > 0:
                wait_until_idle(max_wait_s, log=log)
            with CpuMeter() as meter:
                rate, cpu_per_image = time_batches(model, batches, device, len(images), min_seconds)
            rows.append({"layout": layout, "batch_size": batch_size, "images_per_s": round(rate, 3),
                         "cpu_s_per_image": round(cpu_per_image, 5), "foreign_cpu_share": round(meter.foreign_share, 3)})
            log(f"  bare {layout:>13} batch {batch_size:3d}: {rate:8.2f} img/s, {cpu_per_image * 1000:7.1f} CPU ms/img "
                f"(other processes: {meter.foreign_share:.0%} of the CPUs)")
    return rows


def run_extract(folder: Path, shared: Path, out: Path, args, weights: str, workers: str) -> dict:
    msdn = shutil.which("msdn")
    cli = [msdn] if msdn else [sys.executable, "-c", "import cli; cli.main()"]
    cmd = cli + ["extract", "--dataset", "CUB100", "--data-root", str(folder.parent),
                 "--xlsa17-root", str(shared / "xlsa17"), "--w2v-root", str(shared / "attribute_w2v"),
                 "--backbone", args.backbone, "--image-size", str(args.image_size), "--weights", weights,
                 "--device", args.device, "--out", str(out), "--no-progress", "--overwrite"]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if workers != "default":
        cmd += ["--workers", workers]
    if args.device == "cpu" and args.max_wait > 0:
        wait_until_idle(args.max_wait)
    with CpuMeter() as meter:
        # CPU: the same torch thread count as the bare forward (the engine gives decoding workers
        # their share of it); CUDA: the engine's own choice.
        env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.device == "cpu" else {})}
        result = subprocess.run([sys.executable, "-c", _MEASURE_CHILD, *cmd], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"measuring wrapper failed:\n{result.stderr[-3000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    if measured["rc"] != 0:
        raise SystemExit(f"msdn extract failed (rc {measured['rc']}):\n{result.stderr[-3000:]}")
    measured["foreign_cpu_share"] = round(meter.foreign_share, 3)
    measured["log"] = [line for line in result.stderr.splitlines() if line.startswith("extracting")]
    return measured


def choose_weights(spec_name: str, image_size: int, asked: str) -> str:
    """'auto': ImageNet weights when they are on this machine, else random init (same arithmetic)."""
    if asked != "auto":
        return asked
    try:
        resolve_weights(BackboneSpec(spec_name, image_size, "imagenet"), download=False)
        return "imagenet"
    except BackboneWeightsError:
        return "random"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0", choices=["efficientnet_lite0", "efficientnet_lite2", "resnet101"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--weights", default="auto", help="auto (imagenet if present, else random), imagenet, random, path")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (extraction and bare forward)")
    parser.add_argument("--per-class", type=int, default=1, help="images per species in the small run (N = 100 x this)")
    parser.add_argument("--scale", type=int, default=4, help="the large run has scale x N images")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16", help="bare-forward batch sizes to try")
    parser.add_argument("--layouts", default="contiguous,channels_last")
    parser.add_argument("--bare-images", type=int, default=64, help="images (of the small set) the bare forward cycles over")
    parser.add_argument("--batch-size", type=int, default=None, help="msdn extract --batch-size (default: its own)")
    parser.add_argument("--workers", default="default",
                        help="comma list of msdn extract --workers settings to compare; 'default' = its own")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the bare forward")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="minimum timing per bare configuration")
    parser.add_argument("--max-wait", type=float, default=120.0,
                        help="CPU only: seconds to wait for an idle machine before each measurement")
    parser.add_argument("--json", default="bench_extract.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shared = find_shared_data()
    src = shared / "cub100_subset"
    weights = choose_weights(args.backbone, args.image_size, args.weights)
    spec = BackboneSpec(args.backbone, args.image_size, weights)
    omp = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS") if k in os.environ}
    print(f"{spec.name} @{spec.image_size}px, weights {weights}, device {device}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, OpenMP env {omp or 'default'}")

    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        tmp = Path(tmp)
        sizes = {}
        for k in (args.per_class, args.per_class * args.scale):
            sizes[k] = make_cub_subset(src, tmp / f"k{k}" / "cub100_subset", k)
        small = tmp / f"k{args.per_class}" / "cub100_subset"
        paths = [small / "images" / line for line in read_id_table(small / "images.txt").values()]
        paths = paths[:args.bare_images]

        print(f"bare forward over the {len(paths)} images of the small set:")
        bare = bare_forward(spec, paths, [int(b) for b in args.batch_sizes.split(",")], args.layouts.split(","),
                            device, args.min_seconds, args.max_wait, print)
        best = max(bare, key=lambda r: r["images_per_s"])
        best_cpu = min(bare, key=lambda r: r["cpu_s_per_image"])

        settings = []
        for workers in args.workers.split(","):
            runs = []
            for k, n in sizes.items():
                measured = run_extract(tmp / f"k{k}" / "cub100_subset", shared, tmp / f"k{k}.h5", args, weights,
                                       workers)
                runs.append({"images": n, **measured})
                print(f"msdn extract --workers {workers} {n:5d} images: {measured['wall_s']:7.1f} s wall, "
                      f"{n / measured['wall_s']:6.2f} img/s end-to-end, peak RSS {measured['peak_rss_mb']:.0f} MB "
                      f"(tree {measured['peak_tree_rss_mb']:.0f} MB), other processes "
                      f"{measured['foreign_cpu_share']:.0%} of the CPUs"
                      + (f"\n    {measured['log'][0]}" if measured["log"] else ""))
            settings.append(summarise(workers, runs, best, best_cpu))
    print_table(best, best_cpu, settings)
    noisy = max([r["foreign_cpu_share"] for s in settings for r in s["runs"]] + [best["foreign_cpu_share"]])
    if device.type == "cpu" and noisy > 0.1:
        print(f"warning: other processes used up to {noisy:.0%} of the CPUs during these timings")
    report = {"backbone": spec.to_dict(), "device": str(device), "threads": args.threads,
              "cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
              "openmp_env": omp, "bare": bare, "bare_best": best, "bare_least_cpu": best_cpu, "extract": settings}
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")


def summarise(workers: str, runs: list[dict], best: dict, best_cpu: dict) -> dict:
    """Marginal rate between the two sizes (start-up cancels out) and its ratio to the bare best;
    the same for CPU seconds per image (robust when other processes share the CPUs: it says how
    much work extraction adds to the forward pass); how much peak memory grew with the images."""
    (n1, r1), (n2, r2) = [(r["images"], r) for r in runs]
    marginal = (n2 - n1) / max(r2["wall_s"] - r1["wall_s"], 1e-9)
    cpu_per_image = (r2["cpu_s"] - r1["cpu_s"]) / (n2 - n1)
    return {"workers": workers, "runs": runs, "marginal_images_per_s": marginal,
            "ratio_extract_over_bare": marginal / best["images_per_s"],
            "marginal_cpu_s_per_image": cpu_per_image,
            "cpu_ratio_bare_over_extract": best_cpu["cpu_s_per_image"] / cpu_per_image,
            "peak_rss_growth": r2["peak_rss_mb"] / r1["peak_rss_mb"],
            "peak_tree_rss_growth": r2["peak_tree_rss_mb"] / r1["peak_tree_rss_mb"]}


def print_table(best: dict, best_cpu: dict, settings: list[dict]) -> None:
    print(f"\nbare forward, best: {best['images_per_s']:.2f} img/s ({best['layout']}, batch {best['batch_size']}); "
          f"least CPU: {best_cpu['cpu_s_per_image'] * 1000:.1f} ms/img ({best_cpu['layout']}, batch {best_cpu['batch_size']})")
    n1, n2 = settings[0]["runs"][0]["images"], settings[0]["runs"][1]["images"]
    print(f"| workers | extract img/s ({n1}->{n2}) | ratio to bare (>= 0.9) | extract CPU ms/img | CPU ratio bare/extract "
          f"| peak RSS MB {n1} / {n2} | tree peak RSS MB {n1} / {n2} |")
    print("|---|---|---|---|---|---|---|")
    for s in settings:
        r1, r2 = s["runs"]
        print(f"| {s['workers']} | {s['marginal_images_per_s']:.2f} | {s['ratio_extract_over_bare']:.2f} "
              f"| {s['marginal_cpu_s_per_image'] * 1000:.1f} | {s['cpu_ratio_bare_over_extract']:.2f} "
              f"| {r1['peak_rss_mb']:.0f} / {r2['peak_rss_mb']:.0f} "
              f"| {r1['peak_tree_rss_mb']:.0f} / {r2['peak_tree_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
