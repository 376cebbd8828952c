"""ResNet-encoder segmentation networks: ResNet34-U-Net, LinkNet, FPN and DeepLabV3.

All four share one encoder, :class:`ResNetEncoder`: the layers of MONAI's 2-D ``ResNet``
(7x7 stem with stride 2, max-pool, four residual stages) returning the feature maps at
strides 2, 4, 8, 16 and 32. It uses 1x1-conv shortcuts (``shortcut_type="B"``, as in
torchvision): MONAI's own ``ResNetFeatures`` uses the zero-padding shortcut "A" for
resnet18/34, whose ``out.data`` cuts the gradient through every down-sampling shortcut.
The parameter names equal torchvision's, so a local ImageNet state dict loads after its
``fc.*`` keys are dropped and its 3-channel stem summed to the input channels (done by
:func:`load_encoder_weights`).

Odd input sizes are padded to the network's multiple and cropped back; every network
returns logits (N, out_channels, H, W).
"""

from __future__ import annotations

import logging
import os
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.blocks import FeaturePyramidNetwork
from monai.networks.nets import ResNet
from monai.networks.nets.flexible_unet import SegmentationHead, UNetDecoder
from torch import nn

from ..errors import ConfigError

logger = logging.getLogger(__name__)

# name -> (MONAI block type, blocks per stage)
ENCODERS: dict[str, tuple[str, list[int]]] = {
    "resnet10": ("basic", [1, 1, 1, 1]),
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
}


def pad_to(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int, int]:
    """Replicate-pad H and W of x (N, C, H, W) up to ``multiple``; return it and the old H, W."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, h, w


def load_encoder_weights(
    encoder: nn.Module, path: str | os.PathLike[str], ignore: tuple[str, ...] = ()
) -> None:
    """Load a local state-dict file into ``encoder``; nothing is ever downloaded.

    Keys starting with a prefix in ``ignore`` that the encoder lacks (classifier heads such as
    ``fc.``) are dropped. A stem convolution saved for another number of input channels
    (e.g. 3-channel ImageNet weights for 1-channel MRI) is summed over its input channels
    and spread evenly over the encoder's. Anything else that does not fit raises
    ``ConfigError`` naming the file and the keys.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"pretrained encoder weights {str(p)!r} not found; expected a state-dict file "
            "written by torch.save(model.encoder.state_dict(), path)"
        )
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise ConfigError(f"pretrained encoder weights {str(p)!r} unreadable: {exc}") from exc
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        found = f"keys {list(state)[:5]}" if isinstance(state, Mapping) else type(state).__name__
        raise ConfigError(
            f"pretrained encoder weights {str(p)!r}: expected a state dict of tensors, "
            f"found {found}"
        )
    own = encoder.state_dict()
    stem = next(k for k, v in own.items() if v.ndim == 4)  # first conv weight
    fitted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in own and key.startswith(ignore):
            continue
        if key == stem and value.ndim == 4 and value.shape[1] != own[key].shape[1]:
            c = own[key].shape[1]
            value = value.sum(1, keepdim=True).repeat(1, c, 1, 1) / c  # (O, c, k, k)
        fitted[key] = value
    missing = sorted(own.keys() - fitted.keys())
    unexpected = sorted(fitted.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & fitted.keys() if own[k].shape != fitted[k].shape)
    if missing or unexpected or wrong:
        raise ConfigError(
            f"pretrained encoder weights {str(p)!r} do not fit the {type(encoder).__name__}: "
            f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}, "
            f"wrong shapes {wrong[:5]}"
        )
    encoder.load_state_dict(fitted)
    logger.info("loaded encoder weights from %s", p)


def _dilate(stage: nn.Module, rate: int) -> None:
    """Turn ``stage`` atrous: every conv stride 1, every 3x3 conv dilated by ``rate``."""
    for m in stage.modules():
        if isinstance(m, nn.Conv2d):
            m.stride = (1, 1)
            m.dilation = (rate, rate)
            m.padding = ((m.kernel_size[0] // 2) * rate, (m.kernel_size[1] // 2) * rate)


class ResNetEncoder(nn.Module):
    """MONAI 2-D ResNet layers as a feature encoder.

    ``forward``: x (N, in_channels, H, W) -> 5 maps with ``channels[i]`` channels at strides
    2, 4, 8, 16, 32 (strides 8 and 16 stay 8 where ``output_stride`` makes stages atrous).
    """

    def __init__(self, in_channels: int, name: str, output_stride: int = 32) -> None:
        super().__init__()
        if name not in ENCODERS:
            raise ConfigError(f"unknown encoder {name!r}; known: {', '.join(ENCODERS)}")
        if output_stride not in (8, 16, 32):
            raise ConfigError(f"output_stride must be 8, 16 or 32, found {output_stride}")
        block, layers = ENCODERS[name]
        net = ResNet(
            block=block,
            layers=layers,
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_stride=2,
            shortcut_type="B",
            feed_forward=False,
            bias_downsample=False,
        )
        self.conv1, self.bn1, self.act, self.maxpool = net.conv1, net.bn1, net.act, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        if output_stride <= 16:
            _dilate(self.layer4, 2 if output_stride == 16 else 4)
        if output_stride == 8:
            _dilate(self.layer3, 2)
        e = 4 if block == "bottleneck" else 1
        self.channels: tuple[int, ...] = (64, 64 * e, 128 * e, 256 * e, 512 * e)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (N, C, H, W) -> [(N, 64, H/2, W/2), (N, c1, H/4, W/4), ..., (N, c4, H/32, W/32)]."""
        x = self.act(self.bn1(self.conv1(x)))
        feats = [x]
        x = self.maxpool(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            feats.append(x)
        return feats


def _conv_bn_relu(c_in: int, c_out: int, k: int = 3, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


# --------------------------------------------------------------------------- ResNet34-U-Net


@dataclass(frozen=True)
class ResNetUNetConfig:
    encoder: str = "resnet34"
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)  # 5 up-samplings (R1)
    dropout: float = 0.0  # in the decoder blocks
    pretrained: str | None = None  # local encoder state-dict file


class ResNetUNet(nn.Module):
    """ResNet encoder + U-Net decoder (MONAI ``FlexibleUNet``'s decoder and head, R1).

    Five decoder blocks (up-sample x2, concatenate the encoder map of that scale, two
    conv-BN-ReLU); the fifth has no skip and returns to full size.
    """

    def __init__(self, in_channels: int, out_channels: int, cfg: ResNetUNetConfig) -> None:
        super().__init__()
        if len(cfg.decoder_channels) != 5:
            raise ConfigError(f"decoder_channels needs 5 entries, found {cfg.decoder_channels}")
        self.encoder = ResNetEncoder(in_channels, cfg.encoder)
        self.decoder = UNetDecoder(
            spatial_dims=2,
            encoder_channels=(in_channels, *self.encoder.channels),
            decoder_channels=cfg.decoder_channels,
            act=("relu", {"inplace": True}),
            norm="batch",
            dropout=cfg.dropout,
            bias=False,
            upsample="nontrainable",
            pre_conv="default",
            interp_mode="nearest",
            align_corners=None,
            is_pad=True,
        )
        self.head = SegmentationHead(2, cfg.decoder_channels[-1], out_channels, kernel_size=3)
        if cfg.pretrained is not None:
            load_encoder_weights(self.encoder, cfg.pretrained, ignore=("fc.",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> logits (N, out_channels, H, W)."""
        x, h, w = pad_to(x, 32)
        y: torch.Tensor = self.head(self.decoder(self.encoder(x), 4))
        return y[..., :h, :w]


# --------------------------------------------------------------------------------- LinkNet


@dataclass(frozen=True)
class LinkNetConfig:
    encoder: str = "resnet18"
    pretrained: str | None = None


class _LinkDecoderBlock(nn.Sequential):
    """LinkNet decoder block: 1x1 conv m -> m/4, 3x3 full-conv x2, 1x1 conv m/4 -> n."""

    def __init__(self, m: int, n: int) -> None:
        super().__init__(
            _conv_bn_relu(m, m // 4, k=1),
            nn.ConvTranspose2d(
                m // 4, m // 4, 3, stride=2, padding=1, output_padding=1, bias=False
            ),
            nn.BatchNorm2d(m // 4),
            nn.ReLU(inplace=True),
            _conv_bn_relu(m // 4, n, k=1),
        )


class LinkNet(nn.Module):
    """LinkNet (Chaurasia & Culurciello 2017) on a ResNet encoder.

    Each decoder block's output is added to the encoder map of the same scale (additive
    skips, stride 16 down to 4); a fourth block goes to stride 2; then a 3x3 full-conv to
    full size, a 3x3 conv and a 3x3 conv to the classes.
    """

    def __init__(self, in_channels: int, out_channels: int, cfg: LinkNetConfig) -> None:
        super().__init__()
        self.encoder = ResNetEncoder(in_channels, cfg.encoder)
        c = self.encoder.channels  # strides 2, 4, 8, 16, 32
        self.decoder = nn.ModuleList(
            [
                _LinkDecoderBlock(c[4], c[3]),
                _LinkDecoderBlock(c[3], c[2]),
                _LinkDecoderBlock(c[2], c[1]),
                _LinkDecoderBlock(c[1], 64),
            ]
        )
        self.final = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            _conv_bn_relu(32, 32),
            nn.Conv2d(32, out_channels, 3, padding=1),
        )
        if cfg.pretrained is not None:
            load_encoder_weights(self.encoder, cfg.pretrained, ignore=("fc.",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> logits (N, out_channels, H, W)."""
        x, h, w = pad_to(x, 32)
        _, e1, e2, e3, e4 = self.encoder(x)
        d = self.decoder[0](e4) + e3  # (N, c3, H/16, W/16)
        d = self.decoder[1](d) + e2  # (N, c2, H/8, W/8)
        d = self.decoder[2](d) + e1  # (N, c1, H/4, W/4)
        d = self.decoder[3](d)  # (N, 64, H/2, W/2)
        y: torch.Tensor = self.final(d)
        return y[..., :h, :w]


# ------------------------------------------------------------------------------------- FPN


@dataclass(frozen=True)
class FPNConfig:
    encoder: str = "resnet34"
    pyramid_channels: int = 256
    segmentation_channels: int = 128
    dropout: float = 0.2
    pretrained: str | None = None


class _SegmentationBranch(nn.Sequential):
    """Panoptic-FPN semantic branch of one level: [3x3 conv-GN-ReLU, x2 up] to stride 4."""

    def __init__(self, c_in: int, c_out: int, n_up: int) -> None:
        layers: list[nn.Module] = []
        for i in range(max(n_up, 1)):
            layers += [
                nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False),
                nn.GroupNorm(gcd(32, c_out), c_out),
                nn.ReLU(inplace=True),
            ]
            if n_up:
                layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
        super().__init__(*layers)


class FPN(nn.Module):
    """FPN (Lin et al. 2017) with the panoptic-FPN segmentation head (Kirillov et al. 2019).

    MONAI ``FeaturePyramidNetwork`` turns the encoder maps at strides 4..32 into P2..P5;
    each is brought to stride 4, the four are summed, then dropout, a 1x1 conv to the
    classes and bilinear x4 up-sampling.
    """

    def __init__(self, in_channels: int, out_channels: int, cfg: FPNConfig) -> None:
        super().__init__()
        self.encoder = ResNetEncoder(in_channels, cfg.encoder)
        self.fpn = FeaturePyramidNetwork(
            spatial_dims=2,
            in_channels_list=list(self.encoder.channels[1:]),
            out_channels=cfg.pyramid_channels,
        )
        self.branches = nn.ModuleList(
            _SegmentationBranch(cfg.pyramid_channels, cfg.segmentation_channels, n_up)
            for n_up in range(4)  # P2 (stride 4) .. P5 (stride 32)
        )
        self.drop = nn.Dropout2d(cfg.dropout)
        self.head = nn.Conv2d(cfg.segmentation_channels, out_channels, 1)
        if cfg.pretrained is not None:
            load_encoder_weights(self.encoder, cfg.pretrained, ignore=("fc.",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> logits (N, out_channels, H, W)."""
        x, h, w = pad_to(x, 32)
        feats = self.encoder(x)[1:]
        pyramid = self.fpn(OrderedDict((f"p{i + 2}", f) for i, f in enumerate(feats)))
        s = sum(b(p) for b, p in zip(self.branches, pyramid.values(), strict=True))
        y = self.head(self.drop(s))  # (N, K, H/4, W/4)
        y = F.interpolate(y, scale_factor=4, mode="bilinear", align_corners=False)
        return y[..., :h, :w]


# ------------------------------------------------------------------------------- DeepLabV3


@dataclass(frozen=True)
class DeepLabV3Config:
    encoder: str = "resnet18"  # R2
    output_stride: int = 8  # 8 or 16
    # paper: (6, 12, 18) at stride 16 on 513 px crops; halved for ~96-256 px MRI slices
    atrous_rates: tuple[int, ...] = (3, 6, 9)
    aspp_channels: int = 256
    dropout: float = 0.5  # after the ASPP projection
    pretrained: str | None = None


class ASPP(nn.Module):
    """DeepLabV3 atrous spatial pyramid pooling.

    A 1x1 conv, one 3x3 atrous conv per rate and an image-pooling branch (each conv-BN-
    ReLU, the pooling branch conv-ReLU so that it trains on batches of one), concatenated
    and projected by a 1x1 conv-BN-ReLU and dropout. MONAI's ``SimpleASPP`` has neither
    the image pooling nor per-branch normalisation.
    """

    def __init__(self, c_in: int, c_out: int, rates: tuple[int, ...], dropout: float) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(c_in, c_out, k=1)] + [_conv_bn_relu(c_in, c_out, 3, r) for r in rates]
        )
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(c_in, c_out, 1), nn.ReLU(inplace=True)
        )
        self.project = nn.Sequential(
            _conv_bn_relu(c_out * (len(rates) + 2), c_out, k=1), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, c_in, h, w) -> (N, c_out, h, w)."""
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])  # (N, c_out, h, w)
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class DeepLabV3(nn.Module):
    """DeepLabV3 (Chen et al. 2017): atrous ResNet backbone, ASPP, bilinear up-sampling.

    The last one (stride 16) or two (stride 8) ResNet stages trade their stride for
    dilation; head = ASPP, 3x3 conv-BN-ReLU, 1x1 conv to the classes; the logits are
    up-sampled bilinearly to the input size (any H, W; no padding needed).
    """

    def __init__(self, in_channels: int, out_channels: int, cfg: DeepLabV3Config) -> None:
        super().__init__()
        if cfg.output_stride not in (8, 16):
            raise ConfigError(f"output_stride must be 8 or 16, found {cfg.output_stride}")
        self.encoder = ResNetEncoder(in_channels, cfg.encoder, output_stride=cfg.output_stride)
        c = cfg.aspp_channels
        self.head = nn.Sequential(
            ASPP(self.encoder.channels[-1], c, tuple(cfg.atrous_rates), cfg.dropout),
            _conv_bn_relu(c, c),
            nn.Conv2d(c, out_channels, 1),
        )
        if cfg.pretrained is not None:
            load_encoder_weights(self.encoder, cfg.pretrained, ignore=("fc.",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> logits (N, out_channels, H, W)."""
        y = self.head(self.encoder(x)[-1])  # (N, K, H/os, W/os)
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_resnet34_unet(in_channels: int, out_channels: int, **kwargs: object) -> nn.Module:
    return ResNetUNet(in_channels, out_channels, ResNetUNetConfig(**kwargs))  # type: ignore[arg-type]


def build_linknet(in_channels: int, out_channels: int, **kwargs: object) -> nn.Module:
    return LinkNet(in_channels, out_channels, LinkNetConfig(**kwargs))  # type: ignore[arg-type]


def build_fpn(in_channels: int, out_channels: int, **kwargs: object) -> nn.Module:
    return FPN(in_channels, out_channels, FPNConfig(**kwargs))  # type: ignore[arg-type]


def build_deeplabv3(in_channels: int, out_channels: int, **kwargs: object) -> nn.Module:
    return DeepLabV3(in_channels, out_channels, DeepLabV3Config(**kwargs))  # type: ignore[arg-type]
