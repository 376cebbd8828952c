"""The MLflow model registry entry of an ensemble: registered once per content, loadable,
with the ``champion`` alias on the best val score."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from tiny_project import make_project

from mri_ensemble.errors import DataError
from mri_ensemble.inference import load_predictor
from mri_ensemble.tasks.segmentation import ensemble_labels
from stages.registry import ALIAS, register_ensemble, registered_name


def _scores(root: Path, val: float, weights: dict | None = None) -> None:
    path = root / "reports" / "segmentation" / "ensemble.json"
    ens = json.loads(path.read_text())
    ens.update(val={"iou": val}, test={"iou": val - 0.01}, crossfit={"iou": val - 0.005})
    if weights:
        ens["weights"] = weights
    path.write_text(json.dumps(ens))


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # artifacts go to ./mlruns of the store's folder
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("registry-test")
    yield mlflow.MlflowClient()
    mlflow.set_tracking_uri(None)


def test_register_load_and_champion_alias(tmp_path: Path, store) -> None:
    root = make_project(tmp_path / "project")
    _scores(root, 0.80)
    name = registered_name("segmentation")
    assert register_ensemble(root, "segmentation") == (1, True)
    assert register_ensemble(root, "segmentation") == (1, False)  # same content: no new version
    v1 = store.get_model_version(name, "1")
    assert v1.tags["val_iou"] == "0.800000" and v1.tags["members"] == "unet,small"
    assert str(store.get_model_version_by_alias(name, ALIAS).version) == "1"

    _scores(root, 0.70, {"unet": 0.9, "small": 0.1})  # worse on val: registered, not champion
    assert register_ensemble(root, "segmentation") == (2, True)
    assert str(store.get_model_version_by_alias(name, ALIAS).version) == "1"
    _scores(root, 0.90, {"unet": 0.5, "small": 0.5})  # better: the alias moves
    assert register_ensemble(root, "segmentation") == (3, True)
    assert str(store.get_model_version_by_alias(name, ALIAS).version) == "3"

    model = mlflow.pyfunc.load_model(f"models:/{name}@{ALIAS}")
    images = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    expected = ensemble_labels(load_predictor(root, "segmentation", "ensemble", "cpu"), images)
    np.testing.assert_array_equal(model.predict(images), expected)


def test_cli_predicts_from_the_registry_as_from_the_project(
    tmp_path: Path, store, capsys, monkeypatch
) -> None:
    """``mri-ensemble predict --model-uri models:/...@champion`` (``MLFLOW_TRACKING_URI``'s
    registry) downloads the registered bundle and writes the same labels as ``--root`` on
    the project it came from."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from tiny_project import phantom_nifti

    from mri_ensemble.cli import main

    root = make_project(tmp_path / "project")
    _scores(root, 0.80)
    register_ensemble(root, "segmentation")
    scan = phantom_nifti(tmp_path)
    main(["predict", "--task", "segmentation", "-i", str(scan), "-o", str(tmp_path / "a.nii.gz"),
          "--root", str(root), "--no-progress"])  # fmt: skip
    uri = f"models:/{registered_name('segmentation')}@{ALIAS}"
    main(["predict", "--model-uri", uri, "-i", str(scan), "-o", str(tmp_path / "b.nii.gz"),
          "--no-progress"])  # fmt: skip
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
    assert "segmentation ensemble" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--task", "reconstruction", "--model-uri", uri, "-i", str(scan),
              "-o", str(tmp_path / "c.h5")])  # fmt: skip
    assert exc.value.code == 2
    assert "the registered model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", "--model-uri", "models:/no-such-model@champion", "-i", str(scan),
              "-o", str(tmp_path / "d.nii.gz")])  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("error: --model-uri models:/no-such-model@champion: could not fetch")
    assert not (tmp_path / "c.h5").exists() and not (tmp_path / "d.nii.gz").exists()


def test_the_student_is_registered_and_served_as_one_model(
    tmp_path: Path, store, capsys, monkeypatch
) -> None:
    """distill@'s student, an ordinary model: ``mri-ensemble-segmentation-student`` holds
    its checkpoint only, its alias follows its own val score (student.json), and the pyfunc
    and ``predict --model-uri`` give what ``--model student`` gives on the project."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from tiny_project import SEG_MEMBERS, phantom_nifti, save_member

    from mri_ensemble.cli import main

    root = make_project(tmp_path / "project")
    arch, cfg = SEG_MEMBERS["unet"]
    save_member(root, "segmentation", "student", arch, cfg, (1, 4), seed=7)
    with pytest.raises(DataError, match="student.json: missing"):
        register_ensemble(root, "segmentation", "student")
    student = root / "reports" / "segmentation" / "student.json"
    student.write_text(json.dumps({"val": {"iou": 0.5}, "test": {"iou": 0.45}}))
    name = registered_name("segmentation", "student")
    assert name == "mri-ensemble-segmentation-student"
    assert register_ensemble(root, "segmentation", "student") == (1, True)
    assert register_ensemble(root, "segmentation", "student") == (1, False)
    version = store.get_model_version_by_alias(name, ALIAS)
    assert version.tags["members"] == "student" and version.tags["val_iou"] == "0.500000"
    with pytest.raises(mlflow.exceptions.MlflowException):  # the ensemble is not touched
        store.get_registered_model(registered_name("segmentation"))

    model = mlflow.pyfunc.load_model(f"models:/{name}@{ALIAS}")
    images = np.random.default_rng(1).random((2, 32, 32)).astype(np.float32)
    expected = ensemble_labels(load_predictor(root, "segmentation", "student", "cpu"), images)
    np.testing.assert_array_equal(model.predict(images), expected)
    scan = phantom_nifti(tmp_path)
    main(["predict", "--task", "segmentation", "--model", "student", "-i", str(scan),
          "-o", str(tmp_path / "a.nii.gz"), "--root", str(root), "--no-progress"])  # fmt: skip
    main(["predict", "--model-uri", f"models:/{name}@{ALIAS}", "-i", str(scan),
          "-o", str(tmp_path / "b.nii.gz"), "--no-progress"])  # fmt: skip
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
    assert "student" in capsys.readouterr().out
