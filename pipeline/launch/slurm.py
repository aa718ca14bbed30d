"""The Slurm launcher: a sweep's tasks as ONE Slurm job array through submitit (extra `msdn-zsl[slurm]`).

The only module that imports submitit. submitit writes the sbatch script, pickles each call into the
job folder and, on the node, runs it with the submitting process's interpreter (sys.executable: the
same installed msdn-zsl, which must therefore sit on a filesystem the nodes see). A task that is
preempted or reaches its time limit gets Slurm's USR2 signal first; submitit then requeues it (the
Checkpointable wrapper below), up to 3 times for time limits: it is pending again, never done.

States come from the queue (squeue: pending / running) and, once a task has left it, from the result
file submitit writes when the call returns or raises (done / failed). A task that left the queue
without one (scancel, killed by the node) is failed, after a grace of RESULT_GRACE_S when this handle
saw it leave (a shared filesystem may show the node's file late). Slurm's accounting database
(sacct) is not needed.
"""
from __future__ import annotations

import json
import math
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from pipeline.launch import LaunchError, SlurmOptions, Task, run_task, wait_until_ended

try:
    import submitit
    from submitit.helpers import Checkpointable
except ImportError:  # the launcher says so when asked for (SlurmLauncher), not on import
    submitit, Checkpointable = None, object

NODE_LOCAL = ("/tmp", "/dev/shm")  # folders that every node has its own copy of
PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESIZING", "SUSPENDED"}
QUERY_SECONDS = 60
RESULT_GRACE_S = 10.0  # how long a task that left the queue may take to show its result file here
NO_LIMIT_MINUTES = 365 * 24 * 60  # a partition without a time limit: asked for a year, so that
# submitit's requeue logic (which compares the run time with the request) reads a signal as preemption


class _Requeued(Checkpointable):
    """run_task as submitit's checkpointable callable: on preemption or time limit the task is
    submitted again as it was (a cell restarts; its folder is its only state)."""

    def __call__(self, task: Task):
        return run_task(task)


def _slurm(*args: str) -> str:
    """A Slurm client command's stdout; LaunchError with its first error line when it fails."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=QUERY_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise LaunchError(f"--launcher slurm: {args[0]} failed ({err})") from None
    if done.returncode != 0:
        reason = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()[0]
        raise LaunchError(f"--launcher slurm: {' '.join(args[:3])} failed: {reason}")
    return done.stdout


def partitions() -> dict[str, dict]:
    """{name: {"Default": "YES", "DefaultTime": ..., "MaxTime": ...}} as `scontrol show partition` reports."""
    found = {}
    for line in _slurm("scontrol", "show", "partition", "--oneliner").splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "PartitionName" in fields:
            found[fields["PartitionName"]] = fields
    return found


def minutes(text: str) -> int:
    """Slurm's time format ("90", "1:30:00", "2-00:00:00", "1-12") as whole minutes."""
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return NO_LIMIT_MINUTES
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if match is None:
        raise LaunchError(f"--slurm-time {text!r}: not Slurm's time format (minutes, H:MM:SS or D-HH:MM:SS)")
    days, first, second, third = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, mins, secs = first, second or 0, third or 0
        return days * 1440 + hours * 60 + mins + math.ceil(secs / 60)
    if third is not None:  # H:MM:SS
        return first * 60 + second + math.ceil(third / 60)
    return first + math.ceil((second or 0) / 60)  # M or M:SS


def queue_state(job_id: str) -> dict[str, str] | None:
    """{task id ("123_4"; "123" for an array of one, which submitit submits as a plain job): Slurm
    state} of the job's tasks still in the queue ({} when none is); None when Slurm cannot be asked
    (no squeue, no controller): then nobody knows."""
    if shutil.which("squeue") is None:
        return None
    try:
        done = subprocess.run(["squeue", "--noheader", "--array", "--jobs", str(job_id), "--format", "%i %T"],
                              capture_output=True, text=True, timeout=QUERY_SECONDS)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return {} if "Invalid job id" in done.stderr else None  # an id the controller has forgotten
    return dict(line.split(None, 1) for line in done.stdout.splitlines() if len(line.split()) == 2)


def node_local(paths) -> list[str]:
    """The paths that lie in a folder of which every node has its own copy (/tmp, /dev/shm)."""
    return [str(p) for p in map(Path, paths) if any(str(Path(p).resolve()).startswith(d + "/") for d in NODE_LOCAL)]


class SlurmLauncher:
    def __init__(self, folder: Path, options: SlurmOptions):
        self.folder, self.options = Path(folder).resolve(), options

    def check(self, paths: list[Path], log: Callable[[str], None] | None = None) -> None:
        """Refuse in one line what would fail on the nodes; warn about node-local paths on a
        cluster of more than one node (every node would see its own /tmp)."""
        if submitit is None:
            raise LaunchError('--launcher slurm needs submitit: pip install "msdn-zsl[slurm]"')
        if shutil.which("sbatch") is None:
            raise LaunchError("--launcher slurm: sbatch not found on PATH (run on a machine that submits to Slurm)")
        known = partitions()
        if self.options.partition is not None and self.options.partition not in known:
            raise LaunchError(f"--slurm-partition {self.options.partition!r}: Slurm knows "
                              f"{', '.join(known) or 'no partition'}")
        if self.options.time is not None:
            minutes(self.options.time)
        nodes = set(_slurm("sinfo", "--noheader", "--Node", "--format", "%N").split())
        local = node_local(paths)
        if local and len(nodes) > 1:
            (log or (lambda m: print(m, file=sys.stderr)))(
                f"warning: {', '.join(local)} is node-local on a cluster of {len(nodes)} nodes: "
                "the output folder and the cache must be on a filesystem every node sees")

    def _time_minutes(self) -> int:
        """--slurm-time, else the partition's default time, else its maximum (no limit: a year).
        submitit would otherwise ask for 5 minutes."""
        if self.options.time is not None:
            return minutes(self.options.time)
        known = partitions()
        name = self.options.partition or next((n for n, f in known.items() if f.get("Default") == "YES"), None)
        fields = known.get(name, {})
        for key in ("DefaultTime", "MaxTime"):
            if fields.get(key, "NONE").upper() not in ("NONE", "UNLIMITED", "INFINITE"):
                return minutes(fields[key])
        return NO_LIMIT_MINUTES

    def launch(self, tasks: Sequence[Task]) -> SlurmLaunch:
        if submitit is None:
            raise LaunchError('--launcher slurm needs submitit: pip install "msdn-zsl[slurm]"')
        tasks = list(tasks)
        options = self.options
        executor = submitit.AutoExecutor(folder=self.folder, cluster="slurm")
        parameters = {"name": f"msdn-{self.folder.parent.name}", "timeout_min": self._time_minutes(),
                      "cpus_per_task": options.cpus_per_task,
                      "slurm_array_parallelism": options.array_parallelism or len(tasks),
                      "slurm_additional_parameters": dict(options.extra)}
        if options.partition:
            parameters["slurm_partition"] = options.partition
        if options.gpus_per_task:
            parameters["slurm_gpus_per_task"] = options.gpus_per_task
        if options.mem:
            parameters["slurm_mem"] = options.mem
        try:
            executor.update_parameters(**parameters)
            jobs = executor.map_array(_Requeued(), tasks)
        except Exception as err:  # noqa: BLE001 - sbatch's refusal (bad account, qos, ...) as one line
            reason = next((ln for ln in str(err).splitlines() if "error" in ln.lower()), str(err).splitlines()[0])
            raise LaunchError(f"--launcher slurm: sbatch refused the array: {reason.strip()}") from None
        record = {"job_id": jobs[0].job_id.split("_")[0], "tasks": [t.name for t in tasks],
                  "task_ids": [job.job_id for job in jobs]}
        (self.folder / f"{record['job_id']}_tasks.json").write_text(json.dumps(record))
        return SlurmLaunch(record["job_id"], record["tasks"], record["task_ids"], self.folder)

    def attach(self, job_id: str) -> SlurmLaunch:
        """The handle of an array submitted earlier (by another process) into this folder."""
        record = json.loads((self.folder / f"{job_id}_tasks.json").read_text())
        return SlurmLaunch(str(job_id), record["tasks"], record["task_ids"], self.folder)


class SlurmLaunch:
    def __init__(self, job_id: str, names: list[str], task_ids: list[str], folder: Path):
        self.job_id, self.names, self.task_ids, self.folder = job_id, list(names), list(task_ids), Path(folder)
        self._left: dict[str, float | None] = {}  # task id -> when this handle saw it leave the queue (None: in it)

    def task_log(self, index: int) -> Path:
        """The task's stderr as submitit writes it (tracebacks of a task that died land there)."""
        return self.folder / f"{self.task_ids[index]}_0_log.err"

    def _outcome(self, index: int) -> str:
        task = self.task_ids[index]
        try:
            with (self.folder / f"{task}_0_result.pkl").open("rb") as file:
                tag = pickle.load(file)[0]
        except (OSError, EOFError, pickle.UnpicklingError, IndexError, TypeError):
            # no result: cancelled, or killed on its node; unless the task only just left the queue and
            # the file the node wrote is not yet visible here (a shared filesystem's attribute cache)
            left = self._left.get(task)
            return "running" if left is not None and time.monotonic() - left < RESULT_GRACE_S else "failed"
        return "done" if tag == "success" else "failed"

    def states(self) -> dict[str, str]:
        queue = queue_state(self.job_id)
        if queue is None:
            raise LaunchError(f"slurm job {self.job_id}: Slurm's controller does not answer (squeue)")
        states = {}
        for index, (name, task) in enumerate(zip(self.names, self.task_ids)):
            if task in queue:
                self._left[task] = None
                states[name] = "pending" if queue[task] in PENDING else "running"
            else:
                if task in self._left and self._left[task] is None:
                    self._left[task] = time.monotonic()
                states[name] = self._outcome(index)
        return states

    def wait(self, on_change: Callable[[dict], None] | None = None, poll_seconds: float = 5.0) -> dict[str, str]:
        return wait_until_ended(self.states, on_change, poll_seconds)

    def cancel(self) -> None:
        _slurm("scancel", self.job_id)
