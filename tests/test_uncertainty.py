"""Known answers for the ensemble's uncertainty maps and the calibration of its probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from mri_ensemble.ensemble.calibration import (
    expected_calibration_error,
    fit_temperature,
    reliability,
    temper,
)
from mri_ensemble.ensemble.uncertainty import (
    error_agreement,
    image_variance,
    segmentation_uncertainty,
    uncertain_cases,
)
from mri_ensemble.errors import DataError
from mri_ensemble.tasks import get_task


def _probs(rng: np.random.Generator, n=3, c=4, h=5, w=6) -> np.ndarray:
    p = rng.random((n, c, h, w)).astype(np.float32) + 0.05
    return p / p.sum(axis=1, keepdims=True)


def test_identical_members_disagree_nowhere():
    p = _probs(np.random.default_rng(0))
    entropy, mi = segmentation_uncertainty(np.stack([p, p, p]), [0.2, 0.3, 0.5])
    expected = -(p * np.log(p)).sum(axis=1)
    np.testing.assert_allclose(entropy, expected, rtol=1e-5)
    np.testing.assert_allclose(mi, 0.0, atol=1e-6)
    images = np.random.default_rng(1).random((2, 4, 5))
    np.testing.assert_allclose(image_variance(np.stack([images] * 4), np.ones(4)), 0.0, atol=1e-7)


def test_two_members_disagreeing_on_one_pixel_give_log2_there_and_zero_elsewhere():
    a = np.zeros((1, 2, 3, 3), np.float32)
    a[:, 0] = 1.0  # member a: class 0 everywhere, certain
    b = a.copy()
    b[0, :, 1, 2] = [0.0, 1.0]  # member b: class 1 at one pixel
    entropy, mi = segmentation_uncertainty(np.stack([a, b]), [0.5, 0.5])
    expected = np.zeros((1, 3, 3))
    expected[0, 1, 2] = np.log(2)
    np.testing.assert_allclose(entropy, expected, atol=1e-6)
    np.testing.assert_allclose(mi, expected, atol=1e-6)  # all of it from the disagreement
    # unequal weights: entropy of (0.25, 0.75), still all mutual information
    entropy, mi = segmentation_uncertainty(np.stack([a, b]), [1.0, 3.0])
    h = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    assert entropy[0, 1, 2] == pytest.approx(h, abs=1e-6) == mi[0, 1, 2]
    # a per-class weight matrix weighs the members by its per-model mean
    entropy_pc, _ = segmentation_uncertainty(np.stack([a, b]), [[1.0, 1.0], [3.0, 3.0]])
    np.testing.assert_allclose(entropy_pc, entropy, atol=1e-6)


def test_image_variance_is_the_weighted_spread_around_the_fused_image():
    x = np.zeros((2, 1, 2, 2))
    x[1] = 2.0  # members at 0 and 2, weights 1/4, 3/4: mean 1.5, variance 0.75
    np.testing.assert_allclose(image_variance(x, [1, 3]), 0.75, rtol=1e-6)
    with pytest.raises(DataError, match="recons must have shape"):
        image_variance(np.zeros((2, 3)), [1, 1])


def test_the_most_uncertain_cases_are_flagged_and_their_loss_measured():
    unc = {"a": 0.9, "b": 0.1, "c": 0.2, "d": 0.3, "e": 0.8}
    score = {"a": 0.5, "b": 0.9, "c": 0.9, "d": 0.8, "e": 0.6}
    flag = uncertain_cases(unc, score, fraction=0.2)
    assert flag["flagged"] == ["a"]  # ceil(0.2 * 5) = 1 case
    assert flag["flagged_score"] == pytest.approx(0.5)
    assert flag["rest_score"] == pytest.approx((0.9 + 0.9 + 0.8 + 0.6) / 4)
    assert flag["loss"] == pytest.approx(0.8 - 0.5)
    assert uncertain_cases(unc, score, 0.4)["flagged"] == ["a", "e"]
    with pytest.raises(DataError, match="fraction"):
        uncertain_cases(unc, score, 1.0)
    alone = uncertain_cases({"a": 0.5}, {"a": 0.9})  # one case: nothing to compare
    assert alone["flagged"] == [] and np.isnan(alone["loss"])


def test_uncertainty_that_follows_the_error_correlates_per_case():
    rng = np.random.default_rng(3)
    error = (rng.random((4, 8, 8)) > 0.8).astype(np.float32)
    case = np.array(["p1", "p1", "p2", "p2"])
    noise = rng.random(error.shape) * 0.1
    out = error_agreement(error + noise, error, case, {"p1": 0.9, "p2": 0.7})
    assert out["correlation"] > 0.9
    assert set(out["correlation_per_case"]) == {"p1", "p2"}
    unrelated = error_agreement(rng.random(error.shape), error, case, {"p1": 0.9, "p2": 0.7})
    assert abs(unrelated["correlation"]) < 0.2


def _calibrated(rng: np.random.Generator, n: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """Two classes, confidence c ~ U(0.5, 1) in the drawn label, true with probability c."""
    conf = rng.uniform(0.5, 1.0, n)
    top = rng.integers(0, 2, n)
    correct = rng.random(n) < conf
    labels = np.where(correct, top, 1 - top)
    p = np.where(top == 0, conf, 1 - conf)
    probs = np.stack([p, 1 - p]).T.reshape(n, 2, 1, 1).astype(np.float32)
    return probs, labels.reshape(n, 1, 1)


def test_perfectly_calibrated_probabilities_have_ece_near_zero():
    probs, labels = _calibrated(np.random.default_rng(4))
    assert expected_calibration_error(probs, labels) < 0.01
    r = reliability(probs, labels)
    assert sum(r["count"]) == labels.size and len(r["edges"]) == 16
    filled = [i for i, c in enumerate(r["count"]) if c > 1000]
    for i in filled:  # accuracy follows confidence in every bin with data
        assert abs(r["accuracy"][i] - r["confidence"][i]) < 0.02


def test_temperature_scaling_cuts_the_ece_of_an_over_confident_model():
    probs, labels = _calibrated(np.random.default_rng(5))
    over = temper(probs, 0.3)  # sharpened: softmax(log p / 0.3)
    before = expected_calibration_error(over, labels)
    assert before > 0.1
    t = fit_temperature(over, labels)
    assert t == pytest.approx(1 / 0.3, rel=0.1)  # undoes the sharpening
    after = expected_calibration_error(temper(over, t), labels)
    assert after < 0.02 < before
    np.testing.assert_array_equal(temper(over, t).argmax(1), over.argmax(1))  # labels kept
    with pytest.raises(DataError, match="positive"):
        temper(probs, 0.0)
    with pytest.raises(DataError, match="labels"):
        expected_calibration_error(probs, labels[:, 0])


def test_tasks_name_their_maps_and_errors():
    seg, rec = get_task("segmentation"), get_task("reconstruction")
    p = _probs(np.random.default_rng(6))
    maps = seg.uncertainty_maps(np.stack([p, p]), np.array([0.5, 0.5]))
    assert list(maps) == ["entropy", "mutual_information"]
    truth = p.argmax(1)
    assert seg.error_map(p, truth).sum() == 0 and seg.error_map(truth, 1 - truth).min() >= 0
    images = np.ones((2, 1, 3, 3))
    assert list(rec.uncertainty_maps(images, np.array([1.0, 1.0]))) == ["variance"]
    assert rec.error_map(images[0], images[0] * 3).max() == pytest.approx(2.0)
