"""Losses of MSDN and MSDN++ (docs/method.md) as plain functions of score tensors.

Scores are (..., B, C): a leading axis may stack the two sub-nets so that one kernel serves both
(fewer, larger ops: what both a GPU and a busy CPU want); each function then returns one value per
leading index. Everything is float32, batch-vectorised and free of host synchronisation. Log-domain
forms are used where the released code takes softmax then log: same value, but finite when a
softmax underflows.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cross_entropy_all_classes(unbiased_scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE over ALL classes (seen and unseen in the denominator), as the released code
    (is_conservative=True) does; the scores must already have the ±bias removed."""
    log_p = F.log_softmax(unbiased_scores.float(), dim=-1)
    index = labels.view(*(1,) * (log_p.dim() - 2), -1, 1).expand(*log_p.shape[:-1], 1)
    return -log_p.gather(-1, index).squeeze(-1).mean(-1)


def cross_entropy_subset(scores: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """CE over the listed classes only (e.g. the seen ones): the other classes' scores are left
    out of the denominator, so the loss neither raises nor lowers them. Every label must be one
    of `classes`."""
    position = torch.full((scores.shape[-1],), -1, dtype=torch.long, device=scores.device)
    position[classes] = torch.arange(len(classes), device=scores.device)
    return cross_entropy_all_classes(scores.index_select(-1, classes), position[labels])


def attribute_effect(effect: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Attribute-level causal loss: mean over attributes and images of (e^ - t^)^2, where e^ and
    t^ are the effect (..., B, A) and the true classes' attribute vectors (B, A), each
    standardised per attribute over the batch (population std). For an attribute that varies in
    both it equals 2 (1 - Pearson correlation) over the batch; an attribute constant over the
    batch contributes a constant. Scale-free, so it weighs like a cross-entropy term."""
    def standardise(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        centred = x - x.mean(-2, keepdim=True)
        # sqrt(var + eps), not sqrt(var) + eps: at the released init (W_1_1 = 0) an effect can be
        # constant over the batch, and sqrt's gradient at 0 is infinite (0 * inf = NaN)
        return centred / (centred.pow(2).mean(-2, keepdim=True) + eps).sqrt()

    return (standardise(effect) - standardise(target)).pow(2).mean((-2, -1))


def self_calibration(biased_scores: torch.Tensor, unseen: torch.Tensor,
                     log_p: torch.Tensor | None = None) -> torch.Tensor:
    """-log( mean_b sum_{u in unseen} softmax(s)[b, u] ) on the biased scores: pushes probability
    mass towards the unseen classes so they are not starved during training on seen images.
    `log_p` = log_softmax(biased_scores) when the caller has it already."""
    if log_p is None:
        log_p = F.log_softmax(biased_scores.float(), dim=-1)
    log_mass = torch.logsumexp(log_p.index_select(-1, unseen), dim=-1)  # (..., B) log unseen mass
    return math.log(log_mass.shape[-1]) - torch.logsumexp(log_mass, dim=-1)


def jensen_shannon(s1: torch.Tensor, s2: torch.Tensor,
                   log_p: torch.Tensor | None = None) -> torch.Tensor:
    """JSD(softmax(s1), softmax(s2)), batch mean: (KL(q || m) + KL(p || m)) / 2 with m = (p + q)/2,
    the released code's KLDivLoss(log m, q) + KLDivLoss(log m, p) with reduction='batchmean'.
    `log_p` = stacked log_softmax of (s1, s2), (2, B, C), when the caller has it already."""
    if log_p is None:
        log_p = F.log_softmax(torch.stack([s1.float(), s2.float()]), dim=-1)
    log_m = torch.logaddexp(log_p[0], log_p[1]) - math.log(2.0)
    return (log_p.exp() * (log_p - log_m)).sum((0, 2)).mean() / 2


def weighted_score_distance(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """mean_b sum_c |d|^3 / ||d_b||_2 with d = s1 - s2: an L1 distance whose per-class weights
    d^2/||d|| emphasise the classes where the sub-nets disagree most (released code).
    The norm is clamped so a batch where both sub-nets agree exactly gives 0, not 0/0."""
    d = s1.float() - s2.float()
    norm = torch.linalg.vector_norm(d, dim=1, keepdim=True).clamp_min(1e-12)
    return (d.abs().pow(3) / norm).sum(1).mean()


def distillation_released(s1: torch.Tensor, s2: torch.Tensor,
                          log_p: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Semantic distillation as released: weighted score distance + JSD of the class posteriors."""
    terms = {"distill_w": weighted_score_distance(s1, s2),
             "distill_jsd": jensen_shannon(s1, s2, log_p)}
    terms["distill"] = terms["distill_w"] + terms["distill_jsd"]
    return terms


def distillation_paper(s1: torch.Tensor, s2: torch.Tensor, psi: torch.Tensor, omega: torch.Tensor,
                       log_p: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Paper variant: JSD + Euclidean distance between the two sub-nets' attribute vectors psi and
    omega (per image, batch mean). vector_norm's gradient is defined as 0 where psi == omega."""
    l2 = torch.linalg.vector_norm(psi.float() - omega.float(), dim=1).mean()
    terms = {"distill_l2": l2, "distill_jsd": jensen_shannon(s1, s2, log_p)}
    terms["distill"] = terms["distill_l2"] + terms["distill_jsd"]
    return terms
