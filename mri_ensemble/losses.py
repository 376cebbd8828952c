"""Segmentation losses chosen by name from params.yaml.

``build_loss(name, config, class_counts)`` returns a module called as ``loss(out, target)`` with

- ``out``: logits (N, K, H, W), or a deep-supervision list of them (final output first);
- ``target``: a label map (N, H, W) or (N, 1, H, W) with values in [0, K), or, for every
  multi-class loss, a *soft target* (N, K, H, W) float whose K channels are class probabilities
  summing to 1 per pixel (one-hot mixtures, e.g. from
  :func:`mri_ensemble.data.augment.mixup_batch`). A one-hot soft target gives the same loss as
  its label map (up to float rounding).

Names and their ``loss_config`` keys (defaults in brackets):

``ce``
    Cross-entropy (``torch.nn.CrossEntropyLoss``, mean over pixels). No keys.
``weighted_ce``
    Cross-entropy with effective-number class weights (Cui et al. 2019, report R2),
    ``w_c = (1 - beta) / (1 - beta ** n_c)`` normalised to sum K, where ``n_c`` are the per-class
    pixel counts of the training set passed as ``class_counts``. Keys: ``beta`` [0.9999].
    The mean is weighted: ``sum_i w_{y_i} l_i / sum_i w_{y_i}`` (soft: ``w . t_i`` per pixel).
``focal``
    MONAI ``FocalLoss`` on softmax probabilities (``use_softmax`` [true]), mean over N, K, H, W.
    Keys: ``gamma`` [2.0], ``alpha``, ``weight``, ``use_softmax``.
``dice``
    MONAI ``DiceLoss``: soft Dice on softmax probabilities, per image and class, averaged.
    Keys: any ``DiceLoss`` argument (``smooth_nr``, ``smooth_dr``, ``include_background``,
    ``batch``, ...).
``dice_focal``, ``dice_ce``
    MONAI ``DiceFocalLoss`` / ``DiceCELoss`` (``to_onehot_y``, ``softmax``); keys are passed to
    them. Note that MONAI's focal term inside ``dice_focal`` uses sigmoid probabilities (its
    default, kept for reproducibility of the committed results), unlike ``focal``.
``unet3plus_hybrid``
    U-Net 3+ hybrid loss (report R4): ``lambda_focal * focal + lambda_ms_ssim * (1 - MS-SSIM)
    + lambda_iou * (1 - soft Jaccard)``, all on softmax probabilities against the one-hot
    (or soft) target, MS-SSIM and Jaccard per image and class, averaged. Keys: ``gamma`` [2.0],
    ``lambda_focal``, ``lambda_ms_ssim``, ``lambda_iou`` [1.0 each], ``ms_ssim_scales`` [3],
    ``ms_ssim_window`` [7], ``ms_ssim_sigma`` [1.5] (see :func:`ms_ssim`).
``bce``
    Binary mode (report R1): one output channel, ``BCEWithLogitsLoss`` against a {0, 1} (or
    [0, 1]) mask. Keys: ``pos_weight`` [none].

Absent-class policy (Dice and IoU terms of ``dice``, ``dice_focal``, ``dice_ce``,
``unet3plus_hybrid``): per image and class, ``score = (2 I + s) / (P + T + s)`` (Dice) or
``(2 I + s) / (2 (P + T - I) + s)`` (Jaccard), with I the soft intersection, P and T the
predicted and target masses and ``s = 1e-5`` (MONAI ``smooth_nr = smooth_dr``). A class absent
from both target and prediction therefore scores 1 (loss 0); a class absent from the target but
predicted with mass ``m`` scores ``s / (m + s)``, i.e. it costs a full false-positive loss of
about 1 as soon as ``m`` is much larger than 1e-5. The MS-SSIM term gives 1 (loss 0) to a class
whose target and prediction are both all zero. Every class, background included, enters the
mean.

Deep supervision: lists of outputs are weighted 1, 1/2, 1/4, ... normalised to sum 1 (MONAI
``DeepSupervisionLoss``; targets are resized to each output with nearest-exact interpolation).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss, DiceCELoss, DiceFocalLoss, DiceLoss, FocalLoss
from torch import nn

from .errors import ConfigError

logger = logging.getLogger(__name__)

# Wang, Simoncelli & Bovik 2003: weights of the five MS-SSIM scales (fewer scales: the first ones,
# renormalised to sum 1).
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_SSIM_C1 = 0.01**2  # (K1 * data range) ** 2 with data range 1 (probabilities)
_SSIM_C2 = 0.03**2
_SSIM_FLOOR = 1e-6  # factors are clamped to this before the fractional powers (finite gradients)


def _is_soft(logits: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether ``target`` (N, 1 | K, H, W) holds K class probabilities rather than labels."""
    if target.shape[1] not in (1, logits.shape[1]):
        raise ValueError(
            f"target: expected (N, 1, H, W) labels or (N, {logits.shape[1]}, H, W) "
            f"probabilities, got {tuple(target.shape)}"
        )
    return target.shape[1] != 1


def _to_probabilities(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One-hot (N, K, H, W) of labels (N, 1, H, W); a soft target is returned as it is."""
    if _is_soft(logits, target):
        return target.to(logits.dtype)
    return F.one_hot(target[:, 0].long(), logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)


class _LabelOrSoft(nn.Module):
    """Dispatch to ``hard`` for labels (N, 1, H, W), to ``soft`` for probabilities (N, K, H, W)."""

    def __init__(self, hard: nn.Module, soft: nn.Module) -> None:
        super().__init__()
        self.hard = hard
        self.soft = soft

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if _is_soft(logits, target):
            return self.soft(logits, target.to(logits.dtype))
        return self.hard(logits, target)


class _CrossEntropy(nn.Module):
    """Cross-entropy on logits (N, K, H, W) against labels (N, 1, H, W) or probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.ce = nn.CrossEntropyLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if _is_soft(logits, target):
            return self.ce(logits, target.to(logits.dtype))
        return self.ce(logits, target[:, 0].long())


def effective_number_weights(class_counts: Sequence[float], beta: float = 0.9999) -> torch.Tensor:
    """Class weights ``(1 - beta) / (1 - beta ** n_c)`` normalised to sum K (Cui et al. 2019).

    ``class_counts``: pixel count per class (length K) of the training set. A class with count 0
    is weighted as if it had one pixel (a warning is logged). Returns float32 (K,).
    """
    if not 0.0 <= beta < 1.0:
        raise ConfigError(f"beta: expected a number in [0, 1), found {beta!r}")
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size < 2 or not np.all(np.isfinite(counts)) or counts.min() < 0:
        raise ConfigError(
            f"class_counts: expected >= 2 non-negative pixel counts, found {class_counts!r}"
        )
    if counts.min() == 0:
        logger.warning(
            "class(es) %s have no pixels: weighted as one pixel", np.flatnonzero(counts == 0)
        )
        counts = np.maximum(counts, 1.0)
    raw = (1.0 - beta) / (1.0 - np.power(beta, counts)) if beta > 0 else np.ones_like(counts)
    return torch.as_tensor(raw * counts.size / raw.sum(), dtype=torch.float32)


class _WeightedCrossEntropy(nn.Module):
    """Class-weighted cross-entropy, weighted mean over pixels (labels or probabilities)."""

    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != self.weight.numel():
            raise ConfigError(
                f"weighted_ce: class_counts has {self.weight.numel()} classes, "
                f"the network outputs {logits.shape[1]}"
            )
        w = self.weight.to(logits)
        if not _is_soft(logits, target):
            return F.cross_entropy(logits, target[:, 0].long(), weight=w)
        t = target.to(logits.dtype) * w[None, :, None, None]  # (N, K, H, W)
        return -(t * F.log_softmax(logits, dim=1)).sum() / t.sum()


class _BinaryCE(nn.Module):
    """BCE with logits (N, 1, H, W) against a mask (N, 1, H, W) with values in [0, 1]."""

    pos_weight: torch.Tensor | None

    def __init__(self, pos_weight: float | None = None) -> None:
        super().__init__()
        if pos_weight is not None and not (_is_number(pos_weight) and pos_weight > 0):
            raise ConfigError(f"pos_weight: expected a number > 0, found {pos_weight!r}")
        pw = None if pos_weight is None else torch.tensor(float(pos_weight))
        self.register_buffer("pos_weight", pw)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != 1:
            raise ConfigError(
                f"loss 'bce' is binary: expected 1 output channel, found {logits.shape[1]}"
            )
        target = target.to(logits.dtype)
        if target.numel() and (target.min() < 0 or target.max() > 1):
            raise ValueError("bce: target mask must have values in [0, 1] (foreground 1)")
        pw = None if self.pos_weight is None else self.pos_weight.to(logits)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw)


def _gaussian_window(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    """Normalised 1-D Gaussian (size,) on ``like``'s device and dtype."""
    x = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter: (B, 1, H, W) -> (B, 1, H - w + 1, W - w + 1)."""
    x = F.conv2d(x, g.view(1, 1, 1, -1))
    return F.conv2d(x, g.view(1, 1, -1, 1))


def ms_ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    scales: int = 3,
    window: int = 7,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Multi-scale SSIM per image and channel: x, y (N, C, H, W) in [0, 1] -> (N, C).

    ``MS-SSIM = prod_{j < M-1} cs_j ** w_j * ssim_{M-1} ** w_{M-1}`` (Wang et al. 2003) with a
    ``window`` x ``window`` Gaussian (std ``sigma``, 'valid' filtering), data range 1, 2x2
    average-pool between scales and the first M of :data:`MS_SSIM_WEIGHTS` renormalised. Only
    scales whose image is at least ``window`` pixels wide are used (96 x 96 fits 3 scales with
    window 7, 12 x 12 one); an image smaller than the window is compared at one scale with the
    largest odd window that fits. Factors are clamped to >= 1e-6 before the powers.
    """
    n, c, h, w = x.shape
    x = x.reshape(n * c, 1, h, w)  # (B, 1, H, W)
    y = y.reshape(n * c, 1, h, w).to(x.dtype)
    size = min(h, w)
    used = sum(1 for j in range(scales) if size // 2**j >= window)
    if used == 0:
        window, used = size if size % 2 else size - 1, 1
    weights = torch.tensor(MS_SSIM_WEIGHTS[:used], dtype=x.dtype, device=x.device)
    weights = weights / weights.sum()
    g = _gaussian_window(window, sigma, x)
    factors = []
    for j in range(used):
        if j:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        mu_x, mu_y = _blur(x, g), _blur(y, g)
        var_x = _blur(x * x, g) - mu_x**2
        var_y = _blur(y * y, g) - mu_y**2
        cov = _blur(x * y, g) - mu_x * mu_y
        cs = (2 * cov + _SSIM_C2) / (var_x + var_y + _SSIM_C2)
        if j < used - 1:
            factors.append(cs.mean(dim=(1, 2, 3)))
        else:
            lum = (2 * mu_x * mu_y + _SSIM_C1) / (mu_x**2 + mu_y**2 + _SSIM_C1)
            factors.append((lum * cs).mean(dim=(1, 2, 3)))
    stacked = torch.stack(factors, dim=1).clamp(min=_SSIM_FLOOR)  # (B, M)
    return torch.prod(stacked ** weights[None], dim=1).reshape(n, c)


class _Unet3PlusHybrid(nn.Module):
    """Focal + (1 - MS-SSIM) + (1 - soft Jaccard) on softmax probabilities (U-Net 3+)."""

    def __init__(
        self,
        gamma: float = 2.0,
        lambda_focal: float = 1.0,
        lambda_ms_ssim: float = 1.0,
        lambda_iou: float = 1.0,
        ms_ssim_scales: int = 3,
        ms_ssim_window: int = 7,
        ms_ssim_sigma: float = 1.5,
    ) -> None:
        super().__init__()
        for key, value in (
            ("gamma", gamma),
            ("lambda_focal", lambda_focal),
            ("lambda_ms_ssim", lambda_ms_ssim),
            ("lambda_iou", lambda_iou),
        ):
            if not (_is_number(value) and value >= 0):
                raise ConfigError(f"{key}: expected a number >= 0, found {value!r}")
        if not (_is_int(ms_ssim_scales) and 1 <= ms_ssim_scales <= len(MS_SSIM_WEIGHTS)):
            raise ConfigError(
                f"ms_ssim_scales: expected an integer in [1, 5], found {ms_ssim_scales!r}"
            )
        if not (_is_int(ms_ssim_window) and ms_ssim_window >= 1 and ms_ssim_window % 2 == 1):
            raise ConfigError(
                f"ms_ssim_window: expected an odd integer >= 1, found {ms_ssim_window!r}"
            )
        if not (_is_number(ms_ssim_sigma) and ms_ssim_sigma > 0):
            raise ConfigError(f"ms_ssim_sigma: expected a number > 0, found {ms_ssim_sigma!r}")
        self.focal = FocalLoss(to_onehot_y=False, use_softmax=True, gamma=gamma)
        self.iou = DiceLoss(to_onehot_y=False, softmax=True, jaccard=True, soft_label=True)
        self.lambdas = (float(lambda_focal), float(lambda_ms_ssim), float(lambda_iou))
        self.ms_ssim_args = (int(ms_ssim_scales), int(ms_ssim_window), float(ms_ssim_sigma))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = _to_probabilities(logits, target)  # (N, K, H, W)
        focal = self.focal(logits, t)
        ssim = ms_ssim(torch.softmax(logits, dim=1), t, *self.ms_ssim_args)  # (N, K)
        iou = self.iou(logits, t)
        lf, ls, li = self.lambdas
        return lf * focal + ls * (1 - ssim.mean()) + li * iou


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dice_focal(**kw: Any) -> nn.Module:
    hard = DiceFocalLoss(to_onehot_y=True, softmax=True, **kw)
    soft = DiceFocalLoss(to_onehot_y=False, softmax=True, **kw)
    soft.dice.soft_label = True  # zero Dice loss iff prediction == soft target
    return _LabelOrSoft(hard, soft)


def _dice_ce(**kw: Any) -> nn.Module:
    hard = DiceCELoss(to_onehot_y=True, softmax=True, **kw)
    soft = DiceCELoss(to_onehot_y=False, softmax=True, **kw)
    soft.dice.soft_label = True
    return _LabelOrSoft(hard, soft)


def _dice(**kw: Any) -> nn.Module:
    hard = DiceLoss(to_onehot_y=True, softmax=True, **kw)
    soft = DiceLoss(to_onehot_y=False, softmax=True, soft_label=True, **kw)
    return _LabelOrSoft(hard, soft)


def _focal(gamma: float = 2.0, use_softmax: bool = True, **kw: Any) -> nn.Module:
    if not (_is_number(gamma) and gamma >= 0):
        raise ConfigError(f"gamma: expected a number >= 0, found {gamma!r}")
    hard = FocalLoss(to_onehot_y=True, use_softmax=use_softmax, gamma=gamma, **kw)
    soft = FocalLoss(to_onehot_y=False, use_softmax=use_softmax, gamma=gamma, **kw)
    return _LabelOrSoft(hard, soft)


def _weighted_ce(class_counts: Sequence[float] | None, beta: float = 0.9999) -> nn.Module:
    if class_counts is None:
        raise ConfigError(
            "loss 'weighted_ce' needs class_counts (per-class pixel counts of the training set, "
            "measured by the ingest stage); none were given"
        )
    if not _is_number(beta):
        raise ConfigError(f"beta: expected a number in [0, 1), found {beta!r}")
    return _WeightedCrossEntropy(effective_number_weights(class_counts, float(beta)))


# Each factory gets the loss_config keys; only the names in _NEEDS_COUNTS get class_counts.
LOSSES: dict[str, Callable[..., nn.Module]] = {
    "ce": _CrossEntropy,
    "weighted_ce": _weighted_ce,
    "focal": _focal,
    "dice": _dice,
    "dice_focal": _dice_focal,
    "dice_ce": _dice_ce,
    "unet3plus_hybrid": _Unet3PlusHybrid,
    "bce": _BinaryCE,
}
_NEEDS_COUNTS = frozenset({"weighted_ce"})


def build_loss(
    name: str,
    config: Mapping[str, Any] | None = None,
    class_counts: Sequence[float] | None = None,
) -> nn.Module:
    """Loss ``name`` with its ``config`` keys (see the module docstring).

    ``class_counts``: per-class pixel counts of the training set, used by ``weighted_ce`` only.
    Returns a module ``(out, target) -> scalar`` for logits (N, K, H, W) or a deep-supervision
    list of them, and a target of labels (N, H, W) / (N, 1, H, W) or probabilities (N, K, H, W).
    Unknown names and bad config raise ConfigError.
    """
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; known: {', '.join(sorted(LOSSES))}")
    kwargs = dict(config or {})
    if name in _NEEDS_COUNTS:
        kwargs["class_counts"] = class_counts
    try:
        base = LOSSES[name](**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad config for loss {name!r}: {exc}") from exc
    return _NormalisedDeepSupervision(base)


class _NormalisedDeepSupervision(nn.Module):
    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, out: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if target.ndim == 3:  # labels (N, H, W) -> (N, 1, H, W)
            target = target[:, None]
        if isinstance(out, torch.Tensor):
            return self.loss(out.float(), target)
        w = [0.5**i for i in range(len(out))]
        ds = _DeepSupervision(self.loss, weights=[x / sum(w) for x in w])  # type: ignore[arg-type]
        return ds(out, target)


class _DeepSupervision(DeepSupervisionLoss):
    """MONAI ``DeepSupervisionLoss`` that also resizes integer label maps (nearest-exact)."""

    def get_loss(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape[2:] != target.shape[2:]:
            resized = F.interpolate(
                target if target.is_floating_point() else target.float(),
                size=input.shape[2:],
                mode=self.interp_mode,
            )
            target = resized.to(target.dtype)
        return self.loss(input, target)  # type: ignore[no-any-return]
