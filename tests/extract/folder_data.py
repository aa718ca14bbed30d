"""A `--dataset folder` dataset cut from the real test data: CUB-100 photos of a few species (images
symlinked into a tmp folder, never into the project), classes.csv from the xlsa17 seen/unseen split
of those species, attributes.csv from their rows of xlsa17 CUB `original_att` with CUB's 312
attribute names, and optionally CUB's attribute word vectors as attribute_vectors.npy / .csv."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import scipy.io


def cub_species(shared_data: Path, seen: int, unseen: int) -> list[tuple[str, str, int]]:
    """(name, "seen"|"unseen", xlsa17 class column) of the first `seen` xlsa17-seen and the first
    `unseen` xlsa17-unseen species of cub100_subset, in subset-id order."""
    folder = Path(shared_data) / "cub100_subset"
    names = dict(line.split(", ", 1) for line in (folder / "classes.txt").read_text().splitlines() if line.strip())
    split = json.loads((folder / "zsl_split_xlsa17_PS.json").read_text())
    column = split["subset_to_xlsa17_class_index"]
    picked = [(names[str(c)], "seen", column[c]) for c in sorted(split["seen_subset_class_ids"])[:seen]]
    picked += [(names[str(c)], "unseen", column[c]) for c in sorted(split["unseen_subset_class_ids"])[:unseen]]
    return picked


def cub_attribute_names(shared_data: Path) -> list[str]:
    lines = (Path(shared_data) / "attribute_w2v" / "attribute_names" / "CUB" / "attributes.txt").read_text()
    return [line.split(None, 1)[1].strip() for line in lines.splitlines() if line.strip()]


def write_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def cub_folder_dataset(dest: Path, shared_data: Path, *, seen: int = 10, unseen: int = 4, per_class: int = 20,
                       vectors: str | None = "npy", val: int = 0) -> Path:
    """Write DIR = dest/ in the folder layout and return it. `val`: mark that many of the seen
    species 'val' in classes.csv (0: let the adapter draw the validation classes)."""
    shared_data, dest = Path(shared_data), Path(dest)
    species = cub_species(shared_data, seen, unseen)
    mat = scipy.io.loadmat(shared_data / "xlsa17" / "CUB" / "att_splits.mat", variable_names=["original_att"])
    original_att = np.asarray(mat["original_att"], dtype=np.float64).T  # (200, 312)
    names = cub_attribute_names(shared_data)
    for name, _, _ in species:
        (dest / "images" / name).mkdir(parents=True, exist_ok=True)
        for file in sorted((shared_data / "cub100_subset" / "images" / name).glob("*.jpg"))[:per_class]:
            (dest / "images" / name / file.name).symlink_to(file)
    splits = [s for _, s, _ in species]
    for i in range(val):
        splits[i] = "val"
    write_csv(dest / "classes.csv", [("class", "split")] + [(n, s) for (n, _, _), s in zip(species, splits)])
    write_csv(dest / "attributes.csv", [["class", *names]] +
              [[n, *(f"{v:.6g}" for v in original_att[col])] for n, _, col in species])
    if vectors is not None:
        w2v = np.load(shared_data / "attribute_w2v" / "CUB_attribute_w2v.npy")
        if vectors == "npy":
            np.save(dest / "attribute_vectors.npy", w2v)
        else:
            write_csv(dest / "attribute_vectors.csv", [[n, *(f"{v:.8g}" for v in row)] for n, row in zip(names, w2v)])
    return dest
