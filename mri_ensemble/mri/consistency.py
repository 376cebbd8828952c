"""Data consistency (DC) of a magnitude image with the measured multi-coil k-space.

Any reconstruction output (a network's, a fused ensemble image, a saved prediction) is
an RSS magnitude image (B, H, W). DC makes it agree with the lines that were actually
acquired:

    S = acs_sensitivities(k0, mask)            # (B, C, H, W) from the ACS lines
    k = F(S * image)                           # the estimate's coil k-space
    k = where(mask, k0, k)                     # hard DC; soft: (1 - lam) k + lam k0
    out = RSS(F^-1(k))

``S`` are the low-resolution coil images of the fully sampled centre (ACS) divided by
their RSS: each coil's magnitude and the object's smooth phase, unit RSS wherever there
is signal. ``S * image`` therefore turns the magnitude estimate into coil images that
match the measured ones wherever the sensitivities and the phase are smooth.

Everything is torch and differentiable in ``image`` (and ``lam``), so it can sit inside a
network; ``consistent_image_np`` is the numpy wrapper (hard DC, batched, no grad) for
post-hoc use. Conventions as ``fft.py``: centred orthonormal FFTs, the phase-encode axis
(columns, W) is the undersampled one, ``mask`` is (B, W) bool.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .fft import tfft2c, tifft2c, trss

EPS = 1e-12  # floor of the RSS that sensitivity maps are divided by (as varnet.py)
# Tukey taper of the ACS window: on synthetic 8-coil slices with 4x equispaced + 8 / 16
# ACS lines, 0.25 gave a perfect estimate the smallest DC change (2.0% / 0.7% relative
# L2, against 2.6% / 1.1% for a box and 3.5% / 1.2% for Hann); with 4 lines it is a box
TAPER = 0.25


def acs_mask(mask: torch.Tensor) -> torch.Tensor:
    """The auto-calibration lines: the contiguous acquired block around column ``W // 2``.

    mask (B, W) bool (True = acquired) -> (B, W) bool, per batch element. Where the
    centre column is not acquired there is no ACS block, and all acquired lines are used.
    """
    m = mask.bool().to(torch.int32)  # (B, W)
    c = m.shape[-1] // 2
    right = torch.cumprod(m[:, c:], dim=1)  # (B, W - c): 1 until the first gap right of c
    left = torch.cumprod(m[:, : c + 1].flip(1), dim=1).flip(1)  # (B, c + 1)
    acs = torch.cat([left[:, :-1], right], dim=1).bool()  # (B, W)
    return torch.where(acs.any(dim=1, keepdim=True), acs, mask.bool())


def acs_window(acs: torch.Tensor, taper: float = TAPER) -> torch.Tensor:
    """Tukey weights over each row's ACS span: acs (B, W) bool -> (B, W) float32.

    For the n columns lo..hi of the span, ``t = (j - lo + 1/2) / n`` in (0, 1) and
    ``r = min(t, 1 - t)``: weight ``sin^2(pi r / taper)`` where ``r < taper / 2``, else 1
    (``taper`` 0: a box, 1: Hann); 0 outside the ACS columns, all 0 for rows without any.
    """
    if not 0.0 <= taper <= 1.0:
        raise ValueError(f"taper must be in [0, 1], found {taper}")
    b, w = acs.shape
    j = torch.arange(w, device=acs.device, dtype=torch.float32).expand(b, w)  # (B, W)
    lo = torch.where(acs, j, torch.full_like(j, w)).amin(dim=1, keepdim=True)  # (B, 1)
    hi = torch.where(acs, j, torch.full_like(j, -1)).amax(dim=1, keepdim=True)  # (B, 1)
    t = (j - lo + 0.5) / (hi - lo + 1).clamp_min(1)  # (B, W)
    r = torch.minimum(t, 1 - t)
    win = torch.ones_like(r)
    if taper > 0:
        edge = torch.sin(math.pi * r / taper) ** 2
        win = torch.where(r < taper / 2, edge, win)
    return torch.where(acs, win, torch.zeros_like(win))


def _check(masked_kspace: torch.Tensor, mask: torch.Tensor) -> None:
    if not torch.is_complex(masked_kspace) or masked_kspace.dim() != 4:
        raise ValueError(
            "masked_kspace must be complex (B, C, H, W), found "
            f"{masked_kspace.dtype} {tuple(masked_kspace.shape)}"
        )
    b, _, _, w = masked_kspace.shape
    if tuple(mask.shape) != (b, w):
        raise ValueError(f"mask must be (B, W) = {(b, w)}, found {tuple(mask.shape)}")


def acs_sensitivities(
    masked_kspace: torch.Tensor, mask: torch.Tensor, taper: float = TAPER, eps: float = EPS
) -> torch.Tensor:
    """Coil sensitivity maps from the ACS lines (no learning).

    masked_kspace (B, C, H, W) complex, mask (B, W) bool -> maps (B, C, H, W) complex64:
    the coil images of the ACS columns only (weighted across them by ``acs_window(taper)``,
    which softens the ringing of a hard cut-off; 0 = none), divided by their RSS over coils
    floored at ``eps``. The maps have unit RSS wherever there is signal, 0 where none.
    """
    _check(masked_kspace, mask)
    weight = acs_window(acs_mask(mask), taper)  # (B, W)
    k = masked_kspace.to(torch.complex64) * weight[:, None, None, :]  # (B, C, H, W)
    low = tifft2c(k)  # (B, C, H, W)
    return low / trss(low, dim=1).clamp_min(eps).unsqueeze(1)


def consistent_kspace(
    image: torch.Tensor,
    masked_kspace: torch.Tensor,
    mask: torch.Tensor,
    sens: torch.Tensor | None = None,
    lam: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """The DC'd coil k-space of a magnitude estimate.

    image (B, H, W) real, masked_kspace (B, C, H, W) complex (zeros where not acquired),
    mask (B, W) bool, sens (B, C, H, W) complex or None (``acs_sensitivities``), lam None
    (hard DC) or a scalar / tensor broadcastable to (B, C, H, W) (soft DC) -> k-space
    (B, C, H, W) complex64. Hard: exactly ``masked_kspace`` on the acquired lines and the
    estimate's ``F(sens * image)`` elsewhere. Soft: ``(1 - lam) k + lam k0`` on the
    acquired lines, so lam = 1 is hard DC and lam = 0 no DC.
    """
    _check(masked_kspace, mask)
    k0 = masked_kspace.to(torch.complex64)
    b, _, h, w = k0.shape
    if tuple(image.shape) != (b, h, w):
        raise ValueError(f"image must be (B, H, W) = {(b, h, w)}, found {tuple(image.shape)}")
    if sens is None:
        sens = acs_sensitivities(k0, mask)
    k = tfft2c(sens * image.float().unsqueeze(1))  # (B, C, H, W)
    m = mask.bool()[:, None, None, :]  # (B, 1, 1, W)
    if lam is None:
        return torch.where(m, k0, k)
    return torch.where(m, (1 - lam) * k + lam * k0, k)


def image_data_consistency(
    image: torch.Tensor,
    masked_kspace: torch.Tensor,
    mask: torch.Tensor,
    sens: torch.Tensor | None = None,
    lam: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """RSS of the DC'd coil images: arguments as ``consistent_kspace`` -> (B, H, W) float32.

    Differentiable in ``image`` and ``lam``.
    """
    k = consistent_kspace(image, masked_kspace, mask, sens=sens, lam=lam)
    return trss(tifft2c(k), dim=1)


def consistent_image_np(
    image: np.ndarray, masked_kspace: np.ndarray, mask: np.ndarray, batch_size: int = 4
) -> np.ndarray:
    """Hard DC of saved images, in batches of ``batch_size`` slices (bounded memory).

    image (N, H, W) float, masked_kspace (N, C, H, W) complex (zeros where not acquired),
    mask (N, W) bool -> (N, H, W) float32. Units: image and k-space as they are stored
    (DC is scale-equivariant: both in data units or both scaled alike).
    """
    image, masked_kspace, mask = np.asarray(image), np.asarray(masked_kspace), np.asarray(mask)
    n = image.shape[0]
    if image.ndim != 3 or masked_kspace.shape[:1] != (n,) or mask.shape[:1] != (n,):
        raise ValueError(
            f"expected image (N, H, W), kspace (N, C, H, W), mask (N, W); found "
            f"{image.shape}, {masked_kspace.shape}, {mask.shape}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, found {batch_size}")
    out = np.empty(image.shape, dtype=np.float32)
    with torch.no_grad():
        for i in range(0, n, batch_size):
            s = slice(i, i + batch_size)
            x = torch.from_numpy(np.ascontiguousarray(image[s], dtype=np.float32))
            k = torch.from_numpy(np.ascontiguousarray(masked_kspace[s], dtype=np.complex64))
            m = torch.from_numpy(np.ascontiguousarray(mask[s], dtype=bool))
            out[s] = image_data_consistency(x, k, m).numpy()
    return out
