"""Install and portability (docs/troubleshooting.md, "Platforms"): Python 3.10's missing tomllib, a platform without fcntl
(Windows), `msdn --version`, store keys in every --cache, and a device this machine lacks: each one
line or a working fallback, never a traceback."""
import json
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
from click.testing import CliRunner

from cache.store import FEATURES_FILE, Store
from cli import main
from tests.fixtures.caches import write_tiny_cache

ROOT = Path(__file__).resolve().parent.parent


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_config_reads_recipes_with_tomli_where_tomllib_is_missing():
    """Python 3.10 has no tomllib: the config module falls back to tomli (a 3.10-only dependency)."""
    pytest.importorskip("tomli")  # in the test extra, so CI always runs this
    done = python("import sys; sys.modules['tomllib'] = None\n"
                  "import pipeline.config as c\n"
                  "print(c.tomllib.__name__, c.load_recipe('CUB').iterations)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "tomli" and int(done.stdout.split()[1]) > 0


def test_without_fcntl_everything_imports_and_the_store_says_why_it_cannot_lock(tmp_path):
    """Windows has no fcntl: every command module imports, a plain --out extraction only warns, and
    the store refuses in one line naming what it needs."""
    done = python(
        "import sys; sys.modules['fcntl'] = None\n"
        "import cli, pipeline.train, pipeline.evaluate, pipeline.commands.extract, pipeline.commands.cache\n"
        "import pipeline.commands.ablate, pipeline.commands.report, pipeline.commands.visualize\n"
        "import pipeline.commands.predict\n"
        "from cache.store import Store, StoreError\n"
        "from cache.writer import output_lock\n"
        f"with output_lock({str(tmp_path / 'x.h5')!r}, log=print) as held: print('held', held)\n"
        f"store = Store({str(tmp_path / 'store')!r})\n"
        "try:\n"
        "    with store.lock('ab' * 32): print('locked')\n"
        "except StoreError as err: print('refused:', err)\n")
    assert done.returncode == 0, done.stderr
    assert "no file locks here" in done.stdout and "held None" in done.stdout
    assert "refused:" in done.stdout and "fcntl.flock) is not available on this platform" in done.stdout
    assert "locked" not in done.stdout.replace("refused", "")


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("msdn-zsl ")
    assert "python" in result.output and "torch" in result.output


DEVICE_COMMANDS = [
    ["extract", "--dataset", "demo", "--out", "{tmp}/x.h5"],
    ["train", "--recipe", "demo", "--cache", "{tmp}/none.h5", "--out", "{tmp}/run"],
    ["evaluate", "--checkpoint", "{file}", "--cache", "{file}"],
    ["demo", "--out", "{tmp}/demo"],
    ["ablate", "--recipe", "demo", "--cache", "{file}", "--out", "{tmp}/ab"],
    ["visualize", "--checkpoint", "{file}", "--cache", "{file}", "--out", "{tmp}/pics"],
    ["predict", "--checkpoint", "{file}", "{file}"],
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("args", DEVICE_COMMANDS, ids=lambda a: a[0])
def test_an_unavailable_device_is_one_line_in_every_command(args, tmp_path):
    (tmp_path / "file").write_text("x")
    filled = [a.format(tmp=tmp_path, file=tmp_path / "file") for a in args]
    result = CliRunner().invoke(main, [*filled, "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "CUDA is not available on this machine" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "demo").exists() and not (tmp_path / "ab").exists()


@pytest.fixture
def store_key(tmp_path):
    """The tiny training cache published as a store entry: (store folder, key)."""
    key = "ab" * 32
    store = Store(tmp_path / "store")
    stage = store.staging("extract", key)
    write_tiny_cache(stage / FEATURES_FILE, content_key=key)
    with h5py.File(stage / FEATURES_FILE, "r") as f:
        shape = list(f["feature_map"].shape[1:])
    store.publish(stage, key, {"content_key": key, "dataset": {"name": "demo"}, "feature_shape": shape})
    return tmp_path / "store", key


@pytest.mark.parametrize("command", ["train", "ablate"])
def test_every_cache_option_takes_a_store_key(store_key, tmp_path, command):
    store, key = store_key
    quick = ["--set", "iterations=10", "--set", "eval_every=5", "--set", "batch_size=8"]
    args = {"train": ["train", "--recipe", "demo", "--out", str(tmp_path / "run"), "--quiet"],
            "ablate": ["ablate", "--recipe", "demo", "--out", str(tmp_path / "ab"), "--ablation", "none",
                       "--seeds", "0", "--workers", "1"]}[command]
    result = CliRunner().invoke(main, [*args, "--cache", key[:10], "--cache-dir", str(store), *quick])
    assert result.exit_code == 0, result.output
    summaries = list(tmp_path.rglob("summary.json"))
    assert summaries and json.loads(summaries[0].read_text())["test"]["ZSL"] >= 0


def test_scikit_learn_is_loaded_only_where_it_is_needed():
    """Only `msdn visualize`'s t-SNE uses scikit-learn: no other command pays its import (or needs it)."""
    done = python("import sys\n"
                  "import cli, pipeline.train, pipeline.evaluate, pipeline.commands.extract, pipeline.commands.cache\n"
                  "import pipeline.commands.ablate, pipeline.commands.baseline, pipeline.commands.demo\n"
                  "import pipeline.commands.report, pipeline.commands.predict, pipeline.commands.visualize\n"
                  "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn'))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
