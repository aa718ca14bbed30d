import os
import re
import struct
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
from cache.reader import FeatureCache
from pipeline.checkpoint import (
    CheckpointError,
    cache_identity,
    check_compatible,
    checkpoint_digest,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.engine import build_model
from pipeline.tasks import benchmark_task
from tests.fixtures.caches import tiny_config, write_tiny_cache


def _model_and_identity(cache_path, seed=0):
    config = tiny_config()
    with FeatureCache(cache_path) as cache:
        task = benchmark_task(cache.labels, cache.splits, num_classes=cache.att.shape[0])
        model = build_model(config.head, cache, task, torch.device("cpu"), seed)
        identity = cache_identity(cache)
        features = cache.features(rows=task.eval_unseen_rows, dtype=torch.float32)
    return config, model, identity, features, cache, task


def test_round_trip_gives_identical_scores(tiny_cache, tmp_path):
    config, model, identity, features, cache, task = _model_and_identity(tiny_cache, seed=0)
    with torch.no_grad():
        model.W_2.normal_()  # non-trivial attention, so every parameter matters
        model.W_1_1.normal_()
        before = model.fused_scores(model(features))
    path = save_checkpoint(tmp_path / "best.pt", model=model, config=config.to_dict(), identity=identity,
                           gamma=0.25, iteration=7, metrics={"H": np.float64(0.5)})
    assert not list(tmp_path.glob("*.tmp"))
    raw = torch.load(path, weights_only=True)  # plain tensors / dicts only
    assert raw["gamma"] == 0.25 and raw["iteration"] == 7 and raw["metrics"] == {"H": 0.5}
    ckpt = load_checkpoint(path)
    with FeatureCache(tiny_cache) as cache:
        fresh = build_model(config.head, cache, task, torch.device("cpu"), seed=123)  # other init
    fresh.load_state_dict(ckpt["model"])
    with torch.no_grad():
        after = fresh.fused_scores(fresh(features))
    assert torch.equal(before, after)
    check_compatible(ckpt, identity, path, tiny_cache)  # the same cache is accepted


def test_other_content_key_or_class_split_is_refused(tiny_cache, tmp_path):
    config, model, identity, *_ = _model_and_identity(tiny_cache)
    path = save_checkpoint(tmp_path / "m.pt", model=model, config=config.to_dict(), identity=identity,
                           gamma=0.0, iteration=1)
    ckpt = load_checkpoint(path)
    other = write_tiny_cache(tmp_path / "other.h5", seed=1, content_key="another-key")
    with FeatureCache(other) as cache:
        with pytest.raises(CheckpointError, match=r"m\.pt: trained on a cache with content key tiny-cache-0, "
                                                  r"but .*other\.h5 has another-key"):
            check_compatible(ckpt, cache_identity(cache), path, other)
    moved = {**identity, "unseen_classes": [5, 6, 7]}
    with pytest.raises(CheckpointError, match="unseen classes"):
        check_compatible(ckpt, moved, path, "x.h5")


def test_caches_without_content_key_are_told_apart_by_their_data(tmp_path):
    a = write_tiny_cache(tmp_path / "a.h5", seed=0, content_key=None)
    b = write_tiny_cache(tmp_path / "b.h5", seed=0, content_key=None)
    c = write_tiny_cache(tmp_path / "c.h5", seed=1, content_key=None)  # other attributes
    ids = []
    for p in (a, b, c):
        with FeatureCache(p) as cache:
            ids.append(cache_identity(cache)["content_key"])
    assert ids[0] == ids[1] != ids[2] and ids[0].startswith("data-sha256:")


def test_unreadable_files_give_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt: not a readable checkpoint"):
        load_checkpoint(junk)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an msdn-zsl checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


# ----------------------------------------------------------------------------- damaged and crafted files
def _saved(tiny_cache, path):
    config, model, identity, *_ = _model_and_identity(tiny_cache)
    with torch.no_grad():
        model.W_1_1.normal_()
    return save_checkpoint(path, model=model, config=config.to_dict(), identity=identity, gamma=0.5, iteration=3)


def _member_data(path, suffix):
    """(offset, size) of the bytes of the zip member whose name ends with `suffix` (stored, uncompressed)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if i.filename.endswith(suffix)), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _craft(path, payload, *, checksum=True):
    """A checkpoint a stranger made: any payload, with a matching checksum when asked."""
    if checksum:
        payload["checksum"] = checkpoint_digest(payload)
    else:
        payload.pop("checksum", None)
    torch.save(payload, path)
    return path


def _evaluate_cli(checkpoint, cache):
    result = CliRunner().invoke(cli.main, ["evaluate", "--checkpoint", str(checkpoint), "--cache", str(cache),
                                           "--device", "cpu"])
    # evaluate states its memory plan ("features: resident ...") before it loads the weights
    lines = [line for line in result.output.strip().splitlines() if not line.startswith("features: ")]
    return result.exit_code, lines, result


def test_six_flipped_bytes_in_the_weights_are_refused(tiny_cache, tmp_path):
    path = _saved(tiny_cache, tmp_path / "best.pt")
    offset, size = _largest_storage(path)
    for k in range(6):
        flip = offset + size // 3 + 11 * k
        data = bytearray(path.read_bytes())
        data[flip] ^= 0x5A
        path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"best\.pt: its contents do not match its checksum"):
        load_checkpoint(path)
    code, lines, _ = _evaluate_cli(path, tiny_cache)
    assert code == 1 and len(lines) == 1 and "checksum" in lines[0] and "best.pt" in lines[0]


def _largest_storage(path):
    with zipfile.ZipFile(path) as z:
        name = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size).filename
    return _member_data(path, name)


def test_an_edited_field_is_refused_too(tiny_cache, tmp_path):
    path = _saved(tiny_cache, tmp_path / "best.pt")
    payload = torch.load(path, weights_only=True)
    payload["gamma"] = 0.75                      # edited without updating the checksum
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="do not match its checksum"):
        load_checkpoint(path)


def test_a_checkpoint_without_a_checksum_loads_only_when_trusted_and_then_with_a_warning(tiny_cache, tmp_path):
    path = _saved(tiny_cache, tmp_path / "old.pt")
    _craft(path, torch.load(path, weights_only=True), checksum=False)   # as older versions wrote them
    with pytest.raises(CheckpointError, match=r"old\.pt: has no checksum .* pass --trust-unverified"):
        load_checkpoint(path)
    warnings = []
    ckpt = load_checkpoint(path, warn=warnings.append, trust_unverified=True)
    assert ckpt["iteration"] == 3 and len(warnings) == 1
    assert "old.pt" in warnings[0] and "without a checksum" in warnings[0]


@pytest.mark.parametrize("craft,message", [
    (lambda p: p.pop("model"), "no 'model' weights"),
    (lambda p: p.update(model={}), "no 'model' weights"),
    (lambda p: p.update(model={"W_1_1": [1, 2]}), "'model' must map names to tensors"),
    (lambda p: p["cache"].pop("content_key"), "cache identity lacks 'content_key'"),
    (lambda p: p.pop("cache"), "no 'cache' identity"),
    (lambda p: p["cache"].update(seen_classes="0-19"), "'seen_classes' has the wrong type"),
    (lambda p: p.update(gamma=float("nan")), "'gamma' must be a finite number"),
    (lambda p: p.pop("iteration"), "'iteration' must be an integer"),
    (lambda p: p["config"].pop("head"), "'config' must be an object with 'head'"),
    (lambda p: p["config"]["head"].update(bogus=1), "unknown"),
])
@pytest.mark.parametrize("with_checksum", [True, False])
def test_a_crafted_checkpoint_is_one_line(tiny_cache, tmp_path, craft, message, with_checksum):
    payload = torch.load(_saved(tiny_cache, tmp_path / "x.pt"), weights_only=True)
    craft(payload)
    path = _craft(tmp_path / "crafted.pt", payload, checksum=with_checksum and "model" in payload
                  and all(isinstance(v, torch.Tensor) for v in payload["model"].values()))
    with pytest.raises(CheckpointError, match=r"crafted\.pt: malformed checkpoint: .*" + re.escape(message)):
        load_checkpoint(path, warn=lambda m: None, trust_unverified=True)
    code, lines, result = _evaluate_cli(path, tiny_cache)
    errors = [line for line in lines if line.startswith("Error:")]
    assert code == 1 and len(errors) == 1 and "crafted.pt" in errors[0] and result.exc_info[0] is SystemExit


def test_weights_of_the_wrong_shape_are_one_line(tiny_cache, tmp_path):
    payload = torch.load(_saved(tiny_cache, tmp_path / "x.pt"), weights_only=True)
    payload["model"]["W_1_1"] = torch.zeros(3, 5)
    path = _craft(tmp_path / "shapes.pt", payload)
    load_checkpoint(path)                               # well-formed: the shapes only show against a model
    code, lines, result = _evaluate_cli(path, tiny_cache)
    assert code == 1 and len(lines) == 1 and result.exc_info[0] is SystemExit, result.output
    assert "shapes.pt: weight W_1_1 has shape (3, 5)" in lines[0]
    del payload["model"]["W_1_1"]
    payload["model"]["stray"] = torch.zeros(1)
    code, lines, _ = _evaluate_cli(_craft(tmp_path / "names.pt", payload), tiny_cache)
    assert code == 1 and len(lines) == 1 and "missing W_1_1" in lines[0] and "unexpected stray" in lines[0]


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_naming_the_call(tiny_cache, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": "msdn-zsl-checkpoint", "version": 1, "model": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: refused: loading this file would call ") and "system" in message
    assert "do not load it" in message and "weights_only" not in message and "\n" not in message
    assert not marker.exists()
    code, lines, _ = _evaluate_cli(path, tiny_cache)
    assert code == 1 and len(lines) == 1 and "would call" in lines[0] and "weights_only" not in lines[0]
    assert not marker.exists()


def test_files_that_are_no_checkpoint_at_all_are_one_line(tmp_path):
    for name, data in (("text.pt", b"just some text\n"), ("empty.pt", b""), ("zip.pt", b"PK\x03\x04broken"),
                       ("random.pt", bytes(range(256)) * 8)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError) as refused:
            load_checkpoint(tmp_path / name)
        message = str(refused.value)
        assert message.startswith(f"{tmp_path / name}: ") and "\n" not in message and "weights_only" not in message
