"""Loss values on hand-made scores (explicit numbers) and through MSDN.loss."""
import math

import pytest
import torch

from heads import losses
from heads.config import HeadConfig
from heads.msdn import MSDN, HeadOutput

LN2, LN5 = math.log(2.0), math.log(5.0)


def three_class_head(**cfg) -> MSDN:
    """Classes 0, 1 seen, class 2 unseen; bias 1 -> score_bias = (-1, -1, +1)."""
    return MSDN(HeadConfig(**cfg), torch.rand(3, 4), None, torch.tensor([0, 1]),
                torch.tensor([2]), feature_dim=3)


def output(s1, s2=None, psi=None, omega=None) -> HeadOutput:
    return HeadOutput(s1=s1, s2=s2, psi=psi, omega=omega, beta=None, alpha=None)


def test_cross_entropy_counts_unseen_classes_in_the_denominator():
    head = three_class_head(lambda_cal=0.0)
    unbiased = torch.tensor([[0.0, LN2, LN5]])  # exp: 1, 2, 5
    terms = head.loss(output(unbiased + head.score_bias), torch.tensor([0]))
    assert terms["ce_1"].item() == pytest.approx(math.log(8.0), abs=1e-6)  # log(3) if seen-only
    assert terms["loss"].item() == pytest.approx(math.log(8.0), abs=1e-6)


def test_self_calibration_value():
    biased = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, LN2]])  # unseen mass 1/3 and 1/2
    value = losses.self_calibration(biased, torch.tensor([2]))
    assert value.item() == pytest.approx(math.log(12 / 5), abs=1e-6)  # -log(mean = 5/12)


def test_self_calibration_enters_total_with_lambda():
    head = three_class_head(lambda_cal=0.25)
    s = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, LN2]])
    terms = head.loss(output(s), torch.tensor([0, 1]))
    assert terms["cal_1"].item() == pytest.approx(math.log(12 / 5), abs=1e-6)
    assert terms["loss"].item() == pytest.approx(terms["ce_1"].item() + 0.25 * math.log(12 / 5),
                                                  abs=1e-6)


def test_weighted_score_distance_value():
    s1 = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 0.0]])
    s2 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # d = (0, 2, 0): 8 / 2 = 4;  d = (3, 4, 0): (27 + 64) / 5 = 18.2;  batch mean 11.1
    assert losses.weighted_score_distance(s1, s2).item() == pytest.approx(11.1, abs=1e-5)


def jsd_by_hand() -> float:
    p, q = (1 / 4, 3 / 4), (1 / 2, 1 / 2)  # softmax(0, ln 3), softmax(0, 0)
    m = (3 / 8, 5 / 8)
    kl_p = sum(a * math.log(a / b) for a, b in zip(p, m))
    kl_q = sum(a * math.log(a / b) for a, b in zip(q, m))
    return (kl_p + kl_q) / 2


def test_jensen_shannon_value():
    s1, s2 = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.0, 0.0]])
    assert losses.jensen_shannon(s1, s2).item() == pytest.approx(jsd_by_hand(), abs=1e-7)
    assert losses.jensen_shannon(s1, s1).item() == pytest.approx(0.0, abs=1e-7)


def test_distillation_released_and_paper_values():
    s1, s2 = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.0, 0.0]])
    d_w = math.log(3.0) ** 3 / math.log(3.0)  # one non-zero difference: |d|^3/|d| = d^2
    released = losses.distillation_released(s1, s2)
    assert released["distill_w"].item() == pytest.approx(d_w, abs=1e-6)
    assert released["distill"].item() == pytest.approx(d_w + jsd_by_hand(), abs=1e-6)
    psi, omega = torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2)
    paper = losses.distillation_paper(s1, s2, psi, omega)
    assert paper["distill_l2"].item() == pytest.approx(5.0)
    assert paper["distill"].item() == pytest.approx(5.0 + jsd_by_hand(), abs=1e-6)


@pytest.mark.parametrize("variant", ["released", "paper"])
def test_distillation_of_identical_subnets_is_zero_with_finite_gradients(variant):
    s = torch.tensor([[0.5, -1.0, 2.0]], requires_grad=True)
    psi = torch.tensor([[1.0, 2.0]], requires_grad=True)
    if variant == "released":
        value = losses.distillation_released(s, s.detach().clone())["distill"]
    else:
        value = losses.distillation_paper(s, s.detach().clone(), psi, psi.detach().clone())["distill"]
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-7)
    assert torch.isfinite(s.grad).all()
    if variant == "paper":
        assert torch.isfinite(psi.grad).all()


def test_total_loss_combines_terms_with_lambdas():
    head = three_class_head(lambda_cal=0.3, lambda_distill=0.01)
    s1 = torch.tensor([[0.2, -0.4, 1.0], [1.5, 0.0, -0.5]])
    s2 = torch.tensor([[0.0, 0.3, 0.8], [0.9, 0.1, 0.0]])
    terms = head.loss(output(s1, s2), torch.tensor([0, 1]))
    expect = (terms["ce_1"] + terms["ce_2"] + 0.3 * (terms["cal_1"] + terms["cal_2"])
              + 0.01 * terms["distill"])
    assert terms["loss"].item() == pytest.approx(expect.item(), abs=1e-6)
    assert not any(v.requires_grad for k, v in terms.items() if k != "loss")


def test_causal_loss_needs_counterfactual_forward():
    head = three_class_head(lambda_causal=0.5)
    s = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="counterfactual=True"):
        head.loss(output(s, s), torch.tensor([0]))


def test_causal_term_is_cross_entropy_of_the_effect():
    head = three_class_head(lambda_causal=0.5, lambda_cal=0.0, lambda_distill=0.0)
    s = torch.zeros(1, 3)
    effect = torch.tensor([[0.0, LN2, LN5]])
    out = output(s, s)
    out.s1_eff, out.s2_eff = effect, torch.zeros(1, 3)
    terms = head.loss(out, torch.tensor([0]))
    assert terms["causal_1"].item() == pytest.approx(math.log(8.0), abs=1e-6)
    assert terms["causal_2"].item() == pytest.approx(math.log(3.0), abs=1e-6)
    expect = terms["ce_1"] + terms["ce_2"] + 0.5 * (math.log(8.0) + math.log(3.0))
    assert terms["loss"].item() == pytest.approx(expect.item(), abs=1e-6)
