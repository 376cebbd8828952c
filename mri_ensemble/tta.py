"""Test-time augmentation (TTA) as an ensemble candidate: a trained network run on its
input mirrored (and, with ``rot90``, rotated) in-plane, its outputs mapped back and averaged.

``FlipTTA`` averages the logits over every combination of the listed axes (axes ``[-1,
-2]``: identity, left-right, up-down and both, four forward passes), the mirroring nnU-Net
applies at inference. With ``rot90`` it averages over the quarter turns as well: the four
rotations (C4) when no axes are listed, else the eight symmetries of the square (D4: each
rotation, plain and mirrored; any mirror and the quarter turn give all eight). The result
is a network like any other: equivariant to those transforms by construction, with the
same parameters and a multiple of the MACs. Rotations suit data without a fixed in-plane
orientation; short-axis cine slices written in the scanner's orientation have one.

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


def check_axes(
    axes: Any, where: str, error: type[Exception] = ConfigError, allow_empty: bool = False
) -> list[int]:
    """``axes`` as a list of distinct in-plane axes (``allow_empty``: none, as the quarter
    turns alone need); ``error`` naming ``where`` if not."""
    if (
        not isinstance(axes, list)
        or (not axes and not allow_empty)
        or any(isinstance(a, bool) or a not in AXES for a in axes)
        or len(set(axes)) != len(axes)
    ):
        what = "a list" if allow_empty else "a non-empty list"
        raise error(
            f"{where}: axes should be {what} of distinct in-plane axes from "
            f"{list(AXES)}, found {axes!r}"
        )
    return [int(a) for a in axes]


def check_rot90(value: Any, where: str, error: type[Exception] = ConfigError) -> bool:
    """``rot90`` as a bool (absent: False); ``error`` naming ``where`` if not one."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise error(f"{where}: rot90 should be true or false, found {value!r}")
    return value


class FlipTTA(nn.Module):
    """``inner``'s logits averaged over its input flipped along every combination of
    ``axes`` (the identity included), each mapped back first; ``rot90``: over the quarter
    turns as well (C4 with no axes, D4 with any)."""

    def __init__(self, inner: nn.Module, axes: Sequence[int], rot90: bool = False) -> None:
        super().__init__()
        self.inner = inner
        # (quarter turns, then the flips): the input's transform; the output's is the inverse
        self.transforms: list[tuple[int, list[int]]]
        if rot90:
            mirrors: list[list[int]] = [[], [AXES[0]]] if axes else [[]]
            self.transforms = [(k, f) for k in range(4) for f in mirrors]
        else:
            self.transforms = [
                (0, list(c)) for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)
            ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for k, dims in self.transforms:
            t = torch.rot90(x, k, (-2, -1)) if k else x
            y = self.inner(torch.flip(t, dims) if dims else t)
            y = torch.flip(y, dims) if dims else y
            y = torch.rot90(y, -k, (-2, -1)) if k else y
            total = y if total is None else total + y
        assert total is not None
        return total / len(self.transforms)


def wrap(model: nn.Module, checkpoint: Mapping[str, Any], where: str) -> nn.Module:
    """``model`` as its checkpoint says it runs: wrapped in :class:`FlipTTA` when the
    checkpoint holds a ``"tta"`` entry (``where``: the file, for the error)."""
    entry = checkpoint.get("tta")
    if entry is None:
        return model
    if not isinstance(entry, Mapping):
        raise DataError(f"{where}: 'tta' should be a mapping, found {type(entry).__name__}")
    rot90 = check_rot90(entry.get("rot90"), f"{where}: tta", DataError)
    axes = check_axes(entry.get("axes"), f"{where}: tta", DataError, allow_empty=rot90)
    return FlipTTA(model, axes, rot90).to(next(model.parameters()).device).eval()


def tta_checkpoint(
    state: Mapping[str, Any], axes: list[int], name: str, rot90: bool = False
) -> dict[str, Any]:
    """The TTA candidate's checkpoint: the trained ``state`` (weights, spec, history: the
    training it took) with the averaging and the candidate's ``name`` in its meta."""
    meta = dict(state.get("meta") or {})
    trained = meta.get("model")
    meta["model"] = name
    entry: dict[str, Any] = {"axes": list(axes), "from": trained}
    if rot90:  # only then: a flips-only candidate keeps the bytes it had before rot90 was
        entry["rot90"] = True
    return {**state, "meta": meta, "tta": entry}


def load_member(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A member in eval mode from its ``best.pt`` as it runs in an ensemble (a TTA
    candidate's checkpoint: wrapped in its averaging), and the checkpoint."""
    from .train import load_model  # here: the names above serve stages that train nothing

    model, ckpt = load_model(Path(path), device)
    return wrap(model, ckpt, str(path)), ckpt
