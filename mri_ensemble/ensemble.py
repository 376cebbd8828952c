"""Ensemble weight search: choose member weights on validation outputs only.

Segmentation fuses probabilities, ``argmax_c sum_m W[m, c] p_m[c]``, and is scored by the
mean foreground IoU of :mod:`mri_ensemble.metrics` (per volume). ``W`` is one weight per
model (``(M,)``, shared by every class) or, for ``per_class``, an ``(M, C)`` matrix whose
every column lies on the simplex. Reconstruction fuses images, ``sum_m w_m x_m``, scored by
SSIM with fastMRI's semantics (:mod:`mri_ensemble.mri.quality`). Weights are always chosen
on val outputs; report R3 searched and reported on the same data, we do not, and
:func:`crossfit` estimates how optimistic the in-sample val score is.

Methods (``METHODS``):

- ``mean``: the unweighted mean (nnU-Net, MONAI Auto3DSeg). ``vote``: majority vote of the
  members' labels, ties broken by the mean probability (segmentation only).
  ``best_single``: the member with the best val score.
- ``random``: R3's random grid: ``n_random`` candidates, each weight drawn uniform in
  [0, 1], then normalised. ``nelder_mead``: Nelder-Mead (SciPy) on softmax logits from the
  best one-hot / uniform start. ``random+nelder_mead``: random, then Nelder-Mead from its
  best. Every candidate pool of these holds each one-hot and the uniform weights.
- ``greedy``: forward selection with replacement (Caruana et al. 2004; auto-sklearn's
  ensemble selection): ``rounds`` times add the member whose addition scores best, weights
  = how often each member was added; the best bag along the path wins.
- ``per_class`` (segmentation): start from ``random+nelder_mead``'s shared weights, then
  coordinate search over the columns of ``W`` (``n_random`` Dirichlet columns + one-hots per
  class and sweep), penalised by ``penalty * ||W - W0||^2 / C`` toward the shared weights;
  an overfitting guard refits both on each half of the val cases and keeps the per-class
  weights only if they beat the shared ones on the other half on average.

Every optimiser (all but ``mean`` and ``vote``) returns a val score no lower than the best
single member. Ties go to the weights nearest to uniform (L2), then the earlier candidate;
a search is deterministic for a seed.

Speed. No network is re-run; candidates are scored in batches, vectorised:

- IoU: a pixel on which every member's argmax agrees keeps that label for any shared
  non-negative weights, so its confusion counts are computed once; only disputed pixels are
  re-scored (with per-class weights a pixel is also disputed when some other class's
  largest probability reaches the agreed class's smallest). A batch of K candidates is one
  matrix product over the model axis per chunk of disputed pixels, an argmax and one
  ``np.bincount`` over (candidate, case, true, predicted). Memory: the disputed pixels are
  copied once as (M, C, P); a chunk holds ``CHUNK_ELEMENTS`` candidate-pixels (~10 MB).
- SSIM: the 7x7 box filter is linear, so the local means of a weighted sum are weighted
  sums of each member's filtered maps. The filtered ``x_m``, ``x_m * x_n`` (m <= n) and
  ``x_m * y`` are computed once; a batch of candidates then needs matrix products and
  element-wise arithmetic only, with no filtering (equal to :func:`ssim_slices` to
  rounding). Memory: (M (M + 3) / 2) float64 maps of the val set, plus chunk temporaries.

Robust selection and the member guard. A mean val score can be won by a member that is
excellent on the common kind of slice and poor on a rarer one (a contrast, an orientation,
a pathology group). Objectives take optional ``groups``, one label per slice, constant
within a case. With ``SearchConfig(robust=True)`` every candidate is scored by its worst
group: the minimum over groups of the group's mean score, each computed exactly as the plain
scorer does on that group's slices (:class:`WorstGroupScorer`); this is the worst-group
objective of group DRO (Sagawa et al. 2020, "Distributionally Robust Neural Networks for
Group Shifts", ICLR), applied to the choice of ensemble weights rather than to training. All
optimisers run unchanged on it, so the "never below the best single member" promise holds
in the worst-group score, and ``SearchResult.score`` is that score (``group_scores`` holds
each group's). With one group it is the plain score, bit for bit. The guard
:func:`members_below` lists, per member, the groups on which it scores below a baseline (the
zero-filled images, say); ``search(..., exclude=...)`` or :func:`guarded_search` then search
the allowed members only and return full-length weights with exact zeros for the rest.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.ndimage import uniform_filter
from scipy.optimize import minimize

from mri_ensemble.errors import ConfigError, DataError
from mri_ensemble.metrics import batch_mean_iou, case_index, counts_from_matrix
from mri_ensemble.mri.quality import K1, K2, WIN_SIZE

log = logging.getLogger(__name__)

OPTIMISERS = ("best_single", "random", "nelder_mead", "random+nelder_mead", "greedy", "per_class")
METHODS = ("mean", "vote", *OPTIMISERS)
SEGMENTATION_ONLY = ("vote", "per_class")
CHUNK_ELEMENTS = 1 << 18  # candidate-pixels scored per chunk (bounds memory, see module doc)
NELDER_MEAD_MAX_EVALS = 200  # objective evaluations of one Nelder-Mead refinement
NELDER_MEAD_STEP = 1.0  # initial simplex step in softmax logits (a weight ratio of e)
PER_CLASS_SWEEPS = 2  # passes over the classes of the per-class coordinate search
SSIM_BLOCK = 1 << 15  # candidate-pixels per SSIM block (~256 KiB per float64 temporary)
_TIE_ATOL = 1e-12  # scores closer than this are ties


@dataclass
class SearchResult:
    """Outcome of a search.

    weights: (M,) on the simplex, or (M, C) with every column on the simplex (per_class).
    score: the val score of ``weights`` (IoU or SSIM). trace: (weights, score) of the
    notable candidates: each one-hot, uniform, the chosen weights. order: members in the
    order greedy selection first added them (greedy only). note: what a guard decided, ``"; "``
    joined: the per-class held-out check, robust scoring (``"robust: ..."``), excluded
    members (``"excluded members [..]: ..."``); empty for a plain search.
    group_scores: robust searches only, each group's val score of ``weights`` (``score`` is
    their minimum).
    """

    method: str
    weights: np.ndarray
    score: float
    candidates_evaluated: int
    trace: list[tuple[list, float]] = field(default_factory=list)
    order: list[int] = field(default_factory=list)
    note: str = ""
    group_scores: dict[str, float] = field(default_factory=dict)


@dataclass
class SearchConfig:
    """The ``ensemble.<task>`` params a search reads (see params.yaml for meanings)."""

    method: str = "random+nelder_mead"
    n_random: int = 200
    seed: int = 0
    rounds: int = 25  # greedy
    penalty: float = 0.01  # per_class: shrinkage toward the shared weights
    robust: bool = False  # score a candidate by its worst group (needs objective groups)

    def __post_init__(self) -> None:
        if not isinstance(self.robust, bool | np.bool_):
            raise ConfigError(f"robust must be true or false, found {self.robust!r}")
        if self.method not in METHODS:
            raise ConfigError(
                f"unknown ensemble method {self.method!r}; known: {', '.join(METHODS)}"
            )
        if self.n_random < 0:
            raise ConfigError(f"n_random must be >= 0, found {self.n_random}")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, found {self.rounds}")
        if not self.penalty >= 0:
            raise ConfigError(f"penalty must be >= 0, found {self.penalty}")


def _normalise(weights: np.ndarray | Sequence[float], n_models: int) -> np.ndarray:
    """(M,) or (M, C) weights -> normalised to sum to 1 over the model axis (per column)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim not in (1, 2) or w.shape[0] != n_models:
        raise DataError(
            f"weights must have shape ({n_models},) or ({n_models}, C), found {w.shape}"
        )
    if not np.all(np.isfinite(w)) or np.any(w < 0) or np.any(w.sum(axis=0) <= 0):
        raise DataError(f"weights must be finite, non-negative and not all zero, found {w}")
    return w / w.sum(axis=0)


MIN_WEIGHT = 1e-8  # a member whose share is below this (below float32 resolution) is not run


def ensemble_members(weights: dict[str, Any]) -> list[str]:
    """The one membership rule (predict, registry, cost, report, UI): the members whose
    share of the total weight (of some class, for per-class weights) is at least
    ``MIN_WEIGHT``. ``weights``: ensemble.json's ``{model: w}`` or ``{model: {class: w}}``."""
    keys = sorted({c for w in weights.values() if isinstance(w, dict) for c in w})
    names = list(weights)
    if not keys:
        table = np.array([[float(weights[m])] for m in names])
    else:
        table = np.array(
            [[w.get(c, 0.0) if isinstance(w, dict) else w for c in keys] for w in weights.values()],
            dtype=np.float64,
        )
    totals = table.sum(0)
    share = table / np.where(totals > 0, totals, 1.0)
    return [m for m, row in zip(names, share, strict=True) if np.any(row >= MIN_WEIGHT)]


def combine(probs: np.ndarray, weights: np.ndarray | Sequence[float]) -> np.ndarray:
    """Weighted average of model probabilities.

    probs: (M, N, C, H, W) any float dtype; weights: (M,) or per class (M, C), non-negative,
    normalised here over the models -> (N, C, H, W) float32. Works in chunks of slices.
    """
    probs = np.asarray(probs)
    if probs.ndim != 5 or probs.shape[0] == 0:
        raise DataError(f"probs must have shape (M >= 1, N, C, H, W), found {probs.shape}")
    w = _normalise(weights, probs.shape[0]).astype(np.float32)
    if w.ndim == 2 and w.shape[1] != probs.shape[2]:
        raise DataError(f"per-class weights {w.shape} do not match {probs.shape[2]} classes")
    w = w if w.ndim == 2 else np.repeat(w[:, None], probs.shape[2], axis=1)  # (M, C)
    out = np.empty(probs.shape[1:], dtype=np.float32)
    step = max(1, CHUNK_ELEMENTS // max(1, int(np.prod(probs.shape[2:]))))
    for s in range(0, probs.shape[1], step):
        chunk = probs[:, s : s + step].astype(np.float32)  # (M, n, C, H, W)
        out[s : s + step] = np.einsum("mc,mnchw->nchw", w, chunk)  # (n, C, H, W)
    return out


def vote(probs: np.ndarray) -> np.ndarray:
    """Majority vote of the members' labels -> (N, H, W) uint8; ties -> larger mean probability.

    probs: (M, N, C, H, W). A class's score is its vote count plus its mean probability,
    which lies in [0, 1], so it only ever breaks ties between equal counts.
    """
    probs = np.asarray(probs)
    m, n, c = probs.shape[:3]
    out = np.empty((n, *probs.shape[3:]), dtype=np.uint8)
    step = max(1, CHUNK_ELEMENTS // max(1, int(np.prod(probs.shape[2:]))))
    for s in range(0, n, step):
        chunk = probs[:, s : s + step].astype(np.float32)  # (M, n, C, H, W)
        labels = chunk.argmax(axis=2)  # (M, n, H, W)
        counts = np.stack([(labels == k).sum(axis=0) for k in range(c)], axis=1)  # (n, C, H, W)
        out[s : s + step] = (counts + chunk.mean(axis=0) * (1 - 1e-6)).argmax(axis=1)
    return out


def fuse_labels(probs: np.ndarray, result: SearchResult) -> np.ndarray:
    """Labels (N, H, W) uint8 of the ensemble ``result`` on ``probs`` (M, N, C, H, W)."""
    if result.method == "vote":  # members with weight 0 (excluded ones) have no vote
        keep = np.flatnonzero(np.asarray(result.weights) > 0)
        return vote(probs if len(keep) == len(probs) else probs[keep])
    return combine(probs, result.weights).argmax(axis=1).astype(np.uint8)


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
    """Mean foreground IoU of many weight vectors (K, M) or matrices (K, M, C)."""

    def __init__(
        self, probs: np.ndarray, target: np.ndarray, case: np.ndarray, per_class: bool = False
    ) -> None:
        m, n, c = probs.shape[:3]
        _, case_idx = case_index(case)
        self.n_cases = int(case_idx.max()) + 1
        self.n_classes = c
        self.n_models = m
        self.per_class = per_class
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
        if per_class and m > 1:
            disputed |= self._reachable(probs, votes[0])
        fixed = np.bincount(
            base[~disputed] + votes[0, ~disputed], minlength=self.n_cases * c * c
        )  # counts of the pixels no candidate can change
        self.fixed = fixed.reshape(self.n_cases, c, c)
        self.base = base[disputed]  # (P,)
        flat = np.flatnonzero(disputed)
        slice_i, pixel_i = np.divmod(flat, per_slice)
        # (M, N, C, H*W) -> disputed pixels, class-major for contiguous class planes: (M, C, P)
        picked = probs.reshape(m, n, c, per_slice)[:, slice_i, :, pixel_i]  # (P, M, C)
        self.probs = np.ascontiguousarray(picked.transpose(1, 2, 0))  # (M, C, P)
        log.debug("ensemble scorer: %d of %d pixels disputed", flat.size, disputed.size)

    @staticmethod
    def _reachable(probs: np.ndarray, agreed: np.ndarray) -> np.ndarray:
        """Pixels where per-class weights could move the label off the agreed one: some
        other class's largest member probability reaches the agreed class's smallest."""
        m, n, c = probs.shape[:3]
        out = np.empty(agreed.shape, dtype=bool)
        per_slice = int(np.prod(probs.shape[3:]))
        step = max(1, CHUNK_ELEMENTS // max(1, m * c * per_slice))
        for s in range(0, n, step):
            chunk = probs[:, s : s + step].astype(np.float32).reshape(m, -1, c, per_slice)
            lab = agreed[s * per_slice : (s + step) * per_slice].reshape(-1, 1, per_slice)
            lo = np.take_along_axis(chunk.min(axis=0), lab.astype(np.int64), axis=1)[:, 0]
            hi = chunk.max(axis=0)  # (n, C, P)
            np.put_along_axis(hi, lab.astype(np.int64), -np.inf, axis=1)
            out[s * per_slice : (s + step) * per_slice] = (hi.max(axis=1) >= lo).reshape(-1)
        return out

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        """weights (K, M) or (K, M, C), normalised -> (K,) mean foreground IoU (NaN: nothing)."""
        k = weights.shape[0]
        c, n_cases = self.n_classes, self.n_cases
        if weights.ndim == 3 and not self.per_class:
            raise DataError("per-class weights need a scorer built with per_class=True")
        cells = n_cases * c * c
        matrix = np.zeros((k, cells), dtype=np.int64)
        p_total = self.base.size
        k_step = max(1, min(k, CHUNK_ELEMENTS))
        p_step = max(1, CHUNK_ELEMENTS // k_step)
        w32 = weights.astype(np.float32)
        spec = "kmc,mcp->kcp" if weights.ndim == 3 else "km,mcp->kcp"
        for k0 in range(0, k, k_step):
            wk = w32[k0 : k0 + k_step]
            kk = wk.shape[0]
            offset = (np.arange(kk, dtype=np.int64) * cells)[:, None]  # (kk, 1)
            for p0 in range(0, p_total, p_step):
                chunk = self.probs[:, :, p0 : p0 + p_step]  # (M, C, p), input dtype
                pp = chunk.shape[2]
                fused = np.einsum(spec, wk, chunk.astype(np.float32, copy=False))
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


class _SSIMScorer:
    """Per-volume mean SSIM (fastMRI semantics) of many weighted sums of reconstructions.

    Uses the linearity of the box filter (module doc): the filtered members, pairwise
    products and products with the target are computed once, on the interior pixels that
    SSIM averages (a 3-pixel border is cropped after filtering, as skimage does).
    """

    def __init__(self, recons: np.ndarray, target: np.ndarray, case: np.ndarray) -> None:
        x = np.asarray(recons, dtype=np.float64)  # (M, N, H, W)
        y = np.asarray(target, dtype=np.float64)  # (N, H, W)
        m, n, h, w = x.shape
        pad = (WIN_SIZE - 1) // 2
        self.cov_norm = WIN_SIZE**2 / (WIN_SIZE**2 - 1)

        def filt(a: np.ndarray) -> np.ndarray:  # (..., N, H, W) -> (..., P) interior pixels
            f = uniform_filter(a, size=WIN_SIZE, axes=(-2, -1))
            return f[..., pad : h - pad, pad : w - pad].reshape(*a.shape[:-3], -1)

        self.uy = filt(y)  # (P,)
        self.vy = self.cov_norm * (filt(y * y) - self.uy**2)
        self.u = np.stack([filt(x[i]) for i in range(m)])  # (M, P)
        self.r = np.stack([filt(x[i] * y) for i in range(m)])  # (M, P)
        self.pairs = np.triu_indices(m)
        self.q = np.stack([filt(x[i] * x[j]) for i, j in zip(*self.pairs, strict=True)])
        self.mult = np.where(self.pairs[0] == self.pairs[1], 1.0, 2.0)  # (npairs,)
        _, case_idx = case_index(case)
        n_cases = int(case_idx.max()) + 1
        vol_max = np.array([y[case_idx == c].max() for c in range(n_cases)])
        per_slice = (h - 2 * pad) * (w - 2 * pad)
        dr = np.repeat(vol_max[case_idx], per_slice)  # (P,)
        self.c1 = (K1 * dr) ** 2
        self.c2 = (K2 * dr) ** 2
        # mean over a slice's pixels, then over a volume's slices, then over volumes
        slices_in_case = np.bincount(case_idx)[case_idx]  # (N,)
        self.pixel_weight = np.repeat(1.0 / (per_slice * slices_in_case * n_cases), per_slice)

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        """weights (K, M), rows normalised -> (K,) mean SSIM over volumes.

        Works on blocks of (candidates x pixels) of about ``SSIM_BLOCK`` elements, so the
        dozen element-wise temporaries stay in cache instead of streaming through memory.
        """
        w = np.asarray(weights, dtype=np.float64)
        k, p = w.shape[0], self.uy.size
        out = np.zeros(k)
        pw = w[:, self.pairs[0]] * w[:, self.pairs[1]] * self.mult  # (K, npairs)
        k_step = min(k, 1024)
        p_step = max(64, SSIM_BLOCK // k_step)
        for k0 in range(0, k, k_step):
            wk, pk = w[k0 : k0 + k_step], pw[k0 : k0 + k_step]
            acc = out[k0 : k0 + k_step]
            for p0 in range(0, p, p_step):
                sl = slice(p0, p0 + p_step)
                uy, c1, c2 = self.uy[sl], self.c1[sl], self.c2[sl]
                ux = wk @ self.u[:, sl]  # (k, p)
                ux2 = ux * ux
                uxy = ux * uy
                vx = pk @ self.q[:, sl]
                vx -= ux2
                vx *= self.cov_norm
                vx += self.vy[sl] + c2  # b2
                vxy = wk @ self.r[:, sl]
                vxy -= uxy
                vxy *= 2 * self.cov_norm
                vxy += c2  # a2
                uxy *= 2
                uxy += c1  # a1
                ux2 += uy * uy + c1  # b1
                uxy *= vxy
                ux2 *= vx
                uxy /= ux2
                acc += uxy @ self.pixel_weight[sl]
        return out


Scorer = Callable[[np.ndarray], np.ndarray]  # weights (K, M[, C]), normalised -> scores (K,)


def _choose(weights: np.ndarray, scores: np.ndarray) -> int:
    """Index of the best score; ties -> nearest to uniform, then earliest. NaN loses."""
    finite = np.where(np.isnan(scores), -np.inf, scores)
    tied = np.flatnonzero(finite >= finite.max() - _TIE_ATOL)
    flat = weights.reshape(len(weights), -1)
    uniform = np.full(flat.shape[1], 1.0 / weights.shape[1])
    dist = np.linalg.norm(flat[tied] - uniform, axis=1)
    return int(tied[np.argmin(dist)])  # argmin returns the first of equal distances


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _nelder_mead(scorer: Scorer, start: np.ndarray) -> tuple[list[np.ndarray], list[float]]:
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


def _pool_search(scorer: Scorer, m: int, cfg: SearchConfig) -> SearchResult:
    """best_single, random, nelder_mead, random+nelder_mead: one-hots + uniform + ..."""
    parts = cfg.method.split("+")
    pool = [np.eye(m)] if cfg.method == "best_single" else [np.eye(m), np.full((1, m), 1.0 / m)]
    if "random" in parts:
        draws = np.random.default_rng(cfg.seed).uniform(0.0, 1.0, size=(cfg.n_random, m))
        sums = draws.sum(axis=1, keepdims=True)
        pool.append(np.where(sums > 0, draws / np.where(sums > 0, sums, 1.0), 1.0 / m))
    weights = np.vstack(pool)  # (K, M)
    scores = scorer(weights)  # (K,)
    if "nelder_mead" in parts and m > 1:
        nm_w, nm_s = _nelder_mead(scorer, weights[_choose(weights, scores)])
        weights = np.vstack([weights, *nm_w])
        scores = np.concatenate([scores, nm_s])
    best = _choose(weights, scores)
    trace = [(weights[i].tolist(), float(scores[i])) for i in range(min(m + 1, len(weights)))]
    trace.append((weights[best].tolist(), float(scores[best])))
    return SearchResult(cfg.method, weights[best].copy(), float(scores[best]), len(scores), trace)


def _greedy(scorer: Scorer, m: int, cfg: SearchConfig) -> SearchResult:
    """Caruana's forward selection with replacement; the best bag along the path wins."""
    counts = np.zeros(m)
    path_w, path_s, order = [], [], []
    for _ in range(cfg.rounds):
        cands = (counts + np.eye(m)) / (counts.sum() + 1)  # (M, M): add each member once
        s = scorer(cands)
        j = int(np.argmax(np.where(np.isnan(s), -np.inf, s)))  # first best
        counts[j] += 1
        path_w.append(counts / counts.sum())
        path_s.append(float(s[j]))
        if j not in order:
            order.append(j)
    weights, scores = np.vstack(path_w), np.asarray(path_s)
    finite = np.where(np.isnan(scores), -np.inf, scores)
    best = int(np.flatnonzero(finite >= finite.max() - _TIE_ATOL)[0])  # the smallest best bag
    trace = [(w.tolist(), s) for w, s in zip(path_w, path_s, strict=True)]
    return SearchResult(
        cfg.method, weights[best].copy(), float(scores[best]), cfg.rounds * m, trace, order
    )


def _per_class_refine(
    scorer: Scorer, w0: np.ndarray, n_classes: int, cfg: SearchConfig
) -> tuple[np.ndarray, int]:
    """Coordinate search over the columns of an (M, C) weight matrix from ``w0`` (M,)."""
    m = w0.shape[0]
    start = np.repeat(w0[:, None], n_classes, axis=1)  # (M, C)
    current, evaluated = start.copy(), 0
    rng = np.random.default_rng(cfg.seed)
    for _ in range(PER_CLASS_SWEEPS):
        for cls in range(n_classes):
            cols = np.vstack([np.eye(m), rng.dirichlet(np.ones(m), cfg.n_random)])  # (R, M)
            cand = np.repeat(current[None], len(cols) + 1, axis=0)  # [0] keeps the current
            cand[1:, :, cls] = cols
            raw = scorer(cand)
            evaluated += len(cand)
            shrink = cfg.penalty * ((cand - start) ** 2).sum(axis=(1, 2)) / n_classes
            penalised = np.where(np.isnan(raw), -np.inf, raw - shrink)
            current = cand[int(np.argmax(penalised))].copy()  # ties keep the current
    return current, evaluated


def case_groups(case: np.ndarray) -> np.ndarray:
    """(N,) group id per slice: the case id with an ``_ED``/``_ES``/``_frameNN`` suffix removed,
    so the two phases of one ACDC patient always fall in the same fold."""
    names, idx = case_index(case)
    stripped = [re.sub(r"_(ED|ES|frame\d+)$", "", n) for n in names]
    return np.asarray(stripped)[idx]


def case_folds(case: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Split slice indices into ``min(k, groups)`` folds of whole groups (:func:`case_groups`);
    groups are shuffled by ``seed`` and dealt round-robin. Each fold lists held-out slices."""
    if k < 2:
        raise ConfigError(f"crossfit folds must be >= 2, found {k}")
    groups = case_groups(case)
    unique = np.unique(groups)
    if len(unique) < 2:
        raise DataError(f"cross-fitting needs at least 2 case groups, found {len(unique)}")
    order = np.random.default_rng(seed).permutation(len(unique))
    folds = [unique[order[f :: min(k, len(unique))]] for f in range(min(k, len(unique)))]
    return [np.flatnonzero(np.isin(groups, f)) for f in folds]


class WorstGroupScorer:
    """Worst-group score of many candidates: one plain scorer per group, elementwise minimum.

    ``labels``: the group names; ``scorers``: for each, a scorer built on that group's slices
    only (so a group's score is its own mean over its cases). A group on which a candidate has
    nothing to score (NaN, e.g. no foreground anywhere) does not count; NaN only when every
    group is NaN. With one group this is that group's scorer.
    """

    def __init__(self, labels: Sequence[str], scorers: Sequence[Scorer]) -> None:
        if len(labels) != len(scorers) or not labels:
            raise DataError("a worst-group scorer needs one scorer per group, at least one")
        self.labels = [str(g) for g in labels]
        self.scorers = list(scorers)

    def per_group(self, weights: np.ndarray) -> np.ndarray:
        """weights (K, M[, C]) -> (G, K) each group's scores, in ``labels`` order."""
        return np.stack([s(weights) for s in self.scorers])

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        """weights (K, M[, C]) -> (K,) the minimum over groups (NaN groups ignored)."""
        per = self.per_group(weights)
        return per[0] if len(per) == 1 else np.fmin.reduce(per, axis=0)


ALL_GROUP = "all"  # the one group of an objective without groups


def _validate_groups(groups: np.ndarray | Sequence[str], case: np.ndarray) -> np.ndarray:
    """(N,) group labels -> str array; constant within each case, else DataError."""
    g = np.asarray(groups)
    if g.shape != case.shape:
        raise DataError(f"groups must have shape {case.shape} (one per slice), found {g.shape}")
    names, g_idx = case_index(g)  # decodes bytes (HDF5) like case ids
    if not names:
        return np.asarray(names, dtype=str)[g_idx]
    case_names, c_idx = case_index(case)
    pairs = np.unique(c_idx * len(names) + g_idx)  # distinct (case, group) pairs, sorted
    mixed = np.flatnonzero(np.bincount(pairs // len(names)) > 1)
    if mixed.size:
        found = [names[p % len(names)] for p in pairs if p // len(names) == mixed[0]]
        raise DataError(
            f"groups must be constant within a case: case {case_names[mixed[0]]!r} has "
            f"groups {found} ({mixed.size} case(s) mixed)"
        )
    return np.asarray(names)[g_idx]


class _Objective:
    """A task's val outputs, and how to score and fuse them on subsets of slices/models.

    ``groups`` (optional, (N,) str): one group label per slice, constant within a case
    (checked: DataError), read by robust scoring and by :func:`members_below`.
    """

    n_classes: int | None  # None for images (no per-class weights, no vote)

    def __init__(
        self,
        outputs: np.ndarray,
        target: np.ndarray,
        case: np.ndarray,
        groups: np.ndarray | Sequence[str] | None = None,
    ) -> None:
        self.outputs, self.target, self.case = outputs, target, np.asarray(case)
        self.n_models = outputs.shape[0]
        self.groups = None if groups is None else _validate_groups(groups, self.case)

    def take(
        self, slices: np.ndarray | None, models: Sequence[int] | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = self.outputs if models is None else self.outputs[list(models)]
        if slices is None:
            return out, self.target, self.case
        return out[:, slices], self.target[slices], self.case[slices]

    def take_groups(self, slices: np.ndarray | None) -> np.ndarray | None:
        """The groups of ``slices`` (all slices for None); None when the objective has none."""
        if self.groups is None or slices is None:
            return self.groups
        return self.groups[slices]

    def subset(
        self, slices: np.ndarray | None = None, models: Sequence[int] | None = None
    ) -> _Objective:
        """A new objective of the same kind on ``slices``/``models``, groups subset alike."""
        return type(self)(*self.take(slices, models), groups=self.take_groups(slices))

    def slice_groups(self, slices: np.ndarray | None = None) -> list[tuple[str, np.ndarray]]:
        """(label, absolute slice indices) of each group among ``slices``, labels sorted;
        a single ``("all", slices)`` when the objective has no groups."""
        idx = np.arange(len(self.case)) if slices is None else np.asarray(slices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        if self.groups is None:
            return [(ALL_GROUP, idx)]
        labels = self.groups[idx]
        return [(str(g), idx[labels == g]) for g in np.unique(labels)]

    def _scorer_of(
        self, outputs: np.ndarray, target: np.ndarray, case: np.ndarray, per_class: bool = False
    ) -> Scorer:
        raise NotImplementedError

    def scorer(self, slices=None, models=None, per_class: bool = False) -> Scorer:
        return self._scorer_of(*self.take(slices, models), per_class=per_class)

    def group_scorer(self, slices=None, models=None, per_class: bool = False) -> Scorer:
        """Worst-group scorer (:class:`WorstGroupScorer`) on ``slices``; the plain
        :meth:`scorer` when the slices hold one group (or the objective has none)."""
        parts = self.slice_groups(slices)
        if len(parts) == 1:
            return self.scorer(slices, models, per_class)
        return WorstGroupScorer(
            [g for g, _ in parts], [self.scorer(idx, models, per_class) for _, idx in parts]
        )

    def as_member(self, outputs: np.ndarray) -> np.ndarray:
        """One member's outputs on every slice (a baseline) -> (1, ...) like ``self.outputs``."""
        raise NotImplementedError

    def fuse(self, result: SearchResult, slices=None, models=None) -> np.ndarray:
        raise NotImplementedError

    def score_vote(self, slices=None, models=None) -> float:
        raise ConfigError("ensemble method 'vote' is for segmentation only")


class SegmentationObjective(_Objective):
    """probs (M, N, C, H, W), target (N, H, W) labels, case (N,), optional groups (N,) str;
    checked on creation."""

    def __init__(
        self,
        probs: np.ndarray,
        target: np.ndarray,
        case: np.ndarray,
        groups: np.ndarray | Sequence[str] | None = None,
    ) -> None:
        probs, target = np.asarray(probs), np.asarray(target)
        _validate(probs, target, case)
        super().__init__(probs, target, case, groups)
        self.n_classes = probs.shape[2]

    def _scorer_of(
        self, outputs: np.ndarray, target: np.ndarray, case: np.ndarray, per_class: bool = False
    ) -> Scorer:
        return _BatchScorer(outputs, target, case, per_class=per_class)

    def as_member(self, outputs: np.ndarray) -> np.ndarray:
        """(N, C, H, W) probabilities, or (N, H, W) integer labels (made one-hot)."""
        out = np.asarray(outputs)
        n, c, h, w = self.outputs.shape[1:]
        if out.shape == (n, h, w) and out.dtype.kind in "iu":
            if out.size and (out.min() < 0 or out.max() >= c):
                raise DataError(f"baseline labels must lie in 0..{c - 1}")
            onehot = np.zeros((n, c, h, w), dtype=np.float32)
            np.put_along_axis(onehot, out[:, None].astype(np.int64), 1.0, axis=1)
            return onehot[None]
        if out.shape != (n, c, h, w) or out.dtype.kind != "f":
            raise DataError(
                f"a segmentation baseline must be (N, C, H, W) = {(n, c, h, w)} probabilities "
                f"or (N, H, W) integer labels, found {out.shape} {out.dtype}"
            )
        if not np.all(np.isfinite(out)):
            raise DataError("the baseline contains NaN or infinite values")
        return out[None]

    def fuse(self, result: SearchResult, slices=None, models=None) -> np.ndarray:
        return fuse_labels(self.take(slices, models)[0], result)

    def score_vote(self, slices=None, models=None) -> float:
        probs, target, case = self.take(slices, models)
        labels = vote(probs)
        # the vote as a one-hot "model" scored by the same batched counts as any candidate
        onehot = np.zeros((1, *probs.shape[1:]), dtype=np.float32)
        np.put_along_axis(onehot[0], labels[:, None].astype(np.int64), 1.0, axis=1)
        return float(_BatchScorer(onehot, target, case)(np.ones((1, 1)))[0])


class ImageObjective(_Objective):
    """recons (M, N, H, W), target (N, H, W), case (N,), optional groups (N,) str; checked
    on creation."""

    n_classes = None

    def __init__(
        self,
        recons: np.ndarray,
        target: np.ndarray,
        case: np.ndarray,
        groups: np.ndarray | Sequence[str] | None = None,
    ) -> None:
        recons, target = np.asarray(recons), np.asarray(target)
        if recons.ndim != 4 or recons.shape[0] == 0 or recons.shape[2:] != target.shape[1:]:
            raise DataError(
                f"recons must be (M >= 1, N, H, W) matching target {target.shape}, "
                f"found {recons.shape}"
            )
        if recons.shape[1] != target.shape[0] or np.asarray(case).shape != (target.shape[0],):
            raise DataError("recons, target and case must have the same number of slices")
        if not np.all(np.isfinite(recons)):
            raise DataError("recons contain NaN or infinite values")
        super().__init__(recons, target, case, groups)

    def _scorer_of(
        self, outputs: np.ndarray, target: np.ndarray, case: np.ndarray, per_class: bool = False
    ) -> Scorer:
        return _SSIMScorer(outputs, target, case)

    def as_member(self, outputs: np.ndarray) -> np.ndarray:
        """(N, H, W) images, e.g. the zero-filled reconstructions."""
        out = np.asarray(outputs)
        if out.shape != self.outputs.shape[1:]:
            raise DataError(
                f"an image baseline must be (N, H, W) = {self.outputs.shape[1:]}, found {out.shape}"
            )
        if not np.all(np.isfinite(out)):
            raise DataError("the baseline contains NaN or infinite values")
        return out[None]

    def fuse(self, result: SearchResult, slices=None, models=None) -> np.ndarray:
        return combine_images(self.take(slices, models)[0], result.weights)


def group_member_scores(
    obj: _Objective, baseline: np.ndarray | None = None, slices: np.ndarray | None = None
) -> tuple[list[str], np.ndarray]:
    """Each member's val score per group (and the baseline's as a last column).

    Returns (group labels, (G, M) scores), or (G, M + 1) with ``baseline`` (one member's
    outputs on every slice, see :func:`members_below`). Groups: the objective's among
    ``slices``, or one ``"all"``. Each score is the plain scorer's on that group's slices.
    """
    extra = None if baseline is None else obj.as_member(baseline)
    labels, rows = [], []
    for g, idx in obj.slice_groups(slices):
        row = obj.scorer(idx)(np.eye(obj.n_models))
        if extra is not None:
            base = obj._scorer_of(extra[:, idx], obj.target[idx], obj.case[idx])(np.ones((1, 1)))
            row = np.concatenate([row, base])
        labels.append(g)
        rows.append(row)
    return labels, np.vstack(rows)


def members_below(
    obj: _Objective, baseline: np.ndarray, slices: np.ndarray | None = None
) -> dict[int, list[str]]:
    """The guard: for each member index, the groups on which its mean val score is below the
    baseline's on the same group (empty list: never below).

    baseline: one member's outputs on every slice of ``obj`` (subset by ``slices`` here):
    images (N, H, W) for reconstruction (e.g. zero-filled), probabilities (N, C, H, W) or
    integer labels (N, H, W) for segmentation. Scored by the same scorer as the members.
    Groups: the objective's, or one ``"all"``. A group where either score is NaN (nothing to
    score) flags nobody. Pass the flagged members to ``search(..., exclude=...)``.
    """
    labels, scores = group_member_scores(obj, baseline, slices)
    out: dict[int, list[str]] = {i: [] for i in range(obj.n_models)}
    for g, row in zip(labels, scores, strict=True):
        base = row[-1]
        for i in range(obj.n_models):
            if row[i] < base - _TIE_ATOL:  # False for NaN on either side
                out[i].append(g)
    return out


class SearchGuaranteeError(RuntimeError):
    """An optimiser broke its promise (a bug, not bad input): checked explicitly, so the
    check survives ``python -O``."""


def _check_not_below(method: str, score: float, floor: float, what: str) -> None:
    """Every search keeps its starting points: its val score is never below ``floor``."""
    if not score >= floor - 1e-9:
        raise SearchGuaranteeError(
            f"ensemble method {method!r}: val score {score:.6f} is below {what} ({floor:.6f})"
        )


def _scorer_for(
    obj: _Objective,
    cfg: SearchConfig,
    slices: np.ndarray | None,
    models: Sequence[int] | None,
    per_class: bool = False,
) -> Scorer:
    """The plain scorer, or the worst-group one when ``cfg.robust`` and ``obj`` has groups."""
    if cfg.robust and obj.groups is not None:
        return obj.group_scorer(slices, models, per_class)
    return obj.scorer(slices, models, per_class)


def _worst_note(scores: dict[str, float]) -> str:
    finite = {g: v for g, v in scores.items() if not np.isnan(v)}
    worst = min(finite, key=lambda g: finite[g]) if finite else next(iter(scores))
    return (
        f"robust: score is the worst-group val score, min over {len(scores)} groups of "
        f"the group mean (worst {worst!r} {scores[worst]:.4f})"
    )


def _robust_note(
    obj: _Objective, scorer: Scorer | None, weights: np.ndarray, slices: np.ndarray | None
) -> tuple[str, dict[str, float]]:
    """What robust scoring did, and each group's score of ``weights``."""
    if obj.groups is None:
        return "robust: the objective has no groups, score is the plain val score", {}
    if isinstance(scorer, WorstGroupScorer):
        per = scorer.per_group(weights[None])[:, 0]
        scores = dict(zip(scorer.labels, map(float, per), strict=True))
        return _worst_note(scores), scores
    (label, _), *_ = obj.slice_groups(slices)
    return f"robust: one group ({label!r}), score equals the plain val score", {}


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def search(
    obj: _Objective,
    cfg: SearchConfig,
    slices: np.ndarray | None = None,
    models: Sequence[int] | None = None,
    exclude: Sequence[int] | Mapping[int, str] = (),
) -> SearchResult:
    """Run ``cfg.method`` on the val outputs of ``obj`` (optionally a subset of slices/models).

    ``cfg.robust``: score candidates by their worst group (module doc); the result's score is
    then the worst-group score and ``group_scores`` each group's. ``exclude``: member indices
    of ``obj`` the search may not use, or ``{index: reason}``; the method runs on the others
    only, and the weights keep one row per member searched (``models`` or all) with exact
    zeros for the excluded ones; the note names them and why. Every member excluded:
    DataError.
    """
    if len(exclude):
        return _search_excluding(obj, cfg, slices, models, exclude)
    m = obj.n_models if models is None else len(models)
    if cfg.method in SEGMENTATION_ONLY and obj.n_classes is None:
        raise ConfigError(f"ensemble method {cfg.method!r} is for segmentation only")
    uniform = np.full(m, 1.0 / m)
    if cfg.method == "vote":
        return _search_vote(obj, cfg, slices, models, uniform)
    scorer = _scorer_for(obj, cfg, slices, models)
    if cfg.method == "mean":
        score = float(scorer(uniform[None])[0])
        result = SearchResult("mean", uniform, score, 1, [(uniform.tolist(), score)])
    elif cfg.method == "greedy":
        result = _greedy(scorer, m, cfg)
    elif cfg.method == "per_class":
        result = _per_class(obj, cfg, slices, models)
    else:
        result = _pool_search(scorer, m, cfg)
    if cfg.method not in ("mean", "per_class"):  # the optimiser's promise (per_class: inside)
        singles = scorer(np.eye(m))
        best_single = np.nan if np.all(np.isnan(singles)) else np.nanmax(singles)
        if not np.isnan(best_single):
            _check_not_below(cfg.method, result.score, best_single, "the best single model")
    if cfg.robust and cfg.method != "per_class":  # per_class: noted inside
        note, result.group_scores = _robust_note(obj, scorer, result.weights, slices)
        result.note = _join(result.note, note)
    log.debug(
        "ensemble %s: %d candidates, val %.4f",
        cfg.method,
        result.candidates_evaluated,
        result.score,
    )
    return result


def _search_vote(
    obj: _Objective,
    cfg: SearchConfig,
    slices: np.ndarray | None,
    models: Sequence[int] | None,
    uniform: np.ndarray,
) -> SearchResult:
    """The vote's val score; robust: the minimum over groups of each group's vote score."""
    parts = obj.slice_groups(slices)
    if not cfg.robust or obj.groups is None or len(parts) == 1:
        result = SearchResult("vote", uniform, obj.score_vote(slices, models), 1)
        if cfg.robust:
            result.note = _robust_note(obj, None, uniform, slices)[0]
        return result
    scores = {g: obj.score_vote(idx, models) for g, idx in parts}
    score = float(np.fmin.reduce(np.fromiter(scores.values(), dtype=np.float64)))
    note = _worst_note(scores)
    return SearchResult("vote", uniform, score, 1, note=note, group_scores=scores)


def _search_excluding(
    obj: _Objective,
    cfg: SearchConfig,
    slices: np.ndarray | None,
    models: Sequence[int] | None,
    exclude: Sequence[int] | Mapping[int, str],
) -> SearchResult:
    """:func:`search` on the members not excluded; weights padded with exact zeros."""
    if isinstance(exclude, Mapping):
        reasons = {int(j): str(r) for j, r in exclude.items()}
    else:
        reasons = {int(j): "excluded by the caller" for j in exclude}
    for j in reasons:
        if not 0 <= j < obj.n_models:
            raise DataError(f"exclude: member {j} does not exist (members 0..{obj.n_models - 1})")
    base = list(range(obj.n_models)) if models is None else [int(j) for j in models]
    allowed = [j for j in base if j not in reasons]
    dropped = [j for j in base if j in reasons]
    if not allowed:
        why = "; ".join(f"{j}: {reasons[j]}" for j in dropped)
        raise DataError(
            f"every ensemble member is excluded ({why}); no member is left to search weights "
            f"for (fall back to a baseline, or relax the guard)"
        )
    result = search(obj, cfg, slices, allowed)
    if not dropped:
        return result
    pos = np.array([base.index(j) for j in allowed])

    def pad(w: np.ndarray) -> np.ndarray:
        full = np.zeros((len(base), *w.shape[1:]), dtype=np.float64)
        full[pos] = w
        return full

    result.weights = pad(np.asarray(result.weights))
    result.trace = [(pad(np.asarray(w)).tolist(), s) for w, s in result.trace]
    result.order = [int(pos[i]) for i in result.order]
    note = f"excluded members {dropped}: " + "; ".join(f"member {j}: {reasons[j]}" for j in dropped)
    result.note = _join(result.note, note)
    return result


def guarded_search(
    obj: _Objective,
    cfg: SearchConfig,
    baseline: np.ndarray,
    slices: np.ndarray | None = None,
    models: Sequence[int] | None = None,
) -> SearchResult:
    """:func:`search` without the members that :func:`members_below` flags against
    ``baseline`` on ``slices`` (below it on some group); DataError when that is every one."""
    flagged = members_below(obj, baseline, slices)
    candidates = range(obj.n_models) if models is None else models
    exclude = {
        i: f"below the baseline on group(s) {', '.join(map(repr, flagged[i]))}"
        for i in candidates
        if flagged[i]
    }
    result = search(obj, cfg, slices, models, exclude=exclude)
    if not exclude:
        result.note = _join(result.note, "guard: no member below the baseline on any group")
    return result


def _per_class(
    obj: _Objective, cfg: SearchConfig, slices: np.ndarray | None, models: Sequence[int] | None
) -> SearchResult:
    assert obj.n_classes is not None
    c = obj.n_classes
    m = obj.n_models if models is None else len(models)
    base_cfg = SearchConfig("random+nelder_mead", cfg.n_random, cfg.seed, robust=cfg.robust)
    all_idx = np.arange(len(obj.case)) if slices is None else np.asarray(slices)

    def fit(idx: np.ndarray) -> tuple[SearchResult, np.ndarray, int]:
        base = _pool_search(_scorer_for(obj, cfg, idx, models), m, base_cfg)
        w, n = _per_class_refine(_scorer_for(obj, cfg, idx, models, True), base.weights, c, cfg)
        return base, w, base.candidates_evaluated + n

    base, w, evaluated = fit(all_idx)
    shared = np.repeat(base.weights[:, None], c, axis=1)
    note = ""
    enough = len(np.unique(case_groups(obj.case[all_idx]))) >= 2
    halves = case_folds(obj.case[all_idx], 2, cfg.seed) if enough else []
    if len(halves) == 2 and not np.array_equal(w, shared):
        gains = []
        for held, fitted in ((halves[0], halves[1]), (halves[1], halves[0])):
            b, wf, n = fit(all_idx[fitted])
            evaluated += n
            held_scorer = _scorer_for(obj, cfg, all_idx[held], models, per_class=True)
            s = held_scorer(np.stack([wf, np.repeat(b.weights[:, None], c, axis=1)]))
            gains.append(0.0 if np.any(np.isnan(s)) else float(s[0] - s[1]))
        if np.mean(gains) <= 0:
            w = shared
            note = f"held-out check kept the shared weights (per-class gain {np.mean(gains):+.4f})"
        else:
            note = f"held-out check kept per-class weights (gain {np.mean(gains):+.4f})"
    elif len(halves) < 2:
        note = "held-out check skipped: fewer than 2 case groups"
    final = _scorer_for(obj, cfg, slices, models, per_class=True)
    score = float(final(w[None])[0])
    _check_not_below("per_class", score, base.score, "its shared weights")
    trace = [*base.trace, (w.tolist(), score)]
    group_scores: dict[str, float] = {}
    if cfg.robust:
        robust, group_scores = _robust_note(obj, final, w, slices)
        note = _join(note, robust)
    return SearchResult(
        "per_class", w, score, evaluated, trace, note=note, group_scores=group_scores
    )


def crossfit(
    obj: _Objective,
    cfg: SearchConfig,
    folds: int,
    exclude: Sequence[int] | Mapping[int, str] = (),
) -> tuple[np.ndarray, list[SearchResult]]:
    """Cross-fitted val outputs: each fold of whole case groups is fused with weights searched
    on the other folds only. Returns the fused outputs in val order ((N, H, W) labels or
    images) and each fold's result; score them with the task's usual metric. ``cfg.robust``
    scores each fit by the worst group of its own slices (groups subset per fold);
    ``exclude`` as in :func:`search`, for every fold."""
    parts = case_folds(obj.case, folds, cfg.seed)
    fused: np.ndarray | None = None
    results = []
    everything = np.arange(len(obj.case))
    for held in parts:
        fitted = np.setdiff1d(everything, held)
        result = search(obj, cfg, slices=fitted, exclude=exclude)
        out = obj.fuse(result, slices=held)
        if fused is None:
            fused = np.empty((len(everything), *out.shape[1:]), dtype=out.dtype)
        fused[held] = out
        results.append(result)
    assert fused is not None
    return fused, results


def forward_selection(obj: _Objective, cfg: SearchConfig) -> list[tuple[list[int], SearchResult]]:
    """Ensembles of size 1..M in greedy order: each step adds the member whose addition gives
    the best val score with weights searched by ``cfg`` (ties: the earlier member).

    Returns (members in the order they were added, result) per size; the result's weights
    follow the members in model order (``sorted(members)``), so the last size is exactly
    the search over every member."""
    chosen: list[int] = []
    out = []
    for _ in range(obj.n_models):
        best: tuple[float, int, SearchResult] | None = None
        for j in range(obj.n_models):
            if j in chosen:
                continue
            r = search(obj, cfg, models=sorted([*chosen, j]))
            s = -np.inf if np.isnan(r.score) else r.score
            if best is None or s > best[0] + _TIE_ATOL:
                best = (s, j, r)
        assert best is not None
        chosen.append(best[1])
        out.append((list(chosen), best[2]))
    return out


def leave_one_out(obj: _Objective, cfg: SearchConfig) -> list[SearchResult | None]:
    """Per member: the search re-run without it (None when it is the only member)."""
    m = obj.n_models
    return [
        search(obj, cfg, models=[j for j in range(m) if j != i]) if m > 1 else None
        for i in range(m)
    ]


def search_weights(
    probs: np.ndarray,
    target: np.ndarray,
    case: np.ndarray,
    *,
    method: str,
    n_random: int,
    seed: int,
    rounds: int = 25,
    penalty: float = 0.01,
) -> SearchResult:
    """Search segmentation ensemble weights that maximise val mean foreground IoU.

    probs: (M, N, C, H, W) softmax probabilities of M models on the val slices (float16 or
    float32); target: (N, H, W) integer labels; case: (N,) case id per slice. ``method`` as in
    the module doc; n_random, rounds and penalty are read by the methods that use them.
    Raises ConfigError for an unknown method or bad settings, DataError for bad inputs.
    """
    cfg = SearchConfig(method, n_random, seed, rounds, penalty)
    return search(SegmentationObjective(probs, target, case), cfg)


def combine_images(recons: np.ndarray, weights: np.ndarray | Sequence[float]) -> np.ndarray:
    """Weighted sum of reconstructions (M, N, H, W) with simplex ``weights`` -> (N, H, W)."""
    recons = np.asarray(recons)
    w = _normalise(weights, recons.shape[0])
    if w.ndim != 1:
        raise DataError(f"image ensembles take one weight per model, found shape {w.shape}")
    return np.einsum("m,mnhw->nhw", w, recons.astype(np.float64)).astype(np.float32)


def search_image_weights(
    recons: np.ndarray,
    target: np.ndarray,
    case: np.ndarray,
    *,
    method: str,
    n_random: int,
    seed: int,
    rounds: int = 25,
) -> SearchResult:
    """Search weights of a weighted sum of reconstructions that maximise val SSIM.

    recons: (M, N, H, W) reconstructions of M models on the val slices; target (N, H, W);
    case (N,). SSIM is per volume with data range = the volume's target maximum, averaged
    over volumes (fastMRI). Methods as in the module doc, except the segmentation-only ones.
    """
    cfg = SearchConfig(method, n_random, seed, rounds)
    return search(ImageObjective(recons, target, case), cfg)
