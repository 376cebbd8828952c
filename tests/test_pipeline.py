"""The whole DAG, tiny profile, in a temporary copy of the project.

One Prefect flow run over the real DVC stages with MLflow logging, then: a second run is a
no-op; changing one model's params makes only that model (and the ensemble and report)
stale; a forced single-model rerun retrains that model only; a bad param fails with one
line naming the key and leaves the committed outputs alone.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import copy_project

from mri_ensemble.data.prepared import read_segmentation_h5 as read_segmentation

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("unet", "attention_unet", "unetpp")
RECON_MODELS = ("attention_unet", "varnet", "dircn_attention")
CANDIDATES = (*MODELS, "unet-flip")  # the tiny profile's one TTA candidate (tta@segmentation-unet)


def tiny_params() -> dict:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    # 5 patients split 2/2/1: two val patients, so cross-fitting runs end to end
    p["ingest"]["segmentation"].update(
        n_patients=5,
        size=32,
        spacing_mm=4.5,
        split={"train": 0.4, "val": 0.4, "test": 0.2},
        shifted={"acquisition": 1},
    )
    # three networks of each task are enough for the DAG (every network: test_params.py;
    # DIRCN's U-Net inner network: test_varnet_dircn.py)
    p["train"] = {k: e for k, e in p["train"].items()
                  if e["model"] in (MODELS if e["task"] == "segmentation" else RECON_MODELS)}  # fmt: skip
    p["tta"] = {"segmentation-unet": p["tta"]["segmentation-unet"]}  # one TTA candidate
    p["augment"]["segmentation"]["copies"] = 1
    p["train"]["segmentation-unet"]["net"]["features"] = [4, 8, 16]
    p["train"]["segmentation-attention_unet"]["net"]["channels"] = [4, 8, 16]
    p["train"]["segmentation-unetpp"]["net"]["features"] = [4, 4, 8, 8, 16, 4]
    recon = p["ingest"]["reconstruction"]
    # 6 volumes split 3/2/1: two val volumes, so cross-fitting runs end to end
    recon.update(coils=4, size=[56, 48], split={"train": 0.5, "val": 0.34, "test": 0.16})
    recon["simulation"].update(
        pixel_mm=4.0,
        volumes=6,
        slices_per_volume=2,
        slice_step_mm=8.0,
        shifted={"contrast": 1, "coils": 1},
    )
    recon["mask"]["center_fractions"] = [0.16]  # 8 ACS lines at W = 48 (GRAPPA kernel 5)
    small = {"cascades": 1, "chans": 4, "sens_chans": 2, "pools": 2, "sens_pools": 2}
    p["train"]["reconstruction-attention_unet"]["net"] = {"channels": [4, 8, 16], "fc_hidden": 32}
    p["train"]["reconstruction-varnet"]["net"] = {**small, "fc_hidden": 32}
    p["train"]["reconstruction-dircn_attention"]["net"] = {
        **small,
        "inner": "attention_unet",
        "attention_channels": [4, 8, 16],
        "fc_hidden": 32,
    }
    for entry in p["train"].values():
        entry["optim"].update(epochs=2, batch_size=8)
    p["ensemble"]["segmentation"]["n_random"] = 8
    p["ensemble"]["reconstruction"]["n_random"] = 8
    p["cost"] = {t: {"batch": 2} for t in ("segmentation", "reconstruction")}
    p["report"]["overlay_slices"] = 2
    return p


def env_for(cwd: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PREFECT_HOME": str(cwd / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "MPLBACKEND": "Agg",
        "DVC_NO_ANALYTICS": "1",
    }


def sh(
    cmd: list[str], cwd: Path, check: bool = True, api: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``cmd`` in ``cwd``; ``api``: against that Prefect API (else a flow run starts a
    temporary server of its own, about 20 s of a core)."""
    env = env_for(cwd) | ({"PREFECT_API_URL": api} if api else {})
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def build_tiny_run(proj: Path, api: str | None = None) -> Path:
    """A tiny-profile copy of the project in ``proj`` that has run the Prefect flow once
    (the suite's ``tiny_run``, tests/conftest.py), against the Prefect API ``api``."""
    for name in ("mri_ensemble", "stages", "flows"):
        shutil.copytree(ROOT / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", proj)
    (proj / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    sh(["git", "init", "-q"], proj)
    sh(["dvc", "init", "-q"], proj)
    sh([sys.executable, "-m", "flows.pipeline"], proj, api=api)
    return proj


@pytest.fixture(scope="module")
def project(tiny_run: Path, tmp_path_factory) -> Path:
    """This module's copy of the suite's tiny run (its tests change it, in order)."""
    return copy_project(tiny_run, tmp_path_factory.mktemp("pipeline") / "proj")


def mtimes(proj: Path) -> dict[str, int]:
    return {m: (proj / "models/segmentation" / m / "best.pt").stat().st_mtime_ns for m in MODELS}


def test_flow_writes_every_output(project: Path):
    metrics = json.loads((project / "reports/segmentation/metrics.json").read_text())
    assert set(metrics["models"]) == set(CANDIDATES)
    for m in CANDIDATES:
        assert set(metrics["models"][m]) == {
            "val",
            "test",
            "shift_acquisition",
            "params",
            "training",
        }
        seen = metrics["models"][m]["training"]
        assert seen["samples_seen"] > 0 and seen["epochs_run"] >= 1
        assert {"iou", "dice", "per_class"} <= set(metrics["models"][m]["test"])
        assert set(metrics["models"][m]["test"]["per_class"]) == {"RV", "myocardium", "LV"}
    trained = metrics["training"]  # what the trainings cost in samples, member by member
    assert trained["all_samples_seen"] == sum(trained["samples_seen"].values())
    assert trained["samples_seen"] == {
        m: metrics["models"][m]["training"]["samples_seen"] for m in MODELS
    }
    ens = metrics["ensemble"]
    assert set(ens["weights"]) == set(CANDIDATES)
    assert sum(ens["weights"].values()) == pytest.approx(1.0)
    best_val = max(metrics["models"][m]["val"]["iou"] for m in CANDIDATES)
    assert ens["val"]["iou"] >= best_val - 1e-9, (
        "searched on val: never below the best single model"
    )
    assert "test" in metrics["baselines"]["threshold"]
    report = (project / "reports/report.md").read_text()
    from mri_ensemble.machine import fingerprint
    from stages.report import readme_blocks

    # the bytes hold per CPU type: the run names the one it ran on (this machine)
    made_on = json.loads((project / "reports/platform.json").read_text())
    assert made_on == fingerprint() and made_on["cpu_isa"] is not None

    blocks = readme_blocks(project / "reports")
    assert blocks["segmentation"] in report and blocks["reconstruction"] in report
    assert "| threshold baseline (multi-Otsu, no learning) | 0 | — |" in blocks["segmentation"]
    for fig in ("loss_curves", "per_class_dice", "overlays", "gain_cost"):
        png = project / f"reports/figures/segmentation_{fig}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/segmentation_{fig}.png" in report
    with (project / "reports/segmentation/history/unet.csv").open() as f:
        header = f.readline().strip().split(",")
    assert {"epoch", "train_loss", "val_loss", "val_iou"} <= set(header)


@pytest.mark.parametrize("task, key", [("segmentation", "iou"), ("reconstruction", "ssim")])
def test_flow_compares_methods_and_measures_cost(project: Path, task: str, key: str):
    params = yaml.safe_load((project / "params.yaml").read_text())
    p = params["ensemble"][task]
    metrics = json.loads((project / f"reports/{task}/metrics.json").read_text())
    shipped = f"{p['method']}/worst_group" if p.get("robust") else p["method"]
    assert set(metrics["methods"]) == {shipped, p["method"], *p["compare"]}
    assert metrics["ensemble"]["method"] == shipped
    shifts = {
        "segmentation": ["shift_acquisition"],
        "reconstruction": ["shift_coils", "shift_contrast"],
    }
    for m, scores in metrics["models"].items():  # every model on every shifted set
        assert set(shifts[task]) <= set(scores), m
    for name, scores in metrics["methods"].items():
        assert set(shifts[task]) <= set(scores), name
    for name, scores in metrics["baselines"].items():
        assert set(shifts[task]) <= set(scores), name
    report = (project / "reports/report.md").read_text()
    assert "shifted test set" in report and all(
        s[6:] + " (shifted)" in report for s in shifts[task]
    )
    for name, scores in metrics["methods"].items():
        assert {"val", "crossfit", "test"} <= set(scores)
        assert key in scores["crossfit"], f"{task} {name}: not cross-fitted"
    details = json.loads((project / f"reports/{task}/ensemble.json").read_text())
    sizes = details["sizes"]
    assert [s["size"] for s in sizes] == list(range(1, len(metrics["models"]) + 1))
    assert sizes[-1][f"val_{key}"] == pytest.approx(details["val_search_score"])
    assert set(details["leave_one_out"]) == set(metrics["models"])
    cost = json.loads((project / f"reports/{task}/cost.json").read_text())
    assert [s["size"] for s in cost["sizes"]] == [s["size"] for s in sizes]
    from mri_ensemble.cost import recommend
    from mri_ensemble.ensemble import ensemble_members
    from mri_ensemble.tta import trained_models  # a TTA candidate's weights: its model's

    students = {"student"} if task in params.get("distill", {}) else set()  # distill@<task>
    assert set(cost["member_macs"]) == set(metrics["models"]) | students
    for row, size in zip(cost["sizes"], sizes, strict=True):
        runs = ensemble_members(size["weights"])
        assert row["macs"] == pytest.approx(sum(cost["member_macs"][m] for m in runs))
        assert row["params"] == sum(cost["member_params"][m] for m in trained_models(runs))
    assert all(m > 0 for m in cost["member_macs"].values())
    assert cost["recommendation"] == recommend(cost["sizes"], key)
    assert "latency" not in json.dumps(cost), "machine timings stay out of the outputs"
    report = (project / "reports/report.md").read_text()
    assert cost["recommendation"] in report and f"figures/{task}_pareto.png" in report
    png = project / f"reports/figures/{task}_pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flow_distils_the_ensemble_into_a_student_that_predict_serves(project: Path):
    """distill@segmentation: the best single model on val fine-tuned on the ensemble's soft
    outputs, scored on every set beside both, in the cost table, the report and the README
    block, and afterwards an ordinary model (its own MLflow run, ``--model student``)."""
    metrics = json.loads((project / "reports/segmentation/metrics.json").read_text())
    st = json.loads((project / "reports/segmentation/student.json").read_text())
    best = max(MODELS, key=lambda m: metrics["models"][m]["val"]["iou"])  # one pass: no TTA
    assert st["student"]["trained_from"] == best == st["compared"]["best_single_model"]
    assert st["student"]["init"] == "trained" and st["student"]["alpha"] == 0.5
    assert st["student"]["params"] == metrics["models"][best]["params"]
    assert st["student"]["training"]["epochs_run"] >= 1
    splits = st["compared"]["splits"]
    assert set(splits) == {"val", "test", "shift_acquisition"}
    for split, c in splits.items():
        assert c["student"] == st[split]["iou"]
        assert c["ensemble"] == metrics["ensemble"][split]["iou"]
        assert c["best_single"] == metrics["models"][best][split]["iou"]
        gain = c["ensemble"] - c["best_single"]
        if gain > 0:
            assert c["gain_kept"] == pytest.approx((c["student"] - c["best_single"]) / gain)
        else:
            assert c["gain_kept"] is None  # NaN in strict JSON
    assert (project / "models/segmentation/student/best.pt").is_file()
    with (project / "reports/segmentation/history/student.csv").open() as f:
        assert {"epoch", "train_loss", "val_loss", "val_iou"} <= set(
            f.readline().strip().split(",")
        )
    from stages.report import readme_blocks

    block = readme_blocks(project / "reports")["distill"]
    assert f"student ({best} fine-tuned on it, alpha 0.5, " in block
    assert block in (project / "reports/report.md").read_text()
    assert not (project / "reports/reconstruction/student.json").exists()
    import nibabel as nib

    test = np.asarray(read_segmentation(project / "data/prepared/segmentation/test.h5").image)
    volume = nib.Nifti1Image(test[:3].transpose(2, 1, 0), np.diag([4.5, 4.5, 10.0, 1.0]))
    nib.save(volume, project / "scan.nii.gz")
    out = sh([sys.executable, "-m", "mri_ensemble.cli", "predict", "--task", "segmentation",
              "--model", "student", "--root", str(project), "-i", str(project / "scan.nii.gz"),
              "-o", str(project / "scan_student.nii.gz"), "--no-progress"], project)  # fmt: skip
    labels = np.asarray(nib.load(project / "scan_student.nii.gz").dataobj)
    assert labels.shape == test[:3].transpose(2, 1, 0).shape, out.stdout + out.stderr


def test_flow_adds_the_tta_candidate_to_the_search_costed_as_its_passes(project: Path):
    """tta@segmentation-unet: unet-flip is the trained U-Net's weights (same parameters, same
    training, counted once) averaged over four mirrored passes: a candidate of the weight
    search with four times the U-Net's MACs, answered in the report, served by predict."""
    import torch

    seg = project / "reports/segmentation"
    metrics = json.loads((seg / "metrics.json").read_text())
    unet, flip = metrics["models"]["unet"], metrics["models"]["unet-flip"]
    assert flip["params"] == unet["params"] and flip["training"] == unet["training"]
    assert "unet-flip" not in metrics["training"]["samples_seen"]  # trained once: the U-Net
    ckpt = torch.load(project / "models/segmentation/unet-flip/best.pt", weights_only=False)
    assert ckpt["tta"] == {"axes": [-1, -2], "from": "unet"}
    assert ckpt["meta"]["model"] == "unet-flip"
    trained = torch.load(project / "models/segmentation/unet/best.pt", weights_only=False)
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in trained["state_dict"].items())
    details = json.loads((seg / "ensemble.json").read_text())
    assert "unet-flip" in details["sizes"][-1]["members"]  # the greedy order reached it
    cost = json.loads((seg / "cost.json").read_text())
    assert cost["member_macs"]["unet-flip"] == pytest.approx(4 * cost["member_macs"]["unet"])
    assert cost["member_params"]["unet-flip"] == cost["member_params"]["unet"]
    full = cost["sizes"][-1]  # every candidate: the U-Net's weights counted once
    assert full["params"] == sum(v for m, v in cost["member_params"].items()
                                 if m in full["members"] and m != "unet-flip")  # fmt: skip
    assert details["sizes"][-1]["params"] == full["params"]
    report = (project / "reports/report.md").read_text()
    assert "**Test-time augmentation:** unet-flip (4x unet's MACs" in report
    assert f"{flip['test']['iou']:.4f} against {unet['test']['iou']:.4f} for unet alone" in report
    import nibabel as nib

    test = np.asarray(read_segmentation(project / "data/prepared/segmentation/test.h5").image)
    nib.save(nib.Nifti1Image(test[:2].transpose(2, 1, 0), np.diag([4.5, 4.5, 10.0, 1.0])),
             project / "flip.nii.gz")  # fmt: skip
    for model in ("unet", "unet-flip"):
        sh([sys.executable, "-m", "mri_ensemble.cli", "predict", "--task", "segmentation",
            "--model", model, "--root", str(project), "-i", str(project / "flip.nii.gz"),
            "-o", str(project / f"flip_{model}.nii.gz"), "--no-progress"], project)  # fmt: skip
    plain, tta = (np.asarray(nib.load(project / f"flip_{m}.nii.gz").dataobj)
                  for m in ("unet", "unet-flip"))  # fmt: skip
    assert plain.shape == tta.shape == test[:2].transpose(2, 1, 0).shape


@pytest.mark.parametrize("task, flag", [("segmentation", "dice"), ("reconstruction", "ssim")])
def test_flow_reports_uncertainty_and_calibration(project: Path, task: str, flag: str):
    """Every scored test set gets the uncertainty study of the shipped ensemble; segmentation
    also its calibration (ECE before/after val-fitted temperatures), in the report too."""
    metrics = json.loads((project / f"reports/{task}/metrics.json").read_text())
    details = json.loads((project / f"reports/{task}/ensemble.json").read_text())
    splits = [s for s in metrics["ensemble"] if s == "test" or s.startswith("shift_")]
    assert set(metrics["uncertainty"]) == set(splits)
    for s in splits:
        u = details["uncertainty"][s]
        assert u["metric"] == flag and u["map"] == metrics["uncertainty"][s]["map"]
        assert -1 <= u["correlation"] <= 1 and u["mean_uncertainty"] >= 0
        cases = set(u["per_case"])
        if len(cases) < 2:  # the tiny profile's one-volume test sets: nothing to compare
            assert u["flag"]["flagged"] == [] and u["flag"]["loss"] is None
            continue
        assert set(u["flag"]["flagged"]) < cases and len(u["flag"]["flagged"]) >= 1
        scores = u["case_scores"]
        rest = [scores[c] for c in cases - set(u["flag"]["flagged"])]
        assert u["flag"]["rest_score"] == pytest.approx(np.mean(rest))
    report = (project / "reports/report.md").read_text()
    assert "### Uncertainty: where to distrust the ensemble" in report
    assert f"figures/{task}_uncertainty.png" in report
    if task == "reconstruction":
        assert "calibration" not in metrics and details["calibration"] is None
        return
    cal = metrics["calibration"]
    assert set(cal["temperatures"]) == set(metrics["models"])
    assert all(0.05 <= t <= 20 for t in cal["temperatures"].values())
    for s in splits:
        for entry in (cal[s]["ensemble"], *cal[s]["members"].values()):
            assert 0 <= entry["ece"] <= 1 and 0 <= entry["ece_tempered"] <= 1
    from mri_ensemble.data.prepared import read_segmentation_h5

    rel = details["calibration"]["splits"]["test"]["ensemble"]["reliability"]
    labels = read_segmentation_h5(project / "data/prepared/segmentation/test.h5").label
    assert sum(rel["count"]) == labels.size and len(rel["edges"]) == 16  # every pixel
    assert "### Calibration" in report and "figures/segmentation_reliability.png" in report


def test_flow_registers_each_task_ensemble(project: Path):
    """The registry holds one entry per task with the champion alias, loadable as pyfunc,
    and the segmentation student."""
    import mlflow
    import numpy as np

    from mri_ensemble.data.prepared import read_segmentation_h5
    from mri_ensemble.ensemble import ensemble_members

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        for task in ("segmentation", "reconstruction"):
            version = client.get_model_version_by_alias(f"mri-ensemble-{task}", "champion")
            ens = json.loads((project / f"reports/{task}/ensemble.json").read_text())
            assert version.tags["members"] == ",".join(ensemble_members(ens["weights"]))
        # the student distill@segmentation trained, registered as a model of its own
        student = client.get_model_version_by_alias("mri-ensemble-segmentation-student", "champion")
        assert student.tags["members"] == "student"
        scores = json.loads((project / "reports/segmentation/student.json").read_text())
        assert student.tags["val_iou"] == f"{scores['val']['iou']:.6f}"
        cwd = os.getcwd()
        os.chdir(project)  # the store's artifact root is relative: ./mlruns
        try:
            model = mlflow.pyfunc.load_model("models:/mri-ensemble-segmentation@champion")
        finally:
            os.chdir(cwd)
        images = read_segmentation_h5(project / "data/prepared/segmentation/test.h5").image[:3]
        labels = model.predict(images)
        assert labels.shape == images.shape and set(np.unique(labels)) <= {0, 1, 2, 3}
    finally:
        mlflow.set_tracking_uri(None)


def test_flow_writes_the_reconstruction_outputs(project: Path):
    metrics = json.loads((project / "reports/reconstruction/metrics.json").read_text())
    assert set(metrics["models"]) == set(RECON_MODELS)
    for m in RECON_MODELS:
        assert {"ssim", "psnr", "nmse", "per_case"} <= set(metrics["models"][m]["test"])
    ens = metrics["ensemble"]
    assert sum(ens["weights"].values()) == pytest.approx(1.0)
    details = json.loads((project / "reports/reconstruction/ensemble.json").read_text())
    guard = metrics["guard"]
    allowed = [m for m in RECON_MODELS if guard["all_below"] or m not in guard["dropped"]]
    best_val = max(metrics["models"][m]["val"]["ssim"] for m in allowed)
    plain = details["methods"]["random+nelder_mead"]  # the val-mean search of the shipped method
    assert plain["val_search_score"] >= best_val - 1e-9  # (DC'd members: what the search saw)
    robust = details["methods"]["random+nelder_mead/worst_group"]
    assert robust["note"].startswith("robust:") and details["robust"] is True
    assert details["val_groups"] and set(details["val_groups"]) <= {"T1", "T2", "PD"}
    assert guard["baseline"] == "zero_filled"
    for m, groups in guard["dropped"].items():  # a dropped member ships with weight 0
        assert groups and (guard["all_below"] or ens["weights"][m] == 0.0)
    dc = details["data_consistency"]
    assert isinstance(dc["on"], bool) and dc["param"] == "auto"
    assert set(dc["scores"]) == {"true", "false"}
    assert set(dc["scores"]["true"]) == {"val", "test", "shift_coils", "shift_contrast"}
    assert set(metrics["baselines"]) == {"zero_filled", "grappa"}
    assert metrics["baselines"]["grappa"]["test"]["ssim"] > 0
    report = (project / "reports/report.md").read_text()
    assert "## Reconstruction" in report and "GRAPPA baseline" in report
    for fig in ("loss_curves", "examples", "gain_cost"):
        png = project / f"reports/figures/reconstruction_{fig}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/reconstruction_{fig}.png" in report
    with (project / "reports/reconstruction/history/varnet.csv").open() as f:
        header = f.readline().strip().split(",")
    assert {"epoch", "train_loss", "val_loss", "val_ssim", "val_psnr"} <= set(header)


def test_mlflow_runs_grouped_under_one_parent(project: Path):
    db = sqlite3.connect(project / "mlflow.db")
    runs = dict(db.execute("SELECT run_uuid, name FROM runs").fetchall())
    parents = dict(
        db.execute("SELECT run_uuid, value FROM tags WHERE key='mlflow.parentRunId'").fetchall()
    )
    pipeline = [r for r, n in runs.items() if n == "pipeline"]
    assert len(pipeline) == 1
    logged = dict(db.execute("SELECT key, value FROM params WHERE run_uuid=?", (pipeline[0],)))
    assert logged["train.segmentation-unet.optim.epochs"] == "2"  # params.yaml, flattened
    assert logged["ensemble.segmentation.method"] == "random+nelder_mead"
    children = {runs[r] for r, p in parents.items() if p == pipeline[0]}
    assert set(MODELS) <= children and any(c.startswith("ensemble") for c in children)
    assert set(RECON_MODELS) <= children
    (varnet,) = [r for r, n in runs.items() if n == "varnet"]
    keys = {k for (k,) in db.execute("SELECT key FROM metrics WHERE run_uuid=?", (varnet,))}
    assert {"train_loss", "val_ssim", "best_val_ssim", "test_ssim", "test_psnr"} <= keys
    params = yaml.safe_load((project / "params.yaml").read_text())
    for task, key in (("segmentation", "iou"), ("reconstruction", "ssim")):
        p = params["ensemble"][task]
        methods = {p["method"], *p["compare"]}
        if p.get("robust"):  # the shipped worst-group search beside its val-mean version
            methods.add(f"{p['method']}/worst_group")
        ens_runs = db.execute(
            "SELECT r.run_uuid, r.name FROM runs r JOIN tags t ON r.run_uuid = t.run_uuid "
            "WHERE t.key='task' AND t.value=? AND r.name LIKE 'ensemble-%'",
            (task,),
        ).fetchall()
        # one child run per ensemble method, all with the same metric names
        assert sorted(n for _, n in ens_runs) == sorted(f"ensemble-{m}" for m in methods)
        scores = json.loads((project / f"reports/{task}/metrics.json").read_text())["methods"]
        for run_id, name in ens_runs:
            assert parents[run_id] == pipeline[0]
            ens_keys = {
                k for (k,) in db.execute("SELECT key FROM metrics WHERE run_uuid=?", (run_id,))
            }
            assert scores[name.removeprefix("ensemble-")]["crossfit"]
            assert {f"val_{key}", f"test_{key}", f"crossfit_{key}", "search_seconds"} <= ens_keys
    (unet,) = [r for r, n in runs.items() if n == "unet"]
    steps = db.execute(
        "SELECT key, step FROM metrics WHERE run_uuid=? AND key IN ('train_loss','val_loss')",
        (unet,),
    ).fetchall()
    assert sorted(steps) == [("train_loss", 1), ("train_loss", 2), ("val_loss", 1), ("val_loss", 2)]
    test_keys = {k for (k,) in db.execute("SELECT key FROM metrics WHERE run_uuid=?", (unet,))}
    assert {"test_iou", "test_dice"} <= test_keys


def test_second_run_is_a_noop(project: Path):
    before = mtimes(project)
    assert "changed" not in sh(["dvc", "status"], project).stdout
    out = sh([sys.executable, "-m", "flows.pipeline"], project)  # as `make run`: no server
    assert mtimes(project) == before
    log = out.stdout + out.stderr
    # one `dvc status` at the start found every stage up to date: no DVC ran for any
    said = " up to date (dvc status when the flow started)"
    skipped = {ln.split(" - ")[-1].removesuffix(said) for ln in log.splitlines()
               if ln.endswith(said)}  # fmt: skip
    assert skipped == set(sh(["dvc", "stage", "list", "--name-only"], project).stdout.split())
    assert " ran in " not in log and "Running stage" not in log
    assert "Starting temporary server" in log


def test_a_stage_rerun_reruns_what_depends_on_it(project: Path, tmp_path: Path, prefect_api):
    """The flow skips what `dvc status` found up to date at its start only while nothing
    before it has run: a changed cost param reruns cost@segmentation, and the report, up
    to date at the start, reruns on the new cost table (the rest is skipped)."""
    copy = tmp_path / "proj"
    shutil.copytree(project, copy, symlinks=True)
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["cost"]["segmentation"]["batch"] = 1
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert set(json.loads(sh(["dvc", "status", "--json"], copy).stdout)) == {"cost@segmentation"}
    report = (copy / "reports/report.md").stat().st_mtime_ns
    out = sh([sys.executable, "-m", "flows.pipeline"], copy, api=prefect_api.url)
    log = out.stdout + out.stderr
    assert "cost@segmentation ran in" in log and "report ran in" in log, log[-3000:]
    assert "ensemble@segmentation up to date (dvc status when the flow started)" in log
    assert (copy / "reports/report.md").stat().st_mtime_ns != report
    assert "up to date" in sh(["dvc", "status"], copy).stdout


def lock_outs(lock: dict, stage: str) -> dict[str, str]:
    return {o["path"]: o["md5"] for o in lock["stages"][stage]["outs"]}


def test_forced_reruns_one_and_two_at_a_time_rewrite_identical_bytes(
    project: Path, tmp_path, prefect_api
):
    """HDF5, checkpoints, predictions and JSON reproduce byte for byte, whatever the
    placement: the first run trained all six models at once (one torch thread each on
    two cores); a forced augment, then the flow retraining the U-Net alone (``--parallel
    1``) and two models at once (``--parallel 2``), one thread each
    (``scale.threads_per_training: 1``; not a stage param, nothing goes stale), leave
    dvc.lock, the metrics and the histories as they were (so evaluate, ensemble and cost
    did not rerun)."""
    copy = tmp_path / "proj"
    shutil.copytree(project, copy, symlinks=True)
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["scale"]["threads_per_training"] = 1
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    kept = ("dvc.lock", "reports/segmentation/metrics.json", "reports/segmentation/cost.json",
            "reports/segmentation/history/unet.csv")  # fmt: skip
    before = {f: (copy / f).read_bytes() for f in kept}
    sh(["dvc", "repro", "-f", "-s", "augment@segmentation"], copy)
    # one model is enough for one at a time; two are needed for two at once
    runs = {"1": ["segmentation-unet"], "2": ["segmentation-unet", "segmentation-attention_unet"]}
    for parallel, models in runs.items():
        untouched = mtimes(copy)["unetpp"]
        out = sh([sys.executable, "-m", "flows.pipeline", "--force", "--parallel", parallel,
                  "--models", *models], copy, api=prefect_api.url)  # fmt: skip
        log = out.stdout + out.stderr
        assert all(f"train@{m} ran in" in log for m in models), log[-2000:]
        assert "train@segmentation-unetpp ran in" not in log  # --models: those only
        assert mtimes(copy)["unetpp"] == untouched
        changed = [f for f in kept if (copy / f).read_bytes() != before[f]]
        assert not changed, f"--parallel {parallel} rewrote {changed}"


def test_run_cache_restores_a_training_without_running_it(project: Path, tmp_path: Path):
    """With dvc.lock and the outputs gone (a fresh clone after `dvc pull --run-cache`), the
    run-cache alone restores the trained model: no training runs, same checksums."""
    copy = tmp_path / "proj"
    shutil.copytree(project, copy, symlinks=True)
    stage = "train@segmentation-unet"
    lock = yaml.safe_load((copy / "dvc.lock").read_text())
    expected = lock_outs(lock, stage)
    (copy / "dvc.lock").unlink()
    shutil.rmtree(copy / "models/segmentation/unet")
    (copy / "reports/segmentation/history/unet.csv").unlink()
    out = sh(["dvc", "repro", "-s", stage], copy)
    log = out.stdout + out.stderr
    assert f"Stage '{stage}' is cached - skipping run" in log, log[-2000:]
    assert "epoch 1/" not in log
    assert lock_outs(yaml.safe_load((copy / "dvc.lock").read_text()), stage) == expected
    assert (copy / "reports/segmentation/history/unet.csv").is_file()
    assert sh(["dvc", "status", stage], copy).stdout.strip().endswith("up to date.")


def test_every_training_stage_is_run_cacheable(project: Path):
    """DVC skips its run-cache for a stage with a plain `cache: false` out."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        for stage in repo.index.stages:
            if stage.name.split("@")[0] in ("train", "evaluate", "ensemble"):
                plain = [o.def_path for o in stage.outs
                         if not o.use_cache and not (o.is_metric or o.is_plot)]  # fmt: skip
                assert not plain, f"{stage.name}: uncached outs {plain} disable the run-cache"


def test_one_model_param_change_makes_only_that_model_stale(project: Path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    original = (project / "params.yaml").read_text()
    params["train"]["segmentation-unet"]["optim"]["lr"] = 0.002
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = sh(["dvc", "status", "--json"], project).stdout
        stale = set(json.loads(status))
    finally:
        (project / "params.yaml").write_text(original)
    allowed = {
        "train@segmentation-unet",
        "evaluate@segmentation-unet",
        "ensemble@segmentation",
        # every ensemble reads the `train` section (its member list): cheap, same outputs
        "ensemble@reconstruction",
        # the student's entry is a `train` entry (the best single model's): cheap to recheck
        "distill@segmentation",
        "report",
    }
    assert "train@segmentation-unet" in stale
    assert stale <= allowed, f"unrelated stages stale: {stale - allowed}"


def test_bad_param_gives_one_line_and_keeps_outputs(project: Path):
    original = (project / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["train"]["segmentation-unet"]["arch"] = "no_such_net"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = mtimes(project)
    try:
        proc = sh(
            [
                sys.executable,
                "-m",
                "stages.train",
                "--name",
                "segmentation-unet",
                "--train",
                "data/augmented/segmentation/train.h5",
                "--val",
                "data/prepared/segmentation/val.h5",
                "--out",
                "models/segmentation/unet",
                "--history",
                "reports/segmentation/history/unet.csv",
            ],
            project,
            check=False,
        )
    finally:
        (project / "params.yaml").write_text(original)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: unknown segmentation model 'no_such_net'; known: attention_")
    assert mtimes(project) == before


def test_killed_training_resumes_with_its_mlflow_run(project: Path):
    """SIGKILL a training after its second epoch; the rerun resumes and finishes the run."""
    from mri_ensemble.train import load_checkpoint

    original = (project / "params.yaml").read_text()
    params = yaml.safe_load(original)
    entry = json.loads(json.dumps(params["train"]["segmentation-unet"]))
    entry["model"] = "killme"
    entry["optim"].update(epochs=6, patience=50)
    params["train"]["segmentation-killme"] = entry
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = project / "models/segmentation/killme"
    cmd = [sys.executable, "-m", "stages.train", "--name", "segmentation-killme",
           "--train", "data/augmented/segmentation/train.h5",
           "--val", "data/prepared/segmentation/val.h5",
           "--out", str(out), "--history", str(project / "killme.csv")]  # fmt: skip
    last = project / ".resume/segmentation/killme/last.pt"
    try:
        proc = subprocess.Popen(cmd, cwd=project, env=env_for(project),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 300
        while not (last.is_file() and load_checkpoint(last)["epoch"] >= 2):
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.kill()
        proc.wait()
        assert not out.exists(), "a killed training leaves no output that looks whole"
        second = sh(cmd, project)
        assert "resuming" in second.stderr
        history = json.loads((out / "history.json").read_text())
        assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5, 6]
        db = sqlite3.connect(project / "mlflow.db")
        (run,) = db.execute("SELECT run_uuid FROM runs WHERE name='killme'").fetchall()
        steps = [s for (s,) in db.execute(
            "SELECT step FROM metrics WHERE run_uuid=? AND key='train_loss' ORDER BY step", run)]  # fmt: skip
        assert steps[-1] == 6 and set(steps) == {1, 2, 3, 4, 5, 6}
    finally:
        (project / "params.yaml").write_text(original)
