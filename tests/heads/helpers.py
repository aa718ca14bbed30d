"""Tiny problems shared by the head tests (random but seeded; sizes far from the real ones so
nothing can silently depend on 2048/196/312)."""
from __future__ import annotations

import torch

from heads.config import HeadConfig
from heads.msdn import MSDN

C, A, F_DIM, D, H, W = 7, 5, 16, 8, 2, 3
SEEN = torch.tensor([0, 2, 3, 5])
UNSEEN = torch.tensor([1, 4, 6])


def tiny_inputs(seed: int = 0, batch: int = 4):
    g = torch.Generator().manual_seed(seed)
    att = torch.rand(C, A, generator=g) - 0.2  # some negatives, for clamp_att_negative
    w2v = torch.randn(A, D, generator=g)
    features = torch.rand(batch, F_DIM, H, W, generator=g)  # post-ReLU-like, non-negative
    labels = SEEN[torch.randint(0, len(SEEN), (batch,), generator=g)]
    return att, w2v, features, labels


def make_head(cfg: HeadConfig | None = None, seed: int = 0, w2v="default", randomize=True) -> MSDN:
    """A head whose zero-initialised weights are replaced by small random ones (at the released
    init W_2 = W_1_1 = W_2_1 = 0, so several gradients are exactly zero)."""
    att, default_w2v, _, _ = tiny_inputs(seed)
    torch.manual_seed(seed)
    head = MSDN(cfg or HeadConfig(), att, default_w2v if w2v == "default" else w2v,
                SEEN, UNSEEN, F_DIM)
    if randomize:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name in ("W_2", "W_1_1", "W_2_1"):
                p = getattr(head, name)
                if p is not None:
                    p.copy_(torch.randn(p.shape, generator=g))
    return head
