"""Class and attribute names travel in the cache (cache/layout.py: class_names, attribute_names):
`msdn predict` and `msdn visualize` show attributes.csv's names for a folder dataset, an older cache
without names still gets today's fallbacks, and the names stay out of the content key."""
import h5py
import numpy as np

from cache import layout as L
from cache.reader import FeatureCache
from extract.backbones import BackboneSpec
from extract.datasets import build_dataset
from extract.extractor import extract_features
from extract.manifest import build_manifest
from pipeline.commands.predict.inputs import class_and_attribute_names
from pipeline.commands.visualize import dataset_extras
from tests.fixtures.folder import cub_attribute_names, cub_folder_dataset, cub_species

SPEC = BackboneSpec("efficientnet_lite0", 32, "random")


def test_folder_names_are_stored_and_shown(tmp_path, shared_data):
    root = cub_folder_dataset(tmp_path / "birds", shared_data, seen=3, unseen=2, per_class=5, vectors=None)
    dataset = build_dataset("folder", data_root=root)
    out = extract_features(dataset, SPEC, tmp_path / "birds.h5", device="cpu", progress=False, log=lambda m: None)
    species = [name for name, _, _ in cub_species(shared_data, 3, 2)]
    attributes = cub_attribute_names(shared_data)
    with FeatureCache(out) as cache:
        assert cache.class_names == species and cache.attribute_names == attributes
        classes, shown = class_and_attribute_names(cache)
        extras = dataset_extras(cache)
    assert shown == attributes and not any(a.startswith("attribute ") for a in shown)
    assert classes == [s.split(".", 1)[-1] for s in species]  # "NNN." stripped for display
    assert extras["attribute_names"] == attributes and extras["class_names"] == species

    # an older cache (no names stored) reads as before: the folders name the classes, attributes fall back
    with h5py.File(out, "r+") as f:
        del f[L.CLASS_NAMES], f[L.ATTRIBUTE_NAMES]
    with FeatureCache(out) as cache:
        assert cache.class_names is None and cache.attribute_names is None
        classes, shown = class_and_attribute_names(cache)
    assert classes == [s.split(".", 1)[-1] for s in species]
    assert shown == [f"attribute {a}" for a in range(len(attributes))]


def test_names_are_not_part_of_the_content_key(tmp_path):
    from tests.fixtures.images import image_dataset

    dataset = image_dataset(tmp_path / "img")
    key = build_manifest(dataset, SPEC)["content_key"]
    dataset.class_names = ["w", "x", "y", "z"]
    dataset.attribute_names = [f"a{i}" for i in range(dataset.att.shape[1])]
    assert build_manifest(dataset, SPEC)["content_key"] == key
    out = extract_features(dataset, SPEC, tmp_path / "tiny.h5", device="cpu", progress=False, log=lambda m: None)
    with FeatureCache(out) as cache:
        assert cache.class_names == ["w", "x", "y", "z"] and cache.content_key == key
        assert np.array_equal(cache.att, dataset.att)
