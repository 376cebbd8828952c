"""Ensemble inference: every member runs on the same input batch, outputs are fused.

:class:`EnsembleNet` is the one fused forward of the project: an ``nn.Module`` over the
trained members of one task whose :meth:`~EnsembleNet.member_outputs` runs each member on
the same batch tensor (no copies, no re-batching; float16 autocast on CUDA) and returns
what the task fuses (segmentation: probabilities, reconstruction: images), and whose
``forward`` returns their weighted average: (B, C, H, W) probabilities (weights shared or
per class) or (B, H, W) images. Predict, the UI, the registry's pyfunc and the cost stage
all run it; its latency is the members' latencies plus one weighted sum
(:mod:`mri_ensemble.cost` measures both side by side).

:class:`Predictor` is that network loaded from a project folder (:mod:`mri_ensemble.project`)
together with the task's preprocessing settings: :func:`load_predictor`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import project
from .ensemble import ensemble_members
from .errors import ConfigError, DataError
from .tasks import Task, get_task
from .train import resolve_device
from .tta import load_member

log = logging.getLogger(__name__)


class EnsembleNet(nn.Module):
    """Weighted ensemble of trained members; ``weights`` (M,) or per class (M, C)."""

    weights: torch.Tensor

    def __init__(
        self, members: Sequence[nn.Module], weights: np.ndarray | Sequence[float], task: str | Task
    ) -> None:
        super().__init__()
        self.task = get_task(task) if isinstance(task, str) else task
        w = np.asarray(weights, dtype=np.float64)
        if len(members) == 0 or w.shape[0] != len(members):
            raise DataError(f"{len(members)} members but weights of shape {w.shape}")
        self.task.check_weights(w)
        if np.any(w < 0) or np.any(w.sum(axis=0) <= 0):
            raise DataError(f"weights must be non-negative and not all zero, found {w}")
        w = w / w.sum(axis=0)
        self.members = nn.ModuleList(members)
        # (M, C, 1, 1) for per-class weights, (M,) otherwise; a buffer so .to(device) moves it
        shape = (len(members), -1, 1, 1) if w.ndim == 2 else (len(members),)
        self.register_buffer("weights", torch.tensor(w, dtype=torch.float32).reshape(shape))

    @torch.no_grad()
    def member_outputs(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Every member on the same ``inputs`` -> (M, B, ...) float32, as the task fuses them."""
        dev = inputs[0].device
        outs = []
        for member in self.members:
            member.eval()
            with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
                y = member(*inputs)
            outs.append(self.task.fusable(y))
        return torch.stack(outs)

    def fuse(self, stack: torch.Tensor) -> torch.Tensor:
        """Weighted average over the members of :meth:`member_outputs` -> (B, ...)."""
        out = self.weights[0] * stack[0]
        for i in range(1, len(stack)):
            out = out + self.weights[i] * stack[i]
        return out

    @torch.no_grad()
    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Segmentation: images (B, 1, H, W) -> probabilities (B, C, H, W); reconstruction:
        (kspace (B, C, H, W), mask (B, W), grappa (B, H, W)) -> images (B, H, W)."""
        return self.fuse(self.member_outputs(*inputs))


def load_members(
    checkpoints: Sequence[Path], device: torch.device | str = "cpu"
) -> list[nn.Module]:
    """Trained members in eval mode from their ``best.pt`` checkpoints."""
    return [load_member(Path(p), device)[0] for p in checkpoints]


@dataclass
class Member:
    """One trained network and its (unnormalised) ensemble weight: a number, or per class
    ``{class name: number}``."""

    name: str
    model: nn.Module
    weight: project.Weight = 1.0


@dataclass
class Predictor:
    """Members on ``device`` plus the task's preprocessing settings (``ingest.<task>``).

    ``name`` is the model name or ``"ensemble"``; ``method`` the ensemble's (``"vote"``:
    majority vote of the members' labels; anything else: weighted average); ``class_names``
    (segmentation) names label 0..K-1; ``seed`` is params.yaml's, for reconstruction masks.
    """

    task: str
    members: list[Member]
    settings: dict[str, Any]
    name: str = project.ENSEMBLE
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    class_names: list[str] = field(default_factory=list)
    seed: int = 0
    method: str = "weighted"
    data_consistency: bool = False  # reconstruction ensembles: put acquired lines back

    @property
    def weights(self) -> np.ndarray:
        """(M,) float64 weights, or (M, K) per class, normalised over the members."""
        if any(isinstance(m.weight, dict) for m in self.members):
            w = np.array([_class_weights(m, self.class_names) for m in self.members])
        else:
            w = np.array([m.weight for m in self.members], dtype=np.float64)
        return w / w.sum(axis=0)

    @functools.cached_property
    def net(self) -> EnsembleNet:
        """The members as one :class:`EnsembleNet` on ``device`` (uniform weights for a vote)."""
        w = np.ones(len(self.members)) if self.method == "vote" else self.weights
        return EnsembleNet([m.model for m in self.members], w, self.task).to(self.device)

    def describe(self) -> str:
        if self.name != project.ENSEMBLE:
            return f"{self.task} model {self.name}"
        if self.method == "vote":
            return (
                f"{self.task} ensemble (majority vote of {', '.join(m.name for m in self.members)})"
            )
        w = self.weights
        shares = w if w.ndim == 1 else w.mean(axis=1)
        parts = ", ".join(f"{m.name} {x:.2f}" for m, x in zip(self.members, shares, strict=True))
        kind = "per-class weights, mean" if w.ndim == 2 else "weights"
        return f"{self.task} ensemble ({kind} {parts})"


def _class_weights(member: Member, class_names: Sequence[str]) -> list[float]:
    """A member's weight per class, in ``class_names`` order (a number: the same for all)."""
    w = member.weight
    if not isinstance(w, dict):
        return [float(w)] * len(class_names)
    missing = [c for c in class_names if c not in w]
    if missing:
        raise DataError(
            f"per-class weights of {member.name} name classes {sorted(w)}, the models "
            f"predict {list(class_names)}"
        )
    return [w[c] for c in class_names]


def _load_member(path: Path, task: str, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    try:
        model, ckpt = load_member(path, device)
    except (RuntimeError, KeyError, TypeError) as exc:  # weights that do not fit the spec
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: checkpoint does not rebuild its network ({first})") from exc
    found = (ckpt.get("meta") or {}).get("task")
    if found is not None and found != task:
        raise DataError(f"{path}: expected a {task} checkpoint, found a {found} one")
    return model, ckpt


def load_predictor(
    root: Path, task: str, model: str | None = None, device: str = "auto"
) -> Predictor:
    """Load model ``model`` of ``task`` from project ``root``, or the ensemble (``None`` or
    ``"ensemble"``), on ``device`` (auto | cpu | cuda).

    ConfigError: unknown task or model (naming the trained ones), bad params.yaml.
    DataError: nothing trained yet (naming the command that trains), missing or
    unreadable checkpoints or ensemble weights (naming the file).
    """
    t = get_task(task)
    root = Path(root)
    params = project.load_project_params(root)
    settings = project.ingest_settings(params, task)
    trained = project.trained_models(root, task)
    if not trained:
        raise DataError(project.no_models_message(root, task))
    method = "single"
    chosen: dict[str, project.Weight]
    if model is None or model == project.ENSEMBLE:
        name = project.ENSEMBLE
        method, chosen = project.read_ensemble(root, task)
        missing = sorted(set(chosen) - set(trained))
        if missing:
            raise DataError(
                f"{project.ensemble_path(root, task)}: ensemble members {', '.join(missing)} "
                f"have no checkpoint under {root / 'models' / task}; rerun {project.TRAIN_COMMAND}"
            )
        t.check_ensemble(project.ensemble_path(root, task), method, chosen)
        if method != "vote":
            chosen = {m: chosen[m] for m in ensemble_members(chosen)}
    elif model in trained:
        name, chosen = model, {model: 1.0}
    else:
        raise ConfigError(
            f"unknown {task} model {model!r}; trained: {', '.join(trained)} "
            f"(or {project.ENSEMBLE!r} for the ensemble)"
        )
    dev = resolve_device(device)
    members, specs = [], {}
    for m, w in chosen.items():
        net, ckpt = _load_member(project.checkpoint_path(root, task, m), task, dev)
        members.append(Member(m, net, w))
        specs[m] = ckpt["spec"]
    pred = Predictor(
        task=task,
        members=members,
        settings=settings,
        name=name,
        device=dev,
        class_names=t.output_classes(root, params, specs),
        seed=int(params.get("seed", 0)),
        method=method,
        data_consistency=name == project.ENSEMBLE and project.fused_consistency(root, task),
    )
    _ = pred.weights  # per-class weights must name the models' classes
    log.info("loaded %s on %s", pred.describe(), dev)
    return pred
