"""Fast batched metric scorers: many candidate weights scored at once on the val outputs.

A scorer (``Scorer``) maps normalised weights, (K, M) or per class (K, M, C), to K scores.
Segmentation: the mean foreground IoU of :mod:`mri_ensemble.metrics`, per volume
(:class:`BatchScorer`). Reconstruction: SSIM with fastMRI's semantics
(:mod:`mri_ensemble.mri.quality`), per volume (:class:`SSIMScorer`). Robust selection: the
minimum over groups of each group's plain score (:class:`WorstGroupScorer`).

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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
from scipy.ndimage import uniform_filter

from mri_ensemble.errors import DataError
from mri_ensemble.metrics import batch_mean_iou, case_index, counts_from_matrix
from mri_ensemble.mri.quality import K1, K2, WIN_SIZE

log = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 18  # candidate-pixels scored per chunk (bounds memory, see module doc)
SSIM_BLOCK = 1 << 15  # candidate-pixels per SSIM block (~256 KiB per float64 temporary)
TIE_ATOL = 1e-12  # scores closer than this are ties


class BatchScorer:
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


class SSIMScorer:
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
