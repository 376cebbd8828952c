"""Where to distrust an ensemble: per-pixel uncertainty from its members, and what it tells
about the error, per case.

Segmentation (member probabilities ``p_m``, weights ``w_m`` on the simplex, fused
``p = sum_m w_m p_m``):

- predictive entropy ``H[p] = -sum_c p_c log p_c`` (nats; 0 .. log C): how unsure the fused
  prediction is, whatever the cause;
- mutual information ``H[p] - sum_m w_m H[p_m]`` (>= 0): the part of that entropy that
  comes from the members disagreeing (epistemic), zero when every member says the same.

Per-class weights (``(M, C)``) fuse per class; their per-model mean weighs the members here,
and the fused probabilities are renormalised over the classes.

Reconstruction (member images ``x_m``): the weighted variance ``sum_m w_m (x_m - x)^2``
around the fused image ``x = sum_m w_m x_m``.

:func:`error_agreement` then asks, per case, whether the uncertainty rises where the error
is (Pearson correlation over the case's pixels) and how much the most uncertain cases lose
against the rest (:func:`uncertain_cases`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import DataError
from .fusion import normalise
from .scorers import CHUNK_ELEMENTS

EPS = 1e-12


def _model_weights(weights: np.ndarray | Sequence[float], n_models: int) -> np.ndarray:
    """(M,) weights on the simplex; per-class (M, C) weights -> their per-model mean."""
    w = normalise(weights, n_models)
    return w.mean(axis=1) if w.ndim == 2 else w


def entropy(probs: np.ndarray, axis: int = 1) -> np.ndarray:
    """Entropy (nats) of probabilities along ``axis`` (renormalised there first)."""
    p = np.asarray(probs, dtype=np.float64)
    p = p / np.clip(p.sum(axis=axis, keepdims=True), EPS, None)
    return -(p * np.log(np.clip(p, EPS, None))).sum(axis=axis)


def segmentation_uncertainty(
    probs: np.ndarray, weights: np.ndarray | Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """(predictive entropy, mutual information), each (N, H, W) float32, of the members'
    probabilities ``probs`` (M, N, C, H, W) fused with ``weights``. Works in chunks."""
    probs = np.asarray(probs)
    if probs.ndim != 5 or probs.shape[0] == 0:
        raise DataError(f"probs must have shape (M >= 1, N, C, H, W), found {probs.shape}")
    w = _model_weights(weights, probs.shape[0])
    n = probs.shape[1]
    ent = np.empty((n, *probs.shape[3:]), dtype=np.float32)
    mi = np.empty_like(ent)
    step = max(1, CHUNK_ELEMENTS // max(1, int(np.prod(probs.shape[2:])) * probs.shape[0]))
    for s in range(0, n, step):
        chunk = probs[:, s : s + step].astype(np.float64)  # (M, n, C, H, W)
        fused = np.einsum("m,mnchw->nchw", w, chunk)
        h = entropy(fused, axis=1)
        expected = np.einsum("m,mnhw->nhw", w, entropy(chunk, axis=2))
        ent[s : s + step] = h
        mi[s : s + step] = np.clip(h - expected, 0.0, None)  # >= 0 up to rounding
    return ent, mi


def image_variance(recons: np.ndarray, weights: np.ndarray | Sequence[float]) -> np.ndarray:
    """Weighted variance (N, H, W) float32 of the members' images ``recons`` (M, N, H, W)
    around their weighted mean."""
    recons = np.asarray(recons)
    if recons.ndim != 4 or recons.shape[0] == 0:
        raise DataError(f"recons must have shape (M >= 1, N, H, W), found {recons.shape}")
    w = _model_weights(weights, recons.shape[0])
    x = recons.astype(np.float64)
    mean = np.einsum("m,mnhw->nhw", w, x)
    return np.einsum("m,mnhw->nhw", w, (x - mean) ** 2).astype(np.float32)


def case_means(values: np.ndarray, case: np.ndarray) -> dict[str, float]:
    """Mean of a per-pixel map (N, H, W) over each case's slices and pixels."""
    case = np.asarray(case)
    return {str(c): float(np.mean(values[case == c])) for c in np.unique(case)}


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays (flattened); NaN when either is constant."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def uncertain_cases(
    uncertainty: dict[str, float], score: dict[str, float], fraction: float = 0.2
) -> dict[str, object]:
    """Rank cases by mean uncertainty; the most uncertain ``fraction`` (at least one case,
    never all) against the rest: their mean score, and how much less the flagged ones
    score. Fewer than two cases: nothing is flagged and the scores are NaN."""
    if not 0 < fraction < 1:
        raise DataError(f"fraction must lie in (0, 1), found {fraction}")
    cases = sorted(uncertainty, key=lambda c: (-uncertainty[c], c))
    if len(cases) < 2:
        return {"flagged": [], "flagged_score": float("nan"), "rest_score": float("nan"),
                "loss": float("nan")}  # fmt: skip
    k = min(len(cases) - 1, max(1, int(np.ceil(fraction * len(cases)))))
    flagged, rest = cases[:k], cases[k:]
    fs = float(np.mean([score[c] for c in flagged]))
    rs = float(np.mean([score[c] for c in rest]))
    return {"flagged": flagged, "flagged_score": fs, "rest_score": rs, "loss": rs - fs}


def error_agreement(
    uncertainty: np.ndarray,
    error: np.ndarray,
    case: np.ndarray,
    score: dict[str, float],
    fraction: float = 0.2,
) -> dict[str, object]:
    """Does the uncertainty map (N, H, W) rise where the error map (N, H, W) is? Per case the
    Pearson correlation over its pixels, their mean, the per-case mean uncertainty, and the
    most uncertain ``fraction`` of cases against the rest on ``score`` (per case)."""
    case = np.asarray(case)
    if uncertainty.shape != error.shape or len(case) != len(error):
        raise DataError(
            f"uncertainty {uncertainty.shape}, error {error.shape} and {len(case)} case ids differ"
        )
    corr = {str(c): pearson(uncertainty[case == c], error[case == c]) for c in np.unique(case)}
    finite = [v for v in corr.values() if np.isfinite(v)]
    means = case_means(uncertainty, case)
    return {
        "correlation": float(np.mean(finite)) if finite else float("nan"),
        "correlation_per_case": corr,
        "mean_uncertainty": float(np.mean(uncertainty)),
        "per_case": means,
        "flag": uncertain_cases(means, score, fraction),
    }
