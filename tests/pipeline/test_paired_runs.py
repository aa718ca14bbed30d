"""Common random numbers: with one seed, every causal variant sees the same batches in the same
order and starts from the same weights, so per-seed differences between variants are paired
comparisons (the `msdn ablate --preset causal` screen relies on it)."""
import numpy as np
import torch

from cache.reader import FeatureCache
from pipeline.engine import build_model, fit
from pipeline.features import ResidentFeatures
from pipeline.tasks import benchmark_task, usable_splits
from tests.fixtures.caches import tiny_config

VARIANTS = [{"lambda_causal": 0.0},  # MSDN
            {"lambda_causal": 0.3},  # random counterfactual: draws random numbers every step
            {"lambda_causal": 0.3, "counterfactual": "remove", "causal_grad": "factual"},
            {"lambda_causal": 0.1, "causal_level": "attribute", "causal_warmup": 5, "causal_ramp": 5},
            {"lambda_causal": 0.3, "causal_subnets": "ava", "causal_classes": "seen"}]


class RecordingFeatures(ResidentFeatures):
    """The real resident features, remembering which rows each training batch gathered."""
    def gather(self, positions):
        self.gathered.append(positions.tolist())
        return super().gather(positions)


def run(cache, variant, seed):
    config = tiny_config(seed=seed, iterations=20, **variant)
    labels = np.asarray(cache.labels)
    task = benchmark_task(labels, usable_splits(cache)[0], num_classes=int(cache.att.shape[0]))
    store = RecordingFeatures(cache, task.train_rows, torch.device("cpu"), "float32", max_batch=16)
    store.gathered = []
    model = build_model(config.head, cache, task, store.device, config.seed)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, store, task.train_rows, task.local_labels(labels[task.train_rows]), config, steps=20, amp="none",
        progress=False)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    return store.gathered, initial, final


def test_variants_share_batches_and_initial_weights(tiny_cache):
    seed = 0
    with FeatureCache(tiny_cache) as cache:
        runs = [run(cache, variant, seed) for variant in VARIANTS]
    batches, initial, _ = runs[0]
    assert len(batches) == 20
    for other_batches, other_initial, _ in runs[1:]:
        assert other_batches == batches
        assert other_initial.keys() == initial.keys()
        assert all(torch.equal(other_initial[k], initial[k]) for k in initial)
    # the variants do train differently (otherwise the comparison would say nothing)
    finals = [final["W_1"] for _, _, final in runs]
    assert not any(torch.equal(finals[0], f) for f in finals[1:])


def test_another_seed_gives_other_batches(tiny_cache):
    with FeatureCache(tiny_cache) as cache:
        a, b = run(cache, VARIANTS[1], 0), run(cache, VARIANTS[1], 1)
    assert a[0] != b[0] and not torch.equal(a[1]["W_1"], b[1]["W_1"])
