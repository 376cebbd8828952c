"""U-Net 3+ (Huang et al. 2020): full-scale skips, full-scale deep supervision and CGM.

Encoder: level i is [Conv3x3 + BN + ReLU] x 2 with ``filters[i]`` channels, max-pool
between levels; the deepest encoder map X_En^L is also the deepest decoder map.

Decoder level i (from L-1 up to 1) receives every scale, each through a 3x3 conv-BN-ReLU
to ``cat_channels``: the encoder maps of levels <= i max-pooled down to its scale, and the
decoder maps of the deeper levels bilinearly up-sampled to it; the L maps are concatenated
(L x cat_channels, 5 x 64 = 320 in the paper) and fused by a 3x3 conv-BN-ReLU.

Full-scale deep supervision: a 3x3 conv head on every decoder level, logits up-sampled
bilinearly to the input size.

Classification-guided module (CGM): Dropout(0.5), 1x1 conv, adaptive max-pool on the
deepest encoder map give one logit c per image, "the image contains foreground". The paper
multiplies each segmentation map by the arg-max of the CGM; here the gate is kept soft and
differentiable: ``log sigmoid(c)`` is added to the foreground logits (channel 0 is
background when out_channels > 1; the only channel when out_channels == 1). For softmax
outputs this multiplies every foreground class's unnormalised probability by
``sigmoid(c)``, so an image the CGM calls empty predicts background. The same gate is
applied to every output in training and evaluation, so the CGM is trained by the
segmentation loss and needs no separate classification loss or output.

Odd input sizes are padded to a multiple of ``2**(L-1)`` and cropped back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .resnet_family import load_encoder_weights, pad_to


@dataclass(frozen=True)
class UNet3PlusConfig:
    filters: tuple[int, ...] = (16, 32, 64, 128, 256)  # paper: 64 .. 1024
    cat_channels: int = 64  # per scale; L * cat_channels per decoder level
    deep_supervision: bool = True
    cgm: bool = True
    pretrained: str | None = None  # local state dict of model.encoder


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)
    )


class _DecoderLevel(nn.Module):
    """One decoder level: a 3x3 conv-BN-ReLU per scale to ``cat`` channels, concat, fuse."""

    def __init__(self, source_channels: list[int], cat: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(_conv_bn_relu(c, cat) for c in source_channels)
        self.fuse = _conv_bn_relu(cat * len(source_channels), cat * len(source_channels))

    def forward(self, sources: list[torch.Tensor]) -> torch.Tensor:
        """L maps (N, c_j, h, w), already at this level's scale -> (N, L * cat, h, w)."""
        return self.fuse(torch.cat([c(s) for c, s in zip(self.convs, sources, strict=True)], 1))


class UNet3Plus(nn.Module):
    """U-Net 3+ with full-scale deep supervision and classification-guided module.

    ``forward``: x (N, C, H, W) -> training with ``deep_supervision``: L logits, each
    (N, K, H, W), from decoder level 1 (the final output, first) to level L (the deepest
    encoder map); otherwise the level-1 logits only. With ``cgm`` every output's foreground
    logits carry the CGM gate (module docstring).
    """

    def __init__(self, in_channels: int, out_channels: int, cfg: UNet3PlusConfig) -> None:
        super().__init__()
        f = tuple(cfg.filters)
        if len(f) < 2:
            raise ConfigError(f"filters needs at least 2 entries, found {f}")
        n = len(f)
        cat, up = cfg.cat_channels, cfg.cat_channels * n
        self.levels = n
        self.deep_supervision = cfg.deep_supervision
        self.encoder = nn.ModuleList(
            nn.Sequential(_conv_bn_relu(c_in, c), _conv_bn_relu(c, c))
            for c_in, c in zip((in_channels, *f[:-1]), f, strict=True)
        )

        def source_channels(j: int) -> int:  # channels of the map that level j passes on
            return f[j] if j == n - 1 else up

        self.decoder = nn.ModuleList(
            _DecoderLevel([f[j] if j <= i else source_channels(j) for j in range(n)], cat)
            for i in range(n - 1)
        )
        n_heads = n if cfg.deep_supervision else 1
        self.heads = nn.ModuleList(
            nn.Conv2d(source_channels(i), out_channels, 3, padding=1) for i in range(n_heads)
        )
        self.cgm = (
            nn.Sequential(nn.Dropout(0.5), nn.Conv2d(f[-1], 1, 1), nn.AdaptiveMaxPool2d(1))
            if cfg.cgm
            else None
        )
        if cfg.pretrained is not None:
            load_encoder_weights(self.encoder, cfg.pretrained)

    def _gate(self, logits: torch.Tensor, log_gate: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] == 1:
            return logits + log_gate
        return torch.cat([logits[:, :1], logits[:, 1:] + log_gate], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """x (N, C, H, W) -> logits (N, K, H, W), or a list of L of them (see class)."""
        n = self.levels
        x, h, w = pad_to(x, 2 ** (n - 1))
        size = x.shape[-2:]
        enc: list[torch.Tensor] = []
        for i, block in enumerate(self.encoder):
            enc.append(block(x if i == 0 else F.max_pool2d(enc[-1], 2)))
        dec: dict[int, torch.Tensor] = {n - 1: enc[-1]}
        for i in range(n - 2, -1, -1):
            target = enc[i].shape[-2:]
            srcs = [F.max_pool2d(enc[j], 2 ** (i - j)) for j in range(i)] + [enc[i]]
            srcs += [
                F.interpolate(dec[j], size=target, mode="bilinear", align_corners=False)
                for j in range(i + 1, n)
            ]
            dec[i] = self.decoder[i](srcs)  # (N, n * cat, H / 2**i, W / 2**i)
        all_outs = self.training and self.deep_supervision
        outs = []
        for i, head in enumerate(self.heads if all_outs else self.heads[:1]):
            y = head(dec[i])
            if i:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            outs.append(y[..., :h, :w])
        if self.cgm is not None:
            log_gate = F.logsigmoid(self.cgm(enc[-1]))  # (N, 1, 1, 1)
            outs = [self._gate(o, log_gate) for o in outs]
        if all_outs:
            return outs
        return outs[0]


def build_unet3plus(in_channels: int, out_channels: int, **kwargs: object) -> nn.Module:
    return UNet3Plus(in_channels, out_channels, UNet3PlusConfig(**kwargs))  # type: ignore[arg-type]
