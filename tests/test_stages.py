"""Stage CLIs on bad input: one line naming the file or key, exit status 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from mri_ensemble.data.phantom import write_acdc_phantom

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
