"""Deterministic augmentation of the segmentation training set.

Each augmented copy of a slice applies a random composition of the enabled transforms, drawn
from ``np.random.default_rng(seed)``:

1. horizontal flip (p = 0.5) and vertical flip (p = 0.5)            (``flip``)
2. rotation by 0, 90 or 270 degrees, uniformly                       (``rot90``, square slices)
3. rotation by an angle uniform in [-rotate_deg, rotate_deg] (p = 0.5) (``rotate_deg`` > 0)
4. additive Gaussian noise of std ``noise_std`` on the image only    (``noise_std`` > 0)

Geometric transforms move image and label together. Labels are only moved or resampled with
nearest neighbour (order 0, zero fill), so they keep the original label set; images use
linear interpolation and are filled with the slice minimum. Noise is not clipped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from mri_ensemble.errors import ConfigError

logger = logging.getLogger(__name__)

P_APPLY = 0.5  # probability of each flip and of the small rotation
_PROGRESS_MIN = 2000  # show a progress bar above this many augmented slices


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation settings (the ``augment`` section of params.yaml)."""

    copies: int = 1  # augmented copies per slice (originals are always kept)
    flip: bool = True  # horizontal / vertical flips
    rot90: bool = True  # rot90 / rot270 (report R3)
    rotate_deg: float = 10.0  # small rotation in [-rotate_deg, rotate_deg] (report R2); 0 disables
    noise_std: float = 0.03  # additive Gaussian noise on the image only; 0 disables

    def __post_init__(self) -> None:
        if isinstance(self.copies, bool) or not isinstance(self.copies, int) or self.copies < 0:
            raise ConfigError(f"copies: expected an integer >= 0, found {self.copies!r}")
        for key in ("flip", "rot90"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key}: expected true or false, found {getattr(self, key)!r}")
        if not _is_number(self.rotate_deg) or not 0.0 <= self.rotate_deg <= 180.0:
            raise ConfigError(
                f"rotate_deg: expected a number in [0, 180], found {self.rotate_deg!r}"
            )
        if not _is_number(self.noise_std) or self.noise_std < 0.0:
            raise ConfigError(f"noise_std: expected a number >= 0, found {self.noise_std!r}")

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any]) -> AugmentConfig:
        """Build from a params.yaml section; unknown keys raise ConfigError naming them."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ConfigError(f"augment: unknown keys {unknown}; known: {known}")
        return cls(**params)


def _is_number(value: object) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and bool(np.isfinite(value))
    )


def _augment_slice(
    image: np.ndarray, label: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One random composition applied to image (H, W) float32 and label (H, W) uint8."""
    if cfg.flip:
        if rng.random() < P_APPLY:
            image, label = image[:, ::-1], label[:, ::-1]
        if rng.random() < P_APPLY:
            image, label = image[::-1, :], label[::-1, :]
    if cfg.rot90 and image.shape[0] == image.shape[1]:
        k = int(rng.choice([0, 1, 3]))
        image, label = np.rot90(image, k), np.rot90(label, k)
    if cfg.rotate_deg > 0 and rng.random() < P_APPLY:
        angle = float(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg))
        fill = float(image.min())
        image = ndimage.rotate(image, angle, reshape=False, order=1, mode="constant", cval=fill)
        label = ndimage.rotate(label, angle, reshape=False, order=0, mode="constant", cval=0)
    if cfg.noise_std > 0:
        image = image + rng.normal(0.0, cfg.noise_std, size=image.shape).astype(np.float32)
    return image, label


def augment(
    image: np.ndarray, label: np.ndarray, case: np.ndarray, cfg: AugmentConfig, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Originals followed by ``cfg.copies`` augmented versions of every slice.

    image float32 (N, H, W), label uint8 (N, H, W), case str (N,) in; out image float32
    (N * (1 + copies), H, W), label uint8 of the same shape and case (N * (1 + copies),), where
    rows ``c * N + i`` (c >= 1) are copy c of slice i and keep its case id. Deterministic for a
    given ``seed``. Non-square slices are never rotated by 90 degrees (shape would change).
    """
    image = np.asarray(image, dtype=np.float32)
    label = np.asarray(label)
    case = np.asarray(case)
    if image.ndim != 3:
        raise ValueError(f"image: expected shape (N, H, W), got {image.shape}")
    if label.shape != image.shape:
        raise ValueError(f"label: expected shape {image.shape}, got {label.shape}")
    n = image.shape[0]
    if case.shape != (n,):
        raise ValueError(f"case: expected shape ({n},), got {case.shape}")
    if cfg.rot90 and image.shape[1] != image.shape[2]:
        logger.warning("slices are %dx%d, not square: rot90 skipped", *image.shape[1:])

    total = n * (1 + cfg.copies)
    out_image = np.empty((total, *image.shape[1:]), dtype=np.float32)
    out_label = np.empty((total, *image.shape[1:]), dtype=np.uint8)
    out_image[:n] = image
    out_label[:n] = label
    rng = np.random.default_rng(seed)
    bar = tqdm(
        total=n * cfg.copies,
        desc="augment",
        unit="slice",
        disable=None if n * cfg.copies > _PROGRESS_MIN else True,
    )
    with bar:
        for c in range(1, cfg.copies + 1):
            for i in range(n):
                aug_image, aug_label = _augment_slice(image[i], label[i].astype(np.uint8), cfg, rng)
                out_image[c * n + i] = aug_image
                out_label[c * n + i] = aug_label
                bar.update(1)
    out_case = np.tile(case.astype(str), 1 + cfg.copies)
    logger.info("augmented %d slices to %d (%d copies, seed %d)", n, total, cfg.copies, seed)
    return out_image, out_label, out_case
