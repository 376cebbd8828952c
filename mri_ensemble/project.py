"""A project folder as the pipeline lays it out, read by predict, the UI and the registry.

- ``params.yaml``: the preprocessing settings (``ingest.<task>``) and ``seed``;
- ``models/<task>/<model>/best.pt``: the trained members (self-describing checkpoints);
- ``reports/<task>/ensemble.json``: the ensemble weights (``"weights": {model: w}``, or per
  class ``{model: {class: w}}``), its ``method`` and whether the fused image gets data
  consistency.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, DataError
from .params import load_params
from .tasks import get_task

ENSEMBLE = "ensemble"
STUDENT = "student"  # distill@<task>'s model: models/<task>/student/
TRAIN_COMMAND = "`make run` (or `python -m flows.pipeline`)"

Weight = float | dict[str, float]  # shared, or per class {class name: weight}


def load_project_params(root: Path) -> dict[str, Any]:
    """``root/params.yaml`` as a mapping; ConfigError if missing or not YAML."""
    path = Path(root) / "params.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (the root should be the project folder)")
    return load_params(path)


def ingest_settings(params: Mapping[str, Any], task: str) -> dict[str, Any]:
    node = params.get("ingest")
    settings = node.get(task) if isinstance(node, Mapping) else None
    if not isinstance(settings, Mapping):
        raise ConfigError(f"params.yaml: missing section 'ingest.{task}'")
    return dict(settings)


def checkpoint_path(root: Path, task: str, model: str) -> Path:
    return Path(root) / "models" / task / model / "best.pt"


def ensemble_path(root: Path, task: str) -> Path:
    return Path(root) / "reports" / task / "ensemble.json"


def trained_models(root: Path, task: str) -> list[str]:
    """Names of the ``task`` models that have a ``best.pt`` under ``root``, sorted."""
    get_task(task)
    folder = Path(root) / "models" / task
    if not folder.is_dir():
        return []
    return sorted(p.parent.name for p in folder.glob("*/best.pt") if p.is_file())


def no_models_message(root: Path, task: str) -> str:
    return (
        f"no trained {task} models yet (no {Path(root) / 'models' / task}/<model>/best.pt); "
        f"train them with {TRAIN_COMMAND}"
    )


def read_ensemble(root: Path, task: str) -> tuple[str, dict[str, Weight]]:
    """(method, ``{model: weight}``) of ``reports/<task>/ensemble.json``; a weight is a number
    or, for per-class ensembles, ``{class name: number}``. DataError naming the file."""
    path = ensemble_path(root, task)
    if not path.is_file():
        raise DataError(
            f"{path}: no ensemble weights for {task} yet; search them with {TRAIN_COMMAND}, "
            "or pick one model"
        )
    try:
        report = json.loads(path.read_text())
        method = str(report.get("method", "weighted"))
        weights: dict[str, Weight] = {
            str(m): {str(c): float(x) for c, x in w.items()} if isinstance(w, dict) else float(w)
            for m, w in report["weights"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(
            f"{path}: expected JSON with a 'weights' mapping {{model: weight}}, found an "
            f"unreadable file ({type(exc).__name__})"
        ) from exc
    values = [x for w in weights.values() for x in (w.values() if isinstance(w, dict) else [w])]
    if not values or any(not np.isfinite(x) or x < 0 for x in values) or sum(values) <= 0:
        raise DataError(f"{path}: expected non-negative weights, not all zero, found {weights}")
    return method, weights


def fused_consistency(root: Path, task: str) -> bool:
    """Whether ``ensemble.json`` asks for data consistency on the fused image (reconstruction;
    files written before it existed: no)."""
    try:
        report = json.loads(ensemble_path(root, task).read_text())
        return bool((report.get("data_consistency") or {}).get("on", False))
    except (OSError, ValueError, AttributeError):
        return False


def model_choices(root: Path, task: str) -> list[str]:
    """What can be chosen: ``"ensemble"`` (when its weights exist) then the trained models."""
    models = trained_models(root, task)
    if models and ensemble_path(root, task).is_file():
        return [ENSEMBLE, *models]
    return models
