"""Bare backbone forward throughput: images/s over memory layouts and batch sizes.

    python bench/backbone_forward.py --backbone resnet101 --image-size 448 --json out.json

No decoding, no writing: random input tensors through the frozen backbone under inference_mode
(CUDA: autocast bf16/fp16 as the extractor uses it). The best row is the ceiling that
`msdn extract` is compared with in bench/extract.py. Random init is used by default: the weights
do not change the arithmetic, and ResNet101 ImageNet weights may be absent offline.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.cpu_meter import CpuMeter, wait_until_idle  # noqa: E402
from extract.backbones import BackboneSpec, build_backbone  # noqa: E402

LAYOUTS = ("contiguous", "channels_last")


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_for(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=amp)


def time_batches(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device,
                 min_images: int, min_seconds: float) -> tuple[float, float]:
    """(images/s, CPU seconds of this process per image) of model(x) cycling over `batches` (already
    on the device, in the model's layout), after one warm-up batch (allocator, oneDNN/cuDNN choice).
    CPU seconds stay meaningful when other processes slow the wall clock down."""
    with torch.inference_mode(), autocast_for(device):
        model(batches[0])
        sync_device(device)
        done, start, cpu_start = 0, time.perf_counter(), time.process_time()
        while done < min_images or time.perf_counter() - start < min_seconds:
            for x in batches:
                model(x)
                done += len(x)
        sync_device(device)
        return done / (time.perf_counter() - start), (time.process_time() - cpu_start) / done


def time_forward(model: torch.nn.Module, image_size: int, batch_size: int, layout: str,
                 device: torch.device, min_images: int, min_seconds: float) -> float:
    """images/s for one layout and batch size on random input."""
    memory_format = memory_format_of(layout)
    model = model.to(device=device, memory_format=memory_format)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=memory_format)
    return time_batches(model, [x], device, min_images, min_seconds)[0]


def memory_format_of(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def sweep(spec: BackboneSpec, batch_sizes=(1, 2, 4, 8, 16), layouts=LAYOUTS, device="cpu",
          min_images: int = 16, min_seconds: float = 3.0, max_wait_s: float = 0.0, log=print) -> list[dict]:
    """One row per (layout, batch size); `foreign_cpu_share` says how busy other processes kept
    the CPUs meanwhile (numbers taken above ~0.1 are not to be trusted)."""
    device = torch.device(device)
    model = build_backbone(spec)
    rows = []
    for layout in layouts:
        for batch_size in batch_sizes:
            if device.type == "cpu" and max_wait_s > 0:
                wait_until_idle(max_wait_s, log=log)
            with CpuMeter() as meter:
                rate = time_forward(model, spec.image_size, batch_size, layout, device, min_images, min_seconds)
            rows.append({"backbone": spec.name, "image_size": spec.image_size, "layout": layout,
                         "batch_size": batch_size, "images_per_s": round(rate, 3),
                         "foreign_cpu_share": round(meter.foreign_share, 3)})
            log(f"{spec.name:>18} {spec.image_size:4d}px {layout:>13} batch {batch_size:3d}: {rate:8.2f} img/s "
                f"(other processes used {meter.foreign_share:.0%} of the CPUs)")
    return rows


def best(rows: list[dict]) -> dict:
    return max(rows, key=lambda r: r["images_per_s"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0", choices=["efficientnet_lite0", "efficientnet_lite2", "resnet101"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", default="1,2,4,8,16")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--weights", default="random")
    parser.add_argument("--max-wait", type=float, default=0.0,
                        help="seconds to wait for an idle CPU before each configuration")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = BackboneSpec(args.backbone, args.image_size, args.weights)
    rows = sweep(spec, [int(b) for b in args.batch_sizes.split(",")], args.layouts.split(","), args.device,
                 min_seconds=args.min_seconds, max_wait_s=args.max_wait)
    top = best(rows)
    print(f"fastest: {top['layout']} batch {top['batch_size']}: {top['images_per_s']:.2f} img/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "threads": args.threads, "rows": rows,
                                               "best": top}, indent=1))


if __name__ == "__main__":
    main()
