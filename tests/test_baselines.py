"""Threshold baseline on a synthetic short-axis phantom and on empty input."""

from __future__ import annotations

import numpy as np
import pytest

from mri_ensemble.baselines import threshold_segmentation
from mri_ensemble.errors import DataError
from mri_ensemble.metrics import segmentation_scores


def _phantom(n: int, seed: int, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size) images and labels: dark background, bright LV disk, darker
    myocardial ring around it, bright RV crescent beside it, mild Gaussian noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, labels = [], []
    for _ in range(n):
        cy, cx = size / 2 + rng.integers(-4, 5), size / 2 + rng.integers(-4, 5)
        r_lv = 9 + rng.integers(0, 5)
        d = np.hypot(yy - cy, xx - cx)
        angle = np.arctan2(yy - cy, xx - cx)
        lab = np.zeros((size, size), dtype=np.uint8)
        lab[d < r_lv + 5] = 2
        lab[d < r_lv] = 3
        lab[(d >= r_lv + 7) & (d < r_lv + 14) & (np.abs(angle) > 0.55 * np.pi)] = 1
        intensity = np.array([0.1, 0.85, 0.4, 0.9])[lab]
        images.append(intensity + rng.normal(0, 0.03, lab.shape))
        labels.append(lab)
    return np.clip(np.array(images), 0, 1).astype(np.float32), np.array(labels)


def test_finds_lv_rv_and_myocardium_on_phantom() -> None:
    image, label = _phantom(12, seed=0)
    case = np.repeat(["p1_ED", "p1_ES", "p2_ED"], 4)
    pred = threshold_segmentation(image, case)
    assert pred.shape == label.shape and pred.dtype == np.uint8
    assert pred.min() >= 0 and pred.max() <= 3
    scores = segmentation_scores(pred, label, case)
    assert scores["per_class"]["LV"]["iou"] > 0.7
    assert scores["per_class"]["myocardium"]["iou"] > 0.5
    assert scores["per_class"]["RV"]["iou"] > 0.5


def test_empty_slices_and_volumes_are_background() -> None:
    image, _ = _phantom(4, seed=1, size=48)
    image[2] = 0.0  # an empty slice inside a normal volume
    case = np.array(["a", "a", "a", "a"])
    pred = threshold_segmentation(image, case)
    assert np.all(pred[2] == 0)
    assert np.all(threshold_segmentation(np.zeros((3, 16, 16)), np.array(["z"] * 3)) == 0)
    assert np.all(threshold_segmentation(np.full((2, 8, 8), 0.5), np.array(["c", "c"])) == 0)
    two_levels = np.zeros((1, 16, 16))
    two_levels[0, 6:10, 6:10] = 1.0  # binary image: only 2 grey levels, still no crash
    assert threshold_segmentation(two_levels, np.array(["b"])).max() <= 3


def test_bad_input_raises_data_error() -> None:
    with pytest.raises(DataError, match=r"\(N, H, W\)"):
        threshold_segmentation(np.zeros((4, 4)), np.array(["a"] * 4))
    with pytest.raises(DataError, match="entries"):
        threshold_segmentation(np.zeros((2, 4, 4)), np.array(["a"]))
    with pytest.raises(DataError, match="NaN"):
        threshold_segmentation(np.full((1, 4, 4), np.nan), np.array(["a"]))
