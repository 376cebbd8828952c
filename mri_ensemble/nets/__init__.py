"""Network registry: one explicit name -> constructor table, no string imports.

A new network is one file in this package plus one entry in ``REGISTRY`` and one section
in params.yaml; stages and flows do not change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ..errors import ConfigError
from . import (
    dircn,
    fc_attention_unet,
    light_unets,
    monai_nets,
    resnet_family,
    unet,
    unet3plus,
    varnet,
)

Builder = Callable[..., nn.Module]

# image (N, in, H, W) -> logits (N, out, H, W)
SEGMENTATION: dict[str, Builder] = {
    "unet": unet.build,
    "attention_unet": monai_nets.build_attention_unet,
    "unetpp": monai_nets.build_unetpp,
    "fc_attention_unet": fc_attention_unet.build_fc_attention_unet,
    "unet3plus": unet3plus.build_unet3plus,
    "resnet34_unet": resnet_family.build_resnet34_unet,
    "linknet": resnet_family.build_linknet,
    "fpn": resnet_family.build_fpn,
    "deeplabv3": resnet_family.build_deeplabv3,
    "residual_unet": light_unets.build_residual_unet,
    "mobile_unet": light_unets.build_mobile_unet,
    "efficient_unet": light_unets.build_efficient_unet,
}
# (kspace (B, C, H, W) complex, mask (B, W), grappa (B, H, W)) -> image (B, H, W)
RECONSTRUCTION: dict[str, Builder] = {
    "recon_attention_unet": fc_attention_unet.build_recon_attention_unet,
    "varnet": varnet.build_varnet,
    "dircn": dircn.build_dircn,
}
REGISTRY: dict[str, Builder] = {**SEGMENTATION, **RECONSTRUCTION}


def build_model(
    arch: str, in_channels: int, out_channels: int, config: Mapping[str, Any] | None = None
) -> nn.Module:
    """Build network ``arch`` from its config dict (params.yaml ``net`` section).

    Lists in the config become tuples (YAML has no tuples). Unknown names or keys raise
    ``ConfigError`` (a ``ValueError``) naming what is known.
    """
    if arch not in REGISTRY:
        raise ConfigError(f"unknown model {arch!r}; known: {', '.join(sorted(REGISTRY))}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in (config or {}).items()}
    try:
        return REGISTRY[arch](in_channels, out_channels, **kwargs)
    except TypeError as exc:  # unexpected keyword from params.yaml
        raise ConfigError(f"bad config for model {arch!r}: {exc}") from exc


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
