"""Extraction across processes, GPUs and machines with torchrun.

    torchrun --nproc-per-node 8 cli.py extract --dataset CUB ...                  # one machine
    torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:29500 --nproc-per-node 8 \
        cli.py extract --dataset CUB --cache-dir /shared/msdn-cache                # several

Rank r of W extracts the contiguous rows [r*N//W, (r+1)*N//W) with the normal engine (same
batching, streaming writer, resume and skip-bad rules) into its own shard file
`<out>.shard-r-of-W.h5`, a complete cache of its rows. When every rank has finished, rank 0 joins the
shards into `<out>` with the manifest of a one-process extraction: the same content key whatever the
world size (cache/shards.py: a virtual dataset over the shards, or one materialized file).

A rank that fails or dies leaves its shard's `.partial` file; rerunning the same command (same world
size) continues every shard where it stopped and recomputes only the missing rows. Backends: NCCL
when the ranks use CUDA (device cuda:LOCAL_RANK), gloo on CPU. Several machines need `<out>` (or
the store) on a filesystem every node sees. The process group only carries a few small messages
(decisions and a final status), never features.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cache.reader import FeatureCache
from cache.shards import join_shards, shard_path
from cache.writer import ExtractError
from extract.datasets.base import ImageDataset
from extract.devices import resolve_device
from extract.extractor import extract_features
from extract.manifest import build_manifest

# Collectives wait for the slowest rank's whole shard (hours on CPUs): the default 30 min would
# abort a healthy run. Override with MSDN_DIST_TIMEOUT_MIN.
DEFAULT_TIMEOUT_MIN = 24 * 60


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    @property
    def prefix(self) -> str:
        return f"[rank {self.rank}/{self.world}] "


def torchrun_world() -> int:
    """The world size torchrun announced (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def dist_env(device: str = "auto") -> DistEnv:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    chosen = resolve_device(device)
    if chosen.type == "cuda" and chosen.index is None:
        if local >= torch.cuda.device_count():
            raise ExtractError(f"rank {rank}: LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) "
                               "are visible; lower --nproc-per-node")
        chosen = torch.device("cuda", local)
    return DistEnv(rank, world, local, chosen)


@contextlib.contextmanager
def process_group(env: DistEnv):
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    minutes = float(os.environ.get("MSDN_DIST_TIMEOUT_MIN", DEFAULT_TIMEOUT_MIN))
    kwargs = {"device_id": env.device} if env.backend == "nccl" else {}
    dist.init_process_group(env.backend, timeout=timedelta(minutes=minutes), **kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()


def broadcast(value, env: DistEnv):
    """Rank 0's `value` on every rank (any picklable object)."""
    box = [value if env.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, device=env.device if env.backend == "nccl" else None)
    return box[0]


def all_ok(ok: bool, env: DistEnv) -> bool:
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=env.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    return rank * n // world, (rank + 1) * n // world


def shard_dataset(dataset: ImageDataset, lo: int, hi: int) -> ImageDataset:
    """Rows [lo, hi) of `dataset` as a dataset of their own (splits re-indexed from 0)."""
    splits = {k: v[(v >= lo) & (v < hi)] - lo for k, v in dataset.splits.items()}
    return replace(dataset, image_paths=dataset.image_paths[lo:hi], labels=dataset.labels[lo:hi], splits=splits,
                   boxes=None if dataset.boxes is None else dataset.boxes[lo:hi],
                   source={**dataset.source, "shard_of_rows": [lo, hi]})


def extract_sharded(dataset: ImageDataset, spec, out: str | Path, env: DistEnv, *, materialize: bool = False,
                    dtype: str = "float16", compression: str = "lzf", overwrite: bool = False,
                    progress: bool = True, log=print, **engine_options) -> Path:
    """Called by every rank inside `process_group`: extract this rank's shard, then rank 0 joins.
    Returns `out` (finished on rank 0 when this returns; the others return after the join too)."""
    out = Path(out)
    lo, hi = shard_bounds(dataset.num_images, env.world, env.rank)
    shard = shard_path(out, env.rank, env.world)
    say = lambda msg: log(env.prefix + msg)  # noqa: E731
    failure = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        say(f"rows [{lo}, {hi}) of {dataset.num_images} -> {shard.name}")
        extract_features(shard_dataset(dataset, lo, hi), spec, shard, device=str(env.device), dtype=dtype,
                         compression=compression, resume=True, overwrite=overwrite,
                         progress=progress and env.rank == 0, log=say, **engine_options)
    except Exception as err:  # noqa: BLE001 - every rank must reach the status exchange below
        failure = err
    everyone = all_ok(failure is None, env)
    if failure is not None:
        raise failure
    if not everyone:
        raise ExtractError(f"{env.prefix}another rank failed (see its message); every shard keeps its done rows: "
                           "rerun the same command to complete the missing ones")
    failure = None
    if env.rank == 0:
        shards = [shard_path(out, r, env.world) for r in range(env.world)]
        try:
            join_shards(out, shards, dataset, joined_manifest(dataset, spec, shards, env, dtype, compression),
                        materialize=materialize)
            say(f"joined {env.world} shards into {out}" + (" (materialized)" if materialize else " (virtual dataset)"))
        except Exception as err:  # noqa: BLE001 - the others wait for this status
            failure = err
    joined = all_ok(failure is None, env)  # nobody leaves before the joined file exists
    if failure is not None:
        raise failure
    if not joined:
        raise ExtractError(f"{env.prefix}rank 0 could not join the shards (see its message); rerun to retry")
    return out


def joined_manifest(dataset, spec, shards: list[Path], env: DistEnv, dtype: str, compression: str) -> dict:
    """The manifest of a one-process extraction (same content key), plus how it was distributed."""
    sizes, compute = [], {}
    for path in shards:
        with FeatureCache(path) as cache:
            sizes.append(cache.file["image_bytes"][()])
            compute = compute or dict(cache.manifest.get("compute", {}))
            backbone = cache.manifest["backbone"]
    compute.update({"world_size": env.world, "backend": env.backend, "shards": [p.name for p in shards]})
    return build_manifest(dataset, spec, dtype=dtype, compression=compression, compute=compute,
                          backbone_description=backbone, image_sizes=np.concatenate(sizes))
