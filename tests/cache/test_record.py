"""Entry records (`entry.json`) are checked in one place before anything uses them: a damaged record
is one row "damaged" in `msdn cache ls` (the healthy entries still listed), one line in
`msdn cache verify`, and never a traceback in gc; an entry folder renamed by hand is damaged, not used
under the key of its record."""
import json
import shutil

import pytest
from click.testing import CliRunner

import cli
from cache.gc import collect_garbage
from cache.reader import CacheError
from cache.store import Store, resolve_cache
from tests.fixtures.store import publish_tiny


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    base = tmp_path_factory.mktemp("records")
    store, first = publish_tiny(base / "store", base / "a", name="demo")
    _, second = publish_tiny(base / "store", base / "b", name="CUB100", seed=1)
    return store.root, first, second


@pytest.fixture
def store(pristine, tmp_path):
    """A fresh copy of the two-entry store: (store, the key to damage, the healthy key)."""
    root, first, second = pristine
    shutil.copytree(root, tmp_path / "store")
    return Store(tmp_path / "store"), first, second


def edit(store, key, change):
    path = store.entry_dir(key) / "entry.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


DAMAGE = {
    "bad JSON": (lambda s, k: (s.entry_dir(k) / "entry.json").write_text('{"format": "msdn-store-ent'),
                 "not valid JSON"),
    "empty file": (lambda s, k: (s.entry_dir(k) / "entry.json").write_text(""), "not valid JSON"),
    "not an object": (lambda s, k: (s.entry_dir(k) / "entry.json").write_text("[1, 2]"), "not a JSON object"),
    "missing fields": (lambda s, k: edit(s, k, lambda r: [r.pop("rows"), r.pop("files")]),
                       "missing field(s) files, rows"),
    "wrong type": (lambda s, k: edit(s, k, lambda r: r.update(feature_shape="1280x2x2")),
                   "'feature_shape' must be a list"),
    "file sizes as text": (lambda s, k: edit(s, k, lambda r: r["files"]["features.h5"].update(bytes="12")),
                           "integer 'bytes'"),
    "hostile name": (lambda s, k: edit(s, k, lambda r: r["files"].update({"../../x": {"bytes": 1, "crc32": 0}})),
                     "refused file name '../../x'"),
    "other key": (lambda s, k: edit(s, k, lambda r: r.update(key="f" * 64)), "lies in folder"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_record_is_one_row_in_ls_and_one_line_in_verify(store, damage):
    store, bad, good = store
    breakage, message = DAMAGE[damage]
    breakage(store, bad)
    with pytest.raises(CacheError, match=message.replace("(", r"\(").replace(")", r"\)")):
        store.record(bad)
    ls = CliRunner().invoke(cli.main, ["cache", "ls", "--cache-dir", str(store.root)])
    assert ls.exit_code == 0 and ls.exception is None, ls.output
    rows = {line.split()[0]: line for line in ls.output.splitlines()[1:]}
    assert set(rows) == {bad[:12], good[:12]}
    assert "damaged" in rows[bad[:12]] and "damaged" not in rows[good[:12]] and "demo" not in rows[bad[:12]]
    verify = CliRunner().invoke(cli.main, ["cache", "verify", bad[:10], "--cache-dir", str(store.root)])
    lines = verify.output.strip().splitlines()
    assert verify.exit_code == 1 and len(lines) == 1, verify.output
    assert "DAMAGED entry record" in lines[0] and message in lines[0]
    healthy = CliRunner().invoke(cli.main, ["cache", "verify", good[:10], "--cache-dir", str(store.root)])
    assert healthy.exit_code == 0 and "OK" in healthy.output
    removed = collect_garbage(store, max_bytes=0, stale_hours=1e9, log=lambda m: None)    # no KeyError
    assert len(removed) == 2 and store.keys() == []


def test_an_entry_folder_renamed_by_hand_is_damaged_not_used_under_its_records_key(store):
    store, bad, good = store
    renamed = "0" * 64
    (store.root / "entries" / bad).rename(store.entry_dir(renamed))
    with pytest.raises(CacheError, match="lies in folder"):
        store.record(renamed)
    verify = CliRunner().invoke(cli.main, ["cache", "verify", renamed[:10], "--cache-dir", str(store.root)])
    assert verify.exit_code == 1 and "lies in folder" in verify.output
    ls = CliRunner().invoke(cli.main, ["cache", "ls", "--cache-dir", str(store.root), "--full-keys"])
    assert renamed in ls.output and bad not in ls.output and "damaged" in ls.output
    with pytest.raises(CacheError, match="lies in folder"):           # train, evaluate, export by key
        resolve_cache(renamed[:10], store.root)
    assert resolve_cache(good[:10], store.root) == store.features_path(good)
    pulled = CliRunner().invoke(cli.main, ["cache", "pull", renamed[:10], str(store.root), "--cache-dir",
                                           str(store.root.parent / "mine")])
    assert pulled.exit_code == 1 and "lies in folder" in pulled.output and not Store(store.root.parent / "mine").keys()


def test_ls_with_match_leaves_damaged_entries_out(store):
    store, bad, good = store
    (store.entry_dir(bad) / "entry.json").write_text("{")
    ls = CliRunner().invoke(cli.main, ["cache", "ls", "--match", "CUB100", "--cache-dir", str(store.root)])
    assert ls.exit_code == 0 and good[:12] in ls.output and bad[:12] not in ls.output


def test_a_manifest_of_unexpected_shape_still_lists(store):
    store, bad, good = store
    edit(store, bad, lambda r: r["manifest"].update(dataset="demo", backbone=["x"]))
    ls = CliRunner().invoke(cli.main, ["cache", "ls", "--cache-dir", str(store.root)])
    assert ls.exit_code == 0 and "?@?" in ls.output, ls.output
