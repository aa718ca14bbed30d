"""CUB-style folder adapter on the real 100-species subset in shared/data/cub100_subset."""
import json
import shutil

import numpy as np
import pytest
import scipy.io

from extract.datasets.base import DatasetError
from extract.datasets.cub_folder import load_cub_folder


def read_table(path):
    return {int(a): b.strip() for a, b in (line.split(",", 1) for line in path.read_text().splitlines() if line.strip())}


@pytest.fixture(scope="module")
def cub100(shared_data):
    return load_cub_folder(data_root=shared_data)


def test_counts_and_protocol_match_the_raw_files(cub100, shared_data):
    folder = shared_data / "cub100_subset"
    split = json.loads((folder / "zsl_split_xlsa17_PS.json").read_text())
    labels = read_table(folder / "image_class_labels.txt")
    flags = read_table(folder / "train_test_split.txt")
    seen = set(split["seen_subset_class_ids"])
    expect = {
        "trainval_loc": sum(int(labels[i]) in seen and flags[i] == "1" for i in labels),
        "test_seen_loc": sum(int(labels[i]) in seen and flags[i] == "0" for i in labels),
        "test_unseen_loc": sum(int(labels[i]) not in seen for i in labels),
    }
    assert cub100.name == "CUB100" and cub100.num_images == 5902 and len(cub100.class_names) == 100
    assert (len(cub100.seen_classes), len(cub100.unseen_classes)) == (73, 27)
    assert {k: len(cub100.splits[k]) for k in expect} == expect
    assert sum(expect.values()) == 5902
    assert set(cub100.seen_classes.tolist()) == seen
    assert cub100.image_paths[0] == "Black_footed_Albatross/0000.jpg" and cub100.root == folder / "images"
    assert cub100.check_files() == []  # the real images are all there
    flag = np.array([flags[i] == "1" for i in sorted(labels)])
    assert flag[cub100.splits["trainval_loc"]].all() and not flag[cub100.splits["test_seen_loc"]].any()


def test_validation_holds_out_whole_seen_classes(cub100):
    train, val = cub100.splits["train_loc"], cub100.splits["val_loc"]
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), cub100.splits["trainval_loc"])
    val_classes = np.unique(cub100.labels[val])
    assert not np.intersect1d(cub100.labels[train], val_classes).size
    assert len(val_classes) == round(0.2 * 73)


def test_attribute_columns_are_the_mapped_xlsa17_classes(cub100, shared_data):
    raw = scipy.io.loadmat(shared_data / "xlsa17" / "CUB" / "att_splits.mat")
    names = [str(x[0][0]) for x in raw["allclasses_names"]]
    for c in (0, 1, 37, 99):
        column = names.index(next(n for n in names if n.split(".", 1)[1] == cub100.class_names[c]))
        np.testing.assert_allclose(cub100.att[c], raw["att"][:, column].astype(np.float32))
        np.testing.assert_allclose(cub100.original_att[c], raw["original_att"][:, column].astype(np.float32))
    assert cub100.att.shape == (100, 312) and cub100.w2v_att.shape == (312, 300)
    np.testing.assert_array_equal(cub100.w2v_att, np.load(shared_data / "attribute_w2v" / "CUB_attribute_w2v.npy").astype(np.float32))
    # every image sits in its class's folder
    assert all(p.split("/")[0] == cub100.class_names[c] for p, c in zip(cub100.image_paths, cub100.labels))


def test_max_per_class_is_a_deterministic_stratified_subset(shared_data, cub100):
    small = load_cub_folder(data_root=shared_data, max_per_class=5)
    again = load_cub_folder(data_root=shared_data, max_per_class=5)
    assert small.fingerprint() == again.fingerprint()
    assert np.bincount(small.labels, minlength=100).tolist() == [5] * 100
    assert set(small.image_paths) <= set(cub100.image_paths)
    for c in small.seen_classes:  # every seen class keeps a training image and a test_seen image
        assert np.any(small.labels[small.splits["trainval_loc"]] == c)
        assert np.any(small.labels[small.splits["test_seen_loc"]] == c)
    assert len(small.seen_classes) == 73


def copy_index(shared_data, tmp_path):
    folder = tmp_path / "cub100_subset"
    folder.mkdir()
    for name in ("images.txt", "image_class_labels.txt", "classes.txt", "train_test_split.txt", "zsl_split_xlsa17_PS.json"):
        shutil.copy(shared_data / "cub100_subset" / name, folder / name)
    return folder


def test_class_name_mismatch_is_a_clear_error(shared_data, tmp_path):
    folder = copy_index(shared_data, tmp_path)
    text = (folder / "classes.txt").read_text().replace("Groove_billed_Ani", "Grove_billed_Ani")
    (folder / "classes.txt").write_text(text)
    with pytest.raises(DatasetError, match=r"classes\.txt: 1 class names differ .*'Grove_billed_Ani' -> '.*Groove_billed_Ani'"):
        load_cub_folder(folder, data_root=shared_data)


def test_bad_split_json_is_refused(shared_data, tmp_path):
    folder = copy_index(shared_data, tmp_path)
    split = json.loads((folder / "zsl_split_xlsa17_PS.json").read_text())
    split["seen_subset_class_ids"].append(split["unseen_subset_class_ids"][0])  # class 1 twice
    (folder / "zsl_split_xlsa17_PS.json").write_text(json.dumps(split))
    with pytest.raises(DatasetError, match="exactly once"):
        load_cub_folder(folder, data_root=shared_data)
    split = json.loads((shared_data / "cub100_subset" / "zsl_split_xlsa17_PS.json").read_text())
    seen, unseen = split["seen_subset_class_ids"], split["unseen_subset_class_ids"]
    split["seen_subset_class_ids"], split["unseen_subset_class_ids"] = seen[1:] + unseen[:1], unseen[1:] + seen[:1]
    (folder / "zsl_split_xlsa17_PS.json").write_text(json.dumps(split))
    with pytest.raises(DatasetError, match="not xlsa17 trainval classes"):
        load_cub_folder(folder, data_root=shared_data)


def test_missing_files_name_the_file(shared_data, tmp_path):
    folder = copy_index(shared_data, tmp_path)
    (folder / "train_test_split.txt").unlink()
    with pytest.raises(DatasetError, match=r"train_test_split\.txt: file not found"):
        load_cub_folder(folder, data_root=shared_data)
    with pytest.raises(DatasetError, match=r"images\.txt: file not found"):
        load_cub_folder(tmp_path / "nowhere", data_root=shared_data)
