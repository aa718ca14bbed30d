"""Region rows (heads/regions.py): layout, normalisation, the resident RegionBank, and that the
head gives the same scores from a bank as from raw maps."""
import platform

import h5py
import numpy as np
import pytest
import torch

from heads.config import HeadConfig
from heads.regions import RegionBank, prepare_regions
from heads.runtime import keep_freed_memory
from tests.heads.helpers import F_DIM, H, W, make_head, tiny_inputs


def test_rows_are_regions_in_image_major_order_and_unit_length():
    maps = torch.rand(3, 5, 2, 2)
    regions = prepare_regions(maps, torch.float32)
    assert regions.rows.shape == (12, 5) and (regions.batch, regions.regions) == (3, 4)
    flat = maps.flatten(2)
    for b, r in [(0, 0), (1, 3), (2, 1)]:
        expect = flat[b, :, r] / flat[b, :, r].norm()
        torch.testing.assert_close(regions.rows[b * 4 + r], expect)
    torch.testing.assert_close(regions.rows.norm(dim=1), torch.ones(12))


def test_float16_norm_does_not_overflow_and_zero_regions_stay_zero():
    maps = torch.full((1, 2048, 1, 2), 300.0, dtype=torch.float16)  # sum of squares > 65504
    maps[0, :, 0, 1] = 0
    rows = prepare_regions(maps).rows
    assert rows.dtype == torch.float16 and torch.isfinite(rows).all()
    assert rows[0].float().norm().item() == pytest.approx(1.0, abs=1e-3)
    assert rows[1].abs().max().item() == 0.0


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


def test_keep_freed_memory_applies_on_glibc():
    on_glibc = platform.libc_ver()[0] == "glibc"
    try:
        assert keep_freed_memory(True) is on_glibc  # off glibc: reports that nothing changed
        assert torch.ones(1 << 24).sum().item() == 1 << 24  # large blocks still allocate
    finally:
        assert keep_freed_memory(False) is on_glibc
