"""Networks that MONAI already has, wrapped to one calling convention.

Every wrapper pads odd input sizes to the multiple the network needs and crops back, and
returns logits (N, out_channels, H, W); networks with deep supervision return a list of
such tensors in training mode (final output first) and only the final one in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets import AttentionUnet, BasicUNetPlusPlus
from torch import nn


def _pad_to(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int, int]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, h, w


@dataclass(frozen=True)
class AttentionUNetConfig:
    channels: tuple[int, ...] = (16, 32, 64, 128)
    dropout: float = 0.1


class AttentionUNet2d(nn.Module):
    """MONAI ``AttentionUnet`` (Oktay et al. 2018), 2-D. x (N, C, H, W) -> (N, K, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, cfg: AttentionUNetConfig) -> None:
        super().__init__()
        n_down = len(cfg.channels) - 1
        self.multiple = 2**n_down
        self.net = AttentionUnet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=tuple(cfg.channels),
            strides=(2,) * n_down,
            dropout=cfg.dropout,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = _pad_to(x, self.multiple)
        return self.net(x)[..., :h, :w]


@dataclass(frozen=True)
class UNetPlusPlusConfig:
    features: tuple[int, ...] = (16, 32, 64, 128, 256, 16)
    deep_supervision: bool = True
    dropout: float = 0.0


class UNetPlusPlus2d(nn.Module):
    """MONAI ``BasicUNetPlusPlus`` (Zhou et al. 2018), 2-D, with deep supervision.

    x (N, C, H, W) -> training: [X^{0,4}, X^{0,1}, X^{0,2}, X^{0,3}] logits, each
    (N, K, H, W); eval: X^{0,4} only.
    """

    def __init__(self, in_channels: int, out_channels: int, cfg: UNetPlusPlusConfig) -> None:
        super().__init__()
        self.deep_supervision = cfg.deep_supervision
        self.net = BasicUNetPlusPlus(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            features=tuple(cfg.features),
            deep_supervision=cfg.deep_supervision,
            norm=("batch", {"affine": True}),
            dropout=cfg.dropout,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        x, h, w = _pad_to(x, 16)
        outs = [o[..., :h, :w] for o in self.net(x)]  # MONAI order: X01, X02, X03, X04
        final = outs[-1]
        if self.training and self.deep_supervision:
            return [final, *outs[:-1]]
        return final


def build_attention_unet(in_channels: int, out_channels: int, **kwargs: object) -> nn.Module:
    return AttentionUNet2d(in_channels, out_channels, AttentionUNetConfig(**kwargs))  # type: ignore[arg-type]


def build_unetpp(in_channels: int, out_channels: int, **kwargs: object) -> nn.Module:
    return UNetPlusPlus2d(in_channels, out_channels, UNetPlusPlusConfig(**kwargs))  # type: ignore[arg-type]
