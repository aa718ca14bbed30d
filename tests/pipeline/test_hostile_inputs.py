"""Hostile inputs, round two (issue 21): the bad-input table of tests/pipeline/test_bad_inputs.py
continued (same BadInput rows, same checks, same {tmp} {tiny} {readonly} ... placeholders), plus the
cases whose right outcome is success: values at the edge of float range that now normalise, folder
names that differ from classes.csv only in Unicode form or spaces.

More placeholders (the `hostile` fixture): folder datasets {folder} (well-formed), {folder_huge} (an
attribute value of 1e39, beyond float32), {folder_underflow} (a class whose values are all 1e-46, 0
in float32), {folder_pickle} (attribute_vectors.npy holding Python objects), {folder_bomb}
(well-formed plus a decompression-bomb PNG, {bomb}); caches {zero_att} (att row 3 all zero, as the
folder adapter wrote it for values of 1e30 before), {huge_att} (att row 3 of 1e30, not normalised),
{inf_w2v} (an inf in w2v_att), {zero_w2v} (a zero w2v_att row, as SUN's real word vectors have),
{tiny_paths} ({tiny} with image paths, for visualize); checkpoints of {tiny}: {ckpt_unverified} (its
checksum removed), {ckpt_index} (checksum removed and its unseen_classes buffer pointing at class 99),
{ckpt_identity} (a valid checksum over a cache identity naming class 99), {ckpt_float64} (a valid
checksum over a float64 weight); {image} (a readable JPEG).
"""
from __future__ import annotations

import unicodedata

import h5py
import numpy as np
import pytest
import torch

from extract.datasets import build_dataset
from pipeline.checkpoint import checkpoint_digest, save_checkpoint
from tests.fixtures.caches import tiny_config, write_tiny_cache
from tests.fixtures.folder import write_csv
from tests.fixtures.images import write_jpeg, write_png_bomb
from tests.pipeline.test_bad_inputs import QUICK, BadInput, caches, check_row, row  # noqa: F401 (fixture)

EXTRACT = ("--backbone", "efficientnet_lite0", "--image-size", "64", "--device", "cpu", "--no-progress")
TRAIN = ("train", "--recipe", "demo", "--out", "{tmp}/run", *QUICK)

ROWS = [
    # -- 1: class attributes at the edge of float range
    row("folder-attribute-1e39", "extract", "--dataset", "folder", "--data-root", "{folder_huge}", "--out", "{tmp}/x.h5",
        *EXTRACT, message="attributes.csv: row 2: column 'a1': 1e+39 is beyond float32's range",
        absent=("{tmp}/x.h5", "{tmp}/x.h5.partial")),
    row("folder-attributes-1e-46", "extract", "--dataset", "folder", "--data-root", "{folder_underflow}",
        "--out", "{tmp}/x.h5", *EXTRACT, message="attributes.csv: row 4: class 'c2': every value rounds to 0 in float32",
        absent=("{tmp}/x.h5", "{tmp}/x.h5.partial")),
    row("train-zero-att-row", *TRAIN, "--cache", "{zero_att}", message="att row 3 (class 3) is all zero",
        absent=("{tmp}/run",)),
    row("train-att-1e30", *TRAIN, "--cache", "{huge_att}", message="att row 3 (class 3) does not normalise",
        absent=("{tmp}/run",)),
    row("train-w2v-inf", *TRAIN, "--cache", "{inf_w2v}", message="w2v_att row 2 (attribute 2) holds NaN or inf",
        absent=("{tmp}/run",)),
    row("train-zero-w2v-row-is-fine", *TRAIN, "--cache", "{zero_w2v}", code=0, message="run folder: "),
    row("verify-zero-att-row", "cache", "verify", "{zero_att}", message="NOT USABLE for training: att row 3"),
    row("verify-w2v-inf", "cache", "verify", "{inf_w2v}", message="NOT USABLE for training: w2v_att row 2"),
    # -- 2: a decompression bomb is an unreadable image
    row("extract-png-bomb", "extract", "--dataset", "folder", "--data-root", "{folder_bomb}", "--out", "{tmp}/x.h5",
        *EXTRACT, message="{bomb}: cannot read image (DecompressionBombError: ", subprocess=True),
    row("extract-png-bomb-skipped", "extract", "--dataset", "folder", "--data-root", "{folder_bomb}",
        "--out", "{tmp}/x.h5", *EXTRACT, "--skip-bad", code=0, message="skipped {bomb}: DecompressionBombError",
        subprocess=True),
    # -- 3: checkpoints: a missing checksum needs --trust-unverified; every used field checked
    row("evaluate-no-checksum", "evaluate", "--checkpoint", "{ckpt_unverified}", "--cache", "{tiny}",
        message="has no checksum (written by an older version, or the field was removed)"),
    row("predict-no-checksum", "predict", "--checkpoint", "{ckpt_unverified}", "--cache", "{tiny}", "{image}",
        message="pass --trust-unverified to load it anyway"),
    row("visualize-no-checksum", "visualize", "--checkpoint", "{ckpt_unverified}", "--cache", "{tiny_paths}",
        "--out", "{tmp}/pics", message="pass --trust-unverified to load it anyway", absent=("{tmp}/pics",)),
    row("evaluate-class-index-99-trusted", "evaluate", "--checkpoint", "{ckpt_index}", "--cache", "{tiny}",
        "--trust-unverified", message="its unseen_classes [20, 21, 22, 99] are not the cache's [20, 21, 22, 23]"),
    row("evaluate-identity-class-99", "evaluate", "--checkpoint", "{ckpt_identity}", "--cache", "{tiny}",
        message="cache identity 'unseen_classes' holds class 99, outside the 24 classes"),
    row("evaluate-float64-weight", "evaluate", "--checkpoint", "{ckpt_float64}", "--cache", "{tiny}",
        message="weight W_1_1 has dtype torch.float64, the model needs torch.float32"),
    # -- 5: options and messages
    row("train-max-memory-1K", *TRAIN, "--cache", "{tiny}", "--max-memory", "1K",
        message="--max-memory 1K: below the ~", absent=("{tmp}/run",)),
    row("train-max-memory-1e100", *TRAIN, "--cache", "{tiny}", "--max-memory", "1e100", code=0,
        message="--max-memory 1e100 is more than this machine's"),
    row("extract-folder-w2v-root", "extract", "--dataset", "folder", "--data-root", "{folder}", "--w2v-root", "{tmp}",
        "--out", "{tmp}/x.h5", *EXTRACT, message="--dataset folder: --w2v-root does not apply to it"),
    row("extract-folder-pickled-vectors", "extract", "--dataset", "folder", "--data-root", "{folder_pickle}",
        "--out", "{tmp}/x.h5", *EXTRACT, message="not a plain numeric .npy array (it holds Python objects"),
]


@pytest.mark.parametrize("bad", ROWS, ids=[r.id for r in ROWS])
def test_hostile_input(bad: BadInput, request, tmp_path, caches, hostile):  # noqa: F811 (fixture)
    check_row(bad, request, tmp_path, {**caches, **hostile})


# ----------------------------------------------------------------------------- inputs
CLASSES = [("c0", "seen"), ("c1", "seen"), ("c2", "seen"), ("c3", "unseen")]


def folder_dataset(root, values=None, class_folders=None, classes=CLASSES):
    """A 4-class --dataset folder (3 seen, 1 unseen; 4 JPEGs each) with attributes `values` (one row
    of strings per class; default small integers) and folders named `class_folders`."""
    values = values or [[str(1 + (c + a) % 3) for a in range(3)] for c in range(len(classes))]
    for c, (name, _) in enumerate(classes):
        folder = root / "images" / (class_folders[c] if class_folders else name)
        folder.mkdir(parents=True)
        for i in range(4):
            write_jpeg(folder / f"{i}.jpg", seed=10 * c + i)
    write_csv(root / "classes.csv", [("class", "split"), *classes])
    write_csv(root / "attributes.csv", [("class", "a0", "a1", "a2")] + [[n, *v] for (n, _), v in zip(classes, values)])
    return root


def _edited_cache(path, key: str, edit):
    write_tiny_cache(path)
    with h5py.File(path, "r+") as f:
        data = f[key][()]
        edit(data)
        f[key][...] = data
    return path


def _checkpoint(path, cache, edit=None, checksum=True):
    from tests.pipeline.test_checkpoint import _model_and_identity
    config, model, identity, *_ = _model_and_identity(cache)
    save_checkpoint(path, model=model, config=config.to_dict(), identity=identity, gamma=0.5, iteration=3)
    payload = torch.load(path, weights_only=True)
    (edit or (lambda p: None))(payload)
    payload.pop("checksum")
    if checksum:
        payload["checksum"] = checkpoint_digest(payload)
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, caches):  # noqa: F811 (fixture)
    root = tmp_path_factory.mktemp("hostile")
    places = {"folder": folder_dataset(root / "folder")}
    places["folder_huge"] = folder_dataset(root / "huge", [["1", "1e39", "1"], ["1", "2", "3"], ["3", "2", "1"],
                                                           ["1", "1", "2"]])
    places["folder_underflow"] = folder_dataset(root / "underflow", [["1", "2", "3"], ["3", "2", "1"],
                                                                     ["1e-46", "1e-46", "0"], ["1", "1", "2"]])
    places["folder_pickle"] = folder_dataset(root / "pickle")
    np.save(places["folder_pickle"] / "attribute_vectors.npy", np.array([{"a0": [1.0]}] * 3, dtype=object))
    places["folder_bomb"] = folder_dataset(root / "bomb")
    places["bomb"] = write_png_bomb(places["folder_bomb"] / "images" / "c1" / "zz_bomb.png")
    places["image"] = places["folder"] / "images" / "c0" / "0.jpg"
    places["zero_att"] = _edited_cache(root / "zero_att.h5", "att", lambda a: a.__setitem__(3, 0))
    places["huge_att"] = _edited_cache(root / "huge_att.h5", "att", lambda a: a.__setitem__(3, 1e30))
    places["inf_w2v"] = _edited_cache(root / "inf_w2v.h5", "w2v_att", lambda w: w.__setitem__((2, 5), np.inf))
    places["zero_w2v"] = _edited_cache(root / "zero_w2v.h5", "w2v_att", lambda w: w.__setitem__(2, 0))
    places["tiny_paths"] = write_tiny_cache(root / "tiny_paths.h5")
    with h5py.File(places["tiny_paths"], "r+") as f:
        f.create_dataset("image_paths", data=[f"c{label}/{i}.jpg".encode() for i, label in enumerate(f["labels"][()])])
    tiny = caches["tiny"]
    places["ckpt_unverified"] = _checkpoint(root / "unverified.pt", tiny, checksum=False)
    places["ckpt_index"] = _checkpoint(root / "index.pt", tiny, lambda p: p["model"]["unseen_classes"].__setitem__(3, 99),
                                       checksum=False)
    places["ckpt_identity"] = _checkpoint(root / "identity.pt", tiny,
                                          lambda p: p["cache"]["unseen_classes"].__setitem__(3, 99))
    places["ckpt_float64"] = _checkpoint(root / "float64.pt", tiny,
                                         lambda p: p["model"].__setitem__("W_1_1", p["model"]["W_1_1"].double()))
    return places


# ----------------------------------------------------------------------------- cases whose right outcome is success
@pytest.mark.parametrize("values,where", [
    ([["1e30"] * 3] * 4, "every value 1e30: the norm overflowed, att rows were all zero"),
    ([["1", "1e20", "1"], ["1", "2", "3"], ["3", "2", "1"], ["1", "1", "2"]], "one value 1e20 zeroed its class"),
    ([["1e-45", "1e-45", "0"], ["1", "2", "3"], ["3", "2", "1"], ["1", "1", "2"]], "1e-45 gave inf"),
])
def test_attribute_values_at_the_edge_of_float_range_normalise(tmp_path, values, where):
    att = build_dataset("folder", data_root=folder_dataset(tmp_path, values)).att
    assert np.isfinite(att).all() and np.allclose(np.linalg.norm(att, axis=1), 1, atol=1e-6), where
    direction = np.asarray(values, dtype=np.float64)
    direction /= np.abs(direction).max(axis=1, keepdims=True)
    assert np.allclose(att, direction / np.linalg.norm(direction, axis=1, keepdims=True), atol=1e-6), where


def test_ordinary_attribute_values_normalise_to_the_same_bits_as_before(tmp_path):
    values = [[f"{v:.6g}" for v in np.random.default_rng(c).uniform(0, 100, 3)] for c in range(4)]
    dataset = build_dataset("folder", data_root=folder_dataset(tmp_path, values))
    original = np.asarray(values, dtype=np.float64).astype(np.float32)
    assert np.array_equal(dataset.att, original / np.linalg.norm(original, axis=1, keepdims=True))  # float32, as ever


def test_class_folders_match_after_unicode_nfc_and_stripping(tmp_path):
    # macOS writes the folder decomposed, a spreadsheet the name composed; and a stray space after c1
    folder_dataset(tmp_path, class_folders=[unicodedata.normalize("NFD", "Café"), "c1 ", "c2", "c3"],
                   classes=[("Café", "seen"), ("c1", "seen"), ("c2", "seen"), ("c3", "unseen")])
    dataset = build_dataset("folder", data_root=tmp_path)
    assert dataset.class_names[:2] == ["Café", "c1"] and dataset.num_images == 16
    assert all((dataset.root / p).is_file() for p in dataset.image_paths)
