"""MSDN++ heads (docs/method.md): attribute→visual (AVA) and visual→attribute (VAA) attention
sub-nets over cached region features, with semantic distillation and causal attention.

Speed by design. Every attribute x region product of both sub-nets is an entry of the stacked
(4A, f) matrix P = [V W_2; V W_1; V W_1_1^T; V W_2_1] (built once per step: it is shared by all
images) times a region feature, so the whole head is ONE large GEMM (B*R, f) @ (f, 4A) per batch,
plus small elementwise work on (B, R, A) blocks. Regions are rows (heads/regions.py): a batch
gathered from a resident RegionBank is already in that layout and normalised. Nothing in
forward/loss synchronises with the host. Precision: under autocast only the projection GEMMs run
in the low precision; softmaxes, attention-weighted sums, class scores and losses run in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from heads import losses
from heads.config import HeadConfig
from heads.counterfactual import counterfactual_attention
from heads.regions import Regions, prepare_regions


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
    psi_eff: torch.Tensor | None = None  # (B, A) attribute-level effect psi - psi_bar
    omega_eff: torch.Tensor | None = None  # (B, A) omega - omega_bar


def _compute_dtype(device: torch.device, param_dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return param_dtype


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

    def _use_embedding_route(self, n_rows: int) -> bool:
        route = self.cfg.matmul_route
        if route != "auto":
            return route == "embedding"
        A, D, f = self.num_attributes, self.V.shape[1], self.feature_dim
        via_attributes = A * f * (n_rows + D)  # build P (kA, f), then (N, f) @ (f, kA)
        via_embedding = D * f * n_rows + A * D * n_rows  # (N, f) @ (f, kD), then V per block
        return via_embedding < via_attributes

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """(N, f) unit-length regions -> (N, k, A): v_i^T W f_r for every stacked W.
        "attributes" route: P (kA, f) is one (A, D) @ (D, k*f) GEMM, then ONE big (N, f) @ (f, kA).
        "embedding" route (many attributes, e.g. FLO): (N, f) @ (f, kD), then V on each block."""
        V = F.normalize(self.V, dim=1) if self.cfg.normalize_v else self.V
        ws = self._stacked_weights()
        k, n_rows, f = len(ws), x.shape[0], x.shape[1]
        if self._use_embedding_route(n_rows):
            y = torch.mm(x, torch.cat(ws, 0).to(x.dtype).t())  # (N, kD)
            return torch.matmul(y.view(n_rows, k, -1), V.to(x.dtype).t())
        A = V.shape[0]
        proj = torch.mm(V, torch.cat(ws, 1)).view(A, k, f).transpose(0, 1).reshape(k * A, f)
        return torch.mm(x, proj.to(x.dtype).t()).view(n_rows, k, A)

    def _scores(self, attribute_scores: list[torch.Tensor]) -> torch.Tensor:
        """[(B, A)] attribute scores -> (K, B, C) class scores Z psi in one matmul, float32 even
        under autocast (the matmul is tiny; the scores decide the argmax)."""
        with torch.autocast(self.Z.device.type, enabled=False):
            return torch.matmul(torch.stack(attribute_scores).float(), self.Z.float().t())

    def forward(self, features: torch.Tensor | Regions, counterfactual: bool = False) -> HeadOutput:
        """features: (B, f, H, W) or (B, f, R) maps of any float dtype, or Regions (e.g. from a
        RegionBank). With counterfactual=True and cfg.lambda_causal > 0 the causal effects
        s1_eff/s2_eff are computed too; with lambda_causal == 0 that branch is skipped, so no
        random numbers are drawn."""
        if isinstance(features, torch.Tensor):
            if features.dim() not in (3, 4) or features.shape[1] != self.feature_dim:
                raise ValueError(f"MSDN: features must be (B, {self.feature_dim}, H, W) or "
                                 f"(B, {self.feature_dim}, R), got {tuple(features.shape)}")
            dtype = _compute_dtype(features.device, self.V.dtype)
            features = prepare_regions(features, dtype)
        elif features.feature_dim != self.feature_dim:
            raise ValueError(f"MSDN: regions have {features.feature_dim} channels, "
                             f"the head expects {self.feature_dim}")
        x, B, R = features.rows, features.batch, features.regions
        dtype = _compute_dtype(x.device, self.V.dtype)
        # unbind, not indexing: its backward writes one stacked gradient instead of a zero-filled
        # full-size gradient per block. Blocks are (B, R, A) views; outputs (B, A, R) views.
        blocks = list(self._project(x.to(dtype)).view(B, R, -1, self.num_attributes).unbind(2))
        do_causal = counterfactual and self.cfg.lambda_causal > 0
        out = HeadOutput(None, None, None, None, None, None)
        attribute_scores = []  # per present sub-net, stacked for one matmul
        if self.use_ava:
            logits, region_scores = blocks.pop(0), blocks.pop(0)
            beta = F.softmax(logits, dim=1, dtype=torch.float32)  # over regions
            out.psi = (beta * region_scores).sum(1)  # (B, A): v_i^T W_1 F_i
            out.beta = beta.transpose(1, 2)
            attribute_scores.append(out.psi)
            if do_causal and self.causal_subnet(1):
                out.psi_eff = self._effect(out.psi, logits, beta, region_scores, attn_dim=1)
        if self.use_vaa:
            logits, region_scores = blocks.pop(0), blocks.pop(0)
            alpha = F.softmax(logits, dim=2, dtype=torch.float32)  # over attributes, per region
            out.omega = (alpha * region_scores).sum(1)  # (B, A)
            out.alpha = alpha.transpose(1, 2)
            attribute_scores.append(out.omega)
            if do_causal and self.causal_subnet(2):
                out.omega_eff = self._effect(out.omega, logits, alpha, region_scores, attn_dim=2)
        scores = (self._scores(attribute_scores) + self.score_bias).unbind(0)
        if self.use_ava:
            out.s1 = scores[0]
        if self.use_vaa:
            out.s2 = scores[-1]
        effects = [e for e in (out.psi_eff, out.omega_eff) if e is not None]
        if effects:
            class_effects = iter(self._scores(effects).unbind(0))
            out.s1_eff = next(class_effects) if out.psi_eff is not None else None
            out.s2_eff = next(class_effects) if out.omega_eff is not None else None
        return out

    def causal_subnet(self, k: int) -> bool:
        """Whether sub-net k (1 = AVA, 2 = VAA) is present and gets the causal term."""
        present = self.use_ava if k == 1 else self.use_vaa
        return present and self.cfg.causal_subnets in ("both", "ava" if k == 1 else "vaa")

    def _effect(self, factual: torch.Tensor, logits: torch.Tensor, attention: torch.Tensor,
                region_scores: torch.Tensor, attn_dim: int) -> torch.Tensor:
        """Attribute-level effect of the learned attention: factual scores minus the scores under
        the counterfactual attention (same region scores). causal_grad = "factual" makes the
        counterfactual scores a constant baseline, so only the factual branch learns from it."""
        cfg = self.cfg
        bar = counterfactual_attention(cfg.counterfactual, logits, attention, attn_dim, 0, cfg.remove_k)
        baseline = (bar * region_scores).sum(1)
        return factual - (baseline.detach() if cfg.causal_grad == "factual" else baseline)

    def fused_scores(self, out: HeadOutput) -> torch.Tensor:
        """Inference scores w1*s1 + w2*s2 (biased: the ±bias is a calibration margin of 2*bias in
        favour of unseen classes). A single-sub-net head returns that sub-net's scores."""
        if out.s1 is None:
            return out.s2
        if out.s2 is None:
            return out.s1
        w1, w2 = self.cfg.fusion
        return w1 * out.s1 + w2 * out.s2

    def loss(self, out: HeadOutput, labels: torch.Tensor, causal_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """{"loss": differentiable total} plus every term (detached) for logging.
        L = sum_k [CE_k + lambda_cal cal_k + lambda_causal causal_k] + lambda_distill distill.
        The sub-nets' scores are stacked so each loss kernel runs once for both. `causal_scale`
        multiplies the causal weights (the engine's warm-up and ramp, HeadConfig.causal_scale)."""
        cfg = self.cfg
        present = [(k, s) for k, s in ((1, out.s1), (2, out.s2)) if s is not None]
        names = [k for k, _ in present]
        scores = torch.stack([s.float() for _, s in present])  # (K, B, C), biased
        log_p = F.log_softmax(scores, dim=-1)
        per_subnet = {"ce": losses.cross_entropy_all_classes(scores - self.score_bias, labels),
                      "cal": losses.self_calibration(scores, self.unseen_classes, log_p)}
        total = per_subnet["ce"].sum() + cfg.lambda_cal * per_subnet["cal"].sum()
        terms = {f"{name}_{k}": values[i] for name, values in per_subnet.items()
                 for i, k in enumerate(names)}
        if cfg.lambda_causal > 0 and causal_scale > 0:
            total = total + self._causal_loss(out, labels, causal_scale, terms)
        if len(present) == 2:
            if cfg.distill == "released":
                terms.update(losses.distillation_released(out.s1, out.s2, log_p))
            else:
                terms.update(losses.distillation_paper(out.s1, out.s2, out.psi, out.omega, log_p))
            total = total + cfg.lambda_distill * terms["distill"]
        result = {name: value.detach() for name, value in terms.items()}
        result["loss"] = total
        return result

    def _causal_loss(self, out: HeadOutput, labels: torch.Tensor, scale: float, terms: dict) -> torch.Tensor:
        """Weighted causal terms of the sub-nets that get them; each term is added to `terms`.
        class level: CE of the class-score effect (over all classes, or the seen ones);
        attribute level: the attribute-score effect made to reproduce the true class's attribute
        vector, both standardised per attribute over the batch (losses.attribute_effect)."""
        cfg = self.cfg
        keys = [k for k in (1, 2) if self.causal_subnet(k)]
        effects = {1: (out.s1_eff, out.psi_eff), 2: (out.s2_eff, out.omega_eff)}
        needed = [0] * (cfg.causal_level != "attribute") + [1] * (cfg.causal_level != "class")
        if not keys or any(effects[k][i] is None for k in keys for i in needed):
            raise ValueError("MSDN.loss: lambda_causal > 0 needs the causal effects: "
                             "call forward(features, counterfactual=True)")
        total = 0.0
        if cfg.causal_level in ("class", "both"):
            class_effect = torch.stack([effects[k][0].float() for k in keys])
            if cfg.causal_classes == "seen":
                values = losses.cross_entropy_subset(class_effect, labels, self.seen_classes)
            else:
                values = losses.cross_entropy_all_classes(class_effect, labels)
            terms.update({f"causal_{k}": values[i] for i, k in enumerate(keys)})
            weight = cfg.lambda_causal if scale == 1.0 else cfg.lambda_causal * scale
            total = total + weight * values.sum()
        if cfg.causal_level in ("attribute", "both"):
            attribute_effect = torch.stack([effects[k][1].float() for k in keys])
            values = losses.attribute_effect(attribute_effect, self.Z[labels])
            terms.update({f"causal_att_{k}": values[i] for i, k in enumerate(keys)})
            weight = (cfg.lambda_causal_attribute or cfg.lambda_causal) if cfg.causal_level == "both" \
                else cfg.lambda_causal
            total = total + weight * scale * values.sum()
        return total
