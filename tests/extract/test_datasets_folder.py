"""`--dataset folder`: your own images/<class>/ folder + classes.csv + attributes.csv (+ word vectors,
images.csv), built here from real CUB-100 photos and the real xlsa17 CUB attributes of those species.
Malformed tables go through the real `msdn extract` command and must give one line naming the file
and the row."""
import csv
import shutil

import numpy as np
import pytest
import scipy.io
from click.testing import CliRunner

import cli
from cache.keys import content_key, content_part
from extract.datasets import DatasetError, build_dataset
from extract.datasets.folder import load_folder
from pipeline.commands.extract import ExtractOptions, build_inputs
from tests.fixtures.folder import cub_attribute_names, cub_folder_dataset, cub_species, write_csv

SEEN, UNSEEN, PER_CLASS = 10, 4, 20


@pytest.fixture(scope="module")
def folder(tmp_path_factory, shared_data):
    return cub_folder_dataset(tmp_path_factory.mktemp("folder") / "birds", shared_data, seen=SEEN, unseen=UNSEEN,
                              per_class=PER_CLASS, vectors="npy")


@pytest.fixture(scope="module")
def birds(folder):
    return build_dataset("folder", data_root=folder)


def copy_folder(folder, dest):
    """A copy to edit (images stay symlinks to the shared photos)."""
    shutil.copytree(folder, dest, symlinks=True)
    return dest


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_real_species_load_with_the_xlsa17_protocol_keys(birds, folder, shared_data):
    species = cub_species(shared_data, SEEN, UNSEEN)
    assert birds.name == "folder" and birds.root == folder / "images"
    assert birds.class_names == [name for name, _, _ in species]  # classes.csv order, never sorted
    assert birds.num_images == (SEEN + UNSEEN) * PER_CLASS and birds.check_files() == []
    assert set(birds.splits) == {"trainval_loc", "test_seen_loc", "test_unseen_loc", "train_loc", "val_loc"}
    assert birds.seen_classes.tolist() == list(range(SEEN))
    assert birds.unseen_classes.tolist() == list(range(SEEN, SEEN + UNSEEN))
    assert all(p.split("/")[0] == birds.class_names[c] for p, c in zip(birds.image_paths, birds.labels))
    # no images.csv: each seen class's 20 photos split 16/4, fixed by the seed the manifest records
    trainval, test_seen = birds.splits["trainval_loc"], birds.splits["test_seen_loc"]
    assert np.bincount(birds.labels[trainval]).tolist() == [16] * SEEN
    assert np.bincount(birds.labels[test_seen], minlength=SEEN).tolist() == [4] * SEEN
    assert not np.intersect1d(trainval, test_seen).size
    assert len(birds.splits["test_unseen_loc"]) == UNSEEN * PER_CLASS
    assert birds.source["split_seed"] == 0 and birds.source["test_fraction"] == 0.2
    # validation: whole seen classes (2 of 10) held out of trainval, as make_validation_split does for CUB100
    train, val = birds.splits["train_loc"], birds.splits["val_loc"]
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), trainval)
    assert len(np.unique(birds.labels[val])) == 2 and not np.intersect1d(birds.labels[train], birds.labels[val]).size
    assert birds.source["val_fraction"] == 0.2 and "make_validation_split" in birds.source["validation"]
    # attributes: as written in original_att; att = rows L2-normalised = xlsa17's own `att` of those species
    mat = scipy.io.loadmat(shared_data / "xlsa17" / "CUB" / "att_splits.mat")
    columns = [col for _, _, col in species]
    np.testing.assert_allclose(birds.original_att, mat["original_att"].T[columns], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(birds.att, mat["att"].T[columns], atol=1e-5)
    assert birds.attribute_names == cub_attribute_names(shared_data) and birds.att.shape == (14, 312)
    np.testing.assert_array_equal(birds.w2v_att, np.load(shared_data / "attribute_w2v" / "CUB_attribute_w2v.npy")
                                  .astype(np.float32))


def test_same_files_same_dataset(birds, folder):
    again = load_folder(root=folder)
    assert again.fingerprint() == birds.fingerprint() and again.image_paths == birds.image_paths


def test_csv_vectors_with_or_without_header_equal_the_npy(folder, birds, tmp_path, shared_data):
    other = copy_folder(folder, tmp_path / "csv")
    (other / "attribute_vectors.npy").unlink()
    names = cub_attribute_names(shared_data)
    rows = [[n, *(f"{v:.9g}" for v in row)] for n, row in zip(names, birds.w2v_att)]
    write_csv(other / "attribute_vectors.csv", rows)
    np.testing.assert_allclose(load_folder(root=other).w2v_att, birds.w2v_att, rtol=1e-6)
    write_csv(other / "attribute_vectors.csv", [["attribute", *(f"d{i}" for i in range(300))], *rows])
    np.testing.assert_allclose(load_folder(root=other).w2v_att, birds.w2v_att, rtol=1e-6)


def test_without_vectors_or_with_w2v_none_nothing_is_stored(folder, birds, tmp_path):
    none = build_dataset("folder", data_root=folder, w2v="none")
    assert none.w2v_att is None and "--w2v none" in none.source["w2v_att"]
    assert none.fingerprint()["w2v_att"] == "none" != birds.fingerprint()["w2v_att"]
    bare = copy_folder(folder, tmp_path / "bare")
    (bare / "attribute_vectors.npy").unlink()
    plain = load_folder(root=bare)
    assert plain.w2v_att is None and "random init" in plain.source["w2v_att"]


def test_val_classes_and_images_csv_set_the_splits(folder, tmp_path):
    other = copy_folder(folder, tmp_path / "listed")
    rows = read_rows(other / "classes.csv")
    rows[3][1] = rows[5][1] = "val"                      # two seen species validate
    write_csv(other / "classes.csv", rows)
    images = [["path", "split"]]
    for name, split in rows[1:]:
        files = sorted(p.name for p in (other / "images" / name).iterdir())[:6]  # 6 of 20 listed
        images += [[f"{name}/{f}", "" if split == "unseen" else ("test" if i < 2 else "train")]
                   for i, f in enumerate(files)]
    write_csv(other / "images.csv", images)
    ds = load_folder(root=other)
    assert ds.num_images == 14 * 6 and ds.image_paths == [r[0] for r in images[1:]]
    assert np.bincount(ds.labels[ds.splits["test_seen_loc"]]).tolist() == [2] * SEEN
    assert np.bincount(ds.labels[ds.splits["trainval_loc"]]).tolist() == [4] * SEEN
    assert np.unique(ds.labels[ds.splits["val_loc"]]).tolist() == [2, 4]
    assert set(ds.splits["train_loc"]) | set(ds.splits["val_loc"]) == set(ds.splits["trainval_loc"])
    assert ds.source["test_fraction"] is None and ds.source["val_fraction"] is None
    assert "images.csv" in ds.source["images"] and "'val'" in ds.source["validation"]


def key_of(dataset):
    """The content key an extraction of `dataset` would get (fixed backbone part)."""
    return content_key({"content": content_part({"name": "efficientnet_lite0"}, (1280, 7, 7), "float16",
                                                dataset.name, dataset.fingerprint(), "sizes")})


def test_a_changed_table_gives_a_new_content_key(folder, birds, tmp_path):
    other = copy_folder(folder, tmp_path / "edited")
    assert key_of(load_folder(root=other)) == key_of(birds)
    rows = read_rows(other / "attributes.csv")
    rows[0][5] = "renamed attribute"                    # same numbers: only the table says so
    write_csv(other / "attributes.csv", rows)
    renamed = load_folder(root=other)
    np.testing.assert_array_equal(renamed.att, birds.att)
    assert key_of(renamed) != key_of(birds)
    rows[0][5] = read_rows(folder / "attributes.csv")[0][5]
    rows[2][7] = "99"                                    # one value changed
    write_csv(other / "attributes.csv", rows)
    assert key_of(load_folder(root=other)) not in (key_of(birds), key_of(renamed))
    write_csv(other / "attributes.csv", read_rows(folder / "attributes.csv"))
    write_csv(other / "classes.csv", [r + ["note"] for r in read_rows(folder / "classes.csv")])  # extra column
    assert key_of(load_folder(root=other)) != key_of(birds)


def test_the_cli_options_reach_the_adapter(folder):
    dataset, _, out = build_inputs(ExtractOptions(dataset="folder", data_root=str(folder), w2v="none",
                                                  backbone="efficientnet_lite0", image_size=224))
    assert dataset.name == "folder" and dataset.w2v_att is None and out.name == "folder_efficientnet_lite0_224.h5"
    with pytest.raises(DatasetError, match="pass --data-root DIR"):
        build_inputs(ExtractOptions(dataset="folder"))


# ----------------------------------------------------------------------------- malformed inputs, via the CLI
def _edit_csv(name, edit):
    def apply(root):
        rows = read_rows(root / name)
        edit(rows, root)
        write_csv(root / name, rows)
    return apply


def _append(name, row):
    return _edit_csv(name, lambda rows, root: rows.append(row))


def _set(name, r, c, value):
    def edit(rows, root):
        rows[r][c] = value
    return _edit_csv(name, edit)


def _drop_row(name, r):
    return _edit_csv(name, lambda rows, root: rows.pop(r))


def _vectors_csv(edit):
    def apply(root):
        w2v = np.load(root / "attribute_vectors.npy")
        (root / "attribute_vectors.npy").unlink()
        names = read_rows(root / "attributes.csv")[0][1:]
        rows = [[n, *(f"{v:.6g}" for v in row)] for n, row in zip(names, w2v)]
        edit(rows)
        write_csv(root / "attribute_vectors.csv", rows)
    return apply


def _vectors_npy(array_edit):
    def apply(root):
        w2v = np.load(root / "attribute_vectors.npy")
        np.save(root / "attribute_vectors.npy", array_edit(w2v))
    return apply


def _images_csv(edit):
    def apply(root):
        rows = [["path", "split"]]
        for name, split in read_rows(root / "classes.csv")[1:]:
            files = sorted(p.name for p in (root / "images" / name).iterdir())
            rows += [[f"{name}/{f}", "" if split == "unseen" else ("test" if i == 0 else "train")]
                     for i, f in enumerate(files)]
        edit(rows)
        write_csv(root / "images.csv", rows)
    return apply


def _extra_folder(root):
    (root / "images" / "Dodo").mkdir()
    first = next((root / "images").iterdir())
    (root / "images" / "Dodo" / "a.jpg").symlink_to(next(first.iterdir()).resolve())


def _empty_folder(root):
    folder = root / "images" / read_rows(root / "classes.csv")[2][0]
    for p in folder.iterdir():
        p.unlink()


def _unlink(name):
    return lambda root: (root / name).unlink()


def _nan_value(rows, root):
    rows[3][4] = "nan"


def _npy_nan(w2v):
    w2v = w2v.copy()
    w2v[6, 10] = np.nan
    return w2v


def _all_seen(rows, root):
    for row in rows[1:]:
        row[1] = "seen"


def _set_cell(r, c, value):
    def edit(rows):
        rows[r][c] = value
    return edit


# (id, edit of a fresh copy, file named, row named or None, words of the problem)
MALFORMED = [
    ("classes missing", _unlink("classes.csv"), "classes.csv", None, "file not found"),
    ("classes missing column", _set("classes.csv", 0, 1, "kind"), "classes.csv", 1, "missing column 'split'"),
    ("classes semicolons", _edit_csv("classes.csv", lambda rows, root: rows.__setitem__(0, ["class;split"])),
     "classes.csv", 1, "comma-separated"),
    ("unknown class split", _set("classes.csv", 3, 1, "sene"), "classes.csv", 4, "unknown split 'sene'"),
    ("duplicate class", _edit_csv("classes.csv", lambda rows, root: rows.append(list(rows[2]))),
     "classes.csv", 6, "duplicate class"),
    ("class without folder", _append("classes.csv", ["Dodo", "unseen"]), "classes.csv", 6, "no images folder"),
    ("folder without class", _extra_folder, "Dodo", None, "no row in"),
    ("class folder without images", _empty_folder, "classes.csv", 3, "no image files"),
    ("no unseen classes", _edit_csv("classes.csv", _all_seen), "classes.csv", None, "no unseen classes"),
    ("attributes missing", _unlink("attributes.csv"), "attributes.csv", None, "file not found"),
    ("non-numeric attribute", _set("attributes.csv", 2, 3, "abc"), "attributes.csv", 3, "'abc' is not a number"),
    ("NaN attribute", _edit_csv("attributes.csv", _nan_value), "attributes.csv", 4, "finite number"),
    ("empty attribute", _set("attributes.csv", 2, 9, ""), "attributes.csv", 3, "empty value"),
    ("short attribute row", _edit_csv("attributes.csv", lambda rows, root: rows[4].pop()), "attributes.csv", 5,
     "312 columns, but the header has 313"),
    ("duplicate attribute name", _set("attributes.csv", 0, 3, "has_bill_shape::dagger"), "attributes.csv", 1,
     "duplicate attribute"),
    ("attributes of an unknown class", _set("attributes.csv", 2, 0, "Dodo"), "attributes.csv", 3,
     "'Dodo' is not in classes.csv"),
    ("class without attributes", _drop_row("attributes.csv", 3), "attributes.csv", None, "no row for class"),
    ("all-zero attributes", _edit_csv("attributes.csv", lambda rows, root: rows.__setitem__(
        2, [rows[2][0]] + ["0"] * (len(rows[2]) - 1))), "attributes.csv", 3, "is 0"),
    ("vector length", _vectors_csv(lambda rows: rows[4].pop()), "attribute_vectors.csv", 5, "wrong vector length 299"),
    ("vector name", _vectors_csv(_set_cell(1, 0, "beak")), "attribute_vectors.csv", 2,
     "attribute 'beak', expected"),
    ("vector non-numeric", _vectors_csv(_set_cell(3, 2, "x")), "attribute_vectors.csv", 4, "not a number"),
    ("vector rows missing", _vectors_csv(lambda rows: rows.pop()), "attribute_vectors.csv", None, "311 attribute rows"),
    ("npy shape", _vectors_npy(lambda w2v: w2v[:311]), "attribute_vectors.npy", None, "shape (311, 300)"),
    ("npy NaN", _vectors_npy(_npy_nan), "attribute_vectors.npy", 7, "NaN"),
    ("images missing column", _images_csv(_set_cell(0, 1, "set")), "images.csv", 1, "missing column 'split'"),
    ("image split", _images_csv(_set_cell(3, 1, "validation")), "images.csv", 4, "unknown split 'validation'"),
    ("image file missing", _images_csv(_set_cell(2, 0, "Black_footed_Albatross/missing.jpg")), "images.csv", 3,
     "not found"),
    ("image outside class folders", _images_csv(_set_cell(2, 0, "Dodo/a.jpg")), "images.csv", 3,
     "not inside a class folder"),
    ("unseen image marked train", _images_csv(lambda rows: rows[-1].__setitem__(1, "train")), "images.csv", 17,
     "unseen class"),
]


@pytest.fixture(scope="module")
def small(tmp_path_factory, shared_data):
    """3 seen + 1 unseen species, 4 photos each: what every malformed case starts from."""
    return cub_folder_dataset(tmp_path_factory.mktemp("small") / "birds", shared_data, seen=3, unseen=1,
                              per_class=4, vectors="npy")


def test_the_small_folder_is_valid(small):
    assert load_folder(root=small).num_images == 16


@pytest.mark.parametrize("case,edit,file,row,problem", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_tables_are_one_line_naming_file_and_row(small, tmp_path, case, edit, file, row, problem):
    root = copy_folder(small, tmp_path / "birds")
    edit(root)
    result = CliRunner().invoke(cli.main, ["extract", "--dataset", "folder", "--data-root", str(root),
                                           "--backbone", "efficientnet_lite0", "--image-size", "64",
                                           "--out", str(tmp_path / "x.h5"), "--no-progress"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    line = lines[0]
    assert line.startswith("Error: ") and "Traceback" not in result.output
    assert file in line and problem in line, line
    if row is not None:
        assert f"row {row}:" in line, line
    assert not (tmp_path / "x.h5").exists()


def test_cli_suggests_w2v_none_when_word_vectors_are_missing(shared_data, tmp_path):
    result = CliRunner().invoke(cli.main, ["extract", "--dataset", "CUB", "--data-root", str(shared_data),
                                           "--w2v-root", str(tmp_path), "--out", str(tmp_path / "x.h5")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output
    assert "no attribute word vectors" in lines[0] and "--w2v none" in lines[0] and "--w2v-root" in lines[0]
    result = CliRunner().invoke(cli.main, ["extract", "--dataset", "CUB", "--w2v", "None"])
    assert result.exit_code == 2 and "'auto', 'none'" in result.output  # click's usage error


def test_w2v_none_for_every_kind_of_dataset(shared_data, tmp_path):
    for name in ("CUB", "SUN", "AWA2"):  # need their .pkl with w2v auto; a missing folder is fine with none
        options = ExtractOptions(dataset=name, data_root=str(shared_data), w2v_root=str(tmp_path), w2v="none")
        dataset = build_inputs(options)[0]
        assert dataset.w2v_att is None and "--w2v none" in dataset.source["w2v_att"], name
    cub100 = build_inputs(ExtractOptions(dataset="CUB100", data_root=str(shared_data), w2v="none"))[0]
    assert cub100.w2v_att is None and cub100.att.shape == (100, 312)
    demo = build_dataset("demo", root=tmp_path / "demo", num_classes=6, num_unseen=2, images_per_class=2,
                         image_size=64, w2v="none")
    assert demo.w2v_att is None and demo.fingerprint()["w2v_att"] == "none"
    with pytest.raises(DatasetError, match="w2v 'no'"):
        build_dataset("demo", root=tmp_path / "demo", w2v="no")


def test_headerless_tables_and_nothing_to_test_on(small, tmp_path):
    root = copy_folder(small, tmp_path / "headerless")
    rows = read_rows(root / "attributes.csv")
    write_csv(root / "attributes.csv", rows[1:])                   # the header forgotten
    with pytest.raises(DatasetError, match=r"attributes.csv: row 1: the first row holds numbers"):
        load_folder(root=root)
    write_csv(root / "attributes.csv", rows)
    names = rows[0][1:]
    vectors = np.load(root / "attribute_vectors.npy")
    (root / "attribute_vectors.npy").unlink()
    data = [["renamed", *map(str, vectors[0])]] + [[n, *map(str, v)] for n, v in zip(names[1:], vectors[1:])]
    write_csv(root / "attribute_vectors.csv", data)                # a wrong name on row 1 is data, not a header
    with pytest.raises(DatasetError, match=r"attribute_vectors.csv: row 1: attribute 'renamed', expected"):
        load_folder(root=root)
    (root / "attribute_vectors.csv").unlink()
    images = [["path", "split"]] + [[f"{n}/{f.name}", "" if s == "unseen" else "train"]
                                    for n, s in read_rows(root / "classes.csv")[1:]
                                    for f in sorted((root / "images" / n).iterdir())]
    write_csv(root / "images.csv", images)                          # every seen image 'train'
    with pytest.raises(DatasetError, match=r"images.csv: no test image of a seen class"):
        load_folder(root=root)


def test_a_zero_word_vector_is_kept_as_the_real_sun_vectors_have_one(small, tmp_path):
    root = copy_folder(small, tmp_path / "zero")
    vectors = np.load(root / "attribute_vectors.npy")
    vectors[87] = 0.0                                               # SUN's row 88 is all zeros
    np.save(root / "attribute_vectors.npy", vectors)
    assert not load_folder(root=root).w2v_att[87].any()
