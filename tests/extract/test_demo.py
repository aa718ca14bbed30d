"""Procedural demo dataset: determinism, the ZSL property, boxes, splits, idempotent rendering."""
import itertools
import json

import numpy as np
import pytest
from PIL import Image

from extract.datasets.base import DatasetError
from extract.datasets.demo import (
    ATTRIBUTE_GROUPS,
    INDEX_FILE,
    DemoConfig,
    choose_classes,
    load_demo,
    pseudo_word_vectors,
    render_demo,
)
from extract.datasets.demo_render import COLOURS

SMALL = dict(num_classes=10, num_unseen=3, images_per_class=5, image_size=96)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return load_demo(tmp_path_factory.mktemp("demo"), seed=3, **SMALL)


def test_same_seed_gives_byte_identical_images(demo, tmp_path):
    other = load_demo(tmp_path / "again", seed=3, **SMALL)
    assert other.image_paths == demo.image_paths and other.fingerprint() == demo.fingerprint()
    for rel in demo.image_paths:
        assert (demo.root / rel).read_bytes() == (other.root / rel).read_bytes()
    np.testing.assert_array_equal(other.boxes, demo.boxes)
    different = load_demo(tmp_path / "seed4", seed=4, **SMALL)
    assert (different.root / different.image_paths[0]).read_bytes() != (demo.root / demo.image_paths[0]).read_bytes()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("num_classes, num_unseen", [(24, 8), (10, 3), (6, 2)])
def test_unseen_classes_are_new_combinations_of_seen_values(seed, num_classes, num_unseen):
    classes, unseen = choose_classes(DemoConfig(seed=seed, num_classes=num_classes, num_unseen=num_unseen))
    assert len(set(classes)) == num_classes and len(unseen) == num_unseen
    seen = [c for i, c in enumerate(classes) if i not in unseen]
    for i in unseen:
        assert classes[i] not in seen
    for value in itertools.chain(*ATTRIBUTE_GROUPS.values()):
        assert any(value in c for c in seen), value


def test_default_demo_is_the_advertised_size():
    classes, unseen = choose_classes(DemoConfig())
    assert (len(classes), len(unseen)) == (24, 8)
    seen = [c for i, c in enumerate(classes) if i not in unseen]
    assert min(sum(v in c for c in seen) for v in itertools.chain(*ATTRIBUTE_GROUPS.values())) >= 2


def test_attributes_are_one_hot_per_group_and_match_the_class_name(demo):
    groups = [name.split(":")[0] for name in demo.attribute_names]
    assert demo.original_att.shape == (10, sum(len(v) for v in ATTRIBUTE_GROUPS.values()))
    for c, name in enumerate(demo.class_names):
        on = [demo.attribute_names[a] for a in np.flatnonzero(demo.original_att[c])]
        assert sorted(g.split(":")[0] for g in on) == sorted(ATTRIBUTE_GROUPS)
        assert sorted(v.split(":")[1] for v in on) == sorted(name.split("_"))
        assert groups.count("colour") == len(COLOURS)
    np.testing.assert_allclose(np.linalg.norm(demo.att, axis=1), 1.0, rtol=1e-6)
    assert len({tuple(row) for row in demo.original_att}) == 10


def test_word_vectors_are_deterministic_and_group_structured(demo):
    w2v = pseudo_word_vectors(demo.attribute_names)
    np.testing.assert_array_equal(w2v, demo.w2v_att)
    assert w2v.shape == (13, 300)
    unit = w2v / np.linalg.norm(w2v, axis=1, keepdims=True)
    cos = unit @ unit.T
    groups = np.array([n.split(":")[0] for n in demo.attribute_names])
    same = (groups[:, None] == groups[None, :]) & ~np.eye(13, dtype=bool)
    assert cos[same].mean() > 0.25 and abs(cos[~same & ~np.eye(13, dtype=bool)].mean()) < 0.1


def colour_spread(pixels):
    return pixels.max(axis=2).astype(int) - pixels.min(axis=2).astype(int)


def test_boxes_are_tight_around_the_only_coloured_pixels(demo):
    for i, rel in enumerate(demo.image_paths):
        pixels = np.asarray(Image.open(demo.root / rel))
        assert pixels.shape == (96, 96, 3)
        x0, y0, x1, y1 = demo.boxes[i].astype(int)
        assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
        spread = colour_spread(pixels)
        inside = np.zeros_like(spread, dtype=bool)
        inside[y0:y1, x0:x1] = True
        assert spread[~inside].max() == 0  # background is pure grey
        for edge in (spread[y0, x0:x1], spread[y1 - 1, x0:x1], spread[y0:y1, x0], spread[y0:y1, x1 - 1]):
            assert edge.max() > 3  # tight: the object touches every side of its box
        # the object's dominant colour is its class colour
        colour = next(v for v in demo.class_names[demo.labels[i]].split("_") if v in COLOURS)
        strong = pixels[inside & (spread > 60)].astype(float)
        hue = strong.mean(axis=0) - strong.mean()
        nearest = min(COLOURS, key=lambda c: np.linalg.norm(hue - (np.array(COLOURS[c]) - np.mean(COLOURS[c]))))
        assert nearest == colour, (rel, hue)


def test_splits_are_disjoint_and_follow_the_class_split(demo):
    s = demo.splits
    assert not np.intersect1d(s["trainval_loc"], s["test_seen_loc"]).size
    every = np.sort(np.concatenate([s["trainval_loc"], s["test_seen_loc"], s["test_unseen_loc"]]))
    np.testing.assert_array_equal(every, np.arange(demo.num_images))
    assert not np.intersect1d(demo.seen_classes, demo.unseen_classes).size and len(demo.unseen_classes) == 3
    np.testing.assert_array_equal(np.unique(demo.labels[s["test_seen_loc"]]), demo.seen_classes)  # 1 of 5 per class
    np.testing.assert_array_equal(np.sort(np.concatenate([s["train_loc"], s["val_loc"]])), s["trainval_loc"])
    assert not np.intersect1d(demo.labels[s["train_loc"]], demo.labels[s["val_loc"]]).size
    assert demo.check_files() == []


def test_render_is_idempotent_and_refuses_other_parameters(demo):
    index = demo.root / INDEX_FILE
    first = demo.root / demo.image_paths[0]
    stamp = (index.stat().st_mtime_ns, first.stat().st_mtime_ns)
    assert render_demo(demo.root, seed=3, **SMALL) == demo.root
    assert (index.stat().st_mtime_ns, first.stat().st_mtime_ns) == stamp
    with pytest.raises(DatasetError, match="rendered with .*'seed': 3.*use another root"):
        render_demo(demo.root, seed=4, **SMALL)
    with pytest.raises(DatasetError, match="unknown options \\['colours'\\]"):
        render_demo(demo.root, seed=3, colours=5)


def test_interrupted_render_is_redone(tmp_path):
    root = render_demo(tmp_path / "d", seed=0, **SMALL)
    index = json.loads((root / INDEX_FILE).read_text())
    (root / INDEX_FILE).unlink()  # as if killed before the index was written
    (root / index["image_paths"][0]).write_bytes(b"half a png")
    ds = load_demo(root, seed=0, **SMALL)
    Image.open(ds.root / ds.image_paths[0]).verify()


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="num_unseen"):
        render_demo(tmp_path, num_classes=5, num_unseen=5)
    with pytest.raises(DatasetError, match="num_classes"):
        render_demo(tmp_path, num_classes=1000)
