import math

import numpy as np
import pytest

from rlhf_core.metrics import (
    accuracy,
    calibration_curve,
    cohen_kappa,
    expected_calibration_error,
    roc_auc,
)


def test_accuracy_known_answers():
    assert accuracy([0.9, 0.2, 0.7, 0.4], [True, False, False, False]) == 0.75
    assert accuracy([0.5, 0.9], [True, True]) == 0.75  # a tie counts half


def test_cohen_kappa_known_answers():
    # 2x2 table: both yes 20, a yes b no 5, a no b yes 10, both no 15 -> p_o=.7, p_e=.5*.6+.5*.4=.5 (a: 25/50 yes; b: 30/50)
    a = np.array([1] * 20 + [1] * 5 + [0] * 10 + [0] * 15, bool)
    b = np.array([1] * 20 + [0] * 5 + [1] * 10 + [0] * 15, bool)
    assert cohen_kappa(a, b) == pytest.approx((0.7 - 0.5) / 0.5)
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert cohen_kappa(a, ~a) == pytest.approx(-1.0)


def test_roc_auc_known_answers():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert roc_auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5  # all tied
    assert np.isnan(roc_auc([1, 2], [1, 1]))


def test_calibration_and_ece_known_answers():
    p = np.array([0.05, 0.15, 0.95, 0.95])
    truth = np.array([0, 1, 1, 0])
    curve = calibration_curve(p, truth, n_bins=10)
    assert [b["count"] for b in curve] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert curve[9]["mean_predicted"] == pytest.approx(0.95) and curve[9]["observed"] == 0.5
    # ECE = 1/4*|.05-0| + 1/4*|.15-1| + 2/4*|.95-.5|
    assert expected_calibration_error(p, truth) == pytest.approx(
        0.25 * 0.05 + 0.25 * 0.85 + 0.5 * 0.45
    )
    assert expected_calibration_error(np.array([1.0, 0.0]), np.array([1, 0])) == 0.0


def test_best_of_n_kl_known_answers():
    from rlhf_core.evaluation.baselines import best_of_n_kl

    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)  # 0.1931
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)  # 1.8351
    with pytest.raises(ValueError):
        best_of_n_kl(0)


def test_best_of_n_picks_the_best_of_the_first_n():
    from rlhf_core.evaluation.baselines import best_of_n_indices

    scores = np.array([[0.1, 0.9, 0.5, 2.0], [3.0, 0.0, 1.0, 4.0]])
    picks = best_of_n_indices(scores, [1, 2, 4])
    assert (
        picks[1].tolist() == [0, 0] and picks[2].tolist() == [1, 0] and picks[4].tolist() == [3, 3]
    )
    with pytest.raises(ValueError, match="best-of-8"):
        best_of_n_indices(scores, [8])


def test_length_controlled_win_rate():
    """Outcomes independent of length: LC = raw; outcomes decided by length alone, with tuned longer
    half the time: LC ~ 0.5 even where the raw rate is far from it."""
    from rlhf_core.evaluation.baselines import length_controlled_win_rate, outcomes

    rng = np.random.default_rng(0)
    n = 4000
    la, lb = rng.integers(5, 50, n), rng.integers(5, 50, n)
    y = (rng.random(n) < 0.7).astype(float)
    assert length_controlled_win_rate(y, la, lb) == pytest.approx(y.mean(), abs=0.02)
    longer = np.sign(la - lb) * 0.5 + 0.5  # equal lengths tie
    assert length_controlled_win_rate(longer, la, lb) == pytest.approx(0.5, abs=0.05)
    # tuned always longer and always winning: the fit cannot credit length (no variation), LC = raw
    assert length_controlled_win_rate(np.ones(10), np.full(10, 9), np.full(10, 3)) > 0.9
    out = outcomes(np.array([0.9, 0.5, 0.1, 0.51]), [False, False, False, False], 0.02)
    assert out.tolist() == [1.0, 0.5, 0.0, 0.5]
