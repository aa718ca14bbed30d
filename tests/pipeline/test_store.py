import numpy as np
import pytest
import torch

from cache.reader import FeatureCache
from pipeline.store import FeatureStore


def test_store_gathers_the_cached_rows(tiny_cache):
    with FeatureCache(tiny_cache) as cache:
        rows = np.array([30, 3, 7, 60, 61])
        store = FeatureStore(cache, rows, torch.device("cpu"), "float16")
        reference = cache.lazy()[np.sort(rows)]
    assert store.resident and len(store) == 5 and store.features.dtype == torch.float16
    pos = store.positions(np.array([61, 3]))
    assert pos.tolist() == [4, 0]
    np.testing.assert_array_equal(store.gather(pos).float().numpy(),
                                  reference[[4, 0]].half().float().numpy())
    batches = list(store.batches(store.positions(np.sort(rows)), batch_size=2))
    assert [len(b) for b in batches] == [2, 2, 1]
    with pytest.raises(KeyError, match="not held"):
        store.positions(np.array([5]))
