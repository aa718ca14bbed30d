"""Causal effects s_eff = (s - b) - Z psi_bar for every counterfactual type, on the hand-made case
of test_msdn_math.py (S, G, beta, alpha known exactly there)."""
import pytest
import torch

from heads.counterfactual import counterfactual_attention
from tests.heads.test_msdn_math import hand_features, hand_head

Z = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])


def effect(diff):
    """Class-score effect Z (psi - psi_bar) of an attribute-score difference."""
    return torch.tensor(diff) @ Z.t()


def causal_outputs(kind, second_image=False):
    head = hand_head(counterfactual=kind, lambda_causal=1.0)
    return head(hand_features(second_image), counterfactual=True)


def test_uniform():
    # beta_bar = 1/2: psi_bar = mean_r S = (1.5, 3.5, -1.5);  alpha_bar = 1/3: omega_bar = (1, 1/3, -1)
    out = causal_outputs("uniform")
    torch.testing.assert_close(out.s1_eff, effect([[-0.25, 0.0, -0.25]]))
    torch.testing.assert_close(out.s2_eff, effect([[10 / 21, 0.0, 8 / 21]]))


def test_reversed():
    # beta_bar = softmax(-logits) = [[1/4, 3/4], [1/2, 1/2], [3/4, 1/4]] -> psi_bar = (1.75, 3.5, -1.25)
    # alpha_bar region 1 = (1/7, 2/7, 4/7), region 2 = 1/3 -> omega_bar = (13/21, 7/21, -31/21)
    out = causal_outputs("reversed")
    torch.testing.assert_close(out.s1_eff, effect([[-0.5, 0.0, -0.5]]))
    torch.testing.assert_close(out.s2_eff, effect([[18 / 21, 0.0, 18 / 21]]))


def test_shuffle_uses_the_previous_image_attention():
    # Image 2 has both regions = (1, 0): uniform beta, S2 = [[1, 1], [3, 3], [-1, -1]],
    # alpha = (4/7, 2/7, 1/7) in both regions, G2 = [[2, 2], [0, 0], [-2, -2]].
    # Image 1 takes image 2's maps (roll by one), image 2 takes image 1's.
    out = causal_outputs("shuffle", second_image=True)
    torch.testing.assert_close(out.s1_eff, effect([[-0.25, 0.0, -0.25], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(out.s2_eff, effect([[-5 / 21, 1 / 21, -4 / 21],
                                                   [10 / 21, 0.0, 8 / 21]]))


def test_random_counterfactual_range_shape_and_seed():
    attention = torch.softmax(torch.randn(3, 4, 6), dim=1)
    draws = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        draws.append(counterfactual_attention("random", attention, attention, attn_dim=1, batch_dim=0))
    bar = draws[0]
    assert bar.shape == attention.shape and bar.dtype == torch.float32
    assert bar.min() >= 0 and bar.max() < 2 / 4  # u / n with u in [0, 2), n = 4
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_random_counterfactual_mean_is_uniform():
    torch.manual_seed(0)
    attention = torch.zeros(8, 50, 100)
    bar = counterfactual_attention("random", attention, attention, attn_dim=1, batch_dim=0)
    assert abs(bar.mean().item() * 50 - 1.0) < 0.02  # E[u] = 1; 40,000 draws: 7 sigma


def test_random_effects_through_the_head_are_seeded():
    results = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        out = causal_outputs("random", second_image=True)
        results.append((out.s1_eff, out.s2_eff))
    assert results[0][0].shape == (2, 2) and results[0][1].shape == (2, 2)
    assert all(torch.isfinite(t).all() for t in results[0])
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert not torch.equal(results[0][0], results[2][0])


@pytest.mark.parametrize("kind", ["reversed", "shuffle"])
def test_counterfactual_attention_is_a_constant(kind):
    logits = torch.randn(2, 3, 4, requires_grad=True)
    attention = torch.softmax(logits, dim=2)
    bar = counterfactual_attention(kind, logits, attention, attn_dim=2, batch_dim=0)
    assert not bar.requires_grad


def test_inference_skips_the_counterfactual_branch():
    head = hand_head(counterfactual="random", lambda_causal=1.0)
    state = torch.get_rng_state()
    with torch.no_grad():
        out = head(hand_features())
    assert out.s1_eff is None and out.s2_eff is None
    assert torch.equal(state, torch.get_rng_state())
