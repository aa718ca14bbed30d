import torch

from pipeline.samplers import ClassBalancedSampler, UniformSampler, build_sampler

# 6 classes of uneven size (1..6 images), rows shuffled so classes are not contiguous
LABELS = torch.repeat_interleave(torch.arange(6), torch.arange(1, 7))[torch.randperm(21, generator=torch.Generator().manual_seed(0))]


def draws(sampler, n=50):
    return [sampler() for _ in range(n)]


def test_uniform_batches_are_distinct_rows_in_range():
    sampler = build_sampler("uniform", LABELS, batch_size=8, seed=1)
    assert isinstance(sampler, UniformSampler)
    for batch in draws(sampler):
        assert batch.shape == (8,) and batch.dtype == torch.long
        assert len(set(batch.tolist())) == 8 and 0 <= batch.min() and batch.max() < 21
    assert build_sampler("uniform", LABELS, batch_size=50, seed=1)().shape == (21,)  # capped at N


def test_class_balanced_batches_hold_distinct_classes_one_image_each():
    sampler = build_sampler("class_balanced", LABELS, batch_size=4, seed=1)
    assert isinstance(sampler, ClassBalancedSampler)
    seen_rows = set()
    for batch in draws(sampler, 200):
        classes = LABELS[batch]
        assert batch.shape == (4,) and len(set(classes.tolist())) == 4
        seen_rows.update(batch.tolist())
    assert seen_rows == set(range(21))  # every image of every class is reachable
    # more requested than classes: every class once per batch (released AWA2: 40 of 40)
    batch = build_sampler("class_balanced", LABELS, batch_size=50, seed=0)()
    assert sorted(LABELS[batch].tolist()) == list(range(6))


def test_samplers_are_deterministic_per_seed():
    for kind in ("uniform", "class_balanced"):
        a = torch.stack(draws(build_sampler(kind, LABELS, 4, seed=7), 20))
        b = torch.stack(draws(build_sampler(kind, LABELS, 4, seed=7), 20))
        c = torch.stack(draws(build_sampler(kind, LABELS, 4, seed=8), 20))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_class_balanced_picks_images_uniformly_within_a_class():
    labels = torch.tensor([0] * 4 + [1])
    sampler = build_sampler("class_balanced", labels, batch_size=1, seed=3)
    rows = torch.cat(draws(sampler, 4000))
    counts = torch.bincount(rows, minlength=5).float()
    # each class drawn ~half of the time; class 0's share spread evenly over its 4 images (~500 each)
    assert 1800 < counts[4] < 2200 and counts[:4].min() > 400 and counts[:4].max() < 600
