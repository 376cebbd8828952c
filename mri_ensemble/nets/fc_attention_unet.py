"""Report R0's modified Attention U-Net with a fully connected bottleneck, and its recon wrapper.

``FCAttentionUNet`` is a generic 2-D image-to-image / logits network:

- encoder: ``len(channels) - 1`` levels of [Conv3x3 + InstanceNorm + ReLU] x2, each
  followed by MaxPool2d(2) (``depth = len(channels) - 1``);
- middle block at ``channels[-1]`` (R0): [Conv3x3 + IN + ReLU] x2, max-pool to a small
  grid, flatten, ``fc_layers`` x (Linear + LeakyReLU(0.2) + Dropout), reshape,
  ConvTranspose2d, ConvTranspose2d + IN + ReLU, resized back to the bottleneck's size;
- decoder: ConvTranspose2d (k2, s2), the skip re-weighted by a ``ResidualAttentionGate``,
  concatenation, [Conv3x3 + IN + ReLU] x2; a final 1x1 conv to ``out_channels``.

Differences from R0, all forced by "any input size" or by the missing details in R0:

- R0 max-pools the bottleneck by a fixed factor 12, which ties the FC sizes to one image
  size. Here an adaptive max-pool to a fixed grid ``fc_grid`` (default 4 x 4) makes the
  flatten size ``channels[-1] * prod(fc_grid)`` independent of the input size (2048 with
  the defaults; R0's 4096 -> 2048 -> 4096 becomes 2048 -> ``fc_hidden`` -> 2048).
- The two stride-2 transposed convs bring the grid to ``4 * fc_grid``, which is then
  bilinearly resized to the bottleneck's spatial size (a no-op when they already match).
- Inputs are padded (replicate) to a multiple of ``2**depth`` -- and to at least twice
  that, so InstanceNorm never sees a 1 x 1 bottleneck -- and the output is cropped back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..mri.consistency import acs_sensitivities, image_data_consistency
from ..mri.fft import tifft2c, trss

DATA_CONSISTENCY = ("hard", "soft", "none")  # ImageDomainRecon's output DC


@dataclass(frozen=True)
class FCAttentionUNetConfig:
    channels: tuple[int, ...] = (16, 32, 64, 128)  # encoder levels ..., bottleneck
    fc_bottleneck: bool = True  # False: the middle block is the conv block only
    fc_layers: int = 2  # 1: flat -> flat; 2: flat -> hidden -> flat (R0); k: k-2 hidden->hidden
    fc_hidden: int = 1024  # R0: half the flatten size (4096 -> 2048 -> 4096)
    fc_grid: tuple[int, int] = (4, 4)  # adaptive max-pool target before flattening
    fc_dropout: float = 0.3  # after each FC layer (R0)
    fc_negative_slope: float = 0.2  # LeakyReLU after each FC layer (R0)

    def __post_init__(self) -> None:
        if len(self.channels) < 2 or any(c < 1 for c in self.channels):
            raise ConfigError(
                "FCAttentionUNetConfig.channels needs >= 2 positive entries (levels + "
                f"bottleneck), found {self.channels!r}"
            )
        if self.fc_layers < 1:
            raise ConfigError(f"fc_layers must be >= 1, found {self.fc_layers}")
        if self.fc_hidden < 1:
            raise ConfigError(f"fc_hidden must be >= 1, found {self.fc_hidden}")
        if len(self.fc_grid) != 2 or any(g < 1 for g in self.fc_grid):
            raise ConfigError(f"fc_grid must be two positive ints, found {self.fc_grid!r}")
        if not 0.0 <= self.fc_dropout < 1.0:
            raise ConfigError(f"fc_dropout must be in [0, 1), found {self.fc_dropout}")


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """[Conv3x3 + InstanceNorm + ReLU] x2. (N, c_in, H, W) -> (N, c_out, H, W)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.InstanceNorm2d(c_out, affine=True),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.InstanceNorm2d(c_out, affine=True),
        nn.ReLU(inplace=True),
    )


class ResidualAttentionGate(nn.Module):
    """R0's "modified attention gate": Oktay et al.'s additive gate with three changes.

    Oktay: ``alpha = sigmoid(psi(ReLU(W_x * x_strided + W_g * g)))``, alpha upsampled back,
    ``out = x * alpha``. R0 gives no formula for its modification; this one is

        a = ReLU(IN(W_x * x + up(W_g * g)))       # all at the skip's resolution
        out = x * (1 + tanh(psi * a))            # factor in (0, 2)

    1. The gating signal is projected and bilinearly *upsampled to the skip's resolution*
       instead of the skip being strided down, so the attention map is computed at full
       resolution (no coarse, blocky alpha on fine anatomy).
    2. *InstanceNorm* instead of BatchNorm inside the gate: R0 trains with batch 1.
    3. A *residual* re-weighting ``x * (1 + tanh(.))``: the gate starts near identity and
       can only scale the skip by a factor in (0, 2), never replace it. Oktay's
       ``x * sigmoid`` halves every skip at initialisation and can zero whole regions --
       right for segmenting a foreground, wrong for reconstruction, where every pixel of
       the skip carries detail the output needs.
    """

    def __init__(self, skip_channels: int, gate_channels: int) -> None:
        super().__init__()
        inter = max(skip_channels // 2, 1)
        self.theta_x = nn.Conv2d(skip_channels, inter, 1, bias=False)
        self.phi_g = nn.Conv2d(gate_channels, inter, 1, bias=False)
        self.norm = nn.InstanceNorm2d(inter, affine=True)
        self.psi = nn.Conv2d(inter, 1, 1)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """skip (N, Cs, H, W), gate (N, Cg, h, w) (coarser) -> re-weighted skip (N, Cs, H, W)."""
        g = F.interpolate(
            self.phi_g(gate), size=skip.shape[-2:], mode="bilinear", align_corners=False
        )  # (N, inter, H, W)
        a = F.relu(self.norm(self.theta_x(skip) + g))  # (N, inter, H, W)
        alpha = torch.tanh(self.psi(a))  # (N, 1, H, W)
        return skip * (1.0 + alpha)


class FCBottleneck(nn.Module):
    """R0's fully connected middle path, after the middle conv block.

    Adaptive max-pool to ``fc_grid``, flatten, FC layers, reshape, ConvTranspose2d,
    ConvTranspose2d + IN + ReLU, bilinear resize back to the input's spatial size.
    """

    def __init__(self, channels: int, cfg: FCAttentionUNetConfig) -> None:
        super().__init__()
        self.channels = channels
        self.grid = (cfg.fc_grid[0], cfg.fc_grid[1])
        self.pool = nn.AdaptiveMaxPool2d(self.grid)
        flat = channels * self.grid[0] * self.grid[1]
        sizes = (
            [flat, flat]
            if cfg.fc_layers == 1
            else [flat] + [cfg.fc_hidden] * (cfg.fc_layers - 1) + [flat]
        )
        layers: list[nn.Module] = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [
                nn.Linear(n_in, n_out),
                nn.LeakyReLU(cfg.fc_negative_slope, inplace=True),
                nn.Dropout(cfg.fc_dropout),
            ]
        self.fc = nn.Sequential(*layers)
        self.up1 = nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)
        self.up2 = nn.Sequential(
            nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
            nn.InstanceNorm2d(channels, affine=True),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, h, w) -> (N, C, h, w)."""
        n, c, h, w = x.shape
        gh, gw = self.grid
        z = self.fc(self.pool(x).reshape(n, c * gh * gw))  # (N, C*gh*gw)
        z = z.reshape(n, c, gh, gw)  # (N, C, gh, gw)
        z = self.up2(self.up1(z))  # (N, C, 4gh, 4gw)
        if z.shape[-2:] != (h, w):
            z = F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False)
        return z  # (N, C, h, w)


class FCAttentionUNet(nn.Module):
    """R0's modified Attention U-Net with an FC bottleneck (see the module docstring).

    ``forward``: x (N, in_channels, H, W) -> (N, out_channels, H, W), any H, W >= 1.
    The last layer is ``self.head`` (1x1 conv), so callers can zero-initialise it.
    """

    def __init__(self, in_channels: int, out_channels: int, cfg: FCAttentionUNetConfig) -> None:
        super().__init__()
        *enc, bottom = cfg.channels
        self.depth = len(enc)
        self.down = nn.ModuleList()
        c = in_channels
        for f in enc:
            self.down.append(_conv_block(c, f))
            c = f
        self.pool = nn.MaxPool2d(2)
        self.middle = _conv_block(c, bottom)
        self.fc: nn.Module = FCBottleneck(bottom, cfg) if cfg.fc_bottleneck else nn.Identity()
        self.up = nn.ModuleList()
        self.gates = nn.ModuleList()
        self.dec = nn.ModuleList()
        c = bottom
        for f in reversed(enc):
            self.up.append(nn.ConvTranspose2d(c, f, kernel_size=2, stride=2))
            self.gates.append(ResidualAttentionGate(f, c))
            self.dec.append(_conv_block(2 * f, f))
            c = f
        self.head = nn.Conv2d(c, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in_channels, H, W) -> (N, out_channels, H, W)."""
        h, w = x.shape[-2:]
        m = 2**self.depth
        # a multiple of 2**depth, and >= 2 * 2**depth so the bottleneck is never 1 x 1
        hp, wp = max(-(-h // m) * m, 2 * m), max(-(-w // m) * m, 2 * m)
        if (hp, wp) != (h, w):
            x = F.pad(x, (0, wp - w, 0, hp - h), mode="replicate")  # (N, C, hp, wp)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.fc(self.middle(x))  # (N, channels[-1], hp / m, wp / m)
        for up, gate, dec, skip in zip(self.up, self.gates, self.dec, reversed(skips), strict=True):
            x = dec(torch.cat([up(x), gate(skip, x)], dim=1))  # (N, f, h_l, w_l)
        return self.head(x)[..., :h, :w]


class ImageDomainRecon(nn.Module):
    """Reconstruction with ``FCAttentionUNet(2, 1)`` in the image domain (R0's model 1).

    Input channels: the zero-filled coil-combined image ``trss(tifft2c(kspace))`` and the
    GRAPPA image. The network predicts a *residual on the GRAPPA image*: GRAPPA is already a
    good estimate, so the net only learns its correction, and a zero-initialised head
    returns GRAPPA exactly (before DC). The data pipeline scales inputs so the zero-filled
    image is about [0, 1]; no further normalisation here beyond the net's InstanceNorm.

    ``data_consistency`` (``mri.consistency.image_data_consistency`` on ``grappa + net``,
    with sensitivities from the ACS lines): ``"hard"`` (default) puts the measured k-space
    back on the acquired lines, ``"soft"`` mixes it in with a learnable ``lam`` (initialised
    to 1, i.e. hard), ``"none"`` returns ``grappa + net`` as R0 does. Hard and none have
    the same parameters (old checkpoints load); soft adds ``lam``.
    """

    uses_grappa = True  # the data pipeline computes GRAPPA for fresh training masks

    def __init__(self, cfg: FCAttentionUNetConfig, data_consistency: str = "hard") -> None:
        super().__init__()
        if data_consistency not in DATA_CONSISTENCY:
            raise ConfigError(
                f"unknown data_consistency {data_consistency!r}; known: "
                f"{', '.join(DATA_CONSISTENCY)}"
            )
        self.data_consistency = data_consistency
        self.net = FCAttentionUNet(2, 1, cfg)
        self.lam: nn.Parameter | None = None
        if data_consistency == "soft":
            self.lam = nn.Parameter(torch.ones(1))

    def forward(
        self, kspace: torch.Tensor, mask: torch.Tensor, grappa: torch.Tensor
    ) -> torch.Tensor:
        """kspace (B, C, H, W) complex64 (zeros where not acquired), mask (B, W) bool,
        grappa (B, H, W) float32 -> image (B, H, W) float32.

        ``mask`` marks the acquired columns for the data consistency (unused with
        ``data_consistency="none"``, where kspace being undersampled is enough).
        """
        if not torch.is_complex(kspace):
            raise TypeError(f"kspace must be complex (B, C, H, W), found {kspace.dtype}")
        zf = trss(tifft2c(kspace))  # (B, H, W)
        x = torch.stack([zf, grappa.to(zf.dtype)], dim=1)  # (B, 2, H, W)
        image = grappa + self.net(x)[:, 0]  # (B, H, W)
        if self.data_consistency == "none":
            return image
        sens = acs_sensitivities(kspace, mask)  # (B, C, H, W)
        lam = self.lam if self.data_consistency == "soft" else None
        return image_data_consistency(image, kspace, mask, sens=sens, lam=lam)  # (B, H, W)


def build_fc_attention_unet(in_channels: int, out_channels: int, **kwargs: object) -> nn.Module:
    return FCAttentionUNet(in_channels, out_channels, FCAttentionUNetConfig(**kwargs))  # type: ignore[arg-type]


def build_recon_attention_unet(in_channels: int, out_channels: int, **kwargs: object) -> nn.Module:
    if (in_channels, out_channels) != (2, 1):
        raise ConfigError(
            "recon_attention_unet takes 2 input channels (zero-filled, GRAPPA) and 1 output "
            f"channel, found in_channels={in_channels}, out_channels={out_channels}"
        )
    dc = kwargs.pop("data_consistency", "hard")
    if not isinstance(dc, str):
        raise ConfigError(
            f"data_consistency must be one of {', '.join(DATA_CONSISTENCY)}, found {dc!r}"
        )
    return ImageDomainRecon(FCAttentionUNetConfig(**kwargs), data_consistency=dc)  # type: ignore[arg-type]
