"""MSDN++ heads (SPEC.md §4-5): attribute→visual (AVA) and visual→attribute (VAA) attention
sub-nets over cached region features, with semantic distillation and causal attention.

Speed by design. Every attribute x region product of both sub-nets is one row of the stacked
(4A, f) matrix [V W_2; V W_1; V W_1_1^T; V W_2_1] (built once per step: it is shared by all
images) times a region feature, so the whole head is ONE large GEMM (4A, f) @ (f, B*R) per batch,
plus small elementwise work on (A, B, R) blocks. The features are laid out (f, B*R) by a single
copy that also casts and L2-normalises them. Nothing in forward/loss synchronises with the host.
Precision: under autocast only the projection GEMM runs in the low precision; softmaxes,
attention-weighted sums, class scores and losses run in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from heads import losses
from heads.config import HeadConfig
from heads.counterfactual import counterfactual_attention


@dataclass
class HeadOutput:
    s1: torch.Tensor | None  # (B, C) AVA class scores, biased (+bias unseen, -bias seen)
    s2: torch.Tensor | None  # (B, C) VAA class scores, biased
    psi: torch.Tensor | None  # (B, A) AVA attribute scores
    omega: torch.Tensor | None  # (B, A) VAA attribute scores
    beta: torch.Tensor | None  # (B, A, R) AVA attention, sums to 1 over regions (a strided view)
    alpha: torch.Tensor | None  # (B, A, R) VAA attention, sums to 1 over attributes (a view)
    s1_eff: torch.Tensor | None = None  # (B, C) causal effect (s1 - b) - s1_bar, unbiased
    s2_eff: torch.Tensor | None = None


def _compute_dtype(device: torch.device, param_dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return param_dtype


def regions_channels_first(features: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, f, R) features -> (f, B*R) in `dtype`, each region L2-normalised over channels.
    One pass: the cast, the normalisation and the transpose happen in the same copy. Norms are
    taken in float32 (a float16 sum of 2048 squares can overflow)."""
    B, f, R = features.shape
    inv_norm = torch.linalg.vector_norm(features, dim=1, keepdim=True, dtype=torch.float32)
    inv_norm = inv_norm.clamp_min_(1e-12).reciprocal_()  # F.normalize's eps
    out = torch.empty((f, B, R), dtype=dtype, device=features.device)
    torch.mul(features, inv_norm, out=out.permute(1, 0, 2))
    return out.view(f, B * R)


class MSDN(nn.Module):
    def __init__(self, cfg: HeadConfig, att: torch.Tensor, w2v: torch.Tensor | None,
                 seen_classes: torch.Tensor, unseen_classes: torch.Tensor, feature_dim: int):
        super().__init__()
        att = torch.as_tensor(att, dtype=torch.float32)
        if att.dim() != 2:
            raise ValueError(f"MSDN: att must be (classes, attributes), got shape {tuple(att.shape)}")
        num_classes, num_att = att.shape
        seen = torch.as_tensor(seen_classes, dtype=torch.long).flatten()
        unseen = torch.as_tensor(unseen_classes, dtype=torch.long).flatten()
        for name, idx in (("seen_classes", seen), ("unseen_classes", unseen)):
            if idx.numel() and (idx.min() < 0 or idx.max() >= num_classes):
                raise ValueError(f"MSDN: {name} out of range for {num_classes} classes")
        if unseen.numel() == 0:
            raise ValueError("MSDN: unseen_classes is empty (self-calibration needs unseen classes)")
        if feature_dim <= 0:
            raise ValueError(f"MSDN: feature_dim must be positive, got {feature_dim}")
        self.cfg = cfg
        self.feature_dim = int(feature_dim)

        if cfg.clamp_att_negative:
            att = att.clamp_min(0)
        self.register_buffer("Z", F.normalize(att, dim=1))  # (C, A), frozen class semantics
        if w2v is None:  # FLO/APY: no word vectors, learn V from N(0, 1) (always trainable)
            self.V = nn.Parameter(torch.randn(num_att, cfg.w2v_dim))
        else:
            w2v = torch.as_tensor(w2v, dtype=torch.float32)
            if w2v.dim() != 2 or w2v.shape[0] != num_att:
                raise ValueError(f"MSDN: w2v must be ({num_att}, D) to match att, "
                                 f"got shape {tuple(w2v.shape)}")
            self.V = nn.Parameter(F.normalize(w2v, dim=1), requires_grad=cfg.trainable_v)
        dim_v = self.V.shape[1]
        # Same creation order and inits as the released code, so a seed gives the same W_1.
        self.use_ava = cfg.subnets in ("both", "ava")
        self.use_vaa = cfg.subnets in ("both", "vaa")
        self.W_1 = nn.Parameter(torch.randn(dim_v, feature_dim)) if self.use_ava else None
        self.W_2 = nn.Parameter(torch.zeros(dim_v, feature_dim)) if self.use_ava else None
        self.W_1_1 = nn.Parameter(torch.zeros(feature_dim, dim_v)) if self.use_vaa else None
        self.W_2_1 = nn.Parameter(torch.zeros(dim_v, feature_dim)) if self.use_vaa else None

        score_bias = torch.full((num_classes,), float(cfg.bias))
        score_bias[seen] = -float(cfg.bias)
        self.register_buffer("score_bias", score_bias)
        self.register_buffer("seen_classes", seen)
        self.register_buffer("unseen_classes", unseen)

    @property
    def num_attributes(self) -> int:
        return self.Z.shape[1]

    def _stacked_weights(self) -> list[torch.Tensor]:
        """The (D, f) maps whose products with V give [attention logits, scores] per sub-net."""
        ws = []
        if self.use_ava:
            ws += [self.W_2, self.W_1]
        if self.use_vaa:
            ws += [self.W_2_1, self.W_1_1.t()]
        return ws

    def _use_embedding_route(self, n_cols: int) -> bool:
        route = self.cfg.matmul_route
        if route != "auto":
            return route == "embedding"
        A, D, f = self.num_attributes, self.V.shape[1], self.feature_dim
        via_attributes = A * f * (n_cols + D)  # build (kA, f), then (kA, f) @ (f, N)
        via_embedding = D * f * n_cols + A * D * n_cols  # (kD, f) @ (f, N), then V @ (D, N)
        return via_embedding < via_attributes

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """(f, N) normalised features -> (k, A, N): v_i^T W f for every stacked W, one big GEMM."""
        V = F.normalize(self.V, dim=1) if self.cfg.normalize_v else self.V
        ws = self._stacked_weights()
        k, n_cols = len(ws), x.shape[1]
        if self._use_embedding_route(n_cols):
            y = torch.mm(torch.cat(ws, 0).to(x.dtype), x)  # (kD, N)
            return torch.matmul(V.to(x.dtype), y.view(k, -1, n_cols))
        # (kA, f), shared by the batch: one (A, D) @ (D, k*f) GEMM instead of k small ones.
        A, f = V.shape[0], x.shape[0]
        proj = torch.mm(V, torch.cat(ws, 1)).view(A, k, f).transpose(0, 1).reshape(k * A, f)
        return torch.mm(proj.to(x.dtype), x).view(k, A, n_cols)

    def _scores(self, attribute_scores: torch.Tensor) -> torch.Tensor:
        """(A, B) attribute scores -> (B, C) class scores Z psi, float32 even under autocast."""
        with torch.autocast(attribute_scores.device.type, enabled=False):
            z = self.Z if attribute_scores.dtype == self.Z.dtype else self.Z.to(attribute_scores.dtype)
            return torch.mm(attribute_scores.t(), z.t())

    def forward(self, features: torch.Tensor, counterfactual: bool = False) -> HeadOutput:
        """features (B, f, H, W) or (B, f, R), any float dtype. With counterfactual=True and
        cfg.lambda_causal > 0 the causal effects s1_eff/s2_eff are computed too; with
        lambda_causal == 0 that branch is skipped, so no random numbers are drawn."""
        if features.dim() == 4:
            features = features.flatten(2)
        if features.dim() != 3 or features.shape[1] != self.feature_dim:
            raise ValueError(f"MSDN: features must be (B, {self.feature_dim}, H, W) or "
                             f"(B, {self.feature_dim}, R), got {tuple(features.shape)}")
        B, _, R = features.shape
        dtype = _compute_dtype(features.device, self.V.dtype)
        blocks = self._project(regions_channels_first(features, dtype)).unflatten(-1, (B, R))
        do_causal = counterfactual and self.cfg.lambda_causal > 0
        out = HeadOutput(None, None, None, None, None, None)
        # Physical layout is (A, B, R) per block; outputs are (B, ...) views of it.
        # unbind, not indexing: its backward writes one stacked gradient instead of a zero-filled
        # full-size gradient per block (4x the memory traffic).
        blocks = list(blocks.unbind(0))
        if self.use_ava:
            logits, region_scores = blocks.pop(0), blocks.pop(0)
            beta = F.softmax(logits, dim=2, dtype=torch.float32)  # over regions
            psi = (beta * region_scores).sum(2)  # (A, B): v_i^T W_1 F_i
            out.s1 = self._scores(psi) + self.score_bias
            out.psi, out.beta = psi.t(), beta.permute(1, 0, 2)
            if do_causal:
                beta_bar = counterfactual_attention(self.cfg.counterfactual, logits, beta, 2, 1)
                out.s1_eff = self._scores(psi - (beta_bar * region_scores).sum(2))
        if self.use_vaa:
            logits, region_scores = blocks.pop(0), blocks.pop(0)
            alpha = F.softmax(logits, dim=0, dtype=torch.float32)  # over attributes, per region
            omega = (alpha * region_scores).sum(2)  # (A, B)
            out.s2 = self._scores(omega) + self.score_bias
            out.omega, out.alpha = omega.t(), alpha.permute(1, 0, 2)
            if do_causal:
                alpha_bar = counterfactual_attention(self.cfg.counterfactual, logits, alpha, 0, 1)
                out.s2_eff = self._scores(omega - (alpha_bar * region_scores).sum(2))
        return out

    def fused_scores(self, out: HeadOutput) -> torch.Tensor:
        """Inference scores w1*s1 + w2*s2 (biased: the ±bias is a calibration margin of 2*bias in
        favour of unseen classes). A single-sub-net head returns that sub-net's scores."""
        if out.s1 is None:
            return out.s2
        if out.s2 is None:
            return out.s1
        w1, w2 = self.cfg.fusion
        return w1 * out.s1 + w2 * out.s2

    def loss(self, out: HeadOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"loss": differentiable total} plus every term (detached) for logging.
        L = sum_k [CE_k + lambda_cal cal_k + lambda_causal causal_k] + lambda_distill distill."""
        cfg = self.cfg
        causal = cfg.lambda_causal > 0
        terms, total = {}, 0.0
        for k, s, s_eff in ((1, out.s1, out.s1_eff), (2, out.s2, out.s2_eff)):
            if s is None:
                continue
            terms[f"ce_{k}"] = losses.cross_entropy_all_classes(s - self.score_bias, labels)
            terms[f"cal_{k}"] = losses.self_calibration(s, self.unseen_classes)
            total = total + terms[f"ce_{k}"] + cfg.lambda_cal * terms[f"cal_{k}"]
            if causal:
                if s_eff is None:
                    raise ValueError("MSDN.loss: lambda_causal > 0 needs the causal effects: "
                                     "call forward(features, counterfactual=True)")
                terms[f"causal_{k}"] = losses.cross_entropy_all_classes(s_eff, labels)
                total = total + cfg.lambda_causal * terms[f"causal_{k}"]
        if out.s1 is not None and out.s2 is not None:
            if cfg.distill == "released":
                terms.update(losses.distillation_released(out.s1, out.s2))
            else:
                terms.update(losses.distillation_paper(out.s1, out.s2, out.psi, out.omega))
            total = total + cfg.lambda_distill * terms["distill"]
        result = {name: value.detach() for name, value in terms.items()}
        result["loss"] = total
        return result
