"""DIRCN: Densely Interconnected Residual Cascading Network (Ottesen et al. 2022).

An End-to-End VarNet (``varnet.py``: same sensitivity model, shared by all cascades, same
soft data consistency and expand/reduce operators) with two kinds of connections between
cascades:

- **Input-level dense connections.** Cascade ``i`` reduces its k-space to an image like
  VarNet, then concatenates it with the reduced images of all earlier cascades' inputs,
  (B, 2 (i + 1), H, W), and a 1x1 conv (no bias) compresses them to the 2 channels
  (real/imag) its inner network takes. The original feeds all 2 (i + 1) channels to the
  inner net; compressing first keeps every inner network identical (2 -> 2), so any
  image-to-image net can be the inner one. The 1x1 conv is initialised to pick the
  current image, so at initialisation the dense path is VarNet's and training mixes in
  the history.
- **Long-range skip connections.**
  - ``inner="unet_fc"`` (R0 model 3): as in the original ResXUNet, each decoder level of
    cascade ``i`` concatenates the same level's decoder output of cascade ``i - 1`` with
    its up-sampled features and encoder skip (``RefinementUNet(long_skip=True)``).
    Concatenation rather than addition, as the paper does: the two cascades' features
    live in differently normalised spaces (each cascade normalises its own input), so a
    learned conv should weigh them; the cost is a 3f instead of 2f input to the first
    conv of each decoder level.
  - ``inner="attention_unet"`` (R0 model 4): ``FCAttentionUNet`` exposes no internal
    features, so the long skip is at the image level: cascade ``i``'s refinement output
    is ``net_i(x_i) + g_i * refinement_{i-1}``, with a learnable scalar ``g_i``
    initialised to 0 (the network starts as the no-skip one).

The output is the RSS of the final k-space's coil images, as for VarNet, with the same
optional hard DC on that k-space (``final_dc``, default on).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..mri.fft import channels_to_complex, complex_to_channels, tifft2c, trss
from .fc_attention_unet import FCAttentionUNet, FCAttentionUNetConfig
from .varnet import (
    FCBottleneck,
    NormUnet,
    SensitivityModel,
    SoftDataConsistency,
    check_final_dc,
    check_inputs,
    check_unet_fields,
    final_data_consistency,
    normalise,
    sens_expand,
    sens_reduce,
)

INNER_NETS = ("attention_unet", "unet_fc")


@dataclass(frozen=True)
class DIRCNConfig:
    cascades: int = 6  # R0 model 3; model 4 uses 5
    inner: str = "unet_fc"  # "unet_fc" (R0 model 3) or "attention_unet" (R0 model 4)
    dense: bool = True  # input-level dense connections
    long_skips: bool = True  # long-range skip connections between cascades
    # unet_fc: the VarNet refinement U-Net (varnet.py); fc_* also configure attention_unet
    chans: int = 18
    pools: int = 4
    fc_bottleneck: bool = True
    fc_grid: tuple[int, int] = (4, 4)
    fc_hidden: int = 1024  # unet_fc: Linear output; attention_unet: hidden FC size
    fc_dropout: float = 0.5
    # attention_unet: R0 model 4 = depth 3 (4 entries) with one of model 1's 2 FC removed
    attention_channels: tuple[int, ...] = (16, 32, 64, 128)
    attention_fc_layers: int = 1
    sens_chans: int = 8
    sens_pools: int = 4
    final_dc: bool = True  # hard DC on the final k-space: where(mask, k0, k) before the RSS

    def __post_init__(self) -> None:
        check_final_dc(self.final_dc)
        if self.inner not in INNER_NETS:
            raise ConfigError(f"unknown inner {self.inner!r}; known: {', '.join(INNER_NETS)}")
        if self.cascades < 1:
            raise ConfigError(f"cascades must be >= 1, found {self.cascades}")
        if self.sens_chans < 1 or self.sens_pools < 1:
            raise ConfigError(
                f"sens_chans and sens_pools must be >= 1, found {self.sens_chans}, "
                f"{self.sens_pools}"
            )
        check_unet_fields(self.chans, self.pools, self.fc_grid, self.fc_hidden, self.fc_dropout)

    def attention_config(self) -> FCAttentionUNetConfig:
        return FCAttentionUNetConfig(
            channels=self.attention_channels,
            fc_bottleneck=self.fc_bottleneck,
            fc_layers=self.attention_fc_layers,
            fc_hidden=self.fc_hidden,
            fc_grid=self.fc_grid,
            fc_dropout=self.fc_dropout,
        )


class NormAttentionUNet(nn.Module):
    """``FCAttentionUNet(2, 2)`` on mean/std-normalised real/imag channels (it pads itself)."""

    def __init__(self, cfg: FCAttentionUNetConfig) -> None:
        super().__init__()
        self.net = FCAttentionUNet(2, 2, cfg)

    def forward(
        self, x: torch.Tensor, prev: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x (N, 2, H, W) -> ((N, 2, H, W), []) -- no features for long skips."""
        if prev is not None:
            raise ValueError("the attention U-Net takes no long-skip features")
        x, mean, std = normalise(x)
        return self.net(x) * std + mean, []


class DIRCNCascade(nn.Module):
    """Cascade ``index``: dense input stack -> 1x1 compression -> inner net -> DC update."""

    def __init__(self, index: int, regulariser: nn.Module, dense: bool, image_skip: bool) -> None:
        super().__init__()
        self.dense = dense
        n_in = 2 * (index + 1) if dense else 2
        self.compress: nn.Conv2d | None = None
        if n_in > 2:
            self.compress = nn.Conv2d(n_in, 2, kernel_size=1, bias=False)
            with torch.no_grad():  # start as "use the current image only"
                self.compress.weight.zero_()
                self.compress.weight[:, -2:, 0, 0] = torch.eye(2)
        self.regulariser = regulariser
        self.skip_gate = nn.Parameter(torch.zeros(1)) if image_skip and index > 0 else None
        self.dc = SoftDataConsistency()

    def forward(
        self,
        k: torch.Tensor,
        k0: torch.Tensor,
        mask: torch.Tensor,
        sens: torch.Tensor,
        history: list[torch.Tensor],
        feats: list[torch.Tensor] | None,
        prev_refined: torch.Tensor | None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """k, k0, sens (B, C, H, W) complex, mask (B, W) bool, history: earlier cascades'
        reduced inputs [(B, 2, H, W)], feats: previous decoder features or None,
        prev_refined (B, 2, H, W) or None -> (k (B, C, H, W), history, feats, refined)."""
        x = complex_to_channels(sens_reduce(k, sens))  # (B, 2, H, W)
        history = [*history, x] if self.dense else [x]
        x = torch.cat(history, dim=1)  # (B, 2 * len(history), H, W)
        if self.compress is not None:
            x = self.compress(x)  # (B, 2, H, W)
        refined, feats_out = self.regulariser(x, feats)  # (B, 2, H, W)
        if self.skip_gate is not None and prev_refined is not None:
            refined = refined + self.skip_gate * prev_refined
        k_next = self.dc(k, k0, mask) - sens_expand(channels_to_complex(refined), sens)
        return k_next, history, feats_out, refined


class DIRCN(nn.Module):
    """DIRCN with a selectable inner network (module docstring)."""

    def __init__(self, cfg: DIRCNConfig) -> None:
        super().__init__()
        self.sens = SensitivityModel(cfg.sens_chans, cfg.sens_pools)
        self.feature_skips = cfg.long_skips and cfg.inner == "unet_fc"
        image_skip = cfg.long_skips and cfg.inner == "attention_unet"
        self.cascades = nn.ModuleList()
        for i in range(cfg.cascades):
            inner: nn.Module
            if cfg.inner == "unet_fc":
                fc = None
                if cfg.fc_bottleneck:
                    bottom = cfg.chans * 2**cfg.pools
                    fc = FCBottleneck(bottom, cfg.fc_grid, cfg.fc_hidden, cfg.fc_dropout)
                long_skip = self.feature_skips and i > 0
                inner = NormUnet(cfg.chans, cfg.pools, fc=fc, long_skip=long_skip)
            else:
                inner = NormAttentionUNet(cfg.attention_config())
            self.cascades.append(DIRCNCascade(i, inner, cfg.dense, image_skip))
        self.final_dc = cfg.final_dc  # no parameters: checkpoints load either way

    def forward(
        self, kspace: torch.Tensor, mask: torch.Tensor, grappa: torch.Tensor | None = None
    ) -> torch.Tensor:
        """kspace (B, C, H, W) complex64 (zeros where not acquired), mask (B, W) bool,
        grappa (B, H, W) (ignored) -> RSS image (B, H, W) float32."""
        return trss(tifft2c(self.final_kspace(kspace, mask)), dim=1)  # (B, H, W)

    def final_kspace(self, kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """kspace (B, C, H, W) complex64 (zeros where not acquired), mask (B, W) bool ->
        the final cascade's k-space (B, C, H, W), equal to kspace on the acquired lines
        when ``final_dc``."""
        check_inputs(kspace, mask)
        k0 = kspace.to(torch.complex64)
        mask = mask.bool()
        sens = self.sens(k0, mask)  # (B, C, H, W), shared by all cascades
        k = k0
        history: list[torch.Tensor] = []
        feats: list[torch.Tensor] | None = None
        refined: torch.Tensor | None = None
        for cascade in self.cascades:
            k, history, out_feats, refined = cascade(k, k0, mask, sens, history, feats, refined)
            feats = out_feats if self.feature_skips else None
        return final_data_consistency(k, k0, mask) if self.final_dc else k


def build_dircn(in_channels: int, out_channels: int, **cfg: object) -> nn.Module:
    """DIRCN from params.yaml. ``in_channels``/``out_channels`` are ignored: the network
    takes k-space (any number of coils) and returns one RSS image."""
    return DIRCN(DIRCNConfig(**cfg))  # type: ignore[arg-type]
