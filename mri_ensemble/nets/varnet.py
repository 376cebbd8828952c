"""End-to-End Variational Network (Sriram et al. 2020) with R0's FC-bottleneck U-Nets.

    k_0 = k0 (undersampled k-space),  S = SensitivityModel(k0, mask)
    k_{t+1} = k_t - lam_t * M (k_t - k0) - F(E(Unet_t(R(F^-1(k_t)))))
    image = RSS(F^-1(k_T))

with ``E(x) = S x`` (expand one image to the coils), ``R(x) = sum_c conj(S_c) x_c``
(reduce the coils to one image), ``F`` the centred orthonormal 2-D FFT and ``M`` the
sampling mask. Each ``Unet_t`` is a fastMRI-style ``NormUnet`` on the real/imaginary
channels of the reduced image; R0 gives its bottleneck a fully connected path (see
``FCBottleneck``). The sensitivity maps are estimated once from the ACS lines.

Differences from fastMRI's ``varnet.py``: the FC bottleneck (R0), an ACS detection that
works per batch element on a (B, W) mask, a soft data consistency written so that
``lam = 1`` puts k0 back *exactly* on the acquired lines, and sensitivity maps divided by
``max(RSS, eps)`` so that coils without signal give zeros rather than NaNs. With
``final_dc`` (default) the final k-space gets a hard DC, ``k_T = where(M, k0, k_T)``, so
the output's coil k-space equals the measurement on the acquired lines (the last
cascade's ``lam`` then gets no gradient: only the acquired lines depend on it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..mri.consistency import acs_mask
from ..mri.fft import channels_to_complex, complex_to_channels, tfft2c, tifft2c, trss

_EPS = 1e-12  # floor of the RSS that sensitivity maps are divided by
_STD_EPS = 1e-6  # added to the NormUnet's per-channel std (an all-zero input is legal)


@dataclass(frozen=True)
class VarNetConfig:
    cascades: int = 6  # R0 (memory bound)
    chans: int = 18  # first-layer channels of the refinement U-Net (R0)
    pools: int = 4  # down-samplings of the refinement U-Net (fastMRI)
    fc_bottleneck: bool = True  # R0's fully connected path at the U-Net bottleneck
    fc_grid: tuple[int, int] = (4, 4)  # adaptive max-pool target before flattening
    fc_hidden: int = 1024  # Linear output size; reshaped to (fc_hidden / prod(fc_grid), grid)
    fc_dropout: float = 0.5  # after the FC layer (R0)
    sens_chans: int = 8  # first-layer channels of the sensitivity U-Net (R0)
    sens_pools: int = 4
    final_dc: bool = True  # hard DC on the final k-space: where(mask, k0, k) before the RSS

    def __post_init__(self) -> None:
        check_unet_fields(self.chans, self.pools, self.fc_grid, self.fc_hidden, self.fc_dropout)
        check_final_dc(self.final_dc)
        if self.cascades < 1:
            raise ConfigError(f"cascades must be >= 1, found {self.cascades}")
        if self.sens_chans < 1 or self.sens_pools < 1:
            raise ConfigError(
                f"sens_chans and sens_pools must be >= 1, found {self.sens_chans}, "
                f"{self.sens_pools}"
            )


def check_unet_fields(
    chans: int, pools: int, fc_grid: tuple[int, int], fc_hidden: int, fc_dropout: float
) -> None:
    """Validate the refinement U-Net fields shared by ``VarNetConfig`` and ``DIRCNConfig``."""
    if chans < 1 or pools < 1:
        raise ConfigError(f"chans and pools must be >= 1, found {chans}, {pools}")
    if len(fc_grid) != 2 or any(g < 1 for g in fc_grid):
        raise ConfigError(f"fc_grid must be two positive ints, found {fc_grid!r}")
    if fc_hidden < 1 or fc_hidden % (fc_grid[0] * fc_grid[1]):
        raise ConfigError(
            f"fc_hidden must be a positive multiple of prod(fc_grid) = "
            f"{fc_grid[0] * fc_grid[1]}, found {fc_hidden}"
        )
    if not 0.0 <= fc_dropout < 1.0:
        raise ConfigError(f"fc_dropout must be in [0, 1), found {fc_dropout}")


def check_final_dc(final_dc: object) -> None:
    """``final_dc`` must be a bool (YAML ``true``/``false``), shared with ``DIRCNConfig``."""
    if not isinstance(final_dc, bool):
        raise ConfigError(f"final_dc must be true or false, found {final_dc!r}")


# --------------------------------------------------------------------------- U-Net parts


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """fastMRI's ConvBlock: [Conv3x3 + InstanceNorm + LeakyReLU(0.2)] x2."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.InstanceNorm2d(c_out),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.InstanceNorm2d(c_out),
        nn.LeakyReLU(0.2, inplace=True),
    )


def _up_block(c_in: int, c_out: int) -> nn.Sequential:
    """fastMRI's TransposeConvBlock: ConvTranspose2d(k2, s2) + InstanceNorm + LeakyReLU."""
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2, bias=False),
        nn.InstanceNorm2d(c_out),
        nn.LeakyReLU(0.2, inplace=True),
    )


class FCBottleneck(nn.Module):
    """R0 model 2's fully connected path, added to the U-Net bottleneck features.

    Adaptive max-pool to ``grid`` (a fixed flatten size for any image size), flatten,
    Linear + ReLU, Dropout, reshape to (hidden / prod(grid), *grid), ConvTranspose2d
    (k2, s2) to the bottleneck's channels, bilinear resize to the bottleneck's size. The
    result is *added* to the bottleneck features (a residual path), so the conv U-Net below
    it is unchanged, as when R0 fine-tuned a pretrained VarNet with this path inserted.
    """

    def __init__(self, channels: int, grid: tuple[int, int], hidden: int, dropout: float) -> None:
        super().__init__()
        self.grid = (grid[0], grid[1])
        self.pool = nn.AdaptiveMaxPool2d(self.grid)
        self.fc = nn.Sequential(
            nn.Linear(channels * grid[0] * grid[1], hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.up = nn.ConvTranspose2d(hidden // (grid[0] * grid[1]), channels, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, h, w) -> x + FC path (N, C, h, w)."""
        n, c, h, w = x.shape
        gh, gw = self.grid
        z = self.fc(self.pool(x).reshape(n, c * gh * gw))  # (N, hidden)
        z = self.up(z.reshape(n, -1, gh, gw))  # (N, C, 2gh, 2gw)
        z = F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False)  # (N, C, h, w)
        return x + z


class RefinementUNet(nn.Module):
    """fastMRI's VarNet U-Net (avg-pool encoder, InstanceNorm, LeakyReLU) + optional FC path.

    ``long_skip=True`` (DIRCN) widens each decoder level to take a third input: the same
    level's decoder output of the previous cascade (``prev``), concatenated with the
    up-sampled features and the encoder skip. ``forward`` returns the output and this
    cascade's decoder features (deepest level first) for the next cascade.
    H and W must be multiples of ``2**pools`` (``NormUnet`` pads).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        chans: int,
        pools: int,
        fc: FCBottleneck | None = None,
        long_skip: bool = False,
    ) -> None:
        super().__init__()
        self.long_skip = long_skip
        self.down = nn.ModuleList()
        c, f = in_channels, chans
        for _ in range(pools):
            self.down.append(_conv_block(c, f))
            c, f = f, 2 * f
        self.bottleneck = _conv_block(c, f)  # f = chans * 2**pools
        self.fc = fc if fc is not None else nn.Identity()
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for _ in range(pools):
            self.up.append(_up_block(f, f // 2))
            self.dec.append(_conv_block((3 if long_skip else 2) * (f // 2), f // 2))
            f //= 2
        self.head = nn.Conv2d(chans, out_channels, kernel_size=1)

    def forward(
        self, x: torch.Tensor, prev: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x (N, in, H, W), prev: previous cascade's decoder features or None ->
        ((N, out, H, W), decoder features [(N, chans * 2**(pools-1), H / 2**(pools-1), ...),
        ..., (N, chans, H, W)])."""
        if (prev is not None) != self.long_skip:
            raise ValueError("prev features must be given exactly when long_skip=True")
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.avg_pool2d(x, kernel_size=2, stride=2)
        x = self.fc(self.bottleneck(x))  # (N, chans * 2**pools, H / 2**pools, W / 2**pools)
        feats = []
        for i, (up, dec, skip) in enumerate(zip(self.up, self.dec, reversed(skips), strict=True)):
            parts = [up(x), skip] if prev is None else [up(x), skip, prev[i]]
            x = dec(torch.cat(parts, dim=1))  # (N, f, h_l, w_l)
            feats.append(x)
        return self.head(x), feats


def normalise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean/std normalisation (fastMRI's NormUnet).

    x (N, C, H, W) -> (x - mean) / std, mean (N, C, 1, 1), std (N, C, 1, 1); std has a
    small epsilon added so an all-zero channel stays finite.
    """
    mean = x.mean(dim=(-2, -1), keepdim=True)  # (N, C, 1, 1)
    std = x.std(dim=(-2, -1), keepdim=True) + _STD_EPS  # (N, C, 1, 1)
    return (x - mean) / std, mean, std


class NormUnet(nn.Module):
    """``RefinementUNet(2, 2)`` on normalised real/imaginary channels of a complex image.

    Normalises each channel (mean/std), zero-pads (centred) to a multiple of
    ``2**pools``, runs the U-Net, crops back and un-normalises, as fastMRI's NormUnet.
    """

    def __init__(
        self,
        chans: int,
        pools: int,
        fc: FCBottleneck | None = None,
        long_skip: bool = False,
    ) -> None:
        super().__init__()
        self.multiple = 2**pools
        self.unet = RefinementUNet(2, 2, chans, pools, fc=fc, long_skip=long_skip)

    def forward(
        self, x: torch.Tensor, prev: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x (N, 2, H, W) real/imag, prev (see ``RefinementUNet``) -> ((N, 2, H, W), feats)."""
        h, w = x.shape[-2:]
        x, mean, std = normalise(x)
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        top, left = ph // 2, pw // 2
        x = F.pad(x, (left, pw - left, top, ph - top))  # (N, 2, H + ph, W + pw)
        y, feats = self.unet(x, prev)
        y = y[..., top : top + h, left : left + w]  # (N, 2, H, W)
        return y * std + mean, feats


# --------------------------------------------------------------------- k-space operators


def sens_expand(image: torch.Tensor, sens: torch.Tensor) -> torch.Tensor:
    """E then F: image (B, 1, H, W) complex, sens (B, C, H, W) -> k-space (B, C, H, W)."""
    return tfft2c(image * sens)


def sens_reduce(kspace: torch.Tensor, sens: torch.Tensor) -> torch.Tensor:
    """F^-1 then R: k-space (B, C, H, W), sens (B, C, H, W) -> image (B, 1, H, W) complex."""
    return (tifft2c(kspace) * sens.conj()).sum(dim=1, keepdim=True)


class SensitivityModel(nn.Module):
    """Coil sensitivity maps from the ACS lines (fastMRI's SensitivityModel).

    Keep only the ACS columns, inverse FFT, a ``NormUnet`` on each coil image (coils
    folded into the batch), divide by the RSS over coils (floored at a tiny epsilon), so
    the maps have unit RSS wherever they are non-zero.
    """

    def __init__(self, chans: int, pools: int) -> None:
        super().__init__()
        self.net = NormUnet(chans, pools)

    def forward(self, kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """kspace (B, C, H, W) complex, mask (B, W) bool -> maps (B, C, H, W) complex64."""
        b, c, h, w = kspace.shape
        acs = acs_mask(mask)[:, None, None, :]  # (B, 1, 1, W)
        images = tifft2c(torch.where(acs, kspace, torch.zeros_like(kspace)))  # (B, C, H, W)
        x = complex_to_channels(images.reshape(b * c, 1, h, w))  # (B*C, 2, H, W)
        y, _ = self.net(x)  # (B*C, 2, H, W)
        maps = channels_to_complex(y).reshape(b, c, h, w)  # (B, C, H, W)
        return maps / trss(maps, dim=1).clamp_min(_EPS).unsqueeze(1)


class SoftDataConsistency(nn.Module):
    """``k - lam * mask * (k - k0)`` with a learnable ``lam`` (initialised to 1).

    Written as ``where(mask, (1 - lam) k + lam k0, k)``, which is the same function but
    with ``lam = 1`` returns k0 *exactly* on the acquired lines (no cancellation error)
    and leaves the other lines untouched.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lam = nn.Parameter(torch.ones(1))

    def forward(self, k: torch.Tensor, k0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """k, k0 (B, C, H, W) complex, mask (B, W) or broadcastable bool -> (B, C, H, W)."""
        m = mask[:, None, None, :] if mask.dim() == 2 else mask  # (B, 1, 1, W)
        return torch.where(m.bool(), (1 - self.lam) * k + self.lam * k0, k)


class VarNetCascade(nn.Module):
    """One cascade: ``k - DC(k) - F(E(regulariser(R(F^-1(k)))))``."""

    def __init__(self, regulariser: NormUnet) -> None:
        super().__init__()
        self.regulariser = regulariser
        self.dc = SoftDataConsistency()

    def forward(
        self, k: torch.Tensor, k0: torch.Tensor, mask: torch.Tensor, sens: torch.Tensor
    ) -> torch.Tensor:
        """k, k0, sens (B, C, H, W) complex, mask (B, W) bool -> k (B, C, H, W)."""
        x = complex_to_channels(sens_reduce(k, sens))  # (B, 2, H, W)
        y, _ = self.regulariser(x)  # (B, 2, H, W)
        return self.dc(k, k0, mask) - sens_expand(channels_to_complex(y), sens)


def final_data_consistency(k: torch.Tensor, k0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hard DC: k, k0 (B, C, H, W), mask (B, W) bool -> k0 on the acquired lines, k elsewhere."""
    return torch.where(mask.bool()[:, None, None, :], k0, k)


def check_inputs(kspace: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise ``ValueError`` unless kspace is complex (B, C, H, W) and mask is (B, W)."""
    if not torch.is_complex(kspace) or kspace.dim() != 4:
        raise ValueError(
            f"kspace must be complex (B, C, H, W), found {kspace.dtype} {tuple(kspace.shape)}"
        )
    b, _, _, w = kspace.shape
    if tuple(mask.shape) != (b, w):
        raise ValueError(f"mask must be (B, W) = {(b, w)}, found {tuple(mask.shape)}")


class VarNet(nn.Module):
    """End-to-End VarNet with R0's FC-bottleneck refinement U-Nets (module docstring)."""

    def __init__(self, cfg: VarNetConfig) -> None:
        super().__init__()
        self.sens = SensitivityModel(cfg.sens_chans, cfg.sens_pools)
        self.cascades = nn.ModuleList()
        for _ in range(cfg.cascades):
            fc = None
            if cfg.fc_bottleneck:
                bottom = cfg.chans * 2**cfg.pools
                fc = FCBottleneck(bottom, cfg.fc_grid, cfg.fc_hidden, cfg.fc_dropout)
            self.cascades.append(VarNetCascade(NormUnet(cfg.chans, cfg.pools, fc=fc)))
        self.final_dc = cfg.final_dc  # no parameters: checkpoints load either way

    def final_kspace(self, kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """kspace (B, C, H, W) complex64 (zeros where not acquired), mask (B, W) bool ->
        the final cascade's k-space (B, C, H, W), equal to kspace on the acquired lines
        when ``final_dc``."""
        check_inputs(kspace, mask)
        k0 = kspace.to(torch.complex64)
        mask = mask.bool()
        sens = self.sens(k0, mask)  # (B, C, H, W)
        k = k0
        for cascade in self.cascades:
            k = cascade(k, k0, mask, sens)
        return final_data_consistency(k, k0, mask) if self.final_dc else k

    def forward(
        self, kspace: torch.Tensor, mask: torch.Tensor, grappa: torch.Tensor | None = None
    ) -> torch.Tensor:
        """kspace (B, C, H, W) complex64 (zeros where not acquired), mask (B, W) bool,
        grappa (B, H, W) (ignored) -> RSS image (B, H, W) float32."""
        return trss(tifft2c(self.final_kspace(kspace, mask)), dim=1)  # (B, H, W)


def build_varnet(in_channels: int, out_channels: int, **cfg: object) -> nn.Module:
    """VarNet from params.yaml. ``in_channels``/``out_channels`` are ignored: the network
    takes k-space (any number of coils) and returns one RSS image."""
    return VarNet(VarNetConfig(**cfg))  # type: ignore[arg-type]
