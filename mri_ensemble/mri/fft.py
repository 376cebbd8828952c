"""Centred, orthonormal 2-D FFTs and coil combination, for numpy arrays and torch tensors.

Convention (fastMRI's): the image centre sits at index ``n // 2`` and so does k-space's
DC, i.e. ``kspace = fftshift(fft2(ifftshift(image), norm="ortho"))`` over the last two
axes. Orthonormal scaling keeps energies equal in both domains (Parseval), so noise and
data-consistency weights mean the same thing in each.

Torch versions run in float32/complex64 even under CUDA autocast (cuFFT in half
precision accepts only power-of-two sizes, and k-space has a large dynamic range).
"""

from __future__ import annotations

import numpy as np
import torch

_AXES = (-2, -1)


def fft2c(image: np.ndarray) -> np.ndarray:
    """Centred orthonormal 2-D FFT over the last two axes (numpy)."""
    return np.fft.fftshift(
        np.fft.fft2(np.fft.ifftshift(image, axes=_AXES), norm="ortho"), axes=_AXES
    )


def ifft2c(kspace: np.ndarray) -> np.ndarray:
    """Centred orthonormal 2-D inverse FFT over the last two axes (numpy)."""
    return np.fft.fftshift(
        np.fft.ifft2(np.fft.ifftshift(kspace, axes=_AXES), norm="ortho"), axes=_AXES
    )


def rss(coil_images: np.ndarray, axis: int = -3) -> np.ndarray:
    """Root sum of squares over the coil axis (default: (..., C, H, W) -> (..., H, W))."""
    return np.sqrt(np.sum(np.abs(coil_images) ** 2, axis=axis))


def tfft2c(image: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D FFT of a complex tensor over its last two dims."""
    with torch.autocast(image.device.type, enabled=False):
        x = torch.fft.ifftshift(image.to(torch.complex64), dim=_AXES)
        return torch.fft.fftshift(torch.fft.fft2(x, norm="ortho"), dim=_AXES)


def tifft2c(kspace: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D inverse FFT of a complex tensor over its last two dims."""
    with torch.autocast(kspace.device.type, enabled=False):
        x = torch.fft.ifftshift(kspace.to(torch.complex64), dim=_AXES)
        return torch.fft.fftshift(torch.fft.ifft2(x, norm="ortho"), dim=_AXES)


def trss(coil_images: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """Root sum of squares over the coil dim of a complex or real tensor."""
    return torch.sqrt(torch.sum(coil_images.abs() ** 2, dim=dim))


def complex_to_channels(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) complex -> (B, 2C, H, W) real: real and imaginary parts interleaved."""
    b, c, h, w = x.shape
    return torch.view_as_real(x).permute(0, 1, 4, 2, 3).reshape(b, 2 * c, h, w)


def channels_to_complex(x: torch.Tensor) -> torch.Tensor:
    """(B, 2C, H, W) real (interleaved as above) -> (B, C, H, W) complex64."""
    b, c2, h, w = x.shape
    if c2 % 2:
        raise ValueError(f"expected an even number of channels, found {c2}")
    y = x.float().reshape(b, c2 // 2, 2, h, w).permute(0, 1, 3, 4, 2).contiguous()
    return torch.view_as_complex(y)
