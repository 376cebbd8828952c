"""Segmentation metrics: per-volume (3D, per case) IoU and Dice, as ACDC scores them.

Slices are grouped by their ``case`` id (one patient volume at one phase, e.g.
``"patient001_ED"``); true positives, false positives and false negatives are summed over
the slices of a case, scored per case and class, then averaged over cases.

Edge-case policy (MONAI's ``ignore_empty=True`` convention), the same everywhere here:

- a class absent from both the prediction and the truth of a case scores NaN for that
  case and is left out of that class's mean over cases;
- a class present in only one of them scores 0;
- a class's value is the NaN-ignoring mean over cases; it is NaN if the class is absent
  from every case, in both prediction and truth;
- the headline mean is the mean over the foreground classes whose value is not NaN;
  it is NaN if all of them are NaN.

Class 0 is background and is never part of the per-class table or the means. NaN is kept
as ``float('nan')`` in this numeric API; callers that write JSON convert it themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mri_ensemble.errors import DataError

CLASS_NAMES = ("background", "RV", "myocardium", "LV")

# Last axis of a confusion array: counts per case and class.
TP, FP, FN = 0, 1, 2
_CHUNK_PIXELS = 1 << 22  # pixels counted per np.bincount call (bounds temporary memory)


def case_index(case: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Sorted unique case ids and, per slice, the index of its case.

    case: (N,) str or bytes (HDF5 strings are decoded as UTF-8) -> (list of n_cases str,
    (N,) int64 index into that list).
    """
    case = np.asarray(case)
    if case.ndim != 1:
        raise DataError(f"case must be a 1-D array of case ids, found shape {case.shape}")
    if case.dtype.kind == "S" or case.dtype == object:
        case = np.array([c.decode() if isinstance(c, bytes) else str(c) for c in case], dtype=str)
    names, inverse = np.unique(case.astype(str), return_inverse=True)
    return [str(n) for n in names], inverse.reshape(-1).astype(np.int64)


def _check_labels(name: str, labels: np.ndarray, n_classes: int) -> None:
    if labels.dtype.kind not in "iu":
        raise DataError(f"{name} must hold integer labels, found dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(
            f"{name} labels must lie in 0..{n_classes - 1}, "
            f"found range {labels.min()}..{labels.max()}"
        )


def confusion_per_case(
    pred: np.ndarray, target: np.ndarray, case: np.ndarray, n_classes: int
) -> tuple[list[str], np.ndarray]:
    """TP, FP and FN per case and class, summed over each case's slices.

    pred, target: (N, ...) integer labels in 0..n_classes-1 (usually (N, H, W) uint8).
    case: (N,) case id of each slice.
    Returns (sorted unique case ids, counts (n_cases, n_classes, 3) int64 with last axis
    TP, FP, FN). One ``np.bincount`` over (case, true class, predicted class) indices.
    """
    pred = np.asarray(pred)
    target = np.asarray(target)
    if n_classes < 2:
        raise DataError(f"n_classes must be at least 2, found {n_classes}")
    if pred.shape != target.shape or pred.ndim < 1:
        raise DataError(
            f"pred and target must have the same (N, ...) shape, found {pred.shape} and "
            f"{target.shape}"
        )
    names, idx = case_index(case)
    if idx.shape[0] != pred.shape[0]:
        raise DataError(f"case has {idx.shape[0]} entries but there are {pred.shape[0]} slices")
    _check_labels("pred", pred, n_classes)
    _check_labels("target", target, n_classes)
    n_cases = len(names)
    per_slice = int(np.prod(pred.shape[1:]))
    cells = n_cases * n_classes * n_classes
    matrix = np.zeros(cells, dtype=np.int64)
    step = max(1, _CHUNK_PIXELS // max(per_slice, 1))  # slices per chunk: bounded memory
    for s in range(0, pred.shape[0], step):
        # flat index ((case * C) + true) * C + predicted, one per pixel  # (n * H * W,)
        flat = np.repeat(idx[s : s + step], per_slice) * n_classes
        flat += target[s : s + step].reshape(-1)
        flat *= n_classes
        flat += pred[s : s + step].reshape(-1)
        matrix += np.bincount(flat, minlength=cells)
    # (cases, true, predicted) -> (cases, classes, 3)
    return names, counts_from_matrix(matrix.reshape(n_cases, n_classes, n_classes))


def counts_from_matrix(matrix: np.ndarray) -> np.ndarray:
    """Confusion matrices (..., C, C) [true, predicted] -> counts (..., C, 3) TP, FP, FN."""
    tp = np.diagonal(matrix, axis1=-2, axis2=-1)
    fp = matrix.sum(axis=-2) - tp  # predicted as the class, truly another
    fn = matrix.sum(axis=-1) - tp  # truly the class, predicted as another
    return np.stack([tp, fp, fn], axis=-1).astype(np.int64)


def _per_case(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts (..., C, 3) -> IoU and Dice (..., C), NaN where the class is in neither."""
    conf = conf.astype(np.float64)
    tp, fp, fn = conf[..., TP], conf[..., FP], conf[..., FN]
    union = tp + fp + fn
    empty = union == 0
    safe = np.where(empty, 1.0, union)
    iou = np.where(empty, np.nan, tp / safe)
    dice = np.where(empty, np.nan, 2 * tp / np.where(empty, 1.0, union + tp))
    return iou, dice


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """Mean over ``axis`` ignoring NaN; NaN (no warning) where all values are NaN."""
    valid = ~np.isnan(x)
    count = valid.sum(axis=axis)
    total = np.where(valid, x, 0.0).sum(axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _class_values(score: np.ndarray) -> np.ndarray:
    """Per-case scores (..., n_cases, C) -> per foreground class (..., C - 1)."""
    return _nanmean(score[..., 1:], axis=-2)


def scores_from_confusion(conf: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Mean and per-class foreground IoU and Dice from counts (n_cases, C, 3).

    class_names: C names, index 0 the background (excluded). Returns
    ``{"iou": float, "dice": float, "per_class": {name: {"iou": float, "dice": float}}}``
    with Python floats; NaN follows the module's edge-case policy.
    """
    conf = np.asarray(conf)
    if conf.ndim != 3 or conf.shape[-1] != 3 or conf.shape[1] != len(class_names):
        raise DataError(
            f"confusion counts must have shape (n_cases, {len(class_names)}, 3), found {conf.shape}"
        )
    iou, dice = _per_case(conf)
    class_iou, class_dice = _class_values(iou), _class_values(dice)
    per_class = {
        name: {"iou": float(class_iou[i]), "dice": float(class_dice[i])}
        for i, name in enumerate(class_names[1:])
    }
    return {
        "iou": float(_nanmean(class_iou, axis=-1)),
        "dice": float(_nanmean(class_dice, axis=-1)),
        "per_class": per_class,
    }


def segmentation_scores(
    pred: np.ndarray,
    target: np.ndarray,
    case: np.ndarray,
    class_names: Sequence[str] = CLASS_NAMES,
) -> dict[str, Any]:
    """Per-volume foreground IoU and Dice of labels ``pred`` against ``target``.

    pred, target: (N, H, W) integer labels in 0..len(class_names)-1; case: (N,) ids.
    Returns the dict of :func:`scores_from_confusion` (edge cases: see the module doc).
    """
    _, conf = confusion_per_case(pred, target, case, len(class_names))
    return scores_from_confusion(conf, class_names)


def batch_mean_iou(conf_batch: np.ndarray) -> np.ndarray:
    """Mean foreground IoU of many candidates at once, same policy as the scalar functions.

    conf_batch: (K, n_cases, C, 3) counts -> (K,) float64, NaN where every foreground class
    is absent from every case in both prediction and truth.
    """
    conf_batch = np.asarray(conf_batch)
    if conf_batch.ndim != 4 or conf_batch.shape[-1] != 3:
        raise DataError(
            f"batched confusion counts must have shape (K, n_cases, C, 3), found {conf_batch.shape}"
        )
    iou, _ = _per_case(conf_batch)
    return _nanmean(_class_values(iou), axis=-1)
