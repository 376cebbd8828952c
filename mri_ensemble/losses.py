"""Segmentation losses chosen by name from params.yaml (MONAI implementations)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss, DiceFocalLoss
from torch import nn

from .errors import ConfigError


class _CrossEntropy(nn.Module):
    """Cross-entropy on logits (N, K, H, W) against labels (N, 1, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.ce = nn.CrossEntropyLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.ce(logits, target[:, 0].long())


def _dice_focal(**kw: Any) -> nn.Module:
    return DiceFocalLoss(to_onehot_y=True, softmax=True, **kw)


def _dice_ce(**kw: Any) -> nn.Module:
    return DiceCELoss(to_onehot_y=True, softmax=True, **kw)


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "dice_focal": _dice_focal,
    "dice_ce": _dice_ce,
    "ce": _CrossEntropy,
}


def build_loss(name: str, config: Mapping[str, Any] | None = None) -> nn.Module:
    """Loss ``name`` for logits (N, K, H, W) or a deep-supervision list of them.

    The target is a label map (N, H, W) or (N, 1, H, W). Lists of outputs (final output first) are
    weighted 1, 1/2, 1/4, ... normalised to sum 1 (MONAI ``DeepSupervisionLoss``).
    """
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; known: {', '.join(sorted(LOSSES))}")
    try:
        base = LOSSES[name](**dict(config or {}))
    except TypeError as exc:
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
        ds = DeepSupervisionLoss(self.loss, weights=[x / sum(w) for x in w])  # type: ignore[arg-type]
        return ds(out, target)
