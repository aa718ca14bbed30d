"""Feature stores (pipeline/features.py): the RegionBank and the resident store built on it, and that the
head gives the same scores from a bank as from raw maps."""
import h5py
import numpy as np
import pytest
import torch

from cache.reader import FeatureCache
from heads.config import HeadConfig
from heads.msdn import MSDN
from heads.regions import prepare_regions
from pipeline.features import RegionBank, ResidentFeatures, bank_dtype
from tests.fixtures.heads import F_DIM, H, W, make_head, tiny_inputs


@pytest.mark.parametrize("kind", ["tensor", "numpy", "hdf5"])
def test_bank_matches_prepare_regions_for_every_source(kind, tmp_path):
    maps = torch.rand(7, 4, 2, 3).half()
    source = maps if kind == "tensor" else maps.numpy()
    if kind == "hdf5":
        with h5py.File(tmp_path / "maps.h5", "w") as f:
            f["feature_map"] = maps.numpy()
        source = h5py.File(tmp_path / "maps.h5", "r")["feature_map"]
    bank = RegionBank(source, dtype=torch.float32, chunk=3)  # chunks that do not divide 7
    assert (len(bank), bank.num_regions, bank.feature_dim) == (7, 6, 4)
    index = torch.tensor([6, 0, 3])
    taken = bank.take(index)
    torch.testing.assert_close(taken.rows, prepare_regions(maps[index].float()).rows)
    torch.testing.assert_close(bank.slice(2, 5).rows, prepare_regions(maps[2:5].float()).rows)


def test_head_scores_from_bank_equal_scores_from_raw_maps():
    head = make_head(HeadConfig())
    _, _, features, _ = tiny_inputs(batch=5)
    bank = RegionBank(features, dtype=torch.float32)
    raw = head(features)
    banked = head(bank.take(torch.arange(5)))
    torch.testing.assert_close(banked.s1, raw.s1)
    torch.testing.assert_close(banked.s2, raw.s2)
    torch.testing.assert_close(banked.beta, raw.beta)
    assert banked.beta.shape == (5, head.num_attributes, H * W)


def test_bank_with_wrong_channel_count_is_refused():
    head = make_head(HeadConfig())
    bank = RegionBank(torch.rand(2, F_DIM + 1, H, W))
    with pytest.raises(ValueError, match=f"regions have {F_DIM + 1} channels"):
        head(bank.take(torch.tensor([0])))
    with pytest.raises(ValueError, match="no images"):
        RegionBank(np.zeros((0, 3, 2, 2), np.float16))


def test_store_gathers_the_cached_rows_as_normalised_regions(tiny_cache):
    with FeatureCache(tiny_cache) as cache:
        rows = np.array([30, 3, 7, 60, 61])
        store = ResidentFeatures(cache, rows, torch.device("cpu"), "float16")
        reference = cache.lazy()[np.sort(rows)].float()
    assert store.resident and len(store) == 5 and store.bank.data.dtype == torch.float16
    pos = store.positions(np.array([61, 3]))
    assert pos.tolist() == [4, 0]
    regions = store.gather(pos)
    # (image, region, channel) rows of unit length, as the head's forward reads them
    expected = torch.nn.functional.normalize(reference[[4, 0]].flatten(2).transpose(1, 2), dim=2)
    assert (regions.batch, regions.regions) == (2, reference.shape[2] * reference.shape[3])
    torch.testing.assert_close(regions.rows.float(), expected.reshape(-1, reference.shape[1]),
                               atol=2e-3, rtol=0)
    batches = list(store.batches(store.positions(np.sort(rows)), batch_size=2))
    assert [b.batch for b in batches] == [2, 2, 1]
    with pytest.raises(KeyError, match="not held"):
        store.positions(np.array([5]))


def test_bank_dtype_follows_bf16_autocast():
    assert bank_dtype("float16", "bf16") == "bfloat16"
    assert bank_dtype("float16", "none") == "float16"
    assert bank_dtype("float32", "bf16") == "float32"  # an explicit float32 bank is kept


def test_head_scores_the_same_from_store_regions_and_raw_maps(tiny_cache):
    """The bank's pre-normalised rows feed the head exactly as the maps it would normalise itself."""
    with FeatureCache(tiny_cache) as cache:
        rows = np.arange(10)
        store = ResidentFeatures(cache, rows, torch.device("cpu"), "float32")
        maps = cache.features(rows=rows, dtype=torch.float32)
        torch.manual_seed(0)
        model = MSDN(HeadConfig(), torch.from_numpy(cache.att).float(), torch.from_numpy(cache.w2v_att).float(),
                     torch.arange(20), torch.arange(20, 24), feature_dim=cache.feature_shape[0])
    with torch.no_grad():
        from_store = model(store.gather(store.positions(rows)))
        from_maps = model(maps)
    torch.testing.assert_close(from_store.s1, from_maps.s1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_store.s2, from_maps.s2, atol=1e-5, rtol=1e-5)
