"""Ensemble inference: every member runs on the same input batch, outputs are fused.

:class:`EnsembleNet` is an ``nn.Module`` over the trained members of one task: its forward
takes one batch (segmentation: images (B, 1, H, W); reconstruction: the members' common
``(kspace, mask, grappa)``), runs each member on that same tensor (no copies, no re-batching)
and returns the weighted average of probabilities (segmentation, (B, C, H, W)) or the weighted
sum of images (reconstruction, (B, H, W)). Its latency is therefore the members' latencies
plus one weighted sum; :mod:`mri_ensemble.cost` measures both side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import DataError
from .segmentation import probabilities
from .train import load_model


class EnsembleNet(nn.Module):
    """Weighted ensemble of trained members; ``weights`` (M,) or per class (M, C)."""

    weights: torch.Tensor

    def __init__(
        self, members: Sequence[nn.Module], weights: np.ndarray | Sequence[float], task: str
    ) -> None:
        super().__init__()
        w = np.asarray(weights, dtype=np.float64)
        if len(members) == 0 or w.shape[0] != len(members):
            raise DataError(f"{len(members)} members but weights of shape {w.shape}")
        if task not in ("segmentation", "reconstruction"):
            raise DataError(f"unknown task {task!r}")
        if task == "reconstruction" and w.ndim != 1:
            raise DataError("reconstruction ensembles take one weight per member")
        if np.any(w < 0) or np.any(w.sum(axis=0) <= 0):
            raise DataError(f"weights must be non-negative and not all zero, found {w}")
        w = w / w.sum(axis=0)
        self.members = nn.ModuleList(members)
        self.task = task
        # (M, C, 1, 1) for per-class weights, (M,) otherwise; a buffer so .to(device) moves it
        shape = (len(members), -1, 1, 1) if w.ndim == 2 else (len(members),)
        self.register_buffer("weights", torch.tensor(w, dtype=torch.float32).reshape(shape))

    @torch.no_grad()
    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor | None = None
        for i, member in enumerate(self.members):
            y = member(*inputs)
            y = probabilities(y) if self.task == "segmentation" else y.float()
            term = self.weights[i] * y
            out = term if out is None else out + term
        assert out is not None
        return out


def load_members(
    checkpoints: Sequence[Path], device: torch.device | str = "cpu"
) -> list[nn.Module]:
    """Trained members in eval mode from their ``best.pt`` checkpoints."""
    return [load_model(Path(p), device)[0] for p in checkpoints]
