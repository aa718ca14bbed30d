"""The head's maths on a case small enough to compute by hand: 2 classes (class 0 seen, class 1
unseen), 3 attributes, 2 regions, 2 channels, 2-dimensional word vectors.

Features: region 1 = (1, 0), region 2 = (0, 2), so after L2-normalisation X = I and every
product v_i^T W f_r is simply the entry [i, r] of V W.
  V = [[1, 0], [0, 1], [-1, 0]]      (rows already unit length)
  W_1 = [[1, 2], [3, 4]]              -> S = V W_1 = [[1, 2], [3, 4], [-1, -2]]
  W_2 = [[ln 3, 0], [0, 0]]           -> logits [[ln3, 0], [0, 0], [-ln3, 0]]
                                         beta = [[3/4, 1/4], [1/2, 1/2], [1/4, 3/4]]
  psi = [1.25, 3.5, -1.75]
  att = [[3, 4, 0], [0, 0, 2]]        -> Z = [[0.6, 0.8, 0], [0, 0, 1]]
  s1 = Z psi + b = [3.55 - 1, -1.75 + 1]
  W_1_1 = [[2, 0], [1, 1]]            -> G = V W_1_1^T = [[2, 1], [0, 1], [-2, -1]]  (G[i, r] = g[r, i])
  W_2_1 = [[ln 2, 0], [0, 0]]         -> logits [[ln2, 0], [0, 0], [-ln2, 0]]; softmax over i:
                                         region 1: (2, 1, 1/2)/3.5 = (4/7, 2/7, 1/7), region 2: 1/3 each
  omega = [4/7*2 + 1/3, 1/3, -2/7 - 1/3] = [31/21, 7/21, -13/21]
  s2 = Z omega + b = [(0.6*31 + 0.8*7)/21 - 1, -13/21 + 1]
"""
import math

import pytest
import torch

from heads.config import HeadConfig
from heads.msdn import MSDN

LN2, LN3 = math.log(2.0), math.log(3.0)
PSI = [1.25, 3.5, -1.75]
OMEGA = [31 / 21, 7 / 21, -13 / 21]
S1 = [0.6 * 1.25 + 0.8 * 3.5 - 1, -1.75 + 1]
S2 = [(0.6 * 31 + 0.8 * 7) / 21 - 1, -13 / 21 + 1]


def hand_head(**cfg) -> MSDN:
    att = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])
    w2v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    head = MSDN(HeadConfig(**cfg), att, w2v, torch.tensor([0]), torch.tensor([1]), feature_dim=2)
    values = dict(W_1=[[1.0, 2.0], [3.0, 4.0]], W_2=[[LN3, 0.0], [0.0, 0.0]],
                  W_1_1=[[2.0, 0.0], [1.0, 1.0]], W_2_1=[[LN2, 0.0], [0.0, 0.0]])
    with torch.no_grad():
        for name, value in values.items():
            if getattr(head, name) is not None:  # single-sub-net heads lack the other's weights
                getattr(head, name).copy_(torch.tensor(value))
    return head


def hand_features(second_image: bool = False) -> torch.Tensor:
    images = [[[1.0, 0.0], [0.0, 2.0]]]  # [channel][region]: region 1 = (1, 0), region 2 = (0, 2)
    if second_image:
        images.append([[1.0, 1.0], [0.0, 0.0]])  # both regions = (1, 0)
    return torch.tensor(images)


@pytest.mark.parametrize("route", ["attributes", "embedding"])
@pytest.mark.parametrize("layout", ["3d", "4d", "4d-float16"])
def test_scores_match_hand_computation(route, layout):
    x = hand_features()
    if layout.startswith("4d"):
        x = x.view(1, 2, 1, 2)
    if layout.endswith("float16"):
        x = x.half()
    out = hand_head(matmul_route=route)(x)
    expect = dict(beta=[[[0.75, 0.25], [0.5, 0.5], [0.25, 0.75]]],
                  alpha=[[[4 / 7, 1 / 3], [2 / 7, 1 / 3], [1 / 7, 1 / 3]]],
                  psi=[PSI], omega=[OMEGA], s1=[S1], s2=[S2])
    for name, value in expect.items():
        torch.testing.assert_close(getattr(out, name), torch.tensor(value), rtol=0, atol=1e-6,
                                   msg=name)
    assert out.s1_eff is None and out.s2_eff is None


def test_attention_axes():
    out = hand_head()(torch.rand(3, 2, 5))
    torch.testing.assert_close(out.beta.sum(2), torch.ones(3, 3))  # AVA: over regions
    torch.testing.assert_close(out.alpha.sum(1), torch.ones(3, 5))  # VAA: over attributes
    assert out.beta.shape == out.alpha.shape == (3, 3, 5)


@pytest.mark.parametrize("bias", [1.0, 0.5])
def test_bias_is_plus_for_unseen_minus_for_seen(bias):
    head = hand_head(bias=bias)
    assert head.score_bias.tolist() == [-bias, bias]
    with torch.no_grad():  # all attention-score weights 0 -> raw scores 0, only the bias is left
        for p in (head.W_1, head.W_1_1):
            p.zero_()
    out = head(hand_features())
    assert out.s1.tolist() == [[-bias, bias]] and out.s2.tolist() == [[-bias, bias]]


def test_fused_scores_weights_the_two_subnets():
    head = hand_head(fusion=(0.7, 0.3))
    out = head(hand_features())
    torch.testing.assert_close(head.fused_scores(out), 0.7 * out.s1 + 0.3 * out.s2)
    fused = [0.7 * a + 0.3 * b for a, b in zip(S1, S2)]
    torch.testing.assert_close(head.fused_scores(out), torch.tensor([fused]))


def test_features_are_normalised_inside_forward():
    head = hand_head()
    x = hand_features()
    a, b = head(x), head(x * 37.0)
    torch.testing.assert_close(a.s1, b.s1)
    torch.testing.assert_close(a.s2, b.s2)


def test_parameter_inits_and_normalisation():
    torch.manual_seed(0)
    att = torch.tensor([[3.0, -4.0, 0.0, 1.0], [0.0, 1.0, 2.0, -1.0]])
    w2v = torch.randn(4, 5) * 3
    seen, unseen = torch.tensor([1]), torch.tensor([0])
    head = MSDN(HeadConfig(), att, w2v, seen, unseen, feature_dim=64)
    torch.testing.assert_close(head.Z.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(head.V.norm(dim=1), torch.ones(4))
    assert head.V.requires_grad and not head.Z.requires_grad
    assert head.W_1.shape == (5, 64) and head.W_1_1.shape == (64, 5)
    assert abs(head.W_1.std().item() - 1.0) < 0.15 and abs(head.W_1.mean().item()) < 0.15
    for p in (head.W_2, head.W_1_1, head.W_2_1):
        assert p.abs().max().item() == 0.0 and p.requires_grad
    assert (head.Z < 0).any()
    clamped = MSDN(HeadConfig(clamp_att_negative=True, trainable_v=False), att, w2v, seen, unseen, 64)
    assert (clamped.Z >= 0).all() and not clamped.V.requires_grad
    torch.testing.assert_close(clamped.Z[0], torch.tensor([3.0, 0.0, 0.0, 1.0]) / math.sqrt(10))
    no_w2v = MSDN(HeadConfig(w2v_dim=7, trainable_v=False), att, None, seen, unseen, 64)
    assert no_w2v.V.shape == (4, 7) and no_w2v.V.requires_grad  # random V is always learned


def test_normalize_v_renormalises_every_forward():
    head = hand_head(normalize_v=True)
    x = hand_features()
    before = head(x)
    with torch.no_grad():
        head.V.mul_(5.0)
    torch.testing.assert_close(head(x).s1, before.s1)
    plain = hand_head()
    with torch.no_grad():
        plain.V.mul_(5.0)
    assert not torch.allclose(plain(x).s1, before.s1)


def test_single_subnet_heads():
    x = hand_features()
    ava, vaa = hand_head(subnets="ava"), hand_head(subnets="vaa")
    assert vaa.W_1 is None and ava.W_1_1 is None
    a, v = ava(x), vaa(x)
    assert a.s2 is None and v.s1 is None
    torch.testing.assert_close(a.s1, torch.tensor([S1]))
    torch.testing.assert_close(v.s2, torch.tensor([S2]))
    torch.testing.assert_close(ava.fused_scores(a), a.s1)
    assert set(ava.loss(a, torch.tensor([0]))) == {"loss", "ce_1", "cal_1"}
    assert set(vaa.loss(v, torch.tensor([0]))) == {"loss", "ce_2", "cal_2"}


def test_bad_inputs_raise_clear_errors():
    head = hand_head()
    with pytest.raises(ValueError, match=r"features must be \(B, 2, H, W\)"):
        head(torch.rand(1, 3, 4))
    att = torch.rand(2, 3)
    with pytest.raises(ValueError, match="w2v must be"):
        MSDN(HeadConfig(), att, torch.rand(4, 2), torch.tensor([0]), torch.tensor([1]), 2)
    with pytest.raises(ValueError, match="unseen_classes out of range"):
        MSDN(HeadConfig(), att, None, torch.tensor([0]), torch.tensor([2]), 2)
    with pytest.raises(ValueError, match="subnets"):
        HeadConfig(subnets="all")
    with pytest.raises(ValueError, match="counterfactual"):
        HeadConfig(counterfactual="zero")
