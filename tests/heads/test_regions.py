"""Region rows (heads/regions.py): layout and normalisation (the bank built from them:
tests/pipeline/test_features.py)."""
import platform

import pytest
import torch

from heads.regions import prepare_regions
from heads.runtime import keep_freed_memory


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


def test_keep_freed_memory_applies_on_glibc():
    on_glibc = platform.libc_ver()[0] == "glibc"
    try:
        assert keep_freed_memory(True) is on_glibc  # off glibc: reports that nothing changed
        assert torch.ones(1 << 24).sum().item() == 1 << 24  # large blocks still allocate
    finally:
        assert keep_freed_memory(False) is on_glibc
