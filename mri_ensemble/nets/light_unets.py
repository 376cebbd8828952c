"""U-Net encoder variants of the survey (R4): Residual U-Net, Mobile U-Net, Efficient U-Net.

- Residual U-Net: MONAI ``UNet`` with residual units at every level (Kerfoot et al. 2018).
- Mobile U-Net: a MobileNetV2 encoder (inverted residuals: 1x1 expansion, 3x3 depthwise,
  linear 1x1 projection; written here, MONAI has no MobileNet) and MONAI's U-Net decoder.
- Efficient U-Net: MONAI ``FlexibleUNet`` with an EfficientNet encoder (b0 by default);
  the encoder's unused classifier (``_conv_head``, ``_bn1``, ``_fc``: 1.7 M parameters for
  b0) is removed.

Odd input sizes are padded to the network's multiple and cropped back; every network
returns logits (N, out_channels, H, W). ``pretrained`` names a local state dict of
``model.encoder`` (never downloaded); the Residual U-Net has no separate encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.nets import FlexibleUNet
from monai.networks.nets import UNet as MonaiUNet
from monai.networks.nets.flexible_unet import SegmentationHead, UNetDecoder
from torch import nn

from ..errors import ConfigError
from .resnet_family import load_encoder_weights, pad_to

# --------------------------------------------------------------------------- Residual U-Net


@dataclass(frozen=True)
class ResidualUNetConfig:
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)  # one entry per level
    num_res_units: int = 2  # residual units per level
    dropout: float = 0.0


class ResidualUNet(nn.Module):
    """MONAI ``UNet`` with ``num_res_units`` residual units per level, strided-conv down-sampling."""

    def __init__(self, in_channels: int, out_channels: int, cfg: ResidualUNetConfig) -> None:
        super().__init__()
        if len(cfg.channels) < 2:
            raise ConfigError(f"channels needs at least 2 entries, found {cfg.channels}")
        n_down = len(cfg.channels) - 1
        self.multiple = 2**n_down
        self.net = MonaiUNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=tuple(cfg.channels),
            strides=(2,) * n_down,
            num_res_units=cfg.num_res_units,
            norm="batch",
            dropout=cfg.dropout,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> logits (N, out_channels, H, W)."""
        x, h, w = pad_to(x, self.multiple)
        y: torch.Tensor = self.net(x)
        return y[..., :h, :w]


# ----------------------------------------------------------------------------- Mobile U-Net

# MobileNetV2 stages (expansion t, channels c, repeats n, stride s); Sandler et al. 2018
_MOBILENET_V2: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_FEATURE_STAGES = (0, 1, 2, 4, 6)  # last stage at strides 2, 4, 8, 16, 32


def _divisible(v: float, d: int = 8) -> int:
    """Round channel count ``v`` to a multiple of ``d``, never below 90 % (MobileNet rule)."""
    out = max(d, int(v + d / 2) // d * d)
    return out + d if out < 0.9 * v else out


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (if t > 1), 3x3 depthwise, linear 1x1 project, residual."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, c_in, h, w) -> (N, c_out, h / stride, w / stride)."""
        y: torch.Tensor = self.conv(x)
        return x + y if self.residual else y


class MobileNetV2Encoder(nn.Module):
    """MobileNetV2 features without the final 1x1 conv to 1280 channels.

    ``forward``: x (N, C, H, W) -> 5 maps with ``channels[i]`` channels at strides 2..32.
    """

    def __init__(self, in_channels: int, width: float = 1.0) -> None:
        super().__init__()
        c = _divisible(32 * width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6()
        )
        stages: list[nn.Module] = []
        channels: list[int] = []
        for t, c_stage, n, s in _MOBILENET_V2:
            c_out = _divisible(c_stage * width)
            blocks = [
                InvertedResidual(c if i == 0 else c_out, c_out, s if i == 0 else 1, t)
                for i in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
            channels.append(c_out)
            c = c_out
        self.stages = nn.ModuleList(stages)
        self.channels: tuple[int, ...] = tuple(channels[i] for i in _FEATURE_STAGES)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (N, C, H, W) -> [(N, c0, H/2, W/2), ..., (N, c4, H/32, W/32)]."""
        x = self.stem(x)
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in _FEATURE_STAGES:
                feats.append(x)
        return feats


@dataclass(frozen=True)
class MobileUNetConfig:
    width: float = 1.0  # MobileNetV2 width multiplier
    decoder_channels: tuple[int, ...] = (96, 64, 32, 24, 16)
    pretrained: str | None = None  # local state dict of model.encoder


class MobileUNet(nn.Module):
    """MobileNetV2 encoder + MONAI U-Net decoder (5 up-samplings with skip concatenation)."""

    def __init__(self, in_channels: int, out_channels: int, cfg: MobileUNetConfig) -> None:
        super().__init__()
        if len(cfg.decoder_channels) != 5:
            raise ConfigError(f"decoder_channels needs 5 entries, found {cfg.decoder_channels}")
        self.encoder = MobileNetV2Encoder(in_channels, cfg.width)
        self.decoder = UNetDecoder(
            spatial_dims=2,
            encoder_channels=(in_channels, *self.encoder.channels),
            decoder_channels=cfg.decoder_channels,
            act=("relu", {"inplace": True}),
            norm="batch",
            dropout=0.0,
            bias=False,
            upsample="nontrainable",
            pre_conv="default",
            interp_mode="nearest",
            align_corners=None,
            is_pad=True,
        )
        self.head = SegmentationHead(2, cfg.decoder_channels[-1], out_channels, kernel_size=3)
        if cfg.pretrained is not None:
            load_encoder_weights(self.encoder, cfg.pretrained)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> logits (N, out_channels, H, W)."""
        x, h, w = pad_to(x, 32)
        y: torch.Tensor = self.head(self.decoder(self.encoder(x), 4))
        return y[..., :h, :w]


# -------------------------------------------------------------------------- Efficient U-Net


@dataclass(frozen=True)
class EfficientUNetConfig:
    backbone: str = "efficientnet-b0"  # efficientnet-b0 .. b8, l2
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    dropout: float = 0.0  # in the decoder blocks
    pretrained: str | None = None  # local state dict of model.encoder


class EfficientUNet(nn.Module):
    """MONAI ``FlexibleUNet`` with an EfficientNet encoder (Eff-UNet), never downloading."""

    def __init__(self, in_channels: int, out_channels: int, cfg: EfficientUNetConfig) -> None:
        super().__init__()
        if not cfg.backbone.startswith("efficientnet-"):
            raise ConfigError(f"backbone must be an efficientnet-*, found {cfg.backbone!r}")
        net = FlexibleUNet(
            in_channels,
            out_channels,
            backbone=cfg.backbone,
            pretrained=False,
            decoder_channels=tuple(cfg.decoder_channels),
            dropout=cfg.dropout,
        )
        for unused in ("_conv_head", "_bn1", "_fc"):  # the classifier; forward never runs it
            setattr(net.encoder, unused, nn.Identity())
        self.encoder, self.decoder, self.head = net.encoder, net.decoder, net.segmentation_head
        if cfg.pretrained is not None:
            load_encoder_weights(
                self.encoder, cfg.pretrained, ignore=("_conv_head.", "_bn1.", "_fc.")
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> logits (N, out_channels, H, W)."""
        x, h, w = pad_to(x, 32)
        y: torch.Tensor = self.head(self.decoder(self.encoder(x), 4))
        return y[..., :h, :w]


def build_residual_unet(in_channels: int, out_channels: int, **kwargs: object) -> nn.Module:
    return ResidualUNet(in_channels, out_channels, ResidualUNetConfig(**kwargs))  # type: ignore[arg-type]


def build_mobile_unet(in_channels: int, out_channels: int, **kwargs: object) -> nn.Module:
    return MobileUNet(in_channels, out_channels, MobileUNetConfig(**kwargs))  # type: ignore[arg-type]


def build_efficient_unet(in_channels: int, out_channels: int, **kwargs: object) -> nn.Module:
    return EfficientUNet(in_channels, out_channels, EfficientUNetConfig(**kwargs))  # type: ignore[arg-type]
