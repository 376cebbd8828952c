"""The U-Net of report R2: small, BatchNorm + LeakyReLU, dropout after each pooling.

Encoder: ``depth`` stages of [Conv3x3 + BN + LeakyReLU] x ``convs`` then MaxPool2d and
Dropout; a bottleneck of the same conv block; decoder: ConvTranspose2d (k2, s2), skip
concatenation, conv block; a 1x1 conv to the output classes. Odd input sizes are padded
to a multiple of ``2**depth`` inside ``forward`` and cropped back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    features: tuple[int, ...] = (16, 32, 64, 128)  # encoder stages ..., bottleneck
    convs: int = 2  # conv blocks per stage
    dropout: float = 0.2  # after each max-pool (R2)
    negative_slope: float = 0.01  # LeakyReLU


def _block(c_in: int, c_out: int, convs: int, slope: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [
            nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.LeakyReLU(slope, inplace=True),
        ]
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """R2 U-Net. ``forward``: x (N, in_channels, H, W) -> logits (N, out_channels, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, cfg: UNetConfig) -> None:
        super().__init__()
        if len(cfg.features) < 2:
            raise ValueError("UNetConfig.features needs at least 2 entries (stages + bottleneck)")
        *enc, bottom = cfg.features
        self.depth = len(enc)
        self.down = nn.ModuleList()
        c = in_channels
        for f in enc:
            self.down.append(_block(c, f, cfg.convs, cfg.negative_slope))
            c = f
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout2d(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.bottleneck = _block(c, bottom, cfg.convs, cfg.negative_slope)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        c = bottom
        for f in reversed(enc):
            self.up.append(nn.ConvTranspose2d(c, f, kernel_size=2, stride=2))
            self.dec.append(_block(2 * f, f, cfg.convs, cfg.negative_slope))
            c = f
        self.head = nn.Conv2d(c, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**self.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.drop(self.pool(x))
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips), strict=True):
            x = dec(torch.cat([up(x), skip], dim=1))  # (N, 2f, h, w)
        return self.head(x)[..., :h, :w]


def build(in_channels: int, out_channels: int, **kwargs: object) -> nn.Module:
    return UNet(in_channels, out_channels, UNetConfig(**kwargs))  # type: ignore[arg-type]
