"""Deterministic augmentation of the segmentation training set.

Each augmented copy of a slice applies a random composition of the enabled transforms, drawn
from ``np.random.default_rng(seed)``:

1. horizontal flip (p = 0.5) and vertical flip (p = 0.5)            (``flip``)
2. rotation by 0, 90 or 270 degrees, uniformly                       (``rot90``, square slices)
3. rotation by an angle uniform in [-rotate_deg, rotate_deg] (p = 0.5) (``rotate_deg`` > 0)
4. elastic deformation (p = ``elastic_p``)                            (``elastic_p`` > 0)
5. multiplicative bias field                                         (``bias_field_coeff`` > 0)
6. gamma on min-max normalised intensities                           (``gamma_range`` set)
7. additive Gaussian noise of std ``noise_std`` on the image only    (``noise_std`` > 0)

Geometric transforms (1-4) move image and label together. Labels are only moved or resampled
with nearest neighbour (order 0, zero fill), so they keep the original label set; images use
linear interpolation and are filled with the slice minimum. Intensity transforms (5-7) change the
image only. Noise is not clipped.

A transform draws random numbers only when it is enabled, and 4-6 are off by default, so the
default random stream, and hence the output, is the one of the original four transforms.

Elastic deformation (Simard et al. 2003, report R4): each of the two displacement components is
uniform noise in [-1, 1] per pixel, Gaussian-smoothed with std ``elastic_sigma`` pixels and
scaled by ``elastic_alpha`` pixels (RMS displacement about ``0.16 * alpha / sigma`` pixels).

Bias field: ``exp(sum_{i + j <= order} c_ij x^i y^j)`` with x, y in [-1, 1] and c_ij uniform in
[-bias_field_coeff, bias_field_coeff] (as TorchIO's RandomBiasField); it multiplies the intensity
above the slice minimum, ``min + (image - min) * field``, so the background stays put.

Gamma: ``gamma`` log-uniform in ``gamma_range``; ``min + (max - min) * u ** gamma`` with
``u = (image - min) / (max - min)``. A constant slice is left unchanged.

Batch-level mixup (Zhang et al. 2018, tried in report R0) is :func:`mixup_batch`, called by the
training loop on tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from scipy import ndimage, special
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
    elastic_p: float = 0.0  # probability of an elastic deformation per copy; 0 disables
    elastic_alpha: float = 100.0  # displacement scale (pixels)
    elastic_sigma: float = 8.0  # smoothness: std (pixels) of the Gaussian smoothing the noise
    gamma_range: tuple[float, float] | None = None  # e.g. [0.7, 1.5]; None disables
    bias_field_coeff: float = 0.0  # max |coefficient| of the log bias polynomial; 0 disables
    bias_field_order: int = 3  # degree of the log bias polynomial

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
        if not _is_number(self.elastic_p) or not 0.0 <= self.elastic_p <= 1.0:
            raise ConfigError(f"elastic_p: expected a number in [0, 1], found {self.elastic_p!r}")
        for key in ("elastic_alpha", "elastic_sigma"):
            value = getattr(self, key)
            if not _is_number(value) or value <= 0.0:
                raise ConfigError(f"{key}: expected a number > 0, found {value!r}")
        if self.gamma_range is not None:
            gr = self.gamma_range
            if (
                not isinstance(gr, list | tuple)
                or len(gr) != 2
                or not all(_is_number(g) for g in gr)
                or not 0.0 < gr[0] <= gr[1]
            ):
                raise ConfigError(
                    f"gamma_range: expected [low, high] with 0 < low <= high, or null, found {gr!r}"
                )
            object.__setattr__(self, "gamma_range", (float(gr[0]), float(gr[1])))
        if not _is_number(self.bias_field_coeff) or self.bias_field_coeff < 0.0:
            raise ConfigError(
                f"bias_field_coeff: expected a number >= 0, found {self.bias_field_coeff!r}"
            )
        order = self.bias_field_order
        if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order <= 5:
            raise ConfigError(f"bias_field_order: expected an integer in [0, 5], found {order!r}")

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
    if cfg.elastic_p > 0 and rng.random() < cfg.elastic_p:
        image, label = _elastic(image, label, cfg.elastic_alpha, cfg.elastic_sigma, rng)
    if cfg.bias_field_coeff > 0:
        image = _bias_field(image, cfg.bias_field_coeff, cfg.bias_field_order, rng)
    if cfg.gamma_range is not None:
        image = _gamma(image, cfg.gamma_range, rng)
    if cfg.noise_std > 0:
        image = image + rng.normal(0.0, cfg.noise_std, size=image.shape).astype(np.float32)
    return image, label


def _elastic(
    image: np.ndarray, label: np.ndarray, alpha: float, sigma: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Warp image (order 1, min fill) and label (order 0, zero fill) by one smooth random field."""
    shape = image.shape
    dy, dx = (
        alpha * ndimage.gaussian_filter(rng.uniform(-1.0, 1.0, size=shape), sigma, mode="constant")
        for _ in range(2)
    )
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    coords = np.stack([rows + dy, cols + dx])  # (2, H, W) source coordinate of each pixel
    fill = float(image.min())
    warped = ndimage.map_coordinates(image, coords, order=1, mode="constant", cval=fill)
    warped_label = ndimage.map_coordinates(label, coords, order=0, mode="constant", cval=0)
    return warped.astype(np.float32), warped_label.astype(label.dtype)


def _bias_field(
    image: np.ndarray, coeff: float, order: int, rng: np.random.Generator
) -> np.ndarray:
    """``min + (image - min) * exp(poly(y, x))`` with random coefficients in [-coeff, coeff]."""
    y, x = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in image.shape), indexing="ij")
    log_field = np.zeros(image.shape)
    for i in range(order + 1):
        for j in range(order + 1 - i):
            log_field += rng.uniform(-coeff, coeff) * y**i * x**j
    low = float(image.min())
    return (low + (image - low) * np.exp(log_field)).astype(np.float32)


def _gamma(
    image: np.ndarray, gamma_range: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """Gamma (log-uniform in ``gamma_range``) on the min-max normalised slice, mapped back."""
    gamma = float(np.exp(rng.uniform(np.log(gamma_range[0]), np.log(gamma_range[1]))))
    low, high = float(image.min()), float(image.max())
    if high <= low:
        return image
    unit = (image - low) / (high - low)
    return (low + (high - low) * unit**gamma).astype(np.float32)


def mixup_batch(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup of a batch with a permutation of itself (Zhang et al. 2018).

    x (N, C, H, W) float, y (N, H, W) int64 labels in [0, n_classes) ->
    ``x_mixed = lam * x + (1 - lam) * x[perm]`` (N, C, H, W) and the soft target
    ``y_soft = lam * onehot(y) + (1 - lam) * onehot(y[perm])`` (N, K, H, W) in x's dtype, whose
    channels sum to 1 per pixel (the losses accept it). One ``lam ~ Beta(alpha, alpha)`` per
    batch (:func:`sample_mixup_lambda`, one uniform draw from ``generator``), then one
    ``torch.randperm(N)`` draw from ``generator``: the partner of sample i is ``perm[i]``
    (possibly i itself). Pure: the inputs are not modified.
    """
    if x.ndim != 4 or y.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(
            f"mixup_batch: expected x (N, C, H, W), y (N, H, W); got {x.shape}, {y.shape}"
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(f"mixup_batch: labels must lie in [0, {n_classes}), found {y.unique()}")
    lam = sample_mixup_lambda(alpha, generator)
    perm = torch.randperm(x.shape[0], generator=generator, device=generator.device).to(x.device)
    x_mixed = lam * x + (1.0 - lam) * x[perm]
    onehot = torch.nn.functional.one_hot(y.long(), n_classes).permute(0, 3, 1, 2)  # (N, K, H, W)
    dtype = x.dtype if x.is_floating_point() else torch.float32
    onehot = onehot.to(dtype)
    y_soft = lam * onehot + (1.0 - lam) * onehot[perm]
    return x_mixed, y_soft


def sample_mixup_lambda(alpha: float, generator: torch.Generator) -> float:
    """``lam ~ Beta(alpha, alpha)`` by inverse CDF of one uniform drawn from ``generator``."""
    if not _is_number(alpha) or alpha <= 0:
        raise ConfigError(f"mixup alpha: expected a number > 0, found {alpha!r}")
    u = float(torch.rand((), generator=generator, device=generator.device))
    return float(special.betaincinv(alpha, alpha, u))


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
