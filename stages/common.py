"""What every stage shares: params.yaml access and the CLI wrapper (MLflow: tracking.py).

Stages are thin: read their params section once, take dep/out paths from the command line
that dvc.yaml gives them, call the library, write outs atomically, log to MLflow.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mri_ensemble.errors import ConfigError, PipelineError
from mri_ensemble.params import get
from mri_ensemble.params import load_params as params_file
from mri_ensemble.tasks import TASKS

PARAMS_FILE = Path(os.environ.get("MRI_ENSEMBLE_PARAMS", "params.yaml"))
log = logging.getLogger("stages")


class ServiceUnavailable(RuntimeError):
    """A service the stage needs did not answer (exit status 1: the flow retries the stage)."""


def load_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """The project's params.yaml (``MRI_ENSEMBLE_PARAMS`` names another)."""
    return params_file(path)


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


def pin_blas_threads() -> None:
    """One thread for NumPy/SciPy's BLAS (GRAPPA, coil compression, lstsq) in every stage.

    Left at one thread per core in each of ten parallel trainings it oversubscribes the
    machine (GRAPPA took 2.3 s a slice instead of 0.11 s), and a fixed count makes the
    bytes a stage writes independent of the core count and of whether the flow or
    ``dvc repro`` runs it. Torch's own threads (``MRI_ENSEMBLE_THREADS``) are untouched.
    """
    import scipy.linalg  # noqa: F401  # load SciPy's own OpenBLAS first: limits reach only
    from threadpoolctl import threadpool_limits  # the libraries loaded at the call

    threadpool_limits(limits=1, user_api="blas")  # for the life of the process


def cli(main: Callable[[], None]) -> Callable[[], None]:
    """Run ``main`` with logging set up; user errors become one line and exit status 2 (the
    flow does not retry them), an unreachable service one line and exit status 1."""

    @functools.wraps(main)
    def wrapper() -> None:
        logging.basicConfig(
            level=os.environ.get("MRI_ENSEMBLE_LOG", "INFO"),
            format="%(asctime)s %(name)s %(levelname)s %(message)s",
            datefmt="%H:%M:%S",
        )
        for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        pin_blas_threads()
        try:
            main()
        except PipelineError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except ServiceUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)

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


def weights_array(weights: dict, members: list[str]) -> np.ndarray:
    """ensemble.json weights ({m: w} or {m: {class: w}}) -> (M,) or (M, C) in member order."""
    rows = [weights[m] for m in members]
    if all(isinstance(r, dict) for r in rows):
        return np.array([list(r.values()) for r in rows], dtype=np.float64)
    return np.array(rows, dtype=np.float64)
