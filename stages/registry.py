"""The shipped ensemble in the MLflow model registry: one registered model per task, and
one per task's distilled student (``mri-ensemble-<task>-student``, where distill@ ran).

:func:`register_ensemble` bundles what loading needs (the members' ``best.pt``, the task's
``ensemble.json`` and ``params.yaml`` for preprocessing) as the artifacts of an MLflow
``pyfunc`` model whose code is ``mri_ensemble`` and ``stages`` (MLflow lives in the stages
layer, not the library), registers it as ``mri-ensemble-<task>`` and
points the alias ``champion`` at the version with the best val score (ties: the newer).
A bundle identical to the latest version (same fingerprint of weights and checkpoints) is
not registered again, so rerunning an unchanged pipeline adds no versions.

Loading, anywhere with this package's dependencies installed::

    model = mlflow.pyfunc.load_model("models:/mri-ensemble-segmentation@champion")
    labels = model.predict(images)      # (N, H, W) float32 slices on the network grid
    recon = mlflow.pyfunc.load_model("models:/mri-ensemble-reconstruction@champion")
    images = recon.predict("file_brain.h5")   # a fastMRI HDF5 path -> (S, H, W)
    student = mlflow.pyfunc.load_model("models:/mri-ensemble-segmentation-student@champion")
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

import mri_ensemble
from mri_ensemble.ensemble import ensemble_members
from mri_ensemble.errors import DataError
from mri_ensemble.project import STUDENT
from mri_ensemble.tasks import get_task

log = logging.getLogger(__name__)
PACKAGE = Path(mri_ensemble.__file__).resolve().parent  # shipped with the model (code_paths)

ALIAS = "champion"
BUNDLE_FORMAT = "stages.registry/1"  # part of the fingerprint: a new layout is a new version
REQUIREMENTS = [  # what loading needs (the package's own pins, see pyproject.toml)
    "torch==2.13.0",
    "monai==1.6.1",
    "numpy>=1.26,<3",
    "scipy>=1.11",
    "h5py>=3.10",
    "nibabel>=5.2",
    "scikit-image>=0.22",
    "pyyaml>=6",
    "tqdm>=4.66",
    "pygrappa==0.26.3",
]


def registered_name(task: str, model: str | None = None) -> str:
    """``mri-ensemble-<task>`` (the ensemble), ``mri-ensemble-<task>-<model>`` (one model)."""
    return f"mri-ensemble-{task}" + (f"-{model}" if model else "")


try:  # the class is only needed where mlflow is installed (always, in this project)
    import mlflow.pyfunc

    class EnsembleModel(mlflow.pyfunc.PythonModel):  # type: ignore[misc,name-defined]
        """pyfunc wrapper: the task's ensemble (:class:`~mri_ensemble.inference.EnsembleNet`,
        loaded by :func:`~mri_ensemble.inference.load_predictor`), or the one model that
        the bundle's ``task.json`` names."""

        def load_context(self, context: Any) -> None:
            from mri_ensemble.inference import load_predictor

            root = Path(context.artifacts["project"])
            about = json.loads((root / "task.json").read_text())
            self.task = get_task(about["task"])
            model = about.get("model", "ensemble")
            self.predictor = load_predictor(root, self.task.name, model, device="auto")

        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            return self.task.predict_array(self.predictor, model_input)

except ImportError:  # pragma: no cover
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _record(root: Path, task: str, model: str | None) -> dict[str, Any]:
    """What is registered: the ensemble's ``ensemble.json``, or one model's method, weight
    and scores (the student's from ``student.json``, any other's from ``metrics.json``)."""
    rep = root / "reports" / task
    if model is None:
        path = rep / "ensemble.json"
        if not path.is_file():
            raise DataError(f"{path}: missing; run the ensemble stage first")
        return dict(json.loads(path.read_text()))
    path = rep / ("student.json" if model == STUDENT else "metrics.json")
    if not path.is_file():
        raise DataError(f"{path}: missing; run the stage that scores {model} first")
    scores = json.loads(path.read_text())
    scores = scores if model == STUDENT else scores["models"][model]
    return {"method": "single", "weights": {model: 1.0}, "val": scores["val"],
            "test": scores["test"]}  # fmt: skip


def _bundle(
    root: Path, task: str, dest: Path, model: str | None = None
) -> tuple[dict[str, Any], str]:
    """Copy what loading needs into ``dest`` (``model``: that one model, not the ensemble);
    returns (:func:`_record`, fingerprint)."""
    ens = _record(root, task, model)
    h = hashlib.sha256(f"{BUNDLE_FORMAT}{json.dumps(ens['weights'], sort_keys=True)}".encode())
    for m in sorted(ensemble_members(ens["weights"])):  # the members predict runs
        ckpt = root / "models" / task / m / "best.pt"
        if not ckpt.is_file():
            raise DataError(
                f"{ckpt}: checkpoint of {'ensemble member ' if model is None else ''}{m} missing"
            )
        (dest / "models" / task / m).mkdir(parents=True)
        shutil.copy2(ckpt, dest / "models" / task / m / "best.pt")
        h.update(_sha256(ckpt).encode())
    if model is None:
        (dest / "reports" / task).mkdir(parents=True)
        keep = ("method", "weights", "val", "test", "crossfit", "data_consistency")
        slim = {k: ens[k] for k in keep if k in ens}
        (dest / "reports" / task / "ensemble.json").write_text(json.dumps(slim, indent=1))
    shutil.copy2(root / "params.yaml", dest / "params.yaml")
    (dest / "task.json").write_text(
        json.dumps({"task": task, **({"model": model} if model else {})})
    )
    return ens, h.hexdigest()[:16]


def register_ensemble(root: Path, task: str, model: str | None = None) -> tuple[int, bool]:
    """Register ``task``'s shipped ensemble (``model``: that one trained model instead, as
    :func:`registered_name` ``(task, model)``, e.g. the student) from project ``root`` in
    the tracking URI that MLflow is set to (an active run, if any, owns the logged model).

    Returns (version, registered_now): an unchanged bundle returns the latest version.
    The alias ``champion`` moves to the new version when its val score is at least the
    current champion's.
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    name = registered_name(task, model)
    key = get_task(task).key_metric
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "project"
        bundle.mkdir()
        ens, fp = _bundle(Path(root), task, bundle, model)
        existing = client.search_model_versions(f"name = '{name}'")
        for mv in existing:
            if mv.tags.get("fingerprint") == fp:
                log.info("registry: %s version %s already holds this ensemble", name, mv.version)
                return int(mv.version), False
        info = mlflow.pyfunc.log_model(
            name=model or "ensemble",
            python_model=EnsembleModel(),
            artifacts={"project": str(bundle)},
            code_paths=[str(PACKAGE), str(Path(__file__).resolve().parent)],
            pip_requirements=REQUIREMENTS,
            registered_model_name=name,
        )
    version = int(info.registered_model_version)
    val = float(ens["val"][key])
    tags = {
        "fingerprint": fp,
        "task": task,
        "method": str(ens.get("method")),
        "members": ",".join(ensemble_members(ens["weights"])),
        f"val_{key}": f"{val:.6f}",
        f"test_{key}": f"{float(ens['test'][key]):.6f}",
    }
    if ens.get("crossfit", {}).get(key) is not None:
        tags[f"crossfit_{key}"] = f"{float(ens['crossfit'][key]):.6f}"
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, v)
    what = (
        f"{task} ensemble ({tags['method']}): {tags['members']}"
        if model is None
        else (f"{task} model {model}")
    )
    client.update_model_version(name, str(version), description=what)
    try:
        champion = client.get_model_version_by_alias(name, ALIAS)
        best = float(champion.tags.get(f"val_{key}", "-inf"))
    except mlflow.exceptions.MlflowException:  # no champion yet
        best = -np.inf
    if val >= best:
        client.set_registered_model_alias(name, ALIAS, str(version))
    log.info(
        "registry: %s version %d (val %s %.4f)%s",
        name,
        version,
        key,
        val,
        f", alias {ALIAS}" if val >= best else "",
    )
    return version, True
