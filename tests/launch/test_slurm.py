"""pipeline/launch/slurm.py against the real Slurm cluster (scripts/slurm-local-cluster.sh): one job
array per launch, states from the queue and submitit's result files, preemption requeues, the
refusals before anything is submitted."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.launch import LaunchError, SlurmOptions, Task, make_launcher
from tests.fixtures.slurm import slurm_cluster, wait_for  # noqa: F401 - a fixture

needs_slurm = pytest.mark.usefixtures("slurm_cluster")


def shell(name: str, script: str) -> Task:
    return Task(name, "subprocess:run", {"args": ["sh", "-c", script], "check": True})


@needs_slurm
def test_tasks_run_as_one_array_and_end_done_or_failed(tmp_path):
    launcher = make_launcher("slurm", folder=tmp_path / "slurm", slurm=SlurmOptions(cpus_per_task=1))
    launch = launcher.launch([shell("ok", f"touch {tmp_path}/ran"), shell("broken", "exit 3")])
    changes = []
    states = launch.wait(on_change=changes.append, poll_seconds=0.5)
    assert states == {"ok": "done", "broken": "failed"} and (tmp_path / "ran").is_file()
    assert changes[-1] == {"done": 1, "running": 0, "pending": 0, "failed": 1}
    script = (tmp_path / "slurm" / f"{launch.job_id}_submission.sh").read_text()
    assert "#SBATCH --array=0-1%2" in script and "#SBATCH --cpus-per-task=1" in script
    assert sys.executable in script  # the nodes run the submitting interpreter (this checkout)
    assert launch.task_ids == [f"{launch.job_id}_0", f"{launch.job_id}_1"]
    assert "CalledProcessError" in launch.task_log(1).read_text()
    again = launcher.attach(launch.job_id)  # another process (--status, a rerun) sees the same
    assert again.states() == states


@needs_slurm
def test_a_preempted_task_is_requeued_never_counted_done_and_then_finishes(tmp_path):
    starts = tmp_path / "starts"
    # the signal goes to every process of the task: the shell and its sleep ignore it, so that only
    # submitit's handler in the Python process answers (as in a cell, which trains in that process)
    first_run_waits = f"trap '' USR2; echo start >> {starts}; [ $(wc -l < {starts}) -ge 2 ] || sleep 300"
    launch = make_launcher("slurm", folder=tmp_path / "slurm", slurm=SlurmOptions()).launch(
        [shell("long", first_run_waits)])
    wait_for(starts.is_file, 60, "the task to start")
    assert launch.states() == {"long": "running"}
    # what Slurm sends before preempting (or at the time limit, --signal USR2@90): submitit requeues
    subprocess.run(["scancel", "--signal", "USR2", launch.task_ids[0]], check=True)
    seen = []

    def ended() -> bool:
        state = launch.states()["long"]
        seen.append((state, len(starts.read_text().split())))
        return state in ("done", "failed")

    # a requeued job waits out its old credential before it starts again: cred_expire, 10 s on the
    # test cluster (scripts/slurm-local-cluster.sh), Slurm's default 120 s elsewhere. (Forcing an
    # earlier start makes the node refuse it: "Job credential revoked".)
    wait_for(ended, 240, "the requeued task to end", poll=0.5)
    assert ("pending", 1) in seen
    assert seen[-1] == ("done", 2) and starts.read_text().split() == ["start", "start"]
    assert all(runs == 2 for state, runs in seen if state == "done")  # the preempted run never counts
    log = launch.task_log(0).read_text()
    assert "this job is preempted" in log and "DUE TO JOB REQUEUE" in log


@needs_slurm
def test_cancel_fails_the_tasks_that_had_not_ended(tmp_path):
    launch = make_launcher("slurm", folder=tmp_path / "slurm", slurm=SlurmOptions(array_parallelism=1)).launch(
        [shell("a", "sleep 300"), shell("b", "true")])
    wait_for(lambda: launch.states()["a"] == "running", 60, "the first task to start")
    assert launch.states()["b"] == "pending"  # --array-parallelism 1
    launch.cancel()
    assert launch.wait(poll_seconds=0.5) == {"a": "failed", "b": "failed"}


@needs_slurm
def test_refusals_come_before_anything_is_submitted(tmp_path, monkeypatch):
    with pytest.raises(LaunchError, match=r"--slurm-partition 'no_such': Slurm knows debug"):
        make_launcher("slurm", folder=tmp_path, slurm=SlurmOptions(partition="no_such")).check([tmp_path])
    with pytest.raises(LaunchError, match="--slurm-time '1:2:3:4': not Slurm's time format"):
        make_launcher("slurm", folder=tmp_path, slurm=SlurmOptions(time="1:2:3:4")).check([tmp_path])
    warnings = []  # /tmp is fine on a cluster of one node (the test one)
    make_launcher("slurm", folder=tmp_path, slurm=SlurmOptions()).check([Path("/tmp/x")], log=warnings.append)
    assert warnings == []
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without Slurm's commands
    with pytest.raises(LaunchError, match="sbatch not found on PATH"):
        make_launcher("slurm", folder=tmp_path, slurm=SlurmOptions()).check([tmp_path])
    assert list(tmp_path.iterdir()) == []


@needs_slurm
def test_the_queue_of_an_unknown_job_is_empty_and_an_unreachable_one_unknown(tmp_path, monkeypatch):
    from pipeline.launch.slurm import queue_state

    assert queue_state("999999") == {}
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).read_text()
    (tmp_path / "slurm.conf").write_text(re.sub(r"(?m)^SlurmctldPort=.*$", "", conf) + "SlurmctldPort=9\nMessageTimeout=1\n")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))  # a controller that does not answer
    assert queue_state("1") is None


def test_slurm_time_formats():
    from pipeline.launch.slurm import NO_LIMIT_MINUTES, minutes, node_local

    assert [minutes(t) for t in ("90", "5:30", "1:30:00", "2-00:00:00", "1-12", "1-0:01:01", "UNLIMITED")] == \
        [90, 6, 90, 2880, 2160, 1442, NO_LIMIT_MINUTES]
    assert node_local([Path("/tmp/a"), Path("/dev/shm/b"), Path("/home/x/tmp")]) == ["/tmp/a", "/dev/shm/b"]
