"""Progress for people following a run: a bar on a terminal, short plain lines in a log file
(extract/progress.py), and `msdn extract` with its stderr redirected to a file."""
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tqdm import tqdm

from extract.progress import ENV_INTERVAL, ProgressLines, progress_bar, progress_interval
from tests.fixtures.images import mini_cub

REPO = Path(__file__).resolve().parents[2]


def test_a_terminal_gets_a_bar_and_a_file_gets_lines(tmp_path):
    leader, follower = os.openpty()  # a real terminal
    with os.fdopen(follower, "w") as terminal, open(tmp_path / "log", "w") as log:
        bar = progress_bar(10, "run", stream=terminal)
        assert isinstance(bar, tqdm) and not bar.disable
        bar.close()
        assert isinstance(progress_bar(10, "run", stream=log), ProgressLines)
        disabled = progress_bar(10, "run", enabled=False, stream=log)
        assert isinstance(disabled, tqdm) and disabled.disable
    os.close(leader)


def test_lines_come_at_the_interval_and_at_the_end():
    out = io.StringIO()
    start = time.monotonic()
    bar = ProgressLines(40, "final run", unit="steps", stream=out, interval=0.05)
    for step in range(1, 41):
        if step % 10 == 0:
            bar.set_postfix({"loss": f"{1 / step:.3f}", "samples/s": "100"})
        bar.update(1)
        time.sleep(0.01)
    bar.close()
    bar.close()  # once only
    elapsed = time.monotonic() - start
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # at most one line per interval (not one per step), plus the last
    assert 2 <= len(lines) - 1 <= elapsed / 0.05 + 1, (elapsed, lines)
    assert lines[-1].startswith("final run: done 40/40 steps in ") and "loss=0.025, samples/s=100" in lines[-1]
    first = lines[0]
    assert first.startswith("final run: ") and "steps/s" in first and "ETA " in first and "%" in first
    counts = [int(line.split(": ")[1].split("/")[0]) for line in lines[:-1]]
    assert counts == sorted(set(counts)) and 0 < counts[0] and counts[-1] <= 40  # one line per interval, rising


def test_a_loop_that_stops_early_says_where():
    out = io.StringIO()
    with ProgressLines(100, "extract", unit="img", stream=out, interval=3600) as bar:
        bar.update(7)
    assert out.getvalue().splitlines() == [out.getvalue().strip()]  # nothing before the end at this interval
    assert out.getvalue().startswith("extract: stopped at 7/100 img in ")


def test_the_interval_comes_from_the_environment():
    assert progress_interval({}) == 30.0
    assert progress_interval({ENV_INTERVAL: "2.5"}) == 2.5
    assert progress_interval({ENV_INTERVAL: "0"}) == 0.0
    for bad in ("soon", "-1", "nan", "inf"):
        err = io.StringIO()
        assert progress_interval({ENV_INTERVAL: bad}, stream=err) == 30.0
        assert err.getvalue() == (f"warning: ${ENV_INTERVAL} must be a number of seconds >= 0, got {bad!r}; "
                                  "printing progress every 30 s\n")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, shared_data):
    return mini_cub(tmp_path_factory.mktemp("cub"), shared_data, per_class=5)


def test_extract_into_a_log_file_writes_short_lines(data_root, shared_data, tmp_path):
    """`msdn extract ... > log 2>&1`: progress as lines a person can read, no carriage returns."""
    log = tmp_path / "extract.log"
    with log.open("w") as sink:
        done = subprocess.run([sys.executable, "cli.py", "extract", "--dataset", "CUB100",
                               "--data-root", str(data_root), "--xlsa17-root", str(shared_data / "xlsa17"), "--w2v-root",
                               str(shared_data / "attribute_w2v"), "--backbone", "efficientnet_lite0",
                               "--image-size", "64", "--batch-size", "2", "--workers", "0",
                               "--out", str(tmp_path / "cub.h5")],
                              cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, timeout=300,
                              env={**os.environ, ENV_INTERVAL: "0"})
    text = log.read_text()
    assert done.returncode == 0, text
    assert "\r" not in text and all(len(line) <= 200 for line in text.splitlines()), text
    progress = [line for line in text.splitlines() if line.startswith("extract: ")]
    assert len(progress) >= 5, text  # 20 images in batches of 2, a line at every batch (interval 0)
    assert "img/s" in progress[0] and "ETA " in progress[0]
    assert progress[-1].startswith("extract: done 20/20 img in ")
