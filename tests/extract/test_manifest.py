"""The content key: same inputs -> same key; any content-defining change -> another key."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from cache.keys import content_key
from extract.backbones import BackboneSpec, build_backbone, describe
from extract.manifest import build_manifest
from tests.fixtures.images import image_dataset, write_jpeg

LITE = BackboneSpec("efficientnet_lite0", 224, "imagenet")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return image_dataset(root / "tiny", n=8)


def key(dataset, spec=LITE, **kw):
    return build_manifest(dataset, spec, **kw)["content_key"]


def test_manifest_records_everything_and_key_is_stable(base):
    first = build_manifest(base, LITE)
    second = build_manifest(base, LITE, compression="gzip", compute={"device": "cuda", "batch_size": 3})
    assert first["content_key"] == second["content_key"] == content_key(first)
    assert len(first["content_key"]) == 64
    assert first["backbone"]["weights_sha256"] and first["backbone"]["random_init"] is False
    assert first["backbone"]["preprocessing"]["normalization"] == "x/127.5-1"
    assert set(first["content"]["dataset"]["fingerprint"]) >= {"images", "splits", "att", "w2v_att"}
    assert first["software"]["torch"] == torch.__version__ and first["software"]["msdn-zsl"]
    assert {"torchvision", "h5py", "numpy", "hdf5"} <= set(first["software"])
    json.dumps(first)  # stored as a JSON attribute


def test_key_ignores_where_things_live(base, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(base.root, moved)
    assert key(dataclasses.replace(base, root=moved)) == key(base)
    weights_copy = tmp_path / "lite0_copy.pth"
    shutil.copyfile(describe(LITE)["weights_file"], weights_copy)
    assert key(base, BackboneSpec("efficientnet_lite0", 224, str(weights_copy))) == key(base)


def _changed_datasets(base, tmp_path):
    other_images = tmp_path / "other"
    shutil.copytree(base.root, other_images)
    write_jpeg(other_images / base.image_paths[3], seed=999, size=(90, 70))   # same name, other photo
    w2v = base.w2v_att.copy()
    w2v[0, 0] += 1
    att = base.att.copy()
    att[1, 2] = 0
    splits = dict(base.splits, train_loc=base.splits["val_loc"], val_loc=base.splits["train_loc"])
    paths = list(base.image_paths)
    paths[0], paths[1] = paths[1], paths[0]
    return {
        "image file replaced": dataclasses.replace(base, root=other_images),
        "image list": dataclasses.replace(base, image_paths=paths),
        "labels": dataclasses.replace(base, labels=np.where(base.labels == 1, 0, base.labels)),
        "splits": dataclasses.replace(base, splits=splits),
        "att": dataclasses.replace(base, att=att),
        "w2v": dataclasses.replace(base, w2v_att=w2v),
        "no w2v": dataclasses.replace(base, w2v_att=None),
        "name": dataclasses.replace(base, name="tiny2"),
    }


def test_key_changes_with_every_dataset_input(base, tmp_path):
    reference = key(base)
    keys = {what: key(ds) for what, ds in _changed_datasets(base, tmp_path).items()}
    for what, k in keys.items():
        assert k != reference, what
    assert len(set(keys.values())) == len(keys)


def test_key_changes_with_every_backbone_input(base, tmp_path):
    other_weights = tmp_path / "other.pth"
    torch.save(build_backbone(BackboneSpec("efficientnet_lite0", 224, "random")).body.state_dict(), other_weights)
    variants = {
        "image size": key(base, BackboneSpec("efficientnet_lite0", 256, "imagenet")),
        "random weights": key(base, BackboneSpec("efficientnet_lite0", 224, "random")),
        "other weights file": key(base, BackboneSpec("efficientnet_lite0", 224, str(other_weights))),
        "backbone": key(base, BackboneSpec("resnet101", 224, "random")),
        "dtype": key(base, dtype="float32"),
    }
    reference = key(base)
    for what, k in variants.items():
        assert k != reference, what
    assert len(set(variants.values())) == len(variants)


def test_unknown_dtype_is_refused(base):
    with pytest.raises(ValueError, match="dtype"):
        build_manifest(base, LITE, dtype="bfloat16")
