"""Launchers: where the independent tasks of a sweep run (DomainBed's registry of launchers).

A sweep (`msdn ablate`'s cells, `msdn tune`'s study workers) is a list of `Task`s: one picklable
call each, `target(**kwargs)`, whose results live on disk (a cell's summary.json, a study's
journal), never in the launcher. So a launcher only has to start the calls, report their states
and wait; resuming and collecting stay with the command that made the tasks, which reads the disk.

    LAUNCHERS["local"]   K spawned processes on this machine (LocalLauncher, below)
    LAUNCHERS["slurm"]   ONE Slurm job array through submitit (pipeline/launch/slurm.py,
                         extra `msdn-zsl[slurm]`; importing this package never imports submitit)

Both return a `Launch` handle with the same four members, so a command treats them alike:

    launch = make_launcher("slurm", folder=out / "slurm", slurm=SlurmOptions(...)).launch(tasks)
    launch.job_id            # "12345" for a Slurm array, None for local processes
    launch.states()          # {task.name: "pending" | "running" | "done" | "failed"}
    launch.wait(on_change)   # blocks until no task is pending or running; on_change(counts) on each change
    launch.cancel()          # scancel / kill

`msdn ablate --launcher local` keeps its own worker pool (pipeline/commands/ablate/workers.py:
one worker process trains many cells); the local launcher here serves commands whose tasks are
long-lived processes (a tune worker runs many trials).
"""
from __future__ import annotations

import importlib
import multiprocessing
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

from cache.errors import UserError

STATES = ("pending", "running", "done", "failed")


class LaunchError(UserError, ValueError):
    """A launcher that cannot start here (no sbatch, unknown partition, a bad option)."""


@dataclass(frozen=True)
class Task:
    """One unit of a sweep: `target(**kwargs)` in a process of its own, on this machine or a node.

    `target` is "package.module:function", importable wherever the task runs (the same installed
    msdn-zsl); `kwargs` hold plain values (str, int, float, bool, lists, dicts: paths as absolute
    strings) so that a task pickles, prints and reruns by hand; `name` is unique in one launch and
    names the task in states and logs (a cell's folder name, "worker-3")."""
    name: str
    target: str
    kwargs: dict = field(default_factory=dict)


def run_task(task: Task):
    """What a launcher executes for a task (in a spawned process, or as a Slurm array element)."""
    module, _, function = task.target.partition(":")
    return getattr(importlib.import_module(module), function)(**task.kwargs)


@dataclass
class SlurmOptions:
    """`--slurm-*` options, shared by every command that takes `--launcher slurm`."""
    partition: str | None = None        # --slurm-partition  [default: the cluster's default partition]
    time: str | None = None             # --slurm-time, Slurm's format ("90", "1:30:00", "2-00:00:00")
    cpus_per_task: int = 1              # --cpus-per-task
    gpus_per_task: int = 0              # --gpus-per-task
    mem: str | None = None              # --mem ("8G")
    array_parallelism: int | None = None  # --array-parallelism: tasks of the array running at once
    extra: dict[str, str] = field(default_factory=dict)  # --slurm-option KEY=VALUE (account, qos, ...)


class Launch(Protocol):
    job_id: str | None

    def states(self) -> dict[str, str]: ...
    def wait(self, on_change: Callable[[dict], None] | None = None, poll_seconds: float = 5.0) -> dict[str, str]: ...
    def cancel(self) -> None: ...


def counts(states: dict[str, str]) -> dict[str, int]:
    """{"done": n, "running": n, "pending": n, "failed": n} of a states() dict (every key present)."""
    seen = Counter(states.values())
    return {state: seen.get(state, 0) for state in ("done", "running", "pending", "failed")}


def wait_until_ended(states: Callable[[], dict[str, str]], on_change=None, poll_seconds: float = 1.0) -> dict[str, str]:
    """Launch.wait for any launcher: poll `states()` until no task is pending or running,
    calling on_change(counts) whenever the counts change; returns the last states."""
    last = None
    while True:
        now_states = states()
        now = counts(now_states)
        if now != last and on_change is not None:
            on_change(now)
        last = now
        if not now["running"] and not now["pending"]:
            return now_states
        time.sleep(poll_seconds)


# ----------------------------------------------------------------------------- local processes
class LocalLaunch:
    """Tasks in spawned processes, at most `workers` at once (spawned, not forked: CUDA cannot be
    forked, and a task must not inherit the parent's threads)."""

    job_id = None

    def __init__(self, tasks: Sequence[Task], workers: int):
        self._ctx = multiprocessing.get_context("spawn")
        self._queue = list(tasks)
        self._names = [t.name for t in tasks]
        self._running: dict[str, multiprocessing.Process] = {}
        self._finished: dict[str, str] = {}
        self._workers = workers
        self._fill()

    def _fill(self) -> None:
        for name, proc in list(self._running.items()):
            if not proc.is_alive():
                proc.join()
                self._finished[name] = "done" if proc.exitcode == 0 else "failed"
                del self._running[name]
        while self._queue and len(self._running) < self._workers:
            task = self._queue.pop(0)
            proc = self._ctx.Process(target=run_task, args=(task,), name=f"msdn-{task.name}")
            proc.start()
            self._running[task.name] = proc

    def states(self) -> dict[str, str]:
        self._fill()
        return {n: self._finished.get(n) or ("running" if n in self._running else "pending") for n in self._names}

    def wait(self, on_change=None, poll_seconds: float = 1.0) -> dict[str, str]:
        return wait_until_ended(self.states, on_change, poll_seconds)

    def cancel(self) -> None:
        self._queue.clear()
        for proc in self._running.values():
            proc.kill()
        for proc in self._running.values():
            proc.join()


@dataclass
class LocalLauncher:
    workers: int = 1

    def launch(self, tasks: Sequence[Task]) -> LocalLaunch:
        if self.workers < 1:
            raise LaunchError(f"--workers must be at least 1, got {self.workers}")
        return LocalLaunch(tasks, self.workers)


def _slurm_launcher(folder: Path, slurm: SlurmOptions | None = None, **_):
    from pipeline.launch.slurm import SlurmLauncher  # submitit only when asked for

    return SlurmLauncher(Path(folder), slurm or SlurmOptions())


LAUNCHERS: dict[str, Callable] = {
    "local": lambda folder=None, workers=1, **_: LocalLauncher(workers),
    "slurm": _slurm_launcher,
}


def make_launcher(name: str, **options):
    """LAUNCHERS[name](**options): local takes workers=K; slurm takes folder= (submitit's job
    folder, under the command's --out) and slurm=SlurmOptions."""
    if name not in LAUNCHERS:
        raise LaunchError(f"unknown launcher {name!r}; available: {', '.join(LAUNCHERS)}")
    return LAUNCHERS[name](**options)
