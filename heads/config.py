"""Hyper-parameters of the MSDN++ heads (docs/method.md) as one plain dataclass."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

SUBNETS = ("both", "ava", "vaa")
COUNTERFACTUALS = ("random", "uniform", "reversed", "shuffle", "remove")
# MSDN++ causal switches (docs/method.md, "Causal attention"); the first value of each is the default
CAUSAL_GRADS = ("all", "factual")        # factual: the counterfactual branch is a constant baseline
CAUSAL_CLASSES = ("all", "seen")         # seen: the effect's cross-entropy over training classes only
CAUSAL_LEVELS = ("class", "attribute", "both")
DISTILLS = ("released", "paper")
# "attributes": project the features with the stacked (4A, f) matrix; "embedding": project with the
# stacked (4D, f) weights first and apply V after; "auto" picks the route with fewer FLOPs (the xlsa17
# datasets: CUB/SUN/AWA2 take "attributes", FLO with its 1024 attributes takes "embedding").
MATMUL_ROUTES = ("auto", "attributes", "embedding")


@dataclass
class HeadConfig:
    lambda_cal: float = 0.1
    lambda_distill: float = 0.001
    lambda_causal: float = 0.0  # 0 reproduces MSDN exactly (no counterfactual work, no RNG draws)
    counterfactual: str = "random"
    remove_k: int = 1  # counterfactual "remove": how many top-attended regions / attributes go
    causal_grad: str = "all"
    causal_classes: str = "all"
    causal_level: str = "class"
    lambda_causal_attribute: float = 0.0  # causal_level "both": the attribute term's weight (0: lambda_causal)
    causal_subnets: str = "both"  # which sub-nets get the causal term
    causal_warmup: int = 0  # steps of plain MSDN before the causal term starts
    causal_ramp: int = 0  # then steps over which its weight rises linearly to lambda_causal
    distill: str = "released"
    bias: float = 1.0  # +bias on unseen, -bias on seen class scores (fixed calibration margin)
    normalize_v: bool = False  # AWA2 recipe: re-normalise V rows at every forward
    trainable_v: bool = True
    fusion: tuple[float, float] = (0.9, 0.1)
    subnets: str = "both"
    w2v_dim: int = 300  # only used when no word vectors exist (FLO/APY): V ~ N(0,1), trainable
    clamp_att_negative: bool = False  # AWA2 recipe: clamp negative attributes to 0 before L2-norm
    matmul_route: str = "auto"

    def __post_init__(self) -> None:
        self.fusion = tuple(float(w) for w in self.fusion)
        checks = [
            (self.subnets in SUBNETS, f"subnets must be one of {SUBNETS}, got {self.subnets!r}"),
            (self.counterfactual in COUNTERFACTUALS,
             f"counterfactual must be one of {COUNTERFACTUALS}, got {self.counterfactual!r}"),
            (self.distill in DISTILLS, f"distill must be one of {DISTILLS}, got {self.distill!r}"),
            (self.matmul_route in MATMUL_ROUTES,
             f"matmul_route must be one of {MATMUL_ROUTES}, got {self.matmul_route!r}"),
            (len(self.fusion) == 2, f"fusion must be two weights (w1, w2), got {self.fusion!r}"),
            (self.causal_grad in CAUSAL_GRADS,
             f"causal_grad must be one of {CAUSAL_GRADS}, got {self.causal_grad!r}"),
            (self.causal_classes in CAUSAL_CLASSES,
             f"causal_classes must be one of {CAUSAL_CLASSES}, got {self.causal_classes!r}"),
            (self.causal_level in CAUSAL_LEVELS,
             f"causal_level must be one of {CAUSAL_LEVELS}, got {self.causal_level!r}"),
            (self.causal_subnets in SUBNETS,
             f"causal_subnets must be one of {SUBNETS}, got {self.causal_subnets!r}"),
            (self.w2v_dim > 0, f"w2v_dim must be positive, got {self.w2v_dim}"),
            (self.remove_k > 0, f"remove_k must be positive, got {self.remove_k}"),
            (min(self.causal_warmup, self.causal_ramp) >= 0, "causal_warmup and causal_ramp must be >= 0"),
            (all(math.isfinite(v) and v >= 0 for v in (self.lambda_cal, self.lambda_distill, self.lambda_causal,
                                                       self.lambda_causal_attribute)),
             "lambda_cal, lambda_distill, lambda_causal and lambda_causal_attribute must be finite numbers >= 0, got "
             f"{self.lambda_cal!r}, {self.lambda_distill!r}, {self.lambda_causal!r}, {self.lambda_causal_attribute!r}"),
            (math.isfinite(self.bias), f"bias must be a finite number, got {self.bias!r}"),
            (all(math.isfinite(w) for w in self.fusion), f"fusion weights must be finite numbers, got {self.fusion!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"HeadConfig: {message}")

    def causal_scale(self, step: int) -> float:
        """Share of lambda_causal in force at training step `step` (1-based): 0 during the warm-up,
        then a linear ramp to 1 over causal_ramp steps. 0 whenever lambda_causal is 0."""
        if self.lambda_causal <= 0 or step <= self.causal_warmup:
            return 0.0
        if self.causal_ramp <= 0:
            return 1.0
        return min(1.0, (step - self.causal_warmup) / self.causal_ramp)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fusion"] = list(self.fusion)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"HeadConfig: unknown keys {unknown}")
        return cls(**d)
