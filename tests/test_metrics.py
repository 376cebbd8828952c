"""Per-volume IoU / Dice on tiny hand-computed cases, including the empty-class policy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mri_ensemble.errors import DataError
from mri_ensemble.metrics import (
    batch_mean_iou,
    confusion_per_case,
    scores_from_confusion,
    segmentation_scores,
)

NAMES3 = ("background", "A", "B")


def test_hand_computed_2x3() -> None:
    pred = np.array([[[0, 1, 1], [2, 2, 0]]], dtype=np.uint8)  # (1, 2, 3)
    target = np.array([[[0, 1, 2], [2, 0, 0]]], dtype=np.uint8)
    cases, conf = confusion_per_case(pred, target, np.array(["a"]), 3)
    assert cases == ["a"]
    # TP, FP, FN per class
    np.testing.assert_array_equal(conf[0], [[2, 0, 1], [1, 1, 0], [1, 1, 1]])
    scores = segmentation_scores(pred, target, np.array(["a"]), NAMES3)
    assert scores["per_class"]["A"] == pytest.approx({"iou": 1 / 2, "dice": 2 / 3})
    assert scores["per_class"]["B"] == pytest.approx({"iou": 1 / 3, "dice": 2 / 4})
    assert scores["iou"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert scores["dice"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert "background" not in scores["per_class"]
    assert all(type(v) is float for v in scores["per_class"]["A"].values())
    json.dumps(scores)  # plain Python floats


def test_class_absent_everywhere_is_nan_and_left_out_of_the_mean() -> None:
    target = np.array([[[0, 2, 3], [3, 3, 0]]], dtype=np.uint8)
    pred = np.array([[[0, 2, 2], [3, 3, 0]]], dtype=np.uint8)  # no RV (1) in either
    scores = segmentation_scores(pred, target, np.array(["a"]))
    assert math.isnan(scores["per_class"]["RV"]["iou"])
    assert math.isnan(scores["per_class"]["RV"]["dice"])
    myo, lv = 1 / 2, 2 / 3  # myocardium TP1 FP1 FN0; LV TP2 FP0 FN1
    assert scores["per_class"]["myocardium"]["iou"] == pytest.approx(myo)
    assert scores["per_class"]["LV"]["iou"] == pytest.approx(lv)
    assert scores["iou"] == pytest.approx((myo + lv) / 2)


def test_class_present_in_only_one_scores_zero() -> None:
    target = np.array([[[1, 1, 0], [0, 0, 0]]], dtype=np.uint8)
    pred = np.array([[[0, 0, 0], [0, 0, 2]]], dtype=np.uint8)  # RV missed, myo invented
    scores = segmentation_scores(pred, target, np.array(["a"]))
    assert scores["per_class"]["RV"] == {"iou": 0.0, "dice": 0.0}
    assert scores["per_class"]["myocardium"] == {"iou": 0.0, "dice": 0.0}
    assert math.isnan(scores["per_class"]["LV"]["iou"])
    assert scores["iou"] == 0.0


def test_case_without_the_class_is_excluded_not_zero() -> None:
    target = np.zeros((2, 2, 3), dtype=np.uint8)
    target[0, 0, 0] = 1  # RV only in case "a"
    pred = target.copy()
    scores = segmentation_scores(pred, target, np.array(["a", "b"]))
    assert scores["per_class"]["RV"]["iou"] == 1.0  # case "b" is NaN, not 0


def test_all_empty_gives_nan() -> None:
    zeros = np.zeros((2, 2, 3), dtype=np.uint8)
    scores = segmentation_scores(zeros, zeros, np.array(["a", "a"]))
    assert math.isnan(scores["iou"]) and math.isnan(scores["dice"])


def test_scores_are_per_volume_not_per_slice_or_pooled() -> None:
    # case "a": LV 4 pixels found on slice 0, 1 pixel missed on slice 1 -> 3D IoU 4/5
    # case "b": LV 1 pixel, missed -> IoU 0
    target = np.zeros((3, 3, 3), dtype=np.uint8)
    pred = np.zeros_like(target)
    target[0, :2, :2] = 3
    pred[0, :2, :2] = 3
    target[1, 2, 2] = 3
    target[2, 1, 1] = 3
    case = np.array(["a", "a", "b"])
    lv = segmentation_scores(pred, target, case)["per_class"]["LV"]["iou"]
    assert lv == pytest.approx((4 / 5 + 0) / 2)
    per_slice = (1 + 0 + 0) / 3  # what averaging 2D slice scores would give
    pooled = 4 / 6  # what pooling all pixels would give
    assert lv != pytest.approx(per_slice) and lv != pytest.approx(pooled)


def test_cases_sorted_and_bytes_ids_accepted() -> None:
    labels = np.zeros((3, 2, 2), dtype=np.uint8)
    cases, conf = confusion_per_case(labels, labels, np.array([b"p2", b"p1", b"p2"]), 4)
    assert cases == ["p1", "p2"]
    assert conf.shape == (2, 4, 3)
    assert conf[1, 0, 0] == 8  # two slices of 4 background pixels in case p2


def test_batch_mean_iou_matches_scalar_function() -> None:
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, (6, 5, 5)).astype(np.uint8)
    later = target[3:]  # a view: RV absent from cases "b" and "c"
    later[later == 1] = 0
    case = np.repeat(["a", "b", "c"], 2)
    preds = [rng.integers(0, 4, target.shape).astype(np.uint8) for _ in range(5)]
    preds.append(np.where(target == 1, 0, target).astype(np.uint8))  # RV never predicted
    preds.append(np.zeros_like(target))
    batch = np.stack([confusion_per_case(p, target, case, 4)[1] for p in preds])
    expected = [segmentation_scores(p, target, case)["iou"] for p in preds]
    np.testing.assert_allclose(batch_mean_iou(batch), expected, rtol=0, atol=1e-15)
    _, conf = confusion_per_case(preds[0], target, case, 4)
    names = ("background", "RV", "myocardium", "LV")
    assert scores_from_confusion(conf, names)["iou"] == pytest.approx(expected[0])


def test_bad_inputs_raise_data_error() -> None:
    a = np.zeros((2, 3, 3), dtype=np.uint8)
    with pytest.raises(DataError, match="same"):
        segmentation_scores(a, a[:1], np.array(["a", "b"]))
    with pytest.raises(DataError, match="0..3"):
        segmentation_scores(a + 4, a, np.array(["a", "b"]))
    with pytest.raises(DataError, match="entries"):
        segmentation_scores(a, a, np.array(["a"]))
    with pytest.raises(DataError, match="integer"):
        segmentation_scores(a.astype(float), a, np.array(["a", "b"]))
    with pytest.raises(DataError, match="shape"):
        batch_mean_iou(np.zeros((2, 3, 3)))
