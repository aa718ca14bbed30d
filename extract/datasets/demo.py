"""A procedurally rendered ZSL dataset that needs no download ("demo").

Each class is one combination of attribute values (shape, colour, pattern, size); its attribute
vector is one-hot per group. Unseen classes are held-out combinations whose every value also occurs
in some seen class, so they can only be recognised by composing attributes learned on seen classes.
Per-image nuisance: background grey level and gradient, luminance noise, position, rotation, object
size within its size class, colour jitter. Everything derives from `seed`: the same parameters give
byte-identical PNGs.

Layout: `<root>/images/<class>/<i>.png` and `<root>/demo_index.json` (written last, so its presence
means a complete render; it records the parameters, classes, boxes and splits).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cache.layout import make_validation_split
from cache.semantics import unit_rows

from .base import DatasetError, ImageDataset
from .demo_render import COLOURS, PATTERNS, SHAPES, SIZES, render_image
from .splits import rows_of_classes, split_seen_images

ATTRIBUTE_GROUPS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "colour": tuple(COLOURS), "pattern": PATTERNS, "size": tuple(SIZES)}
INDEX_FILE = "demo_index.json"
RENDER_VERSION = 1  # bump when the drawing changes, so old folders are not mistaken for new ones
W2V_DIM = 300


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 0
    num_classes: int = 24
    num_unseen: int = 8
    images_per_class: int = 32
    image_size: int = 128
    test_seen_fraction: float = 0.2
    val_fraction: float = 0.2

    def check(self) -> None:
        combos = int(np.prod([len(v) for v in ATTRIBUTE_GROUPS.values()]))
        if not 2 <= self.num_classes <= combos:
            raise DatasetError(f"demo: num_classes must lie in [2, {combos}], got {self.num_classes}")
        if not 1 <= self.num_unseen < self.num_classes:
            raise DatasetError(f"demo: num_unseen must lie in [1, num_classes), got {self.num_unseen}")
        if self.images_per_class < 2 or self.image_size < 64:
            raise DatasetError("demo: images_per_class must be >= 2 and image_size >= 64")


def attribute_names() -> list[str]:
    return [f"{group}:{value}" for group, values in ATTRIBUTE_GROUPS.items() for value in values]


def choose_classes(config: DemoConfig) -> tuple[list[tuple[str, ...]], np.ndarray]:
    """Class combos (in class order) and the unseen class indices, drawn from `seed`.

    Redraws until every attribute value occurs in at least two seen classes (one is the ZSL
    requirement; two keep a value learnable when validation holds a seen class out).
    """
    combos = list(itertools.product(*ATTRIBUTE_GROUPS.values()))
    rng = np.random.default_rng([config.seed, 1])
    need = 2 if config.num_classes - config.num_unseen >= 2 * max(map(len, ATTRIBUTE_GROUPS.values())) else 1
    for _ in range(1000):
        classes = [combos[i] for i in rng.choice(len(combos), config.num_classes, replace=False)]
        unseen = np.sort(rng.choice(config.num_classes, config.num_unseen, replace=False))
        seen = [c for i, c in enumerate(classes) if i not in set(unseen.tolist())]
        if min(sum(value in c for c in seen) for value in itertools.chain(*ATTRIBUTE_GROUPS.values())) >= need:
            return classes, unseen
    raise DatasetError(f"demo: no class draw with {config.num_classes - config.num_unseen} seen classes covers "
                       "every attribute value; use more classes or fewer unseen ones")


def class_name(combo: tuple[str, ...]) -> str:
    shape, colour, pattern, size = combo
    return f"{size}_{pattern}_{colour}_{shape}"


def class_attributes(classes: list[tuple[str, ...]]) -> np.ndarray:
    """(C, A) binary: one-hot per attribute group."""
    names = attribute_names()
    att = np.zeros((len(classes), len(names)), dtype=np.float32)
    for c, combo in enumerate(classes):
        for group, value in zip(ATTRIBUTE_GROUPS, combo):
            att[c, names.index(f"{group}:{value}")] = 1.0
    return att


def pseudo_word_vectors(names: list[str], dim: int = W2V_DIM) -> np.ndarray:
    """Deterministic stand-ins for word2vec: group vector + value vector, so attributes of one group
    are similar (cosine ~0.36) and different groups are near-orthogonal. Norms ~3, like the real ones."""
    def vector(word: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).normal(0.0, 3.0 / np.sqrt(dim), dim)
    return np.stack([0.6 * vector(n.split(":")[0]) + 0.8 * vector(n.split(":")[1]) for n in names]).astype(np.float32)


def render_demo(root: str | Path, seed: int = 0, **options) -> Path:
    """Render the demo dataset into `root` unless it already holds this exact render; returns root.

    `options` are the other DemoConfig fields (num_classes, num_unseen, images_per_class, image_size,
    test_seen_fraction, val_fraction). A folder rendered with other parameters is an error.
    """
    config = _config(seed, options)
    root = Path(root)
    params = {"version": RENDER_VERSION, **asdict(config)}
    existing = _read_index(root)
    if existing is not None:
        if existing["params"] != params:
            raise DatasetError(f"{root / INDEX_FILE}: this folder holds a demo rendered with {existing['params']}, not "
                               f"{params}; use another root or delete the folder")
        return root
    classes, unseen = choose_classes(config)
    names = [class_name(c) for c in classes]
    images, labels, boxes = [], [], []
    for c, combo in enumerate(classes):
        (root / "images" / names[c]).mkdir(parents=True, exist_ok=True)
        for i in range(config.images_per_class):
            pixels, box = render_image(*combo, config.image_size, np.random.default_rng([config.seed, 2, c, i]))
            rel = f"images/{names[c]}/{i:03d}.png"
            Image.fromarray(pixels).save(root / rel, compress_level=1)  # noise barely compresses: be fast
            images.append(rel)
            labels.append(c)
            boxes.append(box)
    labels_arr = np.array(labels, dtype=np.int64)
    seen = np.setdiff1d(np.arange(config.num_classes), unseen)
    trainval, test_seen = split_seen_images(labels_arr, seen, config.test_seen_fraction, config.seed)
    train, val = make_validation_split(labels_arr, trainval, config.val_fraction, config.seed)
    splits = {"trainval_loc": trainval, "test_seen_loc": test_seen,
              "test_unseen_loc": rows_of_classes(labels_arr, unseen), "train_loc": train, "val_loc": val}
    index = {"params": params, "class_names": names, "class_attributes": [list(c) for c in classes],
             "unseen_classes": unseen.tolist(), "attribute_names": attribute_names(), "image_paths": images,
             "labels": labels, "boxes": boxes, "splits": {k: v.tolist() for k, v in splits.items()}}
    tmp = root / f"{INDEX_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(index))
    os.replace(tmp, root / INDEX_FILE)  # atomic: a crash mid-render leaves no index, so it re-renders
    return root


def load_demo(root: str | Path, seed: int = 0, **options) -> ImageDataset:
    """Render if needed (see render_demo), then load the demo as an ImageDataset with boxes."""
    root = render_demo(root, seed, **options)
    index = _read_index(root)
    classes = [tuple(c) for c in index["class_attributes"]]
    binary = class_attributes(classes)
    att = unit_rows(binary)  # xlsa17 convention: L2-normalised per class
    return ImageDataset(
        name="demo", root=root, image_paths=index["image_paths"], labels=np.array(index["labels"]),
        class_names=index["class_names"], att=att, original_att=binary,
        w2v_att=pseudo_word_vectors(index["attribute_names"]),
        splits={k: np.array(v, dtype=np.int64) for k, v in index["splits"].items()},
        attribute_names=index["attribute_names"], boxes=np.array(index["boxes"], dtype=np.float32),
        source={"adapter": "demo", "root": str(root), "params": index["params"],
                "w2v_att": "pseudo word vectors (sha256-seeded group + value vectors)"})


def _config(seed: int, options: dict) -> DemoConfig:
    unknown = sorted(set(options) - set(DemoConfig.__dataclass_fields__))
    if unknown:
        raise DatasetError(f"demo: unknown options {unknown}; valid: {sorted(DemoConfig.__dataclass_fields__)}")
    config = DemoConfig(seed=seed, **options)
    config.check()
    return config


def _read_index(root: Path) -> dict | None:
    path = root / INDEX_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: corrupt demo index ({err}); delete the folder to re-render") from None
