"""Test-time augmentation (TTA) as an ensemble candidate: a trained network run on its
input mirrored along the in-plane axes, its outputs mirrored back and averaged.

``FlipTTA`` averages the logits over every combination of the listed axes (axes ``[-1,
-2]``: identity, left-right, up-down and both, four forward passes), the mirroring nnU-Net
applies at inference. The result is a network like any other: equivariant to those flips
by construction, with the same parameters and a multiple of the MACs.

A TTA candidate is written by ``tta@<task>-<model>`` as an ordinary checkpoint
(``models/<task>/<model>-flip/best.pt``: the trained checkpoint plus a ``"tta"`` entry), so
that evaluate, the weight search, cost, predict, the registry and the UI treat it as one
more model; :func:`wrap` rebuilds the averaging from that entry.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, DataError

SUFFIX = "-flip"  # "<model>-flip": the TTA candidate of <model>
AXES = (-1, -2)  # the in-plane axes (W, H) of a (B, C, H, W) input and of its output


def candidate(model: str) -> str:
    """The TTA candidate's name of ``model``."""
    return f"{model}{SUFFIX}"


def is_candidate(name: str) -> bool:
    return name.endswith(SUFFIX)


def base_model(name: str) -> str:
    """The trained model a candidate averages (a plain model: itself)."""
    return name[: -len(SUFFIX)] if is_candidate(name) else name


def trained_models(names: Sequence[str]) -> list[str]:
    """The trained models that ``names`` (models and TTA candidates) run, each once: whose
    weights and training an ensemble of them holds."""
    return list(dict.fromkeys(base_model(m) for m in names))


def best_single(per_model: Mapping[str, Any], key: str) -> str:
    """The plain model (one network, one forward pass) best on val ``key``."""
    return max(
        (m for m in per_model if not is_candidate(m)), key=lambda m: per_model[m]["val"][key]
    )


def check_axes(axes: Any, where: str, error: type[Exception] = ConfigError) -> list[int]:
    """``axes`` as a list of distinct in-plane axes; ``error`` naming ``where`` if not."""
    if (
        not isinstance(axes, list)
        or not axes
        or any(isinstance(a, bool) or a not in AXES for a in axes)
        or len(set(axes)) != len(axes)
    ):
        raise error(
            f"{where}: axes should be a non-empty list of distinct in-plane axes from "
            f"{list(AXES)}, found {axes!r}"
        )
    return [int(a) for a in axes]


class FlipTTA(nn.Module):
    """``inner``'s logits averaged over its input flipped along every combination of
    ``axes`` (the identity included), each flipped back first."""

    def __init__(self, inner: nn.Module, axes: Sequence[int]) -> None:
        super().__init__()
        self.inner = inner
        self.flips = [
            list(c) for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for dims in self.flips:
            y = self.inner(torch.flip(x, dims) if dims else x)
            y = torch.flip(y, dims) if dims else y
            total = y if total is None else total + y
        assert total is not None
        return total / len(self.flips)


def wrap(model: nn.Module, checkpoint: Mapping[str, Any], where: str) -> nn.Module:
    """``model`` as its checkpoint says it runs: wrapped in :class:`FlipTTA` when the
    checkpoint holds a ``"tta"`` entry (``where``: the file, for the error)."""
    entry = checkpoint.get("tta")
    if entry is None:
        return model
    if not isinstance(entry, Mapping):
        raise DataError(f"{where}: 'tta' should be a mapping, found {type(entry).__name__}")
    wrapped = FlipTTA(model, check_axes(entry.get("axes"), f"{where}: tta", DataError))
    return wrapped.to(next(model.parameters()).device).eval()


def tta_checkpoint(state: Mapping[str, Any], axes: list[int], name: str) -> dict[str, Any]:
    """The TTA candidate's checkpoint: the trained ``state`` (weights, spec, history: the
    training it took) with the averaging and the candidate's ``name`` in its meta."""
    meta = dict(state.get("meta") or {})
    trained = meta.get("model")
    meta["model"] = name
    return {**state, "meta": meta, "tta": {"axes": list(axes), "from": trained}}


def load_member(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A member in eval mode from its ``best.pt`` as it runs in an ensemble (a TTA
    candidate's checkpoint: wrapped in its averaging), and the checkpoint."""
    from .train import load_model  # here: the names above serve stages that train nothing

    model, ckpt = load_model(Path(path), device)
    return wrap(model, ckpt, str(path)), ckpt
