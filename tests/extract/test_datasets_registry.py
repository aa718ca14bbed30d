"""build_dataset: the one entry point the extractor and the demo job use."""
import numpy as np
import pytest

from extract.datasets import DATASETS, DatasetError, build_dataset, valid_options


def test_registry_names():
    assert list(DATASETS) == ["CUB", "SUN", "AWA2", "AWA1", "APY", "FLO", "CUB100", "demo", "folder"]


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(DatasetError, match="unknown dataset 'CUB200'; valid names: CUB, SUN, AWA2, AWA1, APY, FLO, CUB100, demo, folder"):
        build_dataset("CUB200")


def test_unknown_option_lists_the_valid_ones(shared_data):
    with pytest.raises(DatasetError, match=r"--dataset CUB: colour= does not apply to it \(it takes .*--xlsa17-root"):
        build_dataset("CUB", data_root=shared_data, colour="red")
    assert "images_per_class" in valid_options("demo") and "max_per_class" in valid_options("CUB100")


def test_each_kind_builds_and_options_pass_through(shared_data, tmp_path):
    sun = build_dataset("sun", data_root=shared_data, splits_root=shared_data / "xlsa17", image_root=None)
    assert sun.name == "SUN" and sun.num_images == 14340
    cub100 = build_dataset("CUB100", data_root=shared_data, max_per_class=3)
    assert cub100.num_images == 300 and cub100.att.shape == (100, 312)
    demo = build_dataset("demo", root=tmp_path / "demo", seed=1, num_classes=6, num_unseen=2,
                         images_per_class=3, image_size=64)
    assert demo.num_images == 18 and demo.boxes.shape == (18, 4)
    assert build_dataset("DEMO", data_root=tmp_path, seed=1, num_classes=6, num_unseen=2, images_per_class=3,
                         image_size=64).root == tmp_path / "demo"
    for ds in (sun, cub100, demo):  # every dataset provides a validation split
        assert {"train_loc", "val_loc"} <= set(ds.splits)
        assert not np.intersect1d(ds.labels[ds.splits["val_loc"]], ds.unseen_classes).size
    with pytest.raises(DatasetError, match="demo: pass root="):
        build_dataset("demo")
