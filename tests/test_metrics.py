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
