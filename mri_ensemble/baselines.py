"""A non-learned intensity-threshold baseline for cardiac short-axis segmentation.

Deliberately simple reference that a trained network must beat: classical image
processing only, no parameters fitted to labels. In cine MRI the blood pools are bright,
the myocardium is intermediate and lungs/air are dark, so per volume (case):

1. multi-Otsu (3 classes) on the volume's intensities -> dark / tissue / bright;
2. per slice, bright connected components whose centroid lies in a central disk
   (``CENTRE_FRACTION`` of the image size from the centre); the one with the largest
   ``area * roundness**ROUNDNESS_POWER`` (roundness = minor / major axis) is the LV
   cavity (3), holes filled (papillary muscles);
3. the largest other bright component within ``RV_REACH`` ring widths of the LV (the
   septum lies between them) is the RV cavity (1);
4. the myocardium (2) is the tissue-class pixels (neither bright nor dark) within a ring
   around the LV whose width is ``RING_FRACTION`` of the LV's equivalent radius.

Everything else is background (0). It never fails on valid input: constant or empty
slices and volumes, or slices without a central bright region, come out all background.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_multiotsu

from mri_ensemble.errors import DataError
from mri_ensemble.metrics import case_index

log = logging.getLogger(__name__)

CENTRE_FRACTION = 0.3  # LV centroid within this fraction of min(H, W) from the centre
RING_FRACTION = 0.5  # myocardial ring width / LV equivalent radius
ROUNDNESS_POWER = 4  # LV choice: a round cavity beats a larger RV crescent
MIN_RING = 2  # pixels
RV_REACH = 2.0  # the RV cavity starts within this many ring widths of the LV (septum)
MIN_AREA_FRACTION = 1 / 2000  # bright components smaller than this share of a slice are noise


def _thresholds(volume: np.ndarray) -> tuple[float, float] | None:
    """(dark/tissue, tissue/bright) thresholds of a volume, None if it is constant."""
    lo, hi = float(volume.min()), float(volume.max())
    if hi <= lo:
        return None
    try:
        t_low, t_high = threshold_multiotsu(volume, classes=3)
    except ValueError:  # fewer than 3 grey levels: split the two that exist
        return lo, (lo + hi) / 2
    return float(t_low), float(t_high)


def _component_stats(labels: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """Area, centroid (y, x) and roundness (minor / major axis, in [0, 1]) of components 1..n."""
    yy, xx = np.indices(labels.shape, dtype=np.float64)
    flat = labels.ravel()
    y, x = yy.ravel(), xx.ravel()

    def total(weights: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(flat, weights=weights, minlength=n + 1)[1:]

    area = total()
    cy, cx = total(y) / area, total(x) / area
    vyy = total(y * y) / area - cy**2
    vxx = total(x * x) / area - cx**2
    vxy = total(x * y) / area - cx * cy
    # eigenvalues of the 2x2 covariance; roundness = sqrt(minor / major) = axis ratio
    half_trace, root = (vyy + vxx) / 2, np.sqrt(((vyy - vxx) / 2) ** 2 + vxy**2)
    major, minor = half_trace + root, np.maximum(half_trace - root, 0.0)
    roundness = np.where(major > 1e-12, np.sqrt(minor / np.maximum(major, 1e-12)), 1.0)
    return area, cy, cx, roundness


def _segment_slice(image: np.ndarray, t_low: float, t_high: float) -> np.ndarray:
    """One (H, W) slice -> (H, W) uint8 labels 0..3 (see the module doc)."""
    h, w = image.shape
    out = np.zeros((h, w), dtype=np.uint8)
    bright = image > t_high
    labels, n = ndimage.label(bright)
    if n == 0:
        return out
    area, cy, cx, roundness = _component_stats(labels, n)
    centre_dist = np.hypot(cy - (h - 1) / 2, cx - (w - 1) / 2)
    min_area = max(4.0, h * w * MIN_AREA_FRACTION)
    ok = (area >= min_area) & (centre_dist <= CENTRE_FRACTION * min(h, w))
    if not ok.any():
        return out
    lv_id = int(np.argmax(np.where(ok, area * roundness**ROUNDNESS_POWER, -1.0))) + 1
    lv = ndimage.binary_fill_holes(labels == lv_id)

    ring_width = max(MIN_RING, round(RING_FRACTION * np.sqrt(lv.sum() / np.pi)))
    dist = ndimage.distance_transform_edt(~lv)  # (H, W) distance to the LV, 0 inside
    ring = (dist > 0) & (dist <= ring_width)

    rv = np.zeros_like(lv)
    others = np.flatnonzero(area >= min_area) + 1
    others = others[others != lv_id]
    if others.size:
        reach = np.asarray(ndimage.minimum(dist, labels, others))
        near = others[reach <= RV_REACH * ring_width]
        if near.size:
            rv_id = near[np.argmax(area[near - 1])]
            rv = (labels == rv_id) & ~lv

    myo = ring & ~bright & (image > t_low) & ~rv
    out[myo] = 2
    out[rv] = 1
    out[lv] = 3
    return out


def threshold_segmentation(image: np.ndarray, case: np.ndarray) -> np.ndarray:
    """Label cardiac short-axis slices with the threshold baseline.

    image: (N, H, W) float, per-volume normalised (usually to [0, 1]); case: (N,) case id
    of each slice (thresholds are chosen per case, i.e. per volume) -> (N, H, W) uint8 in
    0 background, 1 RV, 2 myocardium, 3 LV. Raises DataError on wrong shapes or NaN/inf.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise DataError(f"image must have shape (N, H, W), found {image.shape}")
    names, idx = case_index(case)
    if idx.shape[0] != image.shape[0]:
        raise DataError(f"case has {idx.shape[0]} entries but image has {image.shape[0]} slices")
    if not np.all(np.isfinite(image)):
        raise DataError("image contains NaN or infinite values")
    image = image.astype(np.float32, copy=False)
    out = np.zeros(image.shape, dtype=np.uint8)
    for i, name in enumerate(names):
        rows = np.flatnonzero(idx == i)
        thresholds = _thresholds(image[rows])
        if thresholds is None:
            log.debug("threshold baseline: case %s is constant, all background", name)
            continue
        for r in rows:
            out[r] = _segment_slice(image[r], *thresholds)
    return out
