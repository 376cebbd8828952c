"""The network grid of segmentation: one forward / inverse pair, used by ingest and predict.

Forward (:func:`to_grid` for images, :func:`labels_to_grid` for labels), per slice
(S, H, W) with pixel size ``(dy, dx)`` mm:

1. in-plane resampling to ``spacing_mm`` (images linear, labels nearest neighbour; pixel
   centres aligned, so the field of view is kept);
2. intensity normalisation to [0, 1] over the whole field of view (images only);
3. centre crop / pad to ``size`` x ``size`` (images padded with their minimum, labels with 0).

Without a pixel size (an image-folder source, or a PNG/JPEG slice given without one) the
slice is resized to ``size`` x ``size`` (bilinear) and normalised instead.

:class:`Grid` records what the forward did, so :func:`from_grid` maps labels back to the
input grid exactly (un-crop with background outside the network's field of view, un-pad,
nearest-neighbour resampling): the inverse cannot drift from the forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from mri_ensemble.errors import DataError

MAX_RESAMPLED_PX = 4096  # per in-plane axis after resampling to spacing_mm


def normalize_intensity(
    image: np.ndarray, low_pct: float = 1.0, high_pct: float = 99.0
) -> np.ndarray:
    """Clip to the [low_pct, high_pct] percentiles of ``image`` and scale that range to [0, 1].

    Any shape in, float32 of the same shape out. A constant image maps to all zeros.
    """
    lo, hi = np.percentile(image, [low_pct, high_pct])
    if not hi > lo:
        return np.zeros(image.shape, dtype=np.float32)
    out = (np.clip(image, lo, hi) - lo) / (hi - lo)
    return out.astype(np.float32)


def resample_inplane(
    volume: np.ndarray, spacing_hw: tuple[float, float], target_mm: float, *, order: int
) -> np.ndarray:
    """Resample each slice of ``volume`` (S, H, W) from ``spacing_hw`` (dy, dx) to ``target_mm``.

    Pixel centres are aligned (output pixel o samples input coordinate (o + 0.5) r - 0.5 with
    r = target / spacing), so the field of view is kept and the output spacing is exactly
    ``target_mm``. ``order`` 1 is linear (images), 0 nearest neighbour (labels).
    Returns (S, round(H dy / target), round(W dx / target)) of the input dtype.
    """
    s, h, w = volume.shape
    ratio_h = target_mm / spacing_hw[0]
    ratio_w = target_mm / spacing_hw[1]
    if abs(ratio_h - 1.0) < 1e-6 and abs(ratio_w - 1.0) < 1e-6:
        return volume.copy()
    out_shape = (s, max(1, round(h / ratio_h)), max(1, round(w / ratio_w)))
    return ndimage.affine_transform(
        volume,
        np.array([1.0, ratio_h, ratio_w]),
        offset=np.array([0.0, 0.5 * ratio_h - 0.5, 0.5 * ratio_w - 0.5]),
        output_shape=out_shape,
        order=order,
        mode="nearest",
    )


def center_crop_or_pad(volume: np.ndarray, size: int, fill: float) -> np.ndarray:
    """Centre-crop or pad the last two axes of ``volume`` (S, H, W) to (S, size, size).

    Padding uses the constant ``fill``; odd differences put the extra row/column at the end.
    """
    out = volume
    for axis in (1, 2):
        n = out.shape[axis]
        if n > size:
            start = (n - size) // 2
            out = np.take(out, np.arange(start, start + size), axis=axis)
        elif n < size:
            before = (size - n) // 2
            pad = [(0, 0)] * out.ndim
            pad[axis] = (before, size - n - before)
            out = np.pad(out, pad, mode="constant", constant_values=fill)
    return out


def resampled_hw(
    path: Path | str, shape_hw: tuple[int, int], spacing_hw: tuple[float, float], target: float
) -> tuple[int, int]:
    """(H, W) after :func:`resample_inplane` to ``target`` mm; DataError naming ``path``
    when either exceeds :data:`MAX_RESAMPLED_PX` (an implausible field of view)."""
    hw = (
        max(1, round(shape_hw[0] * spacing_hw[0] / target)),
        max(1, round(shape_hw[1] * spacing_hw[1] / target)),
    )
    if max(hw) > MAX_RESAMPLED_PX:
        raise DataError(
            f"{path}: resampled to {target:g} mm the image would be {hw[0]} x {hw[1]} pixels "
            f"(limit {MAX_RESAMPLED_PX}); its field of view "
            f"{shape_hw[0] * spacing_hw[0]:g} x {shape_hw[1] * spacing_hw[1]:g} mm is not an MRI slice"
        )
    return hw


@dataclass(frozen=True)
class Grid:
    """How slices (S, H, W) were brought to the network grid (S, size, size): their pixel
    size ``spacing_hw`` (dy, dx) mm and ``spacing_mm`` (None: resized), and the resampled
    (H, W) before the crop."""

    shape_hw: tuple[int, int]
    size: int
    spacing_hw: tuple[float, float] | None
    spacing_mm: float | None
    resampled_hw: tuple[int, int]

    @property
    def ratio(self) -> tuple[float, float] | None:
        """(spacing_mm / dy, spacing_mm / dx), as :func:`resample_inplane` computes it."""
        if self.spacing_hw is None or self.spacing_mm is None:
            return None
        return (self.spacing_mm / self.spacing_hw[0], self.spacing_mm / self.spacing_hw[1])


def _resize(slices: np.ndarray, hw: tuple[int, int], nearest: bool) -> np.ndarray:
    """Resize every slice (S, h, w) to ``hw`` with PIL (bilinear, or nearest for labels).

    uint8 slices go through PIL's "L" mode (as the image-folder source reads images),
    labels through "L" with nearest neighbour, anything else through float "F" mode."""
    from PIL import Image

    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    out = []
    for s in slices:
        im = Image.fromarray(s) if s.dtype == np.uint8 else Image.fromarray(s.astype(np.float32))
        out.append(np.asarray(im.resize((hw[1], hw[0]), resample=resample)))
    return np.stack(out)


def to_grid(
    slices: np.ndarray,
    spacing_hw: tuple[float, float] | None,
    size: int,
    spacing_mm: float | None,
    name: str | Path = "input",
) -> tuple[np.ndarray, Grid]:
    """Slices (S, H, W) -> (images (S, size, size) float32, grid); see the module doc.

    ``spacing_hw`` (dy, dx) mm and ``spacing_mm`` resample and crop/pad; either None
    resizes. ``name`` is what an implausible field of view is reported against."""
    shape_hw = (int(slices.shape[1]), int(slices.shape[2]))
    if spacing_mm is None or spacing_hw is None:
        images = normalize_intensity(
            _resize(slices, (size, size), nearest=False).astype(np.float32)
        )
        return images, Grid(shape_hw, size, None, None, (size, size))
    resampled_hw(name, shape_hw, spacing_hw, spacing_mm)  # bounded before anything is allocated
    resampled = resample_inplane(slices.astype(np.float32), spacing_hw, spacing_mm, order=1)
    resampled = normalize_intensity(resampled)  # over the whole field of view, before cropping
    images = center_crop_or_pad(resampled, size, fill=float(resampled.min()))
    grid = Grid(
        shape_hw, size, spacing_hw, spacing_mm, (int(resampled.shape[1]), int(resampled.shape[2]))
    )
    return np.ascontiguousarray(images, np.float32), grid


def labels_to_grid(labels: np.ndarray, grid: Grid) -> np.ndarray:
    """Labels (S, H, W) of the slices that made ``grid`` -> (S, size, size) uint8, the
    same geometry as their images (nearest neighbour; background outside the input)."""
    labels = np.asarray(labels, dtype=np.uint8)
    if grid.spacing_hw is None or grid.spacing_mm is None:
        return _resize(labels, (grid.size, grid.size), nearest=True)
    resampled = resample_inplane(labels, grid.spacing_hw, grid.spacing_mm, order=0)
    return np.ascontiguousarray(center_crop_or_pad(resampled, grid.size, fill=0), np.uint8)


def _uncrop(labels: np.ndarray, hw: tuple[int, int], size: int) -> np.ndarray:
    """Invert ``center_crop_or_pad`` of (S, size, size) labels to (S, *hw); background where
    the crop cut the field of view."""
    out = labels
    for axis, n in ((1, hw[0]), (2, hw[1])):
        if n > size:
            before = (n - size) // 2
            pad = [(0, 0)] * out.ndim
            pad[axis] = (before, n - size - before)
            out = np.pad(out, pad, mode="constant", constant_values=0)
        elif n < size:
            start = (size - n) // 2
            out = np.take(out, np.arange(start, start + n), axis=axis)
    return out


def from_grid(labels: np.ndarray, grid: Grid, nearest: bool = True) -> np.ndarray:
    """Labels (S, size, size) on the network grid -> (S, H, W) on the input grid
    (nearest neighbour), exactly inverting :func:`to_grid`'s geometry. ``nearest=False``:
    a float map instead (an uncertainty map; float32, bilinear), 0 outside the crop."""
    labels = np.asarray(labels, dtype=np.uint8 if nearest else np.float32)
    if grid.ratio is None:
        return _resize(labels, grid.shape_hw, nearest=nearest)
    out = _uncrop(labels, grid.resampled_hw, grid.size)  # (S, Hr, Wr)
    rh, rw = grid.ratio
    s = out.shape[0]
    if out.shape[1:] == grid.shape_hw and abs(rh - 1) < 1e-6 and abs(rw - 1) < 1e-6:
        return out.copy()
    # input pixel i sits at resampled coordinate (i + 0.5) / r - 0.5 (pixel centres aligned)
    return ndimage.affine_transform(
        out,
        np.array([1.0, 1.0 / rh, 1.0 / rw]),
        offset=np.array([0.0, 0.5 / rh - 0.5, 0.5 / rw - 0.5]),
        output_shape=(s, *grid.shape_hw),
        order=0 if nearest else 1,
        mode="nearest",
    )
