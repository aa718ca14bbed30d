"""Small real inputs for the extraction tests: JPEG folders written with PIL, and a 4-species CUB-style
folder cut from the shared CUB-100 photos (images copied into a tmp folder, never into the project)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from extract.datasets.base import ImageDataset


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (80, 64)) -> None:
    """A smooth random colour image: compresses like a photo, different per seed."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize(size, Image.BILINEAR).save(path, quality=90)


def image_dataset(root: Path, n: int = 8, name: str = "tiny", seed: int = 0) -> ImageDataset:
    """n real JPEGs under root, 4 classes (0, 1 seen; 2, 3 unseen)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rel = f"class{i % 4}/img{i:03d}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_jpeg(root / rel, seed * 1000 + i)
        paths.append(rel)
    labels = np.arange(n) % 4
    rng = np.random.default_rng(seed)
    att = rng.random((4, 6)).astype(np.float32)
    rows = np.arange(n)
    seen = rows[labels < 2]
    return ImageDataset(name=name, root=root, image_paths=paths, labels=labels, class_names=list("ABCD"),
                        att=att / np.linalg.norm(att, axis=1, keepdims=True), original_att=att * 100,
                        w2v_att=rng.random((6, 10)).astype(np.float32),
                        splits={"trainval_loc": seen[: len(seen) - 1], "test_seen_loc": seen[len(seen) - 1:],
                                "test_unseen_loc": rows[labels >= 2], "train_loc": seen[:1],
                                "val_loc": seen[1: len(seen) - 1]})


# Subset class ids 0..3 of cub100_subset: 0, 2, 3 are xlsa17 seen species, 1 is unseen.
MINI_CLASSES = (0, 1, 2, 3)


def mini_cub(dest: Path, shared_data: Path, per_class: int = 10) -> Path:
    """`dest/cub100_subset`: a CUB-style folder with `per_class` photos of 4 species (ids re-numbered,
    7 of 10 flagged train). Returns dest, to pass as --data-root with dataset CUB100."""
    source = Path(shared_data) / "cub100_subset"
    folder = Path(dest) / "cub100_subset"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = dict(line.split(", ", 1) for line in (source / "classes.txt").read_text().splitlines() if line.strip())
    split = json.loads((source / "zsl_split_xlsa17_PS.json").read_text())
    images, labels, flags = [], [], []
    for new_id, old_id in enumerate(MINI_CLASSES):
        name = names[str(old_id)]
        files = sorted((source / "images" / name).glob("*.jpg"))[:per_class]
        (folder / "images" / name).mkdir(exist_ok=True)
        for k, file in enumerate(files):
            shutil.copyfile(file, folder / "images" / name / file.name)
            images.append(f"{name}/{file.name}")
            labels.append(new_id)
            flags.append(1 if k < int(0.7 * per_class) else 0)
    _write_table(folder / "images.txt", images)
    _write_table(folder / "image_class_labels.txt", labels)
    _write_table(folder / "train_test_split.txt", flags)
    _write_table(folder / "classes.txt", [names[str(c)] for c in MINI_CLASSES])
    seen_old = set(split["seen_subset_class_ids"])
    (folder / "zsl_split_xlsa17_PS.json").write_text(json.dumps({
        "seen_subset_class_ids": [i for i, c in enumerate(MINI_CLASSES) if c in seen_old],
        "unseen_subset_class_ids": [i for i, c in enumerate(MINI_CLASSES) if c not in seen_old],
        "subset_to_xlsa17_class_index": [split["subset_to_xlsa17_class_index"][c] for c in MINI_CLASSES]}))
    return Path(dest)


def _write_table(path: Path, values) -> None:
    path.write_text("".join(f"{i}, {v}\n" for i, v in enumerate(values)))
