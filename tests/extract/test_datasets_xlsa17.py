"""xlsa17 adapter on the real split, index and word-vector files of shared/data."""
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from extract.datasets.base import DatasetError
from extract.datasets.xlsa17 import load_xlsa17, strip_server_prefix
from extract.datasets.xlsa17_files import load_semantics

# docs/method.md (AWA1 from the xlsa17 README): images, seen, unseen, A, trainval, test_seen, test_unseen
TABLE = {
    "CUB": (11788, 150, 50, 312, 7057, 1764, 2967),
    "SUN": (14340, 645, 72, 102, 10320, 2580, 1440),
    "AWA2": (37322, 40, 10, 85, 23527, 5882, 7913),
    "AWA1": (30475, 40, 10, 85, 19832, 4958, 5685),
    "FLO": (8189, 82, 20, 1024, 5631, 1403, 1155),
    "APY": (15339, 20, 12, 64, 5932, 1483, 7924),
}
W2V = {"CUB": (312, 300), "SUN": (102, 300), "AWA2": (85, 300), "AWA1": (85, 300), "FLO": None, "APY": None}
# Absolute res101.mat paths on the xlsa17 authors' server (the prefix TransZero's loader strips).
SERVER_PREFIX = {"CUB": "/BS/Deep_Fragments/work/MSc/CUB_200_2011/", "SUN": "/BS/Deep_Fragments/work/MSc/data/SUN/"}


def write_res101(path: Path, image_files: list[str], labels_1based: np.ndarray) -> None:
    """A res101.mat holding only the metadata half (no `features`), in MATLAB's cell layout."""
    cells = np.empty((len(image_files), 1), dtype=object)
    for i, name in enumerate(image_files):
        cells[i, 0] = np.array([name])
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"image_files": cells, "labels": labels_1based.reshape(-1, 1).astype(np.float64)})


@pytest.mark.parametrize("name", list(TABLE))
def test_semantics_of_every_benchmark_load(shared_data, name):
    n, n_seen, n_unseen, a, trainval, test_seen, test_unseen = TABLE[name]
    sem = load_semantics(name, shared_data / "xlsa17", shared_data / "attribute_w2v")
    assert sem.splits.att.shape == (n_seen + n_unseen, a)
    assert len(sem.class_names) == n_seen + n_unseen
    locs = sem.splits.locations
    assert [len(locs[k]) for k in ("trainval_loc", "test_seen_loc", "test_unseen_loc")] == [trainval, test_seen, test_unseen]
    every = np.concatenate([locs["trainval_loc"], locs["test_seen_loc"], locs["test_unseen_loc"]])
    assert every.min() == 0 and every.max() == n - 1 and len(np.unique(every)) == n  # 0-based partition
    assert (None if sem.w2v_att is None else sem.w2v_att.shape) == W2V[name]


@pytest.mark.parametrize("name", ["CUB", "SUN", "AWA2"])
def test_image_index_benchmarks_match_spec_and_npz(shared_data, name):
    n, n_seen, n_unseen, a, trainval, test_seen, test_unseen = TABLE[name]
    ds = load_xlsa17(name, data_root=shared_data)
    npz = np.load(shared_data / "xlsa17_image_index" / f"{name}_image_index.npz")
    assert ds.source["image_source"] == "image_index"
    assert ds.num_images == n and ds.att.shape == (n_seen + n_unseen, a) and ds.original_att.shape == ds.att.shape
    np.testing.assert_array_equal(ds.labels, npz["labels"])
    for key in ("trainval_loc", "test_seen_loc", "test_unseen_loc"):
        np.testing.assert_array_equal(ds.splits[key], npz[key])
    np.testing.assert_array_equal(ds.seen_classes, npz["seenclasses"])
    np.testing.assert_array_equal(ds.unseen_classes, npz["unseenclasses"])
    assert len(ds.seen_classes) == n_seen and len(ds.unseen_classes) == n_unseen
    raw = scipy.io.loadmat(shared_data / "xlsa17" / name / "att_splits.mat")
    np.testing.assert_allclose(ds.att, raw["att"].T.astype(np.float32))
    assert ds.class_names[0] == str(raw["allclasses_names"][0, 0][0])
    # xlsa17's validation split: class-disjoint halves of the seen classes' images
    train, val = ds.splits["train_loc"], ds.splits["val_loc"]
    assert not np.intersect1d(ds.labels[train], ds.labels[val]).size
    assert not np.intersect1d(ds.labels[val], ds.unseen_classes).size
    assert ds.image_paths[0] == (shared_data / "xlsa17_image_index" / f"{name}_image_files.txt").read_text().split()[0].replace("//", "/")


def test_cub_train_val_come_from_sent_splits_and_class_dirs_match_labels(shared_data):
    ds = load_xlsa17("CUB", data_root=shared_data)
    sent = scipy.io.loadmat(shared_data / "xlsa17" / "CUB" / "sent_splits.mat")
    assert "sent_splits.mat" in ds.source["train_val"]
    np.testing.assert_array_equal(ds.splits["train_loc"], sent["train_loc"].ravel().astype(np.int64) - 1)
    np.testing.assert_array_equal(ds.splits["val_loc"], sent["val_loc"].ravel().astype(np.int64) - 1)
    assert (len(ds.splits["train_loc"]), len(ds.splits["val_loc"])) == (5875, 2946)
    class_dirs = [p.split("/")[2] for p in ds.image_paths]
    assert class_dirs == [ds.class_names[c] for c in ds.labels]
    assert ds.class_names[:2] == ["002.Laysan_Albatross", "003.Sooty_Albatross"]  # file order, never sorted
    assert ds.attribute_names[0] == "has_bill_shape::curved_(up_or_down)"


def test_sun_word_vector_row_88_is_zero(shared_data):
    ds = load_xlsa17("SUN", data_root=shared_data)
    assert not ds.w2v_att[88].any() and np.linalg.norm(ds.w2v_att, axis=1)[np.arange(102) != 88].min() > 0.5


@pytest.mark.parametrize("name", ["CUB", "SUN"])  # AWA2's '//' is covered by test_strip_server_prefix
def test_res101_server_paths_are_stripped_to_the_image_index_paths(shared_data, tmp_path, name):
    index = load_xlsa17(name, data_root=shared_data)
    files = (shared_data / "xlsa17_image_index" / f"{name}_image_files.txt").read_text().split()
    xlsa17_root = tmp_path / "xlsa17" / "data"
    (xlsa17_root / name).mkdir(parents=True)
    for file in (shared_data / "xlsa17" / name).iterdir():
        (xlsa17_root / name / file.name).symlink_to(file)
    write_res101(xlsa17_root / name / "res101.mat", [SERVER_PREFIX[name] + f for f in files], index.labels + 1)
    ds = load_xlsa17(name, data_root=tmp_path, w2v_root=shared_data / "attribute_w2v")
    assert ds.source["image_source"] == "res101"
    assert ds.image_paths == index.image_paths
    np.testing.assert_array_equal(ds.labels, index.labels)
    assert ds.root == tmp_path / name  # TransZero layout: data/<DS>/<kept path>


@pytest.mark.parametrize("name", ["AWA1", "APY", "FLO"])
def test_benchmarks_without_a_real_image_list_load_from_a_res101_file(shared_data, tmp_path, name):
    # No res101.mat exists here for these; this one is written by the test (labels: seen classes
    # cycled over trainval+test_seen rows, unseen ones over test_unseen rows) to run the res101 path.
    n, n_seen, n_unseen = TABLE[name][:3]
    sem = load_semantics(name, shared_data / "xlsa17", None, w2v="none")
    split_dir = tmp_path / name
    split_dir.mkdir()
    (split_dir / "att_splits.mat").symlink_to(sem.splits.path)
    if name == "FLO":
        seen, unseen = np.arange(n_seen), np.arange(n_seen, n_seen + n_unseen)
    else:
        names = (shared_data / "xlsa17" / name / "trainvalclasses.txt").read_text().split()
        seen = np.array([sem.class_names.index(c) for c in names])
        unseen = np.setdiff1d(np.arange(n_seen + n_unseen), seen)
    labels = np.empty(n, dtype=np.int64)
    seen_rows = np.sort(np.concatenate([sem.splits.locations["trainval_loc"], sem.splits.locations["test_seen_loc"]]))
    labels[seen_rows] = seen[np.arange(len(seen_rows)) % len(seen)]
    unseen_rows = sem.splits.locations["test_unseen_loc"]
    labels[unseen_rows] = unseen[np.arange(len(unseen_rows)) % len(unseen)]
    write_res101(split_dir / "res101.mat", [f"/BS/xian/work/data/{name}/JPEG/img_{i:05d}.jpg" for i in range(n)], labels + 1)
    with pytest.raises(DatasetError, match="path_anchor"):
        load_xlsa17(name, data_root=tmp_path, xlsa17_root=tmp_path, w2v_root=shared_data / "attribute_w2v")
    ds = load_xlsa17(name, data_root=tmp_path, xlsa17_root=tmp_path, w2v_root=shared_data / "attribute_w2v",
                     path_anchor=f"{name}/")
    assert ds.image_paths[7] == f"{name}/JPEG/img_00007.jpg"
    np.testing.assert_array_equal(ds.labels, labels)
    assert (len(ds.seen_classes), len(ds.unseen_classes)) == (n_seen, n_unseen)
    assert (None if ds.w2v_att is None else ds.w2v_att.shape) == W2V[name]
    if name == "AWA1":
        assert ds.source["w2v_att"].endswith("AWA2_attribute_w2v.npy")
    if name == "FLO":
        assert ds.class_names[0] == "class_001" and ds.attribute_names is None


def test_cub_own_index_files_are_mapped_onto_xlsa17_classes(shared_data, tmp_path):
    # The CUB_200_2011 release's own index files (space-separated, 1-based ids), written from the
    # real image list in a shuffled order so that row order cannot be what makes the test pass.
    files = (shared_data / "xlsa17_image_index" / "CUB_image_files.txt").read_text().split()
    rel = [f.split("CUB_200_2011/images/")[1] for f in files]
    order = np.random.default_rng(0).permutation(len(rel))
    class_names = sorted({r.split("/")[0] for r in rel})  # CUB's classes.txt is numeric-prefix order
    folder = tmp_path / "CUB" / "CUB_200_2011"
    folder.mkdir(parents=True)
    (folder / "images.txt").write_text("".join(f"{k + 1} {rel[i]}\n" for k, i in enumerate(order)))
    (folder / "classes.txt").write_text("".join(f"{k + 1} {c}\n" for k, c in enumerate(class_names)))
    (folder / "image_class_labels.txt").write_text(
        "".join(f"{k + 1} {class_names.index(rel[i].split('/')[0]) + 1}\n" for k, i in enumerate(order)))
    ds = load_xlsa17("CUB", data_root=tmp_path, xlsa17_root=shared_data / "xlsa17",
                     w2v_root=shared_data / "attribute_w2v")
    index = np.load(shared_data / "xlsa17_image_index" / "CUB_image_index.npz")
    assert ds.source["image_source"] == "cub_index" and "derived" in ds.source["locations"]
    assert ds.image_paths == [files[i] for i in order]
    np.testing.assert_array_equal(ds.labels, index["labels"][order])
    np.testing.assert_array_equal(ds.seen_classes, index["seenclasses"])
    np.testing.assert_array_equal(ds.unseen_classes, index["unseenclasses"])
    assert len(ds.splits["test_unseen_loc"]) == 2967
    assert len(ds.splits["trainval_loc"]) + len(ds.splits["test_seen_loc"]) == 7057 + 1764
    assert abs(len(ds.splits["test_seen_loc"]) - 1764) < 40  # ~20% of each seen class, as xlsa17
    assert not np.intersect1d(ds.splits["trainval_loc"], ds.splits["test_seen_loc"]).size
    assert not np.intersect1d(ds.labels[ds.splits["train_loc"]], ds.labels[ds.splits["val_loc"]]).size
    again = load_xlsa17("CUB", data_root=tmp_path, xlsa17_root=shared_data / "xlsa17",
                        w2v_root=shared_data / "attribute_w2v")
    assert again.fingerprint() == ds.fingerprint()


def test_missing_split_file_and_image_list_are_one_line_errors(shared_data, tmp_path):
    with pytest.raises(DatasetError, match=r"SUN/att_splits\.mat: xlsa17 split file not found") as err:
        load_xlsa17("SUN", data_root=tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(DatasetError, match="no image list found") as err:
        load_xlsa17("SUN", data_root=tmp_path, xlsa17_root=shared_data / "xlsa17",
                    w2v_root=shared_data / "attribute_w2v")
    assert "SUN_image_files.txt" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DatasetError, match="unknown xlsa17 dataset 'CUB200'"):
        load_xlsa17("CUB200", data_root=shared_data)


def test_word_vectors_of_the_wrong_shape_or_unsafe_are_refused(shared_data, tmp_path):
    w2v = tmp_path / "w2v"
    w2v.mkdir()
    np.save(w2v / "CUB_attribute_w2v.npy", np.ones((85, 300)))
    with pytest.raises(DatasetError) as err:
        load_xlsa17("CUB", data_root=shared_data, w2v_root=w2v)
    message = str(err.value)
    assert "CUB_attribute_w2v.npy" in message and "(85, 300)" in message and "(312, D)" in message
    assert "\n" not in message
    (w2v / "CUB_attribute_w2v.npy").unlink()
    (w2v / "CUB_attribute.pkl").write_bytes(pickle.dumps(print))
    with pytest.raises(DatasetError, match="builtins.print"):
        load_xlsa17("CUB", data_root=shared_data, w2v_root=w2v)
    (w2v / "CUB_attribute.pkl").unlink()
    with pytest.raises(DatasetError, match="w2v='none'"):
        load_xlsa17("CUB", data_root=shared_data, w2v_root=w2v)
    assert load_xlsa17("CUB", data_root=shared_data, w2v_root=w2v, w2v="none").w2v_att is None


def test_index_locations_that_disagree_with_att_splits_are_refused(shared_data, tmp_path):
    index = tmp_path / "index"
    index.mkdir()
    (index / "SUN_image_files.txt").symlink_to(shared_data / "xlsa17_image_index" / "SUN_image_files.txt")
    npz = dict(np.load(shared_data / "xlsa17_image_index" / "SUN_image_index.npz"))
    npz["test_seen_loc"] = npz["test_seen_loc"] + 1  # a 1-based copy
    np.savez(index / "SUN_image_index.npz", **npz)
    with pytest.raises(DatasetError, match="SUN_image_index.npz: test_seen_loc differs"):
        load_xlsa17("SUN", data_root=shared_data, index_root=index)


def test_strip_server_prefix():
    assert strip_server_prefix("/BS/x/data/SUN/images/a/abbey/s.jpg", "images/", Path("r")) == "images/a/abbey/s.jpg"
    assert strip_server_prefix("/a/Animals_with_Attributes2//JPEGImages/ox/ox_1.jpg", "Animals_with_Attributes2/",
                               Path("r")) == "Animals_with_Attributes2/JPEGImages/ox/ox_1.jpg"
    with pytest.raises(DatasetError, match="does not contain"):
        strip_server_prefix("/a/b/c.jpg", "images/", Path("r"))


def test_check_files_lists_missing_images(shared_data, tmp_path):
    ds = load_xlsa17("AWA2", data_root=shared_data, image_root=tmp_path)
    for rel in ds.image_paths[:3]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    missing = ds.check_files()
    assert len(missing) == ds.num_images - 3 and missing[0] == str(tmp_path / ds.image_paths[3])
