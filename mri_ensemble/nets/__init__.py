"""Network registry: one explicit name -> constructor table.

A new network is one file in this package plus one entry in ``REGISTRY`` and one section
in params.yaml; stages and flows do not change. A network's module is imported when the
first network of it is built (:class:`Lazy`): the MONAI-backed ones import all of MONAI,
about 3 s of every process that starts a stage, and a stage builds one network.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any

from torch import nn

from ..errors import ConfigError

Builder = Callable[..., nn.Module]


class Lazy:
    """``build_<name>`` of this package's module ``module``, imported on the first call."""

    def __init__(self, module: str, function: str) -> None:
        self.module, self.function = module, function

    def resolve(self) -> Builder:
        return getattr(import_module(f"{__name__}.{self.module}"), self.function)

    def __call__(self, *args: Any, **kwargs: Any) -> nn.Module:
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{__name__}.{self.module}.{self.function}"


# image (N, in, H, W) -> logits (N, out, H, W)
SEGMENTATION: dict[str, Lazy] = {
    "unet": Lazy("unet", "build"),
    "attention_unet": Lazy("monai_nets", "build_attention_unet"),
    "unetpp": Lazy("monai_nets", "build_unetpp"),
    "fc_attention_unet": Lazy("fc_attention_unet", "build_fc_attention_unet"),
    "unet3plus": Lazy("unet3plus", "build_unet3plus"),
    "resnet34_unet": Lazy("resnet_family", "build_resnet34_unet"),
    "linknet": Lazy("resnet_family", "build_linknet"),
    "fpn": Lazy("resnet_family", "build_fpn"),
    "deeplabv3": Lazy("resnet_family", "build_deeplabv3"),
    "residual_unet": Lazy("light_unets", "build_residual_unet"),
    "mobile_unet": Lazy("light_unets", "build_mobile_unet"),
    "efficient_unet": Lazy("light_unets", "build_efficient_unet"),
}
# (kspace (B, C, H, W) complex, mask (B, W), grappa (B, H, W)) -> image (B, H, W)
RECONSTRUCTION: dict[str, Lazy] = {
    "recon_attention_unet": Lazy("fc_attention_unet", "build_recon_attention_unet"),
    "varnet": Lazy("varnet", "build_varnet"),
    "dircn": Lazy("dircn", "build_dircn"),
}
REGISTRY: dict[str, Lazy] = {**SEGMENTATION, **RECONSTRUCTION}


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
    build = REGISTRY[arch].resolve()
    try:
        return build(in_channels, out_channels, **kwargs)
    except TypeError as exc:  # unexpected keyword from params.yaml
        raise ConfigError(f"bad config for model {arch!r}: {exc}") from exc


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
