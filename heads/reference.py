"""A deliberately straightforward MSDN (docs/method.md), written the obvious way: one einsum per
product and per sub-net, softmax-then-log losses, float32 only. It is the oracle the fused head
(heads/msdn.py) is tested against and the speed baseline of bench/train.py. Not for training.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from heads.msdn import MSDN


class ReferenceMSDN(nn.Module):
    """Holds its own copies of an MSDN head's parameters (so gradients can be compared)."""

    def __init__(self, head: MSDN):
        super().__init__()
        if not (head.use_ava and head.use_vaa):
            raise ValueError("ReferenceMSDN implements the two-sub-net MSDN only")
        self.cfg = head.cfg
        for name in ("V", "W_1", "W_2", "W_1_1", "W_2_1"):
            src = getattr(head, name)
            setattr(self, name, nn.Parameter(src.detach().float().clone(),
                                             requires_grad=src.requires_grad))
        for name in ("Z", "score_bias", "unseen_classes"):
            self.register_buffer(name, getattr(head, name).clone())

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = features.float().flatten(2)  # (B, f, R)
        x = F.normalize(x, dim=1)
        V = F.normalize(self.V, dim=1) if self.cfg.normalize_v else self.V
        # attribute -> visual
        S = torch.einsum("iv,vf,bfr->bir", V, self.W_1, x)
        beta = F.softmax(torch.einsum("iv,vf,bfr->bir", V, self.W_2, x), dim=-1)
        psi = torch.einsum("bir,bir->bi", beta, S)
        s1 = torch.einsum("ki,bi->bk", self.Z, psi) + self.score_bias
        # visual -> attribute
        g = torch.einsum("bfr,fv,iv->bri", x, self.W_1_1, V)
        alpha = F.softmax(torch.einsum("iv,vf,bfr->bir", V, self.W_2_1, x), dim=1)
        omega = torch.einsum("bir,bri->bi", alpha, g)
        s2 = torch.einsum("ki,bi->bk", self.Z, omega) + self.score_bias
        return s1, s2

    def loss(self, s1: torch.Tensor, s2: torch.Tensor, labels: torch.Tensor) -> dict:
        onehot = F.one_hot(labels, self.Z.shape[0]).float()
        terms = {}
        for k, s in ((1, s1), (2, s2)):
            log_p = F.log_softmax(s - self.score_bias, dim=1)
            terms[f"ce_{k}"] = -(log_p * onehot).sum(1).mean()
            unseen_mass = F.softmax(s, dim=1)[:, self.unseen_classes].sum(1)
            terms[f"cal_{k}"] = -torch.log(unseen_mass.mean())
        d = s1 - s2
        weight = d.pow(2) / d.pow(2).sum(1, keepdim=True).sqrt()
        terms["distill_w"] = (weight * d.abs()).sum() / d.shape[0]
        p, q = F.softmax(s1, dim=1), F.softmax(s2, dim=1)
        log_m = ((p + q) / 2).log()
        kl = nn.KLDivLoss(reduction="batchmean")
        terms["distill_jsd"] = (kl(log_m, q) + kl(log_m, p)) / 2
        terms["distill"] = terms["distill_w"] + terms["distill_jsd"]
        cfg = self.cfg
        terms["loss"] = (terms["ce_1"] + terms["ce_2"]
                         + cfg.lambda_cal * (terms["cal_1"] + terms["cal_2"])
                         + cfg.lambda_distill * terms["distill"])
        return terms
