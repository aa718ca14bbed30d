"""Shape / no-NaN / gradient / determinism over a registry of head configurations, and the fused
head against the straightforward einsum reference (heads/reference.py)."""
import pytest
import torch

from heads import losses
from heads.config import HeadConfig
from heads.reference import ReferenceMSDN
from tests.fixtures.heads import F_DIM, A, C, H, W, make_head, tiny_inputs

# name -> (HeadConfig overrides, feature layout, input dtype, no word vectors)
REGISTRY = {
    "msdn": ({}, "4d", torch.float32, False),
    "msdn-3d": ({}, "3d", torch.float32, False),
    "msdn-float16-input": ({}, "4d", torch.float16, False),
    "msdn-bfloat16-input": ({}, "4d", torch.bfloat16, False),
    "paper-distill": ({"distill": "paper"}, "4d", torch.float32, False),
    "ava-only": ({"subnets": "ava"}, "4d", torch.float32, False),
    "vaa-only": ({"subnets": "vaa"}, "3d", torch.float32, False),
    "awa2-style": ({"normalize_v": True, "clamp_att_negative": True}, "4d", torch.float32, False),
    "no-word-vectors": ({"w2v_dim": 6}, "4d", torch.float32, True),
    "embedding-route": ({"matmul_route": "embedding"}, "4d", torch.float32, False),
    "frozen-v": ({"trainable_v": False}, "4d", torch.float32, False),
    **{f"causal-{kind}": ({"lambda_causal": 0.5, "counterfactual": kind}, "4d", torch.float32,
                          False) for kind in ("random", "uniform", "reversed", "shuffle")},
    "causal-paper-3d-float16": ({"lambda_causal": 1.0, "distill": "paper"}, "3d", torch.float16,
                                False),
}


def run(name, seed=0, batch=4):
    overrides, layout, dtype, no_w2v = REGISTRY[name]
    head = make_head(HeadConfig(**overrides), seed=seed, w2v=None if no_w2v else "default")
    _, _, features, labels = tiny_inputs(seed, batch)
    if layout == "3d":
        features = features.flatten(2)
    torch.manual_seed(seed + 100)
    out = head(features.to(dtype), counterfactual=True)
    return head, out, head.loss(out, labels)


@pytest.mark.parametrize("name", REGISTRY)
def test_shapes_and_finite(name):
    head, out, terms = run(name)
    ava, vaa = head.use_ava, head.use_vaa
    causal = head.cfg.lambda_causal > 0
    for field, present, shape in [("s1", ava, (4, C)), ("s2", vaa, (4, C)), ("psi", ava, (4, A)),
                                  ("omega", vaa, (4, A)), ("beta", ava, (4, A, H * W)),
                                  ("alpha", vaa, (4, A, H * W)), ("s1_eff", ava and causal, (4, C)),
                                  ("s2_eff", vaa and causal, (4, C))]:
        value = getattr(out, field)
        assert (value is not None) == present, field
        if present:
            assert value.shape == shape and value.dtype == torch.float32, field
            assert torch.isfinite(value).all(), field
    assert head.fused_scores(out).shape == (4, C)
    assert all(torch.isfinite(v).all() for v in terms.values())
    assert terms["loss"].dim() == 0 and terms["loss"].requires_grad


@pytest.mark.parametrize("name", REGISTRY)
def test_gradients_reach_every_trainable_parameter(name):
    head, _, terms = run(name)
    terms["loss"].backward()
    trainable = {n: p for n, p in head.named_parameters() if p.requires_grad}
    expected = ({"W_1", "W_2"} if head.use_ava else set()) | ({"W_1_1", "W_2_1"} if head.use_vaa
                                                              else set())
    assert expected <= set(trainable)
    assert ("V" in trainable) == (head.cfg.trainable_v or REGISTRY[name][3])
    for pname, p in trainable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", REGISTRY)
def test_deterministic_under_a_seed(name):
    _, out_a, terms_a = run(name)
    _, out_b, terms_b = run(name)
    assert torch.equal(out_a.s1 if out_a.s1 is not None else out_a.s2,
                       out_b.s1 if out_b.s1 is not None else out_b.s2)
    for key in terms_a:
        assert torch.equal(terms_a[key], terms_b[key]), key


@pytest.mark.parametrize("variant", ["released", "paper"])
def test_distillation_alone_trains_both_subnets(variant):
    head = make_head(HeadConfig(distill=variant))
    _, _, features, _ = tiny_inputs()
    out = head(features)
    if variant == "released":
        losses.distillation_released(out.s1, out.s2)["distill"].backward()
    else:
        losses.distillation_paper(out.s1, out.s2, out.psi, out.omega)["distill"].backward()
    for name in ("W_1", "W_2", "W_1_1", "W_2_1", "V"):
        assert getattr(head, name).grad.abs().sum() > 0, name


def reference_pair(seed, route="attributes", **cfg):
    head = make_head(HeadConfig(matmul_route=route, **cfg), seed=seed)
    return head, ReferenceMSDN(head)


@pytest.mark.parametrize("route", ["attributes", "embedding"])
@pytest.mark.parametrize("normalize_v", [False, True])
def test_fused_head_matches_einsum_reference(route, normalize_v):
    head, ref = reference_pair(3, route, normalize_v=normalize_v, lambda_cal=0.2, lambda_distill=0.05)
    _, _, features, labels = tiny_inputs(3, batch=6)
    out = head(features)
    s1, s2 = ref(features)
    torch.testing.assert_close(out.s1, s1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.s2, s2, rtol=1e-5, atol=1e-5)
    terms, ref_terms = head.loss(out, labels), ref.loss(s1, s2, labels)
    for key, value in ref_terms.items():
        torch.testing.assert_close(terms[key], value.detach(), rtol=1e-5, atol=1e-6, msg=key)
    terms["loss"].backward()
    ref_terms["loss"].backward()
    for name in ("V", "W_1", "W_2", "W_1_1", "W_2_1"):
        torch.testing.assert_close(getattr(head, name).grad, getattr(ref, name).grad,
                                   rtol=1e-4, atol=1e-6, msg=name)


def test_lambda_causal_zero_reproduces_msdn_exactly():
    _, _, features, labels = tiny_inputs(4)
    results = []
    for counterfactual in (False, True):
        head, ref = reference_pair(4, counterfactual="random", lambda_causal=0.0)
        state = torch.get_rng_state()
        out = head(features, counterfactual=counterfactual)
        terms = head.loss(out, labels)
        assert torch.equal(state, torch.get_rng_state())  # no random numbers drawn
        assert out.s1_eff is None and out.s2_eff is None
        assert not any(key.startswith("causal") for key in terms)
        terms["loss"].backward()
        results.append((terms, {n: p.grad.clone() for n, p in head.named_parameters()}))
        s1, s2 = ref(features)
        ref_terms = ref.loss(s1, s2, labels)
        torch.testing.assert_close(terms["loss"], ref_terms["loss"].detach(), rtol=1e-6, atol=1e-6)
    (terms_a, grads_a), (terms_b, grads_b) = results
    assert all(torch.equal(terms_a[k], terms_b[k]) for k in terms_a)
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)


def test_bfloat16_autocast_scores_close_to_float32():
    torch.manual_seed(0)
    head = make_head(HeadConfig(), seed=5)
    features = torch.rand(8, F_DIM, H, W)
    with torch.no_grad():
        exact = head(features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = head(features)
    for name in ("s1", "s2", "psi", "omega"):
        a, b = getattr(exact, name), getattr(low, name)
        assert b.dtype == torch.float32  # everything after the projection GEMM stays float32
        scale = a.abs().max().item()
        assert (a - b).abs().max().item() < 2e-2 * scale, name
    assert (exact.beta - low.beta).abs().max().item() < 2e-2
