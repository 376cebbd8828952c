"""Do the probabilities mean what they say? Calibration of segmentation probabilities.

- :func:`reliability`: pixels binned by their top-label confidence ``max_c p_c`` into equal
  bins of [0, 1]; per bin the mean confidence, the accuracy (how often the top label is the
  truth) and the count: a reliability diagram's points.
- :func:`expected_calibration_error` (ECE): ``sum_b n_b / N |accuracy_b - confidence_b|``,
  over every pixel of a split (Guo et al. 2017, top-label, 15 bins). A perfectly calibrated
  model has ECE 0.
- :func:`fit_temperature`: temperature scaling, one scalar ``T`` per member fitted on val
  by the negative log-likelihood of the truth, applied before fusion: ``p_T ∝ p ** (1 / T)``
  (a softmax of ``logits / T``: the saved probabilities are the softmax of the logits, so
  ``log p`` is the logits up to a constant per pixel). ``T > 1`` softens an over-confident
  member; the top label, and so IoU and Dice of that member, never change.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError

BINS = 15
EPS = 1e-12
T_RANGE = (0.05, 20.0)


def _checked(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs, labels = np.asarray(probs), np.asarray(labels)
    if probs.ndim != 4 or labels.shape != (probs.shape[0], *probs.shape[2:]):
        raise DataError(
            f"probabilities (N, C, H, W) and labels (N, H, W) expected, found {probs.shape} "
            f"and {labels.shape}"
        )
    return probs, labels


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> dict[str, list]:
    """Per confidence bin of probabilities (N, C, H, W) against labels (N, H, W): ``edges``
    (bins + 1), ``confidence`` and ``accuracy`` (NaN in an empty bin) and ``count``."""
    probs, labels = _checked(probs, labels)
    conf = probs.max(axis=1).ravel().astype(np.float64)
    correct = (probs.argmax(axis=1) == labels).ravel()
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=bins)
    acc_sum = np.bincount(idx, weights=correct.astype(np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
        acc = np.where(count > 0, acc_sum / count, np.nan)
    return {
        "edges": edges.tolist(),
        "confidence": mean_conf.tolist(),
        "accuracy": acc.tolist(),
        "count": count.astype(int).tolist(),
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Top-label ECE of probabilities (N, C, H, W) against labels (N, H, W) (0 .. 1)."""
    r = reliability(probs, labels, bins)
    count = np.asarray(r["count"], dtype=np.float64)
    if count.sum() == 0:
        raise DataError("no pixels to calibrate on")
    gap = np.abs(np.nan_to_num(np.asarray(r["accuracy"]) - np.asarray(r["confidence"])))
    return float((count * gap).sum() / count.sum())


def temper(probs: np.ndarray, temperature: float, axis: int = 1) -> np.ndarray:
    """Probabilities tempered by ``temperature``: ``softmax(log p / T)`` along ``axis``."""
    if not np.isfinite(temperature) or temperature <= 0:
        raise DataError(f"a temperature must be a positive number, found {temperature}")
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), EPS, None)) / temperature
    logp -= logp.max(axis=axis, keepdims=True)
    out = np.exp(logp)
    return (out / out.sum(axis=axis, keepdims=True)).astype(np.float32)


def _nll(logp: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of labels (P,) under softmax(logp (P, C) / T)."""
    z = logp / temperature
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(labels)), labels]))


def fit_temperature(
    probs: np.ndarray, labels: np.ndarray, max_pixels: int = 400_000, seed: int = 0
) -> float:
    """The temperature in [0.05, 20] that minimises the NLL of labels (N, H, W) under
    tempered probabilities (N, C, H, W) (a bounded scalar search over log T, on at most
    ``max_pixels`` pixels drawn with ``seed``)."""
    from scipy.optimize import minimize_scalar

    probs, labels = _checked(probs, labels)
    c = probs.shape[1]
    logp = np.log(np.clip(np.moveaxis(probs, 1, -1).reshape(-1, c).astype(np.float64), EPS, None))
    y = labels.reshape(-1).astype(np.int64)
    if y.size == 0:
        raise DataError("no pixels to fit a temperature on")
    if y.size > max_pixels:
        keep = np.random.default_rng(seed).choice(y.size, max_pixels, replace=False)
        logp, y = logp[keep], y[keep]
    lo, hi = np.log(T_RANGE[0]), np.log(T_RANGE[1])
    res = minimize_scalar(
        lambda s: _nll(logp, y, float(np.exp(s))), bounds=(lo, hi), method="bounded",
        options={"xatol": 1e-4},
    )  # fmt: skip
    return float(np.exp(res.x))
