"""The calibration maths against cases small enough to work out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cnnforge.core import calibration as cal

# Four images, two classes: confidences 0.9, 0.6, 0.8, 0.55; the second and fourth are wrong.
PROBS = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.55, 0.45]])
LABELS = np.array([0, 0, 1, 1])


def test_ece_by_hand() -> None:
    # 15 bins of width 1/15: 0.55 and 0.6 fall in (8/15, 9/15] = (0.533, 0.6] -> accuracy 0,
    # confidence 0.575; 0.8 in (11/15, 12/15] -> 1 vs 0.8; 0.9 in (13/15, 14/15] -> 1 vs 0.9.
    expected = (2 * 0.575 + 1 * 0.2 + 1 * 0.1) / 4
    assert cal.ece(PROBS, LABELS) == pytest.approx(expected)


def test_ece_bin_edges_are_closed_on_the_right() -> None:
    # A confidence of exactly 0.6 = 9/15 belongs to (8/15, 9/15], with 0.55.
    rows = cal.reliability(PROBS, LABELS)
    assert rows[8]["count"] == 2 and rows[8]["accuracy"] == 0.0
    assert sum(r["count"] for r in rows) == 4


def test_nll_and_brier_by_hand() -> None:
    assert cal.nll(PROBS, LABELS) == pytest.approx(
        -(math.log(0.9) + math.log(0.4) + math.log(0.8) + math.log(0.45)) / 4
    )
    # per image sum of squares: 0.02, 0.72, 0.08, 0.605
    assert cal.brier(PROBS, LABELS) == pytest.approx((0.02 + 0.72 + 0.08 + 0.605) / 4)


def test_selective_accuracy_answers_the_most_confident_share() -> None:
    assert cal.selective_accuracy(PROBS, LABELS, 1.0) == 0.5
    assert cal.selective_accuracy(PROBS, LABELS, 0.75) == pytest.approx(2 / 3)  # 0.9, 0.8, 0.6
    assert cal.selective_accuracy(PROBS, LABELS, 0.5) == 1.0  # 0.9, 0.8
    with pytest.raises(ValueError, match="coverage"):
        cal.selective_accuracy(PROBS, LABELS, 0)


def test_temperature_rescale_by_hand() -> None:
    # Logits (log 3, 0) at T = 2 become (log 3 / 2, 0): softmax = sqrt(3) / (sqrt(3) + 1).
    scaled = cal.rescale(np.array([[0.75, 0.25]]), 2.0)
    assert scaled[0, 0] == pytest.approx(math.sqrt(3) / (math.sqrt(3) + 1))


def test_fitted_temperature_matches_the_closed_form() -> None:
    # Four images with logits (4, 0), three of them of class 0: the NLL of softmax(logits / T)
    # is least where the predicted probability sigmoid(4 / T) equals the share right, 3/4.
    logits = np.array([[4.0, 0.0]] * 4)
    labels = np.array([0, 0, 0, 1])
    t = cal.fit_temperature(logits, labels)
    assert t == pytest.approx(4.0 / math.log(3.0), rel=1e-6)  # sigmoid(4 / T) = 3/4


def test_calibration_never_changes_the_argmax() -> None:
    rng = np.random.default_rng(0)
    probs = cal.softmax(rng.normal(0, 4, (500, 10)))
    labels = rng.integers(0, 10, 500)
    fit = cal.calibrate(probs, labels, source="random")
    assert fit.temperature > 1  # random labels: the model is over-confident
    assert fit.nll_after < fit.nll_before
    assert (cal.rescale(probs, fit.temperature).argmax(1) == probs.argmax(1)).all()


def test_overconfident_model_gets_a_lower_ece() -> None:
    rng = np.random.default_rng(1)
    true_logits = rng.normal(0, 2, (4000, 5))
    labels = np.array([rng.choice(5, p=p) for p in cal.softmax(true_logits)])
    overconfident = cal.softmax(true_logits * 3)  # a model 3x too sure of itself
    fit = cal.calibrate(overconfident, labels, source="simulated")
    assert fit.temperature == pytest.approx(3.0, rel=0.15)
    assert fit.ece_after < fit.ece_before / 3


def test_a_label_smoothed_model_is_calibrated_with_its_smoothing_undone() -> None:
    # A network 1/0.6 times too sure of itself, trained to smoothed targets (label smoothing
    # 0.1): its softmax is (1 - 0.1) q + 0.1 / K. A temperature alone cannot reach q's
    # calibration; with the smoothing's share taken off first it finds the network's 1/0.6.
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 1, (20000, 10))
    logits[np.arange(20000), rng.integers(0, 10, 20000)] += 4
    labels = np.array([rng.choice(10, p=p) for p in cal.softmax(logits)])
    smoothed = 0.9 * cal.softmax(logits, 0.6) + 0.01
    fit_on, scored = slice(0, 10000), slice(10000, None)
    plain = cal.calibrate(smoothed[fit_on], labels[fit_on], source="simulated")
    undone = cal.calibrate(smoothed[fit_on], labels[fit_on], "simulated", label_smoothing=0.1)
    assert undone.label_smoothing == 0.1 and plain.label_smoothing == 0.0
    assert undone.temperature == pytest.approx(1 / 0.6, rel=0.05)
    ece_plain = cal.ece(cal.rescale(smoothed[scored], plain.temperature), labels[scored])
    ece_undone = cal.ece(cal.rescale(smoothed[scored], undone.temperature, 0.1), labels[scored])
    assert ece_undone < 0.015 < 0.03 < ece_plain
    after = cal.rescale(smoothed, undone.temperature, 0.1)
    assert (after.argmax(1) == smoothed.argmax(1)).all()
    # a class at or under the smoothing's share keeps a hundredth of it, not zero
    assert after.min() > 0
    # the smoothing put back: the probabilities before calibration, from those after
    before = cal.uncalibrated(after, undone.temperature, 0.1)
    assert np.abs(before - smoothed).max() < 0.01


def test_energy_score_by_hand() -> None:
    logits = np.array([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert cal.energy_score(logits) == pytest.approx([math.log(2.0), math.log(4.0)])
    assert cal.energy_score(logits, 2.0) == pytest.approx(
        [2 * math.log(2.0), 2 * math.log(math.sqrt(3.0) + 1)]
    )


def test_max_probability_score() -> None:
    assert cal.max_probability(PROBS) == pytest.approx([0.9, 0.6, 0.8, 0.55])


def test_acceptance_threshold_accepts_the_stated_share() -> None:
    scores = np.arange(1, 21) / 20  # 0.05 ... 1.0
    t = cal.acceptance_threshold(scores, 0.95)
    assert t == pytest.approx(0.10)  # rejects only 0.05: 19 of 20 accepted
    assert (scores >= t).mean() == pytest.approx(0.95)
    assert cal.acceptance_threshold(scores, 1.0) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="acceptance"):
        cal.acceptance_threshold(scores, 1.5)


def test_auroc_by_hand() -> None:
    # pairs (in, out): (3,1) (3,2) (2,1) win, (2,2) ties: (3 + 0.5) / 4
    assert cal.auroc(np.array([3.0, 2.0]), np.array([1.0, 2.0])) == pytest.approx(0.875)
    assert cal.auroc(np.array([5.0, 6.0]), np.array([1.0])) == 1.0
    assert cal.auroc(np.array([0.0]), np.array([1.0, 2.0])) == 0.0


def test_knn_score_is_the_cosine_to_the_kth_nearest_bank_image() -> None:
    # bank: unit vectors at 0, 90 and 180 degrees; the image at 45 degrees (length 2 does not
    # matter): cosines 0.707, 0.707, -0.707 -> 1st and 2nd nearest 0.707, 3rd -0.707.
    bank = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    image = np.array([[math.sqrt(2), math.sqrt(2)], [0.0, 0.0]])
    half = math.sqrt(0.5)
    np.testing.assert_allclose(cal.knn_score(image, bank, 1), [half, 0.0], atol=1e-9)
    np.testing.assert_allclose(cal.knn_score(image, bank, 3), [-half, 0.0], atol=1e-9)
    with pytest.raises(ValueError, match="between 1 and the 3"):
        cal.knn_score(image, bank, 4)
