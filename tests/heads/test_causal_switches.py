"""The MSDN++ causal switches (heads/config.py) on tiny hand-computed cases: which tensors carry
gradient under causal_grad=factual, the seen-only cross-entropy, the attribute-level effect, the
"remove" counterfactual, per-sub-net causal terms and the warm-up schedule."""
import math

import pytest
import torch

from heads import losses
from heads.config import HeadConfig
from heads.counterfactual import counterfactual_attention
from tests.fixtures.heads import make_head, tiny_inputs
from tests.heads.test_losses import LN2, LN5, output, three_class_head


def grads(head, value):
    head.zero_grad()
    value.backward(retain_graph=True)
    return {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("counterfactual", ["uniform", "reversed", "remove"])
def test_factual_grad_makes_the_counterfactual_branch_a_constant(counterfactual):
    """d(psi_eff)/d(theta) = d(psi)/d(theta) exactly under causal_grad=factual; not under "all"."""
    _, _, features, _ = tiny_inputs()
    for mode, same in (("factual", True), ("all", False)):
        head = make_head(HeadConfig(lambda_causal=1.0, counterfactual=counterfactual, causal_grad=mode))
        out = head(features, counterfactual=True)
        for effect, factual in ((out.psi_eff, out.psi), (out.omega_eff, out.omega)):
            g_effect, g_factual = grads(head, effect.sum()), grads(head, factual.sum())
            equal = all(torch.allclose(g_effect[n], g_factual[n], atol=1e-6) for n in g_factual)
            assert equal == same, (mode, counterfactual)


def test_factual_grad_keeps_the_forward_values():
    _, _, features, _ = tiny_inputs()
    outs = []
    for mode in ("all", "factual"):
        torch.manual_seed(3)
        head = make_head(HeadConfig(lambda_causal=1.0, causal_grad=mode))
        torch.manual_seed(4)
        outs.append(head(features, counterfactual=True))
    torch.testing.assert_close(outs[0].s1_eff, outs[1].s1_eff, rtol=0, atol=0)
    torch.testing.assert_close(outs[0].s2_eff, outs[1].s2_eff, rtol=0, atol=0)


def test_seen_only_cross_entropy_by_hand():
    # classes 0, 1 seen and 2 unseen; effect exp = (1, 2, 5): all classes -log(1/8), seen -log(1/3)
    effect = torch.tensor([[0.0, LN2, LN5]])
    for classes, expect in (("all", math.log(8.0)), ("seen", math.log(3.0))):
        head = three_class_head(lambda_causal=1.0, lambda_cal=0.0, causal_classes=classes, subnets="ava")
        out = output(torch.zeros(1, 3))
        out.s1_eff, out.psi_eff = effect, torch.zeros(1, 4)
        terms = head.loss(out, torch.tensor([0]))
        assert terms["causal_1"].item() == pytest.approx(expect, abs=1e-6)


def test_cross_entropy_subset_maps_labels_into_the_subset():
    scores = torch.tensor([[0.0, 5.0, LN2, 9.0]])  # classes 1 and 3 are left out
    value = losses.cross_entropy_subset(scores, torch.tensor([2]), torch.tensor([2, 0]))
    assert value.item() == pytest.approx(-math.log(2 / 3), abs=1e-6)


def test_attribute_effect_by_hand():
    """Two images, two attributes. Attribute 0: effect (1, 3) and target (0, 1) both standardise to
    (-1, 1): no loss. Attribute 1: effect (2, 0) -> (1, -1) against target (0, 1) -> (-1, 1):
    squared error 4 per image. Mean over 2 x 2 entries = 2 (= 2 (1 - corr) with corr = -1)."""
    effect = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert losses.attribute_effect(effect, target).item() == pytest.approx(2.0, abs=1e-5)
    assert losses.attribute_effect(effect[None].repeat(3, 1, 1), target).shape == (3,)


def test_attribute_level_uses_the_true_class_attribute_vector():
    _, _, features, labels = tiny_inputs(batch=6)
    head = make_head(HeadConfig(lambda_causal=0.5, causal_level="attribute", lambda_cal=0.0, lambda_distill=0.0))
    torch.manual_seed(0)
    out = head(features, counterfactual=True)
    terms = head.loss(out, labels)
    assert "causal_1" not in terms and "causal_att_1" in terms and "causal_att_2" in terms
    expect = losses.attribute_effect(out.psi_eff, head.Z[labels])
    assert terms["causal_att_1"].item() == pytest.approx(expect.item(), abs=1e-6)
    plain = terms["ce_1"] + terms["ce_2"]
    assert terms["loss"].item() == pytest.approx(
        (plain + 0.5 * (terms["causal_att_1"] + terms["causal_att_2"])).item(), abs=1e-5)


def test_both_levels_with_their_own_weights():
    _, _, features, labels = tiny_inputs(batch=6)
    cfg = dict(lambda_causal=0.5, causal_level="both", lambda_cal=0.0, lambda_distill=0.0,
               counterfactual="uniform")
    for attribute_weight, expect_weight in ((0.0, 0.5), (2.0, 2.0)):
        head = make_head(HeadConfig(**cfg, lambda_causal_attribute=attribute_weight))
        terms = head.loss(head(features, counterfactual=True), labels)
        expect = (terms["ce_1"] + terms["ce_2"] + 0.5 * (terms["causal_1"] + terms["causal_2"])
                  + expect_weight * (terms["causal_att_1"] + terms["causal_att_2"]))
        assert terms["loss"].item() == pytest.approx(expect.item(), abs=1e-5)


def test_remove_masks_exactly_k_and_renormalises():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 5)  # (batch, regions, attributes); attention over regions (dim 1)
    attention = torch.softmax(logits, dim=1)
    for k in (1, 2, 5, 9):
        bar = counterfactual_attention("remove", logits, attention, attn_dim=1, batch_dim=0, remove_k=k)
        kept = min(k, 5)  # at least one region is always kept
        zeros = (bar == 0).sum(1)
        assert torch.equal(zeros, torch.full_like(zeros, kept))
        top = attention.topk(kept, dim=1).indices
        assert torch.equal(bar.gather(1, top), torch.zeros_like(top, dtype=bar.dtype))
        torch.testing.assert_close(bar.sum(1), torch.ones(3, 5))
        mask = bar > 0  # the rest keeps its proportions: attention / (1 - removed mass)
        rest = attention * mask / (attention * mask).sum(1, keepdim=True)
        torch.testing.assert_close(bar, rest)


def test_remove_by_hand_on_the_hand_made_head():
    """test_msdn_math's case: beta = [[3/4, 1/4], [1/2, 1/2], [1/4, 3/4]], S = [[1, 2], [3, 4],
    [-1, -2]]. Removing each attribute's most-attended of the two regions leaves all attention on
    the other: psi_bar_0 = S[0, 2] = 2, psi_bar_2 = S[2, 1] = -1, so psi_eff_0 = 1.25 - 2 and
    psi_eff_2 = -1.75 + 1 (attribute 1 is a tie and is not checked)."""
    from tests.heads.test_msdn_math import hand_features, hand_head
    out = hand_head(counterfactual="remove", lambda_causal=1.0)(hand_features(), counterfactual=True)
    torch.testing.assert_close(out.psi_eff[0, [0, 2]], torch.tensor([-0.75, -0.75]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("which,present", [("ava", (1,)), ("vaa", (2,)), ("both", (1, 2))])
def test_causal_subnets(which, present):
    _, _, features, labels = tiny_inputs()
    head = make_head(HeadConfig(lambda_causal=1.0, counterfactual="uniform", causal_subnets=which))
    out = head(features, counterfactual=True)
    assert (out.s1_eff is not None) == (1 in present) and (out.s2_eff is not None) == (2 in present)
    terms = head.loss(out, labels)
    assert {k for k in terms if k.startswith("causal")} == {f"causal_{k}" for k in present}


def test_causal_scale_warmup_and_ramp():
    cfg = HeadConfig(lambda_causal=0.3, causal_warmup=10, causal_ramp=4)
    assert [cfg.causal_scale(s) for s in (1, 10, 11, 12, 14, 15, 100)] == [0, 0, 0.25, 0.5, 1, 1, 1]
    assert HeadConfig(lambda_causal=0.3).causal_scale(1) == 1.0
    assert HeadConfig(lambda_causal=0.0, causal_warmup=0).causal_scale(5) == 0.0


def test_causal_scale_multiplies_the_causal_terms():
    _, _, features, labels = tiny_inputs()
    head = make_head(HeadConfig(lambda_causal=1.0, counterfactual="uniform", causal_level="both"))
    out = head(features, counterfactual=True)
    full, half, off = (head.loss(out, labels, causal_scale=s) for s in (1.0, 0.5, 0.0))
    causal = sum(full[k] for k in full if k.startswith("causal"))
    assert (full["loss"] - half["loss"]).item() == pytest.approx(0.5 * causal.item(), abs=1e-5)
    assert not any(k.startswith("causal") for k in off)


@pytest.mark.parametrize("key,value", [("causal_grad", "some"), ("causal_classes", "unseen"),
                                       ("causal_level", "region"), ("causal_subnets", "none"),
                                       ("remove_k", 0), ("causal_warmup", -1), ("lambda_causal_attribute", -1.0)])
def test_bad_switch_values_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        HeadConfig(**{key: value})


@pytest.mark.parametrize("level", ["class", "attribute", "both"])
@pytest.mark.parametrize("counterfactual", ["random", "remove"])
def test_finite_loss_and_gradients_at_the_released_init(level, counterfactual):
    """At the released init (W_2 = W_1_1 = W_2_1 = 0) the VAA scores are 0 for every image, so an
    attribute-level effect is constant over the batch: its standardisation must stay finite."""
    _, _, features, labels = tiny_inputs(batch=6)
    head = make_head(HeadConfig(lambda_causal=0.3, causal_level=level, counterfactual=counterfactual),
                     randomize=False)
    terms = head.loss(head(features, counterfactual=True), labels)
    terms["loss"].backward()
    assert all(torch.isfinite(v).all() for v in terms.values())
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)
