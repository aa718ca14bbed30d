"""Bring your own dataset: an image folder plus small CSV tables ("folder").

    DIR/images/<class>/<file>     one folder per class (torchvision ImageFolder layout; any depth
                                  below the class folder; .jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp)
    DIR/classes.csv               header `class,split`; split = seen | unseen | val (val: a seen class
                                  that plays unseen in the validation run that selects the model)
    DIR/attributes.csv            header = <anything>, then one column per attribute (its name);
                                  one row per class: the class name, then one number per attribute
    DIR/attribute_vectors.csv     optional, no header needed: `<attribute>,v1,...,vD`, one row per
      or .npy                     attribute in attributes.csv's column order; .npy: an (A, D) array
    DIR/images.csv                optional, header `path,split`: the images to use (path relative to
                                  images/), split = train | test for images of seen classes (unseen
                                  classes' images are all test: empty or `test`)

Protocol (the same split keys as the xlsa17 datasets): trainval_loc = train images of seen and val
classes, test_seen_loc = their test images, test_unseen_loc = every image of an unseen class;
train_loc/val_loc = trainval images of the seen / the val classes. Without val classes a fixed 20%
of the seen classes is drawn as validation classes (make_validation_split, seeded); without
images.csv each seen class's images are split 80/20 into train/test by a generator seeded per class
(splits.split_seen_images). The manifest records either rule with its seed and fraction.

Class semantics: `original_att` is attributes.csv as written, `att` each class row L2-normalised
(the xlsa17 convention the heads expect). Without attribute vectors (or with w2v="none") the cache
holds no word vectors and training learns the attribute embeddings from a random init, as for FLO.

Every malformed file is a DatasetError of one line: the file, the row as a spreadsheet numbers it
(the header is row 1) and the problem.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cache.layout import make_validation_split
from cache.semantics import unit_rows

from .base import DatasetError, ImageDataset
from .folder_files import (
    ATTRIBUTES,
    CLASSES,
    IMAGES,
    LAYOUT,
    class_folders,
    read_attributes,
    read_classes,
    read_images_csv,
    read_vectors,
    scan_images,
)
from .splits import rows_of_classes, split_seen_images


def load_folder(data_root: str | Path | None = None, root: str | Path | None = None, w2v: str = "auto",
                test_fraction: float = 0.2, val_fraction: float = 0.2, split_seed: int = 0,
                name: str = "folder") -> ImageDataset:
    """The dataset in `root` (alias `data_root`, as --data-root passes it); see the module docstring.
    test_fraction / val_fraction / split_seed apply only where images.csv / val classes are absent."""
    if w2v not in ("auto", "none"):
        raise DatasetError(f"w2v {w2v!r}: expected 'auto' or 'none'")
    if root is None and data_root is None:
        raise DatasetError(f"{name}: pass --data-root DIR, the folder holding images/, {CLASSES} and {ATTRIBUTES} "
                           f"({LAYOUT})")
    if not 0.0 <= test_fraction < 1.0 or not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"{name}: test_fraction must lie in [0, 1) and val_fraction in (0, 1)")
    root = Path(root if root is not None else data_root)
    if not root.is_dir():
        raise DatasetError(f"{root}: folder not found (--data-root must hold images/, {CLASSES}, {ATTRIBUTES})")
    tables = {}
    class_names, class_split, class_rows = read_classes(root / CLASSES, tables)
    folders = class_folders(root, class_names, class_rows)
    attribute_names, original_att = read_attributes(root / ATTRIBUTES, class_names, class_rows, tables)
    if (root / IMAGES).is_file():
        image_paths, labels, is_train = read_images_csv(root, class_names, class_split, class_rows, tables, folders)
    else:
        image_paths, labels = scan_images(root, class_names, class_rows, folders)
        is_train = None

    seen = [c for c, s in enumerate(class_split) if s in ("seen", "val")]
    unseen = [c for c, s in enumerate(class_split) if s == "unseen"]
    if is_train is None:
        trainval, test_seen = split_seen_images(labels, seen, test_fraction, split_seed)
        image_rule = (f"images of each seen class split {1 - test_fraction:.2f}/{test_fraction:.2f} into "
                      f"train/test, seed {split_seed} (no {IMAGES})")
    else:
        seen_rows = np.isin(labels, seen)
        trainval, test_seen = np.flatnonzero(seen_rows & is_train), np.flatnonzero(seen_rows & ~is_train)
        image_rule = f"train/test as {IMAGES} says"
    if not len(test_seen):
        raise DatasetError(f"{root / IMAGES if is_train is not None else root / 'images'}: no test image of a seen "
                           "class (S and H are measured on them): "
                           + ("mark some seen-class images 'test'" if is_train is not None else
                              "every seen class has a single image"))
    val_classes = [c for c, s in enumerate(class_split) if s == "val"]
    if val_classes:
        is_val = np.isin(labels[trainval], val_classes)
        train, val = trainval[~is_val], trainval[is_val]
        val_rule = f"validation classes: the {len(val_classes)} classes with split 'val' in {CLASSES}"
    else:
        train, val = make_validation_split(labels, trainval, fraction=val_fraction, seed=split_seed)
        val_rule = (f"validation classes: {len(np.unique(labels[val]))} of the {len(seen)} seen classes drawn "
                    f"by make_validation_split(fraction={val_fraction}, seed={split_seed}) (no 'val' in {CLASSES})")

    w2v_att, w2v_source = None, "none: training learns the attribute embeddings from a random init"
    if w2v == "none":
        w2v_source = "none (w2v='none', --w2v none): training learns the attribute embeddings from a random init"
    else:
        found = read_vectors(root, attribute_names, tables)
        if found is not None:
            w2v_att, w2v_source = found
    splits = {"trainval_loc": trainval, "test_seen_loc": test_seen, "test_unseen_loc": rows_of_classes(labels, unseen),
              "train_loc": np.sort(train), "val_loc": np.sort(val)}
    source = {"adapter": "folder", "root": str(root), "tables": sorted(tables),
              "seen_classes": len(seen), "unseen_classes": len(unseen), "val_classes_given": len(val_classes),
              "images": image_rule, "validation": val_rule, "w2v_att": w2v_source,
              "split_seed": split_seed, "test_fraction": None if is_train is not None else test_fraction,
              "val_fraction": None if val_classes else val_fraction,
              "att": f"{ATTRIBUTES} rows L2-normalised per class (original_att: as written)"}
    return ImageDataset(name=name, root=root / "images", image_paths=image_paths, labels=labels,
                        class_names=class_names, att=unit_rows(original_att), original_att=original_att,
                        w2v_att=w2v_att, splits=splits, attribute_names=attribute_names, source=source,
                        tables=tables)
