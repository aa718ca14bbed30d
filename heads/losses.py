"""Losses of MSDN (SPEC.md §4) and MSDN++ (§5) as plain functions of score tensors.

Every function is batch-vectorised and free of host synchronisation, so a training step can run
ahead of the device. Log-domain forms are used where the released code takes softmax then log: the
value is the same, but it stays finite when a softmax underflows (bfloat16, large scores).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cross_entropy_all_classes(unbiased_scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE over ALL classes (seen and unseen in the denominator), as the released code
    (is_conservative=True) does; the scores must already have the ±bias removed."""
    return F.cross_entropy(unbiased_scores.float(), labels)


def self_calibration(biased_scores: torch.Tensor, unseen: torch.Tensor) -> torch.Tensor:
    """-log( mean_b sum_{u in unseen} softmax(s)[b, u] ) on the biased scores: pushes probability
    mass towards the unseen classes so they are not starved during training on seen images."""
    log_p = F.log_softmax(biased_scores.float(), dim=1)
    log_mass = torch.logsumexp(log_p.index_select(1, unseen), dim=1)  # (B,) log unseen mass
    return -(torch.logsumexp(log_mass, dim=0) - math.log(log_mass.shape[0]))


def jensen_shannon(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """JSD(softmax(s1), softmax(s2)), batch mean: (KL(q || m) + KL(p || m)) / 2 with m = (p + q)/2,
    the released code's KLDivLoss(log m, q) + KLDivLoss(log m, p) with reduction='batchmean'."""
    log_p = F.log_softmax(s1.float(), dim=1)
    log_q = F.log_softmax(s2.float(), dim=1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_q = (log_q.exp() * (log_q - log_m)).sum(1)
    kl_p = (log_p.exp() * (log_p - log_m)).sum(1)
    return (kl_q + kl_p).mean() / 2


def weighted_score_distance(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """mean_b sum_c |d|^3 / ||d_b||_2 with d = s1 - s2: an L1 distance whose per-class weights
    d^2/||d|| emphasise the classes where the sub-nets disagree most (released code).
    The norm is clamped so a batch where both sub-nets agree exactly gives 0, not 0/0."""
    d = s1.float() - s2.float()
    norm = torch.linalg.vector_norm(d, dim=1, keepdim=True).clamp_min(1e-12)
    return (d.abs().pow(3) / norm).sum(1).mean()


def distillation_released(s1: torch.Tensor, s2: torch.Tensor) -> dict[str, torch.Tensor]:
    """Semantic distillation as released: weighted score distance + JSD of the class posteriors."""
    terms = {"distill_w": weighted_score_distance(s1, s2), "distill_jsd": jensen_shannon(s1, s2)}
    terms["distill"] = terms["distill_w"] + terms["distill_jsd"]
    return terms


def distillation_paper(s1: torch.Tensor, s2: torch.Tensor, psi: torch.Tensor,
                       omega: torch.Tensor) -> dict[str, torch.Tensor]:
    """Paper variant: JSD + Euclidean distance between the two sub-nets' attribute vectors psi and
    omega (per image, batch mean). vector_norm's gradient is defined as 0 where psi == omega."""
    l2 = torch.linalg.vector_norm(psi.float() - omega.float(), dim=1).mean()
    terms = {"distill_l2": l2, "distill_jsd": jensen_shannon(s1, s2)}
    terms["distill"] = terms["distill_l2"] + terms["distill_jsd"]
    return terms
