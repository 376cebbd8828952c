"""What every stage shares: params.yaml access, the CLI wrapper, MLflow runs.

Stages are thin: read their params section once, take dep/out paths from the command line
that dvc.yaml gives them, call the library, write outs atomically, log to MLflow.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mri_ensemble.errors import ConfigError, PipelineError
from mri_ensemble.io import write_json

PARAMS_FILE = Path(os.environ.get("MRI_ENSEMBLE_PARAMS", "params.yaml"))
PARENT_RUN_ENV = "MRI_ENSEMBLE_PARENT_RUN_ID"
# Which MLflow run trained which model: kept beside the outputs, not in them, so a model
# folder's bytes do not depend on the run id (evaluate continues the training's run).
RUNS_DIR = Path(".mlflow-runs")
TASKS = ("segmentation", "reconstruction")
KEY_METRIC = {"segmentation": "iou", "reconstruction": "ssim"}  # what the ensemble maximises
log = logging.getLogger("stages")


def git_revision() -> str:
    """The commit the stage runs at: an MLflow tag, never part of a DVC output (outputs must
    not change bytes when only the commit does)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the repository root)")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return params


def get(
    params: Mapping[str, Any], dotted: str, default: Any = ..., kind: type | None = None
) -> Any:
    """``params['a']['b']`` for ``'a.b'``; ConfigError naming the key if missing or mistyped."""
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is not ...:
                return default
            raise ConfigError(f"params.yaml: missing key {dotted!r}")
        node = node[part]
    if kind is not None and not isinstance(node, kind):
        raise ConfigError(f"params.yaml: key {dotted!r} should be {kind.__name__}, found {node!r}")
    return node


def model_entry(params: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The ``train.<task>-<model>`` entry, checked for its required keys."""
    entry = get(params, f"train.{name}", kind=dict)
    for key in ("task", "model", "arch"):
        if key not in entry:
            raise ConfigError(f"params.yaml: missing key 'train.{name}.{key}'")
    if entry["task"] not in TASKS:
        raise ConfigError(
            f"params.yaml: train.{name}.task {entry['task']!r} unknown; known: {list(TASKS)}"
        )
    if name != f"{entry['task']}-{entry['model']}":
        raise ConfigError(
            f"params.yaml: key 'train.{name}' should be '<task>-<model>' = "
            f"'{entry['task']}-{entry['model']}'"
        )
    return entry


def task_models(params: Mapping[str, Any], task: str) -> list[str]:
    """Model names of ``task`` in params.yaml order."""
    return [e["model"] for e in get(params, "train", kind=dict).values() if e.get("task") == task]


def cli(main: Callable[[], None]) -> Callable[[], None]:
    """Run ``main`` with logging set up; user errors become one line and exit status 2."""

    @functools.wraps(main)
    def wrapper() -> None:
        logging.basicConfig(
            level=os.environ.get("MRI_ENSEMBLE_LOG", "INFO"),
            format="%(asctime)s %(name)s %(levelname)s %(message)s",
            datefmt="%H:%M:%S",
        )
        for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        try:
            main()
        except PipelineError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1e-3}} -> {'optim.lr': 1e-3} (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextlib.contextmanager
def mlflow_run(
    params: Mapping[str, Any],
    run_name: str,
    tags: Mapping[str, str],
    run_id: str | None = None,
) -> Iterator[Any]:
    """Start (or continue, with ``run_id``) an MLflow run in the configured store.

    Runs started inside a pipeline execution (the Prefect flow exports
    ``MRI_ENSEMBLE_PARENT_RUN_ID``) become children of its parent run.
    """
    import mlflow

    mlflow.set_tracking_uri(get(params, "mlflow.tracking_uri", "sqlite:///mlflow.db"))
    mlflow.set_experiment(get(params, "mlflow.experiment", "mri-ensemble"))
    kwargs: dict[str, Any]
    if run_id:  # continuing a run: its tags (stage, revision) stay those of its start
        kwargs = {"run_id": run_id}
    else:
        kwargs = {
            "run_name": run_name,
            "tags": {
                "git_revision": git_revision(),
                "dvc_stage": os.environ.get("DVC_STAGE", "manual"),
                **tags,
            },
        }
        parent = os.environ.get(PARENT_RUN_ENV)
        if parent:
            kwargs["parent_run_id"] = parent
    with mlflow.start_run(**kwargs) as run:
        yield run


def remember_run(name: str, run_id: str) -> None:
    """Record that ``train@<name>`` logged to MLflow run ``run_id`` (for evaluate)."""
    write_json(RUNS_DIR / f"{name}.json", {"run_id": run_id})


def remembered_run(name: str) -> str | None:
    """The run ``train@<name>`` logged to on this machine; None (a new run) if unknown, e.g.
    when the model was restored from the DVC run-cache instead of trained here."""
    path = RUNS_DIR / f"{name}.json"
    try:
        return str(json.loads(path.read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def weights_array(weights: dict, members: list[str]) -> np.ndarray:
    """ensemble.json weights ({m: w} or {m: {class: w}}) -> (M,) or (M, C) in member order."""
    rows = [weights[m] for m in members]
    if all(isinstance(r, dict) for r in rows):
        return np.array([list(r.values()) for r in rows], dtype=np.float64)
    return np.array(rows, dtype=np.float64)
