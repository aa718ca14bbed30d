import numpy as np
import pytest
import torch

from pipeline.metrics import (
    calibrated_stacking,
    gzsl_accuracy,
    gzsl_report,
    harmonic_mean,
    per_class_accuracy,
    seen_unseen_curve,
    zsl_accuracy,
)

SEEN, UNSEEN = [0, 1], [2]


def test_per_class_accuracy_averages_classes_not_images():
    # class 0: 2 of 3 right, class 1: 1 of 1 -> (2/3 + 1) / 2, while the image accuracy is 3/4
    assert per_class_accuracy([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(5 / 6)
    # an absent class is skipped, not counted as 0
    assert per_class_accuracy([0, 0, 1, 1], [0, 0, 0, 1], classes=[0, 1, 7]) == pytest.approx(5 / 6)


def test_harmonic_mean():
    assert harmonic_mean(0.5, 1.0) == pytest.approx(2 / 3)
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_zsl_restricts_candidates_to_unseen():
    scores = torch.tensor([[9.0, 0.0, 1.0, 2.0], [9.0, 0.0, 3.0, 2.0]])
    # columns 2, 3 are unseen; the large seen score must not matter
    assert zsl_accuracy(scores, [3, 2], unseen=[2, 3]) == 1.0
    assert zsl_accuracy(scores, [2, 2], unseen=[2, 3]) == 0.5


def test_calibrated_stacking_subtracts_gamma_from_seen_only():
    scores = torch.zeros(2, 3)
    out = calibrated_stacking(scores, SEEN, 1.5)
    assert out[:, :2].eq(-1.5).all() and out[:, 2].eq(0).all()
    assert scores.eq(0).all()  # input untouched


def _tiny_case():
    """Two seen images (classes 0, 1), one unseen image (class 2); see the breakpoints below."""
    scores_seen = torch.tensor([[3.0, 0.0, 1.0],    # right; best seen - best unseen = 2
                                [0.0, 1.0, 2.0]])   # right among seen; margin -1
    scores_unseen = torch.tensor([[2.0, 0.0, 1.0]])  # right among unseen; margin 1
    return scores_seen, torch.tensor([0, 1]), scores_unseen, torch.tensor([2])


def test_gzsl_by_hand():
    ss, ys, su, yu = _tiny_case()
    assert gzsl_accuracy(ss, ys, SEEN, gamma=0.0) == 0.5   # image 2 goes to the unseen class
    assert gzsl_accuracy(su, yu, SEEN, gamma=0.0) == 0.0
    assert gzsl_accuracy(su, yu, SEEN, gamma=1.5) == 1.0
    assert gzsl_accuracy(ss, ys, SEEN, gamma=-2.0) == 1.0


def test_curve_and_ausuc_by_hand():
    # breakpoints -1 (seen image 2 leaves), 1 (unseen image arrives), 2 (seen image 1 leaves):
    # (S, U) = (1, 0) -> (.5, 0) -> (.5, 1) -> (0, 1); area = .5 * 1
    curve = seen_unseen_curve(*_tiny_case(), SEEN, UNSEEN)
    np.testing.assert_allclose(curve.seen_acc, [1, .5, .5, 0])
    np.testing.assert_allclose(curve.unseen_acc, [0, 0, 1, 1])
    np.testing.assert_allclose(curve.gammas, [-2, 0, 1.5, 3])
    assert curve.ausuc == pytest.approx(0.5)
    best = curve.best()
    assert best == {"gamma": 1.5, "U": 1.0, "S": 0.5, "H": pytest.approx(2 / 3)}


def test_simultaneous_breakpoints_give_a_diagonal_segment():
    ss, ys, su, yu = _tiny_case()
    su = torch.tensor([[3.0, 0.0, 1.0]])  # unseen image margin 2 = seen image 1's margin
    curve = seen_unseen_curve(ss, ys, su, yu, SEEN, UNSEEN)
    np.testing.assert_allclose(curve.seen_acc, [1, .5, 0])
    np.testing.assert_allclose(curve.unseen_acc, [0, 0, 1])
    assert curve.ausuc == pytest.approx(0.25)  # triangle (.5, 0) -> (0, 1)


def test_curve_matches_direct_evaluation_on_random_scores():
    g = torch.Generator().manual_seed(0)
    seen, unseen = [0, 2, 3, 5], [1, 4, 6]
    ss, su = torch.randn(40, 7, generator=g), torch.randn(30, 7, generator=g)
    ys = torch.tensor(seen)[torch.randint(0, 4, (40,), generator=g)]
    yu = torch.tensor(unseen)[torch.randint(0, 3, (30,), generator=g)]
    curve = seen_unseen_curve(ss, ys, su, yu, seen, unseen)
    for gamma, s, u in zip(curve.gammas, curve.seen_acc, curve.unseen_acc):
        assert gzsl_accuracy(ss, ys, seen, float(gamma)) == pytest.approx(s)
        assert gzsl_accuracy(su, yu, seen, float(gamma)) == pytest.approx(u)
    assert curve.seen_acc[0] == pytest.approx(per_class_accuracy(torch.tensor(seen)[ss[:, seen].argmax(1)], ys))
    assert curve.unseen_acc[-1] == pytest.approx(zsl_accuracy(su, yu, unseen))
    assert 0 < curve.ausuc < 1


def test_report_keys_and_values():
    rep = gzsl_report(*_tiny_case(), SEEN, UNSEEN, gamma=1.5)
    best = {"gamma": 1.5, "U": 1.0, "S": 0.5, "H": pytest.approx(2 / 3)}
    assert rep == {"ZSL": 1.0, "U": 1.0, "S": 0.5, "H": pytest.approx(2 / 3), "gamma": 1.5, "AUSUC": 0.5,
                   "best": best}
    assert gzsl_report(*_tiny_case(), SEEN, UNSEEN, with_curve=True)["curve"]["S"] == [1, .5, .5, 0]
