"""Stage CLIs on bad input: one line naming the file or key, exit status 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from mri_ensemble import ensemble
from mri_ensemble.data.phantom import write_acdc_phantom
from mri_ensemble.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def run_stage(tmp: Path, params: dict, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=300
    )


def ingest_params(path: Path, **extra) -> dict:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["ingest"]["segmentation"].update({"source": "acdc", "path": str(path), "size": 32, **extra})
    return p


@pytest.fixture()
def acdc(tmp_path: Path) -> Path:
    write_acdc_phantom(tmp_path / "acdc", n_patients=3, seed=0, write_4d=False)
    return tmp_path / "acdc"


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and proc.stderr.strip().endswith(lines[0]), proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_ingest_reads_a_real_acdc_layout(tmp_path, acdc):
    proc = run_stage(
        tmp_path, ingest_params(acdc), "stages.ingest", "--task", "segmentation", "--out", "prep"
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "prep").iterdir()) == [
        "split.json",
        "test.h5",
        "train.h5",
        "val.h5",
    ]


@pytest.mark.parametrize(
    "breakage, needle",
    [
        ("missing_gt", "patient002_frame01_gt.nii.gz"),
        ("corrupt_nifti", "patient001_frame01.nii.gz"),
        ("bad_labels", "patient003_frame01_gt.nii.gz"),
        ("empty", "acdc"),
    ],
)
def test_ingest_bad_input(tmp_path, acdc, breakage, needle):
    import nibabel as nib

    if breakage == "missing_gt":
        (acdc / "training/patient002/patient002_frame01_gt.nii.gz").unlink()
    elif breakage == "corrupt_nifti":
        (acdc / "training/patient001/patient001_frame01.nii.gz").write_bytes(b"\x1f\x8b garbage")
    elif breakage == "bad_labels":
        f = acdc / "training/patient003/patient003_frame01_gt.nii.gz"
        img = nib.load(f)
        data = np.asarray(img.dataobj).copy()
        data[0, 0, 0] = 7
        nib.save(nib.Nifti1Image(data, img.affine, img.header), f)
    else:
        for p in sorted(acdc.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
    proc = run_stage(
        tmp_path, ingest_params(acdc), "stages.ingest", "--task", "segmentation", "--out", "prep"
    )
    one_line_error(proc, needle)
    assert not (tmp_path / "prep").exists()
    assert not list(tmp_path.glob(".prep*")), "no temporary left behind"


def test_bad_params_name_the_key(tmp_path, acdc):
    proc = run_stage(
        tmp_path,
        ingest_params(acdc, source="dicom"),
        "stages.ingest",
        "--task",
        "segmentation",
        "--out",
        "prep",
    )
    one_line_error(proc, "ingest.segmentation.source", "dicom")
    p = ingest_params(acdc)
    p["ingest"]["segmentation"]["split"] = {"train": 0.5, "val": 0.2, "test": 0.2}
    one_line_error(
        run_stage(tmp_path, p, "stages.ingest", "--task", "segmentation", "--out", "prep"),
        "fractions",
    )
    p = ingest_params(acdc)
    p["train"]["segmentation-unet"]["optim"]["epoch"] = 3
    paths = ["--train", "x.h5", "--val", "y.h5", "--out", "m", "--history", "h.csv"]
    for name, needle in (
        ("segmentation-unet", "epoch"),
        ("segmentation-nope", "train.segmentation-nope"),
    ):
        proc = run_stage(tmp_path, p, "stages.train", "--name", name, *paths)
        one_line_error(proc, needle)
    assert not (tmp_path / "prep").exists() and not (tmp_path / "m").exists()


def recon_params(path: Path) -> dict:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["ingest"]["reconstruction"].update(
        {"source": "fastmri", "path": str(path), "size": [16, 16], "coils": 3}
    )
    p["ingest"]["reconstruction"]["mask"]["center_fractions"] = [0.4]
    p["ingest"]["reconstruction"]["mask"]["accelerations"] = [2]
    return p


def write_fastmri_folder(root: Path, n: int = 3, seed: int = 0) -> None:
    from mri_ensemble.data.fastmri import write_fastmri
    from mri_ensemble.mri.fft import fft2c

    rng = np.random.default_rng(seed)
    root.mkdir()
    yy, xx = np.mgrid[:20, :18] / 20
    for i in range(n):
        img = np.exp(-((yy - 0.5) ** 2 + (xx - 0.45) ** 2) / 0.08)
        coils = np.stack([img * np.exp(1j * k * xx) * (1 + 0.2 * k * yy) for k in range(4)])
        k = fft2c(np.stack([coils * (1 + 0.1 * s) for s in range(2)]))
        k = k + 0.01 * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
        write_fastmri(root / f"file_{i}.h5", k.astype(np.complex64), attrs={"max": 1.0})


def test_ingest_reads_a_real_fastmri_folder(tmp_path):
    write_fastmri_folder(tmp_path / "raw")
    proc = run_stage(
        tmp_path, recon_params(tmp_path / "raw"), "stages.ingest", "--task", "reconstruction",
        "--out", "prep",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    from mri_ensemble.data.prepared_recon import read_reconstruction_h5

    data = read_reconstruction_h5(tmp_path / "prep" / "test.h5")
    assert data.kspace.shape == (2, 3, 16, 16)  # cropped to size, compressed to 3 coils
    assert data.mask.shape == (2, 16) and data.attrs["mask"]["accelerations"] == [2]


def test_ingest_prepares_a_named_fastmri_folder_as_a_shifted_test_set(tmp_path):
    write_fastmri_folder(tmp_path / "raw")
    write_fastmri_folder(tmp_path / "siteB", n=2, seed=1)
    p = recon_params(tmp_path / "raw")
    p["ingest"]["reconstruction"]["shifted"] = {"siteB": str(tmp_path / "siteB")}
    proc = run_stage(tmp_path, p, "stages.ingest", "--task", "reconstruction", "--out", "prep")
    assert proc.returncode == 0, proc.stderr
    from mri_ensemble.data.prepared import scored_splits
    from mri_ensemble.data.prepared_recon import read_reconstruction_h5

    assert scored_splits(tmp_path / "prep") == ["val", "test", "shift_siteB"]
    data = read_reconstruction_h5(tmp_path / "prep" / "shift_siteB.h5")
    assert sorted(set(data.case)) == ["file_0", "file_1"] and data.kspace.shape == (4, 3, 16, 16)
    split = json.loads((tmp_path / "prep" / "split.json").read_text())
    assert split["shifted"] == {"shift_siteB": ["file_0", "file_1"]}
    assert split["slices"]["shift_siteB"] == 4
    p["ingest"]["reconstruction"]["shifted"] = {"siteB": 3}
    proc = run_stage(tmp_path, p, "stages.ingest", "--task", "reconstruction", "--out", "bad")
    one_line_error(proc, "ingest.reconstruction.shifted")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("no_kspace", "expected a 'kspace' dataset"),
        ("ndim", "expected kspace of shape (S, C, H, W) or (S, H, W)"),
        ("real", "expected complex kspace"),
        ("nan", "expected finite kspace values"),
        ("inf", "expected finite kspace values"),
        ("mask", "expected a mask of 18 columns"),
    ],
)
def test_ingest_bad_fastmri_file_one_line_nothing_written(tmp_path, kind, needle):
    import h5py

    write_fastmri_folder(tmp_path / "raw")
    bad = tmp_path / "raw" / "file_1.h5"
    with h5py.File(bad, "a") as f:
        k = f["kspace"][...]
        del f["kspace"]
        if kind == "ndim":
            f["kspace"] = k[0, 0, 0]
        elif kind == "real":
            f["kspace"] = k.real
        elif kind in ("nan", "inf"):
            k[1, 2, 3, 4] = np.nan if kind == "nan" else np.inf
            f["kspace"] = k
        elif kind == "mask":
            f["kspace"] = k
            f["mask"] = np.ones(17, bool)
    proc = run_stage(
        tmp_path, recon_params(tmp_path / "raw"), "stages.ingest", "--task", "reconstruction",
        "--out", "prep",
    )  # fmt: skip
    one_line_error(proc, str(bad), needle)
    assert not (tmp_path / "prep").exists()
    assert not list(tmp_path.glob(".prep*"))  # no temp left behind either


def test_training_a_network_of_the_other_task_is_one_line(tmp_path):
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["train"]["segmentation-unet"]["arch"] = "varnet"
    proc = run_stage(
        tmp_path, p, "stages.train", "--name", "segmentation-unet", "--train", "t.h5",
        "--val", "v.h5", "--out", "m", "--history", "h.csv",
    )  # fmt: skip
    one_line_error(proc, "unknown segmentation model 'varnet'; known: attention_unet,")


def test_mixup_on_a_reconstruction_model_is_one_line(tmp_path):
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["train"]["reconstruction-varnet"]["mixup_alpha"] = 0.4
    p["train"]["reconstruction-varnet"]["net"] = {"cascades": 1, "chans": 2, "sens_chans": 2}
    from test_reconstruction import make_set

    from mri_ensemble.data.prepared_recon import write_reconstruction_h5

    write_reconstruction_h5(tmp_path / "t.h5", make_set())
    proc = run_stage(
        tmp_path, p, "stages.train", "--name", "reconstruction-varnet", "--train", "t.h5",
        "--val", "t.h5", "--out", "m", "--history", "h.csv",
    )  # fmt: skip
    one_line_error(proc, "reconstruction-varnet.mixup_alpha needs a multi-class segmentation")
    assert not (tmp_path / "m").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    "folds, ok", [(0, True), (2, True), (1, False), (-1, False), (True, False)]
)
def test_crossfit_folds_zero_is_the_only_way_to_skip_cross_fitting(folds, ok):
    from mri_ensemble.tasks import TASKS
    from stages.ensemble import search_configs

    p = {"method": "mean", "crossfit_folds": folds}
    if ok:
        assert search_configs(p, TASKS["segmentation"], 0)[1] == folds
    else:
        with pytest.raises(ConfigError, match="crossfit_folds should be an int >= 2 \\(or 0"):
            search_configs(p, TASKS["segmentation"], 0)


def test_a_val_split_of_one_case_is_an_error_unless_cross_fitting_is_off():
    from mri_ensemble.ensemble.evaluation import run_method
    from mri_ensemble.tasks import TASKS

    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, (4, 8, 8)).astype(np.uint8)
    probs = rng.dirichlet(np.ones(4), (2, 4, 8, 8)).transpose(0, 1, 4, 2, 3).astype(np.float32)
    obj = ensemble.SegmentationObjective(probs, target, np.array(["p1"] * 4))
    t = {"objs": {"val": obj, "test": obj}, "names": ["background", "RV", "myocardium", "LV"]}
    cfg = ensemble.SearchConfig("mean")
    with pytest.raises(
        DataError, match="ensemble@segmentation: method 'mean': cross-fitting needs"
    ):
        run_method(TASKS["segmentation"], t, cfg, 3, ["a", "b"])
    assert run_method(TASKS["segmentation"], t, cfg, 0, ["a", "b"])["crossfit"] == {}


def test_every_stage_runs_numpy_blas_on_one_thread():
    """The CLI wrapper pins NumPy/SciPy's BLAS to one thread (stages/common.py), so ten
    parallel stages do not oversubscribe the cores and bytes do not depend on them."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from stages.common import cli

    seen: list[int] = []

    @cli
    def main() -> None:
        seen.extend(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")

    before = threadpool_limits(limits=None)  # records the current limits, changes nothing
    try:
        main()
    finally:
        before.restore_original_limits()
    assert seen and set(seen) == {1}
