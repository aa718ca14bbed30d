"""Training batch samplers that run entirely on the device holding the features.

Each sampler returns positions into the training rows (a LongTensor on `labels.device`), drawn
with its own torch.Generator, so a batch costs a couple of kernel launches and no host round trip.
"""
from __future__ import annotations

import torch


class UniformSampler:
    """`batch_size` distinct training images, uniformly at random (released CUB loader)."""

    def __init__(self, labels: torch.Tensor, batch_size: int, generator: torch.Generator):
        self.num_rows = len(labels)
        self.batch_size = min(batch_size, self.num_rows)
        self.device = labels.device
        self.generator = generator

    def __call__(self) -> torch.Tensor:
        # argsort of uniform noise = a random permutation; top-k of it avoids sorting everything
        noise = torch.rand(self.num_rows, device=self.device, generator=self.generator)
        return noise.topk(self.batch_size, sorted=False).indices


class ClassBalancedSampler:
    """min(batch_size, #classes) distinct classes, one random image of each (released SUN/AWA2
    loaders: with 645 SUN classes a batch is 50 classes; with 40 AWA2 classes it is all 40)."""

    def __init__(self, labels: torch.Tensor, batch_size: int, generator: torch.Generator):
        classes, counts = torch.unique(labels, return_counts=True)
        self.rows_by_class = torch.argsort(labels, stable=True)  # rows grouped class after class
        self.counts = counts
        self.starts = torch.cumsum(counts, 0) - counts
        self.classes_per_batch = min(batch_size, len(classes))
        self.device = labels.device
        self.generator = generator

    def __call__(self) -> torch.Tensor:
        noise = torch.rand(len(self.counts), device=self.device, generator=self.generator)
        picked = noise.topk(self.classes_per_batch, sorted=False).indices
        u = torch.rand(self.classes_per_batch, device=self.device, generator=self.generator)
        offset = (u * self.counts[picked]).long().clamp_max_(self.counts[picked] - 1)
        return self.rows_by_class[self.starts[picked] + offset]


SAMPLERS = {"uniform": UniformSampler, "class_balanced": ClassBalancedSampler}


def build_sampler(kind: str, labels: torch.Tensor, batch_size: int, seed: int):
    """A sampler over training rows with these labels, seeded on the labels' device."""
    generator = torch.Generator(device=labels.device)
    generator.manual_seed(seed)
    return SAMPLERS[kind](labels, batch_size, generator)
