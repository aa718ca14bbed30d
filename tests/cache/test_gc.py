"""`msdn cache gc` refuses negative, NaN and infinite ages and sizes as a usage error (exit 2) before
anything is deleted: `--older-than -1` or `--max-size -5G` would otherwise empty a team store, and
`--older-than nan` would silently do nothing."""
import os
import shutil
import time

import pytest
from click.testing import CliRunner

import cli
from cache.gc import collect_garbage
from cache.store import Store, StoreError
from tests.fixtures.store import publish_tiny


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    base = tmp_path_factory.mktemp("gc")
    return publish_tiny(base / "store", base / "work")


@pytest.fixture
def store(pristine, tmp_path):
    """A fresh copy of a one-entry store with an old staging folder: (store, key, staging folder)."""
    shutil.copytree(pristine[0].root, tmp_path / "store")
    store, key = Store(tmp_path / "store"), pristine[1]
    stale = store.staging("extract", "f" * 64)
    old = time.time() - 3 * 86400
    os.utime(stale, (old, old))
    return store, key, stale


@pytest.mark.parametrize("option,value", [
    ("--older-than", "-1"), ("--older-than", "nan"), ("--older-than", "inf"), ("--older-than", "-inf"),
    ("--max-size", "-5G"), ("--max-size", "-1"), ("--max-size", "nanG"), ("--max-size", "infT"),
    ("--max-size", "lots"), ("--stale-hours", "-1"), ("--stale-hours", "nan"),
])
def test_nonsense_ages_and_sizes_are_usage_errors_before_anything_is_deleted(store, option, value):
    store, key, stale = store
    result = CliRunner().invoke(cli.main, ["cache", "gc", "--cache-dir", str(store.root), option, value])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and option in errors[0] and value in errors[0], result.output
    assert "Traceback" not in result.output and "removed" not in result.output
    assert store.keys() == [key] and stale.exists()          # nothing was touched


def test_sensible_values_still_work(store):
    store, key, stale = store
    result = CliRunner().invoke(cli.main, ["cache", "gc", "--cache-dir", str(store.root), "--older-than", "0",
                                           "--max-size", "20G", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"would remove entry {key}" in result.output and store.keys() == [key]


@pytest.mark.parametrize("kwargs", [{"older_than_days": -1}, {"older_than_days": float("nan")},
                                    {"max_bytes": -5}, {"stale_hours": float("-inf")}])
def test_the_library_refuses_them_too(store, kwargs):
    store, key, stale = store
    with pytest.raises(StoreError, match=next(iter(kwargs))):
        collect_garbage(store, log=lambda m: None, **kwargs)
    assert store.keys() == [key] and stale.exists()
