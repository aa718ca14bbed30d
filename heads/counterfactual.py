"""Counterfactual attention for the causal intervention of MSDN++ (docs/method.md, after CAL).

The learned attention is replaced by a counterfactual one while the region scores stay the same;
training the difference ("effect") rewards attention that beats the counterfactual. The functions
work on any tensor layout: `attn_dim` is the axis the attention is normalised over (regions for AVA,
attributes for VAA), `batch_dim` the image axis.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from heads.config import COUNTERFACTUALS


def counterfactual_attention(kind: str, logits: torch.Tensor, attention: torch.Tensor,
                             attn_dim: int, batch_dim: int, remove_k: int = 1) -> torch.Tensor:
    """Counterfactual version of `attention` (same shape), float32.

    - random:   u / n with u ~ U(0, 2) per entry (n = size of the attention axis): CAL's default;
                the expectation is the uniform attention.
    - uniform:  1 / n everywhere (a broadcast view, no memory).
    - reversed: softmax of the negated logits: attends where the learned attention does not.
    - shuffle:  the attention of another image of the batch: image b takes image b-1's map
                (a roll by one along the batch, fixed so it needs no random numbers; a batch of one
                gets its own map back, so the effect is zero there).
    - remove:   the learned attention with its `remove_k` most-attended entries masked out and the
                rest renormalised (a softmax of the logits without them): "what if this cue were
                gone". At least one entry is always kept.
    The counterfactual is an intervention, a constant: no gradient flows through it (reversed and
    shuffle are detached), gradients reach the model only through the region scores it weights.
    """
    n = attention.shape[attn_dim]
    if kind == "random":
        # Draw in the canonical (batch, attention-axis, other) order so the numbers for a given
        # seed do not depend on the head's internal memory layout.
        other = 3 - attn_dim - batch_dim
        order = (batch_dim, attn_dim, other)
        shape = [attention.shape[d] for d in order]
        u = torch.rand(shape, device=attention.device, dtype=torch.float32)
        inverse = [order.index(d) for d in range(3)]
        return u.permute(inverse).mul_(2.0 / n)
    if kind == "uniform":
        return attention.new_full((), 1.0 / n, dtype=torch.float32).expand(attention.shape)
    if kind == "reversed":
        return F.softmax(-logits.detach(), dim=attn_dim, dtype=torch.float32)
    if kind == "shuffle":
        return attention.detach().roll(1, dims=batch_dim)
    if kind == "remove":
        k = min(int(remove_k), n - 1)
        top = attention.detach().topk(k, dim=attn_dim).indices
        masked = logits.detach().float().scatter(attn_dim, top, float("-inf"))
        return F.softmax(masked, dim=attn_dim)
    raise ValueError(f"counterfactual must be one of {COUNTERFACTUALS}, got {kind!r}")
