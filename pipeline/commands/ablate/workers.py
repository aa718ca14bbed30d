"""Worker processes of `msdn ablate`.

One spawned process per slot trains cells one after another, in-process, exactly as `msdn train`
would (the same recipe and `--set` list): torch and the readers are imported once per worker
instead of once per cell (seconds a cell on a busy machine). Each cell's output
(warnings, tracebacks) goes to its own stderr.log. An exception fails only its cell; a worker that
dies (killed, out of memory) fails the cell it held and is replaced before the next one.
Spawned, not forked: CUDA cannot be forked, and each worker sets its own CUDA_VISIBLE_DEVICES /
thread count before torch is imported.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
import traceback
from pathlib import Path


def worker_main(conn, env: dict) -> None:
    _die_with_parent()
    os.environ.update(env)  # before torch is imported: CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS
    import torch

    if "OMP_NUM_THREADS" in env:
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    while (job := conn.recv()) is not None:
        conn.send(train_cell(job))


def train_cell(job: dict) -> tuple[str, str, float]:
    """One cell in this process, as `msdn train` would: ("done", "", CPU s) or ("failed", one-line
    error, CPU s); its output (warnings, the traceback) goes to <dir>/stderr.log. A local worker
    and a Slurm array task (slurm_cells.run_cell) both call this."""
    from pipeline.config import apply_overrides, load_recipe
    from pipeline.train import train

    status, error, cpu = "done", "", time.process_time()
    with _output_to(Path(job["dir"]) / "stderr.log"):
        try:
            config = apply_overrides(load_recipe(job["recipe"]), job["overrides"])
            train(config, job["cache"], job["dir"], device=job["device"], progress=False, overwrite=True)
        except Exception as err:  # noqa: BLE001 - any failure of a cell is reported, the worker goes on
            traceback.print_exc()
            status, error = "failed", f"{type(err).__name__}: {err}".splitlines()[0]
    return status, error, time.process_time() - cpu


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the ablation process dies (even by SIGKILL), so that no
    orphan keeps training. Elsewhere the worker ends when it next reads its closed pipe. (The
    kernel watches the *thread* that started the worker: the pool threads of run_cells live until
    the workers are closed.)"""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


class _output_to:
    """Point file descriptors 1 and 2 at `path` for the duration (C-level output included)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        sys.stdout.flush(), sys.stderr.flush()
        self.saved = [os.dup(1), os.dup(2)]
        self.file = open(self.path, "w")
        for fd in (1, 2):
            os.dup2(self.file.fileno(), fd)

    def __exit__(self, *exc):
        sys.stdout.flush(), sys.stderr.flush()
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)
        self.file.close()


class Worker:
    """The parent's handle on one worker process (started on first use, restarted after a death)."""

    def __init__(self, env: dict):
        self.env, self.proc, self.conn = env, None, None

    def run(self, job: dict) -> tuple[str, str, float | None]:
        """(status, error, CPU seconds of the worker): ("done", "", s) or ("failed", one-line
        error, s) for one cell; CPU time is None when the worker died. CPU seconds, unlike wall
        time, hardly depend on what else runs on the machine."""
        if self.proc is None or not self.proc.is_alive():
            self._start()
        try:
            self.conn.send(job)
            return self.conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self.proc.join()
            code, self.proc = self.proc.exitcode, None
            if code is not None and code < 0:
                return "failed", f"worker killed by signal {-code} ({signal.Signals(-code).name})", None
            return "failed", f"worker exited with status {code}", None

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, self.env), daemon=True)
        self.proc.start()
        child.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()

    def close(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.proc = None
