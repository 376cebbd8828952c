"""Weighted-ensemble search: choose per-model weights on validation outputs.

Segmentation: the ensemble of M models is ``argmax_c sum_m w_m p_m[c]``, scored by the
mean foreground IoU of :mod:`mri_ensemble.metrics` (per-volume, NaN policy as documented
there). Reconstruction: the ensemble is the weighted sum of images ``sum_m w_m x_m``,
scored by SSIM with fastMRI's semantics (:mod:`mri_ensemble.mri.quality`). Weights ``w``
lie on the simplex (non-negative, summing to 1) and are searched on validation outputs
only (report R3 searched and reported on the same data; we do not).

Every method's candidate pool holds each one-hot (every single model) and the uniform
weights, so the chosen val score is never below the best single model. Among equal
scores the weights nearest to uniform (L2) win, then the earlier candidate; a search is
deterministic for a seed.

Speed (segmentation): no network is re-run. A pixel on which every model's argmax agrees keeps that label
for any non-negative weights (the combination cannot prefer another class), so its counts
are computed once; only the disputed pixels are re-scored per candidate. A batch of K
candidates is scored with one matrix product over the model axis per chunk of disputed
pixels, an argmax, and one ``np.bincount`` over (candidate, case, true, predicted) indices.

Memory: the disputed pixels are copied once, (M, C, P) in the input dtype (at most the
size of ``probs``); each chunk then holds ``CHUNK_ELEMENTS`` candidate-pixels, about
``CHUNK_ELEMENTS * (4 * C + 3 * 8)`` bytes (~10 MB for C = 4, cache-sized), whatever K
and N are; the counts add ``K * n_cases * C * C * 8`` bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from mri_ensemble.errors import ConfigError, DataError
from mri_ensemble.metrics import batch_mean_iou, case_index, counts_from_matrix
from mri_ensemble.mri.quality import ssim_slices

log = logging.getLogger(__name__)

METHODS = ("mean", "random", "nelder_mead", "random+nelder_mead")
CHUNK_ELEMENTS = 1 << 18  # candidate-pixels scored per chunk (bounds memory, see module doc)
NELDER_MEAD_MAX_EVALS = 200  # objective evaluations of one Nelder-Mead refinement
NELDER_MEAD_STEP = 1.0  # initial simplex step in softmax logits (a weight ratio of e)
_TIE_ATOL = 1e-12  # scores closer than this are ties


@dataclass
class SearchResult:
    """Outcome of :func:`search_weights`.

    weights: (M,) non-negative, sums to 1. score: val mean foreground IoU of ``weights``.
    trace: (weights, score) of the notable candidates, in order: each one-hot (model
    order), uniform, the chosen weights.
    """

    method: str
    weights: np.ndarray
    score: float
    candidates_evaluated: int
    trace: list[tuple[list[float], float]] = field(default_factory=list)


def _normalise(weights: np.ndarray, n_models: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n_models,):
        raise DataError(f"weights must have shape ({n_models},), found {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise DataError(f"weights must be finite, non-negative and not all zero, found {w}")
    return w / w.sum()


def combine(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted average of model probabilities.

    probs: (M, N, C, H, W) any float dtype; weights: (M,) non-negative, normalised here to
    sum to 1 -> (N, C, H, W) float32. Works in chunks of slices (no float32 copy of probs).
    """
    probs = np.asarray(probs)
    if probs.ndim != 5 or probs.shape[0] == 0:
        raise DataError(f"probs must have shape (M >= 1, N, C, H, W), found {probs.shape}")
    w = _normalise(weights, probs.shape[0]).astype(np.float32)
    out = np.empty(probs.shape[1:], dtype=np.float32)
    step = max(1, CHUNK_ELEMENTS // max(1, int(np.prod(probs.shape[2:]))))
    for s in range(0, probs.shape[1], step):
        chunk = probs[:, s : s + step].astype(np.float32)  # (M, n, C, H, W)
        out[s : s + step] = np.einsum("m,mnchw->nchw", w, chunk)  # (n, C, H, W)
    return out


def _validate(probs: np.ndarray, target: np.ndarray, case: np.ndarray) -> None:
    if probs.ndim != 5:
        raise DataError(f"probs must have shape (M, N, C, H, W), found {probs.shape}")
    m, n, c, h, w = probs.shape
    if m == 0:
        raise DataError("probs holds no models (M = 0); the ensemble needs at least one")
    if n == 0:
        raise DataError("probs holds no slices (N = 0); the search needs validation data")
    if c < 2:
        raise DataError(f"probs must have at least 2 classes, found C = {c}")
    if target.shape != (n, h, w):
        raise DataError(
            f"target must have shape (N, H, W) = {(n, h, w)} to match probs {probs.shape}, "
            f"found {target.shape}"
        )
    if np.asarray(case).shape != (n,):
        raise DataError(f"case must have shape ({n},), found {np.asarray(case).shape}")
    if probs.dtype.kind != "f":
        raise DataError(f"probs must be floating point, found dtype {probs.dtype}")
    for i in range(m):
        if not np.all(np.isfinite(probs[i])):
            raise DataError(f"probs of model {i} contain NaN or infinite values")
    if target.dtype.kind not in "iu" or (target.size and (target.min() < 0 or target.max() >= c)):
        raise DataError(f"target must hold integer labels in 0..{c - 1}")


class _BatchScorer:
    """Mean foreground IoU of many weight vectors on fixed probabilities and labels."""

    def __init__(self, probs: np.ndarray, target: np.ndarray, case: np.ndarray) -> None:
        m, n, c = probs.shape[:3]
        _, case_idx = case_index(case)
        self.n_cases = int(case_idx.max()) + 1
        self.n_classes = c
        per_slice = int(np.prod(target.shape[1:]))
        # base index (case * C + true) * C of each pixel, the predicted class is added later
        index_dtype = np.int32 if self.n_cases * c * c < 2**31 else np.int64
        base = np.repeat(case_idx.astype(index_dtype), per_slice) * c  # (N*H*W,)
        base += target.reshape(-1)
        base *= c
        vote_dtype = np.min_scalar_type(c - 1)
        votes = np.stack(
            [probs[i].argmax(axis=1).reshape(-1).astype(vote_dtype) for i in range(m)]
        )  # (M, N*H*W): each model's own label
        disputed = np.any(votes != votes[:1], axis=0)  # (N*H*W,)
        fixed = np.bincount(
            base[~disputed] + votes[0, ~disputed], minlength=self.n_cases * c * c
        )  # counts of the pixels every model agrees on
        self.fixed = fixed.reshape(self.n_cases, c, c)
        self.base = base[disputed]  # (P,)
        flat = np.flatnonzero(disputed)
        slice_i, pixel_i = np.divmod(flat, per_slice)
        # (M, N, C, H*W) -> disputed pixels, class-major for contiguous class planes: (M, C, P)
        picked = probs.reshape(m, n, c, per_slice)[:, slice_i, :, pixel_i]  # (P, M, C)
        self.probs = np.ascontiguousarray(picked.transpose(1, 2, 0))  # (M, C, P)
        log.debug("ensemble scorer: %d of %d pixels disputed", flat.size, disputed.size)

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        """weights (K, M), rows normalised -> (K,) mean foreground IoU (NaN: nothing to score)."""
        k = weights.shape[0]
        c, n_cases = self.n_classes, self.n_cases
        cells = n_cases * c * c
        matrix = np.zeros((k, cells), dtype=np.int64)
        p_total = self.base.size
        k_step = max(1, min(k, CHUNK_ELEMENTS))
        p_step = max(1, CHUNK_ELEMENTS // k_step)
        w32 = weights.astype(np.float32)
        for k0 in range(0, k, k_step):
            wk = w32[k0 : k0 + k_step]
            kk = wk.shape[0]
            offset = (np.arange(kk, dtype=np.int64) * cells)[:, None]  # (kk, 1)
            for p0 in range(0, p_total, p_step):
                chunk = self.probs[:, :, p0 : p0 + p_step]  # (M, C, p), input dtype
                pp = chunk.shape[2]
                fused = np.einsum("km,mcp->kcp", wk, chunk.astype(np.float32, copy=False))
                pred = _argmax_classes(fused)  # (kk, p)
                idx = offset + self.base[p0 : p0 + pp] + pred  # (kk, p) int64
                counts = np.bincount(idx.reshape(-1), minlength=kk * cells)
                matrix[k0 : k0 + kk] += counts.reshape(kk, cells)
        matrix = matrix.reshape(k, n_cases, c, c) + self.fixed
        return batch_mean_iou(counts_from_matrix(matrix))


def _argmax_classes(fused: np.ndarray) -> np.ndarray:
    """(K, C, P) -> (K, P) uint8 index of the largest class, the first one on ties.

    Branch-free running maximum (``pred += (c - pred) * (f_c > best)``), several times
    faster than ``np.argmax`` over a middle axis or boolean-mask assignment.
    """
    best = fused[:, 0].copy()  # (K, P)
    dtype = np.min_scalar_type(fused.shape[1] - 1)  # uint8 for up to 256 classes
    pred = np.zeros(best.shape, dtype=dtype)
    better = np.empty(best.shape, dtype=bool)
    step = np.empty(best.shape, dtype=dtype)
    for cls in range(1, fused.shape[1]):
        np.greater(fused[:, cls], best, out=better)
        np.subtract(dtype.type(cls), pred, out=step)
        step *= better
        pred += step
        np.maximum(best, fused[:, cls], out=best)
    return pred


def _choose(weights: np.ndarray, scores: np.ndarray) -> int:
    """Index of the best score; ties -> nearest to uniform, then earliest. NaN loses."""
    finite = np.where(np.isnan(scores), -np.inf, scores)
    tied = np.flatnonzero(finite >= finite.max() - _TIE_ATOL)
    uniform = np.full(weights.shape[1], 1.0 / weights.shape[1])
    dist = np.linalg.norm(weights[tied] - uniform, axis=1)
    return int(tied[np.argmin(dist)])  # argmin returns the first of equal distances


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _nelder_mead(
    scorer: Callable[[np.ndarray], np.ndarray], start: np.ndarray
) -> tuple[list[np.ndarray], list[float]]:
    """Refine ``start`` (M,) by Nelder-Mead on softmax logits; returns every evaluated point."""
    m = start.shape[0]
    seen_w: list[np.ndarray] = []
    seen_s: list[float] = []

    def objective(z: np.ndarray) -> float:
        w = _softmax(z)
        s = float(scorer(w[None])[0])
        seen_w.append(w)
        seen_s.append(s)
        return 1.0 if np.isnan(s) else -s

    # logits of the start, zero weights floored so a one-hot is a finite point
    z0 = np.log(np.maximum(start, 1e-3))
    z0 -= z0.mean()
    simplex = np.vstack([z0, z0 + NELDER_MEAD_STEP * np.eye(m)])  # (M + 1, M)
    minimize(
        objective,
        z0,
        method="Nelder-Mead",
        options={
            "initial_simplex": simplex,
            "maxfev": NELDER_MEAD_MAX_EVALS,
            "xatol": 1e-2,
            "fatol": 1e-6,
        },
    )
    return seen_w, seen_s


Scorer = Callable[[np.ndarray], np.ndarray]  # weights (K, M), rows sum to 1 -> scores (K,)


def _search(scorer: Scorer, m: int, method: str, n_random: int, seed: int) -> SearchResult:
    """The search shared by every task: candidates, refinement and choice on ``scorer``."""
    if method not in METHODS:
        raise ConfigError(f"unknown ensemble method {method!r}; known: {', '.join(METHODS)}")
    if n_random < 0:
        raise ConfigError(f"n_random must be >= 0, found {n_random}")
    pool = [np.eye(m), np.full((1, m), 1.0 / m)]  # one-hots, uniform
    if "random" in method.split("+"):
        draws = np.random.default_rng(seed).uniform(0.0, 1.0, size=(n_random, m))
        sums = draws.sum(axis=1, keepdims=True)
        pool.append(np.where(sums > 0, draws / np.where(sums > 0, sums, 1.0), 1.0 / m))
    weights = np.vstack(pool)  # (K, M)
    scores = scorer(weights)  # (K,)

    if "nelder_mead" in method and m > 1:
        start = weights[_choose(weights, scores)]
        nm_w, nm_s = _nelder_mead(scorer, start)
        weights = np.vstack([weights, *nm_w])
        scores = np.concatenate([scores, nm_s])

    best = _choose(weights, scores)
    best_single = np.nanmax(scores[:m]) if not np.all(np.isnan(scores[:m])) else np.nan
    assert np.isnan(best_single) or scores[best] >= best_single - _TIE_ATOL
    trace = [(weights[i].tolist(), float(scores[i])) for i in range(m + 1)]
    trace.append((weights[best].tolist(), float(scores[best])))
    log.info(
        "ensemble %s: %d candidates, best val score %.4f (best single %.4f, uniform %.4f)",
        method,
        len(scores),
        scores[best],
        best_single,
        scores[m],
    )
    return SearchResult(
        method=method,
        weights=weights[best].copy(),
        score=float(scores[best]),
        candidates_evaluated=int(len(scores)),
        trace=trace,
    )


def search_weights(
    probs: np.ndarray,
    target: np.ndarray,
    case: np.ndarray,
    *,
    method: str,
    n_random: int,
    seed: int,
) -> SearchResult:
    """Search ensemble weights that maximise val mean foreground IoU.

    probs: (M, N, C, H, W) softmax probabilities of M models on the val slices (float16 or
    float32); target: (N, H, W) integer labels; case: (N,) case id per slice.
    method: ``"mean"`` (uniform 1/M unless a single model scores higher),
    ``"random"`` (R3's random grid: ``n_random`` candidates, each weight independently
    uniform in [0, 1], then normalised), ``"nelder_mead"`` (Nelder-Mead over softmax logits
    from the best of one-hots and uniform), ``"random+nelder_mead"`` (random, then
    Nelder-Mead from its best). n_random is ignored by methods without ``random``.
    Raises ConfigError for an unknown method or negative n_random, DataError for bad inputs.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown ensemble method {method!r}; known: {', '.join(METHODS)}")
    probs = np.asarray(probs)
    target = np.asarray(target)
    _validate(probs, target, case)
    return _search(_BatchScorer(probs, target, case), probs.shape[0], method, n_random, seed)


def combine_images(recons: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted sum of reconstructions (M, N, H, W) with simplex ``weights`` -> (N, H, W)."""
    recons = np.asarray(recons)
    w = _normalise(weights, recons.shape[0])
    return np.einsum("m,mnhw->nhw", w, recons.astype(np.float64)).astype(np.float32)


class _SSIMScorer:
    """Per-volume mean SSIM (fastMRI semantics) of many weighted sums of reconstructions."""

    def __init__(self, recons: np.ndarray, target: np.ndarray, case: np.ndarray) -> None:
        self.recons = recons.astype(np.float64)  # (M, N, H, W)
        self.target = target.astype(np.float64)
        _, self.case_idx = case_index(case)
        n_cases = int(self.case_idx.max()) + 1
        vol_max = np.array([target[self.case_idx == c].max() for c in range(n_cases)])
        self.data_range = vol_max[self.case_idx]  # (N,)
        # per-volume mean of per-slice scores, then the mean over volumes, as one matrix
        onehot = np.eye(n_cases)[self.case_idx]  # (N, V)
        self.avg = onehot / onehot.sum(0) / n_cases  # (N, V): scores @ avg summed -> mean
        per_candidate = int(np.prod(target.shape))  # pixels of one fused candidate
        self.k_step = max(1, CHUNK_ELEMENTS * 8 // per_candidate)

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        out = np.empty(weights.shape[0])
        for k0 in range(0, weights.shape[0], self.k_step):
            wk = weights[k0 : k0 + self.k_step]
            fused = np.einsum("km,mnhw->knhw", wk, self.recons)  # (k, N, H, W)
            per_slice = ssim_slices(fused, self.target, self.data_range)  # (k, N)
            out[k0 : k0 + len(wk)] = (per_slice @ self.avg).sum(axis=1)
        return out


def search_image_weights(
    recons: np.ndarray,
    target: np.ndarray,
    case: np.ndarray,
    *,
    method: str,
    n_random: int,
    seed: int,
) -> SearchResult:
    """Search weights of a weighted sum of reconstructions that maximise val SSIM.

    recons: (M, N, H, W) reconstructions of M models on the val slices; target (N, H, W);
    case (N,). SSIM is per volume with data range = the volume's target maximum, averaged
    over volumes (fastMRI). Methods as in :func:`search_weights`.
    """
    recons = np.asarray(recons)
    target = np.asarray(target)
    if recons.ndim != 4 or recons.shape[0] == 0 or recons.shape[2:] != target.shape[1:]:
        raise DataError(
            f"recons must be (M >= 1, N, H, W) matching target {target.shape}, found {recons.shape}"
        )
    if recons.shape[1] != target.shape[0] or np.asarray(case).shape != (target.shape[0],):
        raise DataError("recons, target and case must have the same number of slices")
    if not np.all(np.isfinite(recons)):
        raise DataError("recons contain NaN or infinite values")
    return _search(_SSIMScorer(recons, target, case), recons.shape[0], method, n_random, seed)
