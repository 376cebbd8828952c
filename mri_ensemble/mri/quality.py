"""Reconstruction quality with fastMRI's evaluation semantics, and SSIM training losses.

Scores follow ``fastmri/evaluate.py``: per volume, the data range is the maximum of the
target volume; SSIM is the mean over the volume's slices of skimage's
``structural_similarity`` (7x7 uniform window, K1=0.01, K2=0.03, sample covariance, a
3-pixel border cropped); PSNR and NMSE are taken over the whole volume. Summary numbers are
means over volumes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import uniform_filter
from torch import nn

from ..errors import ConfigError, DataError

log = logging.getLogger(__name__)

WIN_SIZE = 7
K1, K2 = 0.01, 0.03
# ssim_slices filters at most this many float64 pixels of ``pred`` at once. About ten arrays
# of that size are alive per chunk, so its temporary memory stays near 10 * 8 B * 2**21
# = 160 MiB (plus the target's own statistics), whatever the number of candidates.
_CHUNK_PIXELS = 1 << 21


def _filter(x: np.ndarray) -> np.ndarray:
    """7x7 uniform mean over the last two axes (scipy's 'reflect' border, as skimage)."""
    return uniform_filter(x, size=WIN_SIZE, axes=(-2, -1))


def ssim_slices(pred: np.ndarray, target: np.ndarray, data_range: np.ndarray | float) -> np.ndarray:
    """SSIM of every slice, as skimage's ``structural_similarity(target[i], pred[i], ...)``.

    pred: (..., N, H, W), target: (N, H, W), data_range: scalar or (N,) -> (..., N) float64.
    Leading dims of ``pred`` (e.g. K candidate ensembles) are vectorised and processed in
    chunks of about ``_CHUNK_PIXELS`` pixels, which bounds temporary memory (~160 MiB).
    """
    y = np.asarray(target, dtype=np.float64)
    x = np.asarray(pred, dtype=np.float64)
    if y.ndim != 3 or x.ndim < 3 or x.shape[-3:] != y.shape:
        raise DataError(
            f"ssim: expected pred (..., N, H, W) and target (N, H, W) with equal (N, H, W), "
            f"found {x.shape} and {y.shape}"
        )
    n, h, w = y.shape
    if min(h, w) < WIN_SIZE:
        raise DataError(f"ssim: expected slices of at least {WIN_SIZE}x{WIN_SIZE}, found {h}x{w}")
    dr = np.asarray(data_range, dtype=np.float64)
    if dr.shape not in ((), (1,), (n,)):
        raise DataError(f"ssim: expected data_range scalar or ({n},), found shape {dr.shape}")
    dr = np.broadcast_to(dr, (n,))
    c1 = ((K1 * dr) ** 2)[:, None, None]  # (N, 1, 1)
    c2 = ((K2 * dr) ** 2)[:, None, None]
    cov_norm = WIN_SIZE**2 / (WIN_SIZE**2 - 1)
    pad = (WIN_SIZE - 1) // 2

    uy = _filter(y)
    vy = cov_norm * (_filter(y * y) - uy * uy)

    lead = x.shape[:-3]
    flat = x.reshape(-1, n, h, w)  # (L, N, H, W)
    out = np.empty((flat.shape[0], n), dtype=np.float64)
    step = max(1, _CHUNK_PIXELS // (n * h * w))
    for i in range(0, flat.shape[0], step):
        xc = flat[i : i + step]  # (l, N, H, W)
        ux = _filter(xc)
        vx = cov_norm * (_filter(xc * xc) - ux * ux)
        vxy = cov_norm * (_filter(xc * y) - ux * uy)
        a1 = 2 * ux * uy + c1
        a2 = 2 * vxy + c2
        b1 = ux**2 + uy**2 + c1
        b2 = vx + vy + c2
        s = (a1 * a2) / (b1 * b2)
        out[i : i + step] = s[..., pad : h - pad, pad : w - pad].mean(axis=(-2, -1))
    return out.reshape(*lead, n)


def _group_by_case(case: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Slice indices per case, in order of first appearance."""
    c = np.asarray(case)
    if c.shape != (n,):
        raise DataError(f"case: expected shape ({n},) (one id per slice), found {c.shape}")
    ids = [v.decode() if isinstance(v, bytes) else str(v) for v in c.tolist()]
    groups: dict[str, list[int]] = {}
    for i, cid in enumerate(ids):
        groups.setdefault(cid, []).append(i)
    return {k: np.asarray(v, dtype=np.int64) for k, v in groups.items()}


def reconstruction_scores(pred: np.ndarray, target: np.ndarray, case: np.ndarray) -> dict[str, Any]:
    """Per-volume SSIM, PSNR and NMSE (fastMRI ``evaluate.py``) and their means over volumes.

    pred, target: (N, H, W) magnitude images; case: (N,) volume id of each slice.
    Returns ``{"ssim", "psnr", "nmse": float, "per_case": {case: {"ssim", "psnr", "nmse"}}}``.
    A perfect volume has PSNR ``inf``. A target volume whose maximum is not positive has no
    defined score and raises DataError.
    """
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    if p.shape != t.shape or p.ndim != 3:
        raise DataError(
            f"scores: expected pred and target of equal shape (N, H, W), found {p.shape} "
            f"and {t.shape}"
        )
    if not np.all(np.isfinite(p)):
        raise DataError(
            f"scores: expected finite predictions, found {np.sum(~np.isfinite(p))} "
            "non-finite values"
        )
    if not np.all(np.isfinite(t)):
        raise DataError(
            f"scores: expected a finite target, found {np.sum(~np.isfinite(t))} non-finite values"
        )
    per_case: dict[str, dict[str, float]] = {}
    for cid, idx in _group_by_case(case, p.shape[0]).items():
        gt, pr = t[idx], p[idx]  # (n_slices, H, W)
        maxval = float(gt.max())
        if maxval <= 0:
            raise DataError(
                f"scores: expected a target volume with a positive maximum, found {maxval:g} "
                f"in case {cid!r}"
            )
        mse = float(np.mean((gt - pr) ** 2))
        psnr = float(10 * np.log10(maxval**2 / mse)) if mse > 0 else float("inf")
        per_case[cid] = {
            "ssim": float(ssim_slices(pr, gt, maxval).mean()),
            "psnr": psnr,
            "nmse": float(np.sum((gt - pr) ** 2) / np.sum(gt**2)),
        }
    summary: dict[str, Any] = {
        key: float(np.mean([v[key] for v in per_case.values()])) for key in ("ssim", "psnr", "nmse")
    }
    summary["per_case"] = per_case
    return summary


def _as_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) -> (B, 1, H, W) float32."""
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(
            f"{name}: expected shape (B, H, W) or (B, 1, H, W), found {tuple(x.shape)}"
        )
    return x.float()


class SSIMLoss(nn.Module):
    """``1 - mean SSIM`` over the batch (fastMRI's ``SSIMLoss``; skimage's SSIM per image).

    A uniform ``win_size`` window applied as a 'valid' convolution, so the border skimage
    crops is never computed. Runs in float32 even under autocast.
    """

    w: torch.Tensor  # (1, 1, win_size, win_size) window, a buffer

    def __init__(self, win_size: int = WIN_SIZE, k1: float = K1, k2: float = K2) -> None:
        super().__init__()
        if win_size < 3 or win_size % 2 == 0:
            raise ConfigError(f"ssim win_size: expected an odd integer >= 3, found {win_size}")
        self.win_size = win_size
        self.k1, self.k2 = k1, k2
        self.register_buffer("w", torch.ones(1, 1, win_size, win_size) / win_size**2)
        npix = win_size**2
        self.cov_norm = npix / (npix - 1)

    def ssim_map(
        self, pred: torch.Tensor, target: torch.Tensor, data_range: torch.Tensor | float
    ) -> torch.Tensor:
        """pred, target: (B, H, W) or (B, 1, H, W); data_range: (B,) -> (B, 1, H-w+1, W-w+1)."""
        with torch.autocast(pred.device.type, enabled=False):
            x = _as_batch(pred, "pred")
            y = _as_batch(target, "target")
            if x.shape != y.shape:
                raise ValueError(
                    f"ssim: expected pred and target of equal shape, found {tuple(x.shape)} "
                    f"and {tuple(y.shape)}"
                )
            dr = torch.as_tensor(data_range, dtype=torch.float32, device=x.device)
            dr = dr.expand(x.shape[0])[:, None, None, None]  # (B, 1, 1, 1)
            w = self.w.float()
            c1 = (self.k1 * dr) ** 2
            c2 = (self.k2 * dr) ** 2
            ux = F.conv2d(x, w)  # (B, 1, H', W')
            uy = F.conv2d(y, w)
            uxx = F.conv2d(x * x, w)
            uyy = F.conv2d(y * y, w)
            uxy = F.conv2d(x * y, w)
            vx = self.cov_norm * (uxx - ux * ux)
            vy = self.cov_norm * (uyy - uy * uy)
            vxy = self.cov_norm * (uxy - ux * uy)
            a1, a2 = 2 * ux * uy + c1, 2 * vxy + c2
            b1, b2 = ux**2 + uy**2 + c1, vx + vy + c2
            return (a1 * a2) / (b1 * b2)

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, data_range: torch.Tensor | float
    ) -> torch.Tensor:
        """pred, target: (B, H, W) or (B, 1, H, W); data_range: (B,) -> scalar loss."""
        return 1 - self.ssim_map(pred, target, data_range).mean()


class SSIML1Loss(nn.Module):
    """``(1 - SSIM) + alpha * mean_b(mean |pred - target| / data_range_b)``."""

    def __init__(
        self, alpha: float = 0.1, win_size: int = WIN_SIZE, k1: float = K1, k2: float = K2
    ) -> None:
        super().__init__()
        if not alpha >= 0:
            raise ConfigError(f"ssim_l1 alpha: expected a number >= 0, found {alpha}")
        self.alpha = float(alpha)
        self.ssim = SSIMLoss(win_size=win_size, k1=k1, k2=k2)

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, data_range: torch.Tensor | float
    ) -> torch.Tensor:
        """pred, target: (B, H, W) or (B, 1, H, W); data_range: (B,) -> scalar loss."""
        loss = self.ssim(pred, target, data_range)
        with torch.autocast(pred.device.type, enabled=False):
            x, y = _as_batch(pred, "pred"), _as_batch(target, "target")
            dr = torch.as_tensor(data_range, dtype=torch.float32, device=x.device)
            l1 = (x - y).abs().mean(dim=(1, 2, 3)) / dr.expand(x.shape[0])  # (B,)
            return loss + self.alpha * l1.mean()


RECON_LOSSES: dict[str, Callable[..., nn.Module]] = {
    "ssim": SSIMLoss,
    "ssim_l1": SSIML1Loss,
}
_LOSS_KEYS: dict[str, tuple[str, ...]] = {
    "ssim": ("win_size", "k1", "k2"),
    "ssim_l1": ("alpha", "win_size", "k1", "k2"),
}


def build_recon_loss(name: str, config: Mapping[str, Any] | None = None) -> nn.Module:
    """Reconstruction loss ``name`` taking ``(pred, target, data_range)``, from its config."""
    if name not in RECON_LOSSES:
        raise ConfigError(f"unknown loss {name!r}; known: {', '.join(sorted(RECON_LOSSES))}")
    kw = dict(config or {})
    unknown = sorted(set(kw) - set(_LOSS_KEYS[name]))
    if unknown:
        raise ConfigError(
            f"loss {name!r}: unknown key(s) {', '.join(map(repr, unknown))}; known: "
            f"{', '.join(_LOSS_KEYS[name])}"
        )
    for key, value in kw.items():
        want_int = key == "win_size"
        ok = isinstance(value, int) if want_int else isinstance(value, int | float)
        if isinstance(value, bool) or not ok:
            kind = "an integer" if want_int else "a number"
            raise ConfigError(f"loss {name!r} {key}: expected {kind}, found {value!r}")
    return RECON_LOSSES[name](**kw)
