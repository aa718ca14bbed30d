"""A `.partial` left by an extraction of other inputs (a wrong --weights, say) does not block the
corrected command, with --resume or without: it is replaced after one line that says so. A partial of
the same inputs is still continued by --resume only."""
import pytest

from cache.layout import partial_path
from cache.reader import FeatureCache
from extract.backbones import BackboneSpec
from extract.extractor import ExtractError, extract_features
from extract.manifest import build_manifest
from tests.fixtures.images import image_dataset, write_jpeg

WRONG, RIGHT = BackboneSpec("efficientnet_lite0", 64, "random"), BackboneSpec("efficientnet_lite0", 64, "imagenet")


def extract(dataset, out, spec, **kw):
    logs = []
    extract_features(dataset, spec, out, batch_size=2, num_workers=0, progress=False, log=logs.append, **kw)
    return logs


def wrong_partial(tmp_path):
    """A partial of the WRONG weights with some rows done: the run stopped at an unreadable image."""
    dataset, out = image_dataset(tmp_path / "images", n=8), tmp_path / "f.h5"
    good = (dataset.root / dataset.image_paths[4]).read_bytes()
    (dataset.root / dataset.image_paths[4]).write_bytes(good[: len(good) // 2])
    with pytest.raises(ExtractError, match="cannot read image"):
        extract(dataset, out, WRONG)
    write_jpeg(dataset.root / dataset.image_paths[4], 4)  # fixed: as image_dataset wrote it
    assert partial_path(out).exists()
    return dataset, out


@pytest.mark.parametrize("resume", [False, True])
def test_a_partial_of_other_inputs_is_replaced_after_one_line(tmp_path, resume):
    dataset, out = wrong_partial(tmp_path)
    logs = extract(dataset, out, RIGHT, resume=resume)
    said = [line for line in logs if "unfinished extraction of other inputs" in line]
    assert len(said) == 1 and str(partial_path(out)) in said[0] and " of 8 rows done" in said[0]
    with FeatureCache(out) as cache:
        assert cache.complete and cache.content_key == build_manifest(dataset, RIGHT)["content_key"]


def test_a_partial_of_the_same_inputs_still_asks_for_resume(tmp_path):
    dataset, out = wrong_partial(tmp_path)
    with pytest.raises(ExtractError, match="same inputs is there; pass --resume"):
        extract(dataset, out, WRONG)
    logs = extract(dataset, out, WRONG, resume=True)
    assert any(line.startswith("resuming") for line in logs)
