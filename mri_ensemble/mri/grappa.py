"""GRAPPA reconstruction of column-undersampled multi-coil k-space (via ``pygrappa``).

The kernel is calibrated on the autocalibration (ACS) block: the contiguous sampled columns
around ``W // 2`` (:func:`mri_ensemble.mri.masks.acs_bounds`), all rows. Acquired entries are
returned unchanged; a missing entry whose kernel window holds no acquired sample (a gap wider
than the kernel, possible with random masks) stays zero.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..errors import DataError
from .fft import ifft2c, rss
from .masks import acs_bounds

log = logging.getLogger(__name__)


def _check_inputs(masked_kspace: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    kspace = np.asarray(masked_kspace)
    if kspace.ndim != 3 or not np.iscomplexobj(kspace):
        raise DataError(
            "k-space: expected a complex array (coils, H, W), found "
            f"{kspace.dtype} of shape {kspace.shape}"
        )
    m = np.asarray(mask)
    if m.ndim != 1 or m.shape[0] != kspace.shape[-1]:
        raise DataError(
            f"mask: expected shape ({kspace.shape[-1]},) to match k-space width, found {m.shape}"
        )
    if m.dtype != bool:
        if not np.all((m == 0) | (m == 1)):
            raise DataError(f"mask: expected boolean or 0/1 values, found dtype {m.dtype}")
        m = m.astype(bool)
    return kspace, m


def grappa_kspace(
    masked_kspace: np.ndarray,
    mask: np.ndarray,
    kernel_size: tuple[int, int] = (5, 5),
    lamda: float = 0.01,
) -> np.ndarray:
    """Fill the missing columns of one slice with GRAPPA.

    masked_kspace: (C, H, W) complex, mask: (W,) bool -> (C, H, W) complex64.
    ``kernel_size`` is (rows, columns) of the kernel; ``lamda`` the relative Tikhonov weight.
    """
    kspace, m = _check_inputs(masked_kspace, mask)
    start, stop = acs_bounds(m)
    if stop - start < kernel_size[1]:
        raise DataError(
            f"mask: expected an autocalibration block of at least {kernel_size[1]} columns "
            f"(the kernel width), found {stop - start}"
        )
    # pygrappa takes exact zeros as the missing entries; solve in double precision.
    sampled = kspace.astype(np.complex128) * m  # (C, H, W)
    calib = np.ascontiguousarray(sampled[:, :, start:stop])  # (C, H, n_acs)
    from pygrappa import grappa  # here: half a second of every stage's start otherwise

    t0 = time.perf_counter()
    filled = grappa(sampled, calib, kernel_size=kernel_size, coil_axis=0, lamda=lamda)
    log.debug(
        "GRAPPA on %s, %d ACS columns: %.3f s", kspace.shape, stop - start, time.perf_counter() - t0
    )
    out = np.asarray(filled, dtype=np.complex64)  # (C, H, W)
    out[:, :, m] = kspace[:, :, m]  # acquired entries exactly as given
    return out


def grappa_image(
    masked_kspace: np.ndarray,
    mask: np.ndarray,
    kernel_size: tuple[int, int] = (5, 5),
    lamda: float = 0.01,
) -> np.ndarray:
    """RSS magnitude image of the GRAPPA-filled k-space: (C, H, W) complex -> (H, W) float32."""
    filled = grappa_kspace(masked_kspace, mask, kernel_size=kernel_size, lamda=lamda)
    return rss(ifft2c(filled)).astype(np.float32)
