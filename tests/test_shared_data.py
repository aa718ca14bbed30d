"""Tests that need the real data skip with the reason when it is missing, except under CI=true, where a
missing folder fails: run as a child pytest with $MSDN_SHARED_DATA pointing nowhere and the
repository copied where ../shared/data does not exist."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = '''
def test_uses_the_data(shared_data):
    assert (shared_data / "xlsa17").is_dir()
'''


@pytest.fixture(scope="module")
def lone_clone(tmp_path_factory):
    """The test package (which holds the data helper), copied to a folder with no ../shared/data beside it."""
    clone = tmp_path_factory.mktemp("alone") / "repo"
    shutil.copytree(ROOT / "tests", clone / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    (clone / "tests" / "test_probe.py").write_text(PROBE)
    return clone


@pytest.mark.parametrize("ci, outcome", [("", "1 skipped"), ("true", "1 error")])
def test_missing_data_skips_with_a_reason_outside_ci_and_fails_in_ci(lone_clone, ci, outcome):
    env = {**os.environ, "CI": ci, "MSDN_SHARED_DATA": str(lone_clone / "nowhere"), "PYTHONPATH": str(lone_clone)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/test_probe.py"], cwd=lone_clone, env=env, capture_output=True, text=True,
                          timeout=300)
    assert outcome in done.stdout, done.stdout + done.stderr
    assert "shared data folder not found" in done.stdout
