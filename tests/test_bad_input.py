"""The bad-input catalogue (issue #17): every case a hostile but realistic user produces
against ``mri-ensemble predict`` (both tasks), the ingest stage (ACDC/phantom layout and
fastMRI) and the other stage CLIs, with its expected exit status, what the one-line message
must name, and the check that nothing was written (no output, no temporary, no lock, the
input unchanged).

A few cases are accepted on purpose (exit 0): they are variants a user has (``Patient005``,
``.H5``/``.hdf5``), or data that float64 scaling handles (k-space x 1e30, x 1e-30), or a
stale temporary that the next run cleans up; their checks say what "handled" means.

Everything runs in this process (no interpreter start-up per case) on tiny inputs with the
untrained networks of ``tiny_project``: the checks fire before any model would matter.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import importlib
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_stages import ingest_params, recon_params, write_fastmri_folder
from tiny_project import fastmri_file, make_project

from mri_ensemble.cli import main as cli_main
from mri_ensemble.data.fastmri import write_fastmri
from mri_ensemble.data.phantom import write_acdc_phantom
from mri_ensemble.errors import DataError
from mri_ensemble.train import CHECKPOINT_FORMAT

MARKER_NAME = "pwned"  # what a poisoned checkpoint's payload would create


class Poison:
    """Pickles to a call of ``os.system``: unpickling it would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


@dataclass
class Run:
    """What a case runs (``argv`` of ``mri-ensemble`` or of the stage module ``stage``),
    what must not exist afterwards when it is refused, and the inputs that must not change."""

    argv: list[str]
    outputs: list[Path]
    inputs: list[Path] = field(default_factory=list)
    stage: str | None = None
    params: dict | None = None
    check: Callable[[], None] | None = None  # extra assertions (accepted cases)


@dataclass
class Case:
    id: str
    build: Callable[[Path, Path], Run]  # (case folder, shared project) -> Run
    code: int
    needles: tuple[str, ...] = ()


# ---------------------------------------------------------------------------- inputs


def nifti(path: Path, data: np.ndarray, zooms=(1.5, 1.5, 8.0), dtype=None) -> Path:
    img = nib.Nifti1Image(data, np.diag([*zooms[:3], 1.0]) if len(zooms) >= 3 else np.eye(4))
    img.header.set_zooms(zooms[: data.ndim])
    if dtype is not None:
        img.set_data_dtype(dtype)
    nib.save(img, path)
    return path


def scan(path: Path, zooms=(1.5, 1.5, 8.0), shape=(40, 36, 3)) -> Path:
    rng = np.random.default_rng(0)
    return nifti(path, rng.random(shape).astype(np.float32) * 100, zooms)


def predict_seg(inp: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "--task", "segmentation", "--input", str(inp), "--output", str(out),
            "--no-progress", *extra]  # fmt: skip


def predict_recon(inp: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "--task", "reconstruction", "--input", str(inp), "--output", str(out),
            "--no-progress", *extra]  # fmt: skip


def recon_file(folder: Path, name: str = "file_brain_tiny.h5") -> tuple[Path, np.ndarray]:
    path = fastmri_file(folder, name)
    with h5py.File(path, "r") as f:
        return path, f["kspace"][()]


def rewrite_kspace(path: Path, kspace: np.ndarray, **extra: np.ndarray) -> None:
    with h5py.File(path, "a") as f:
        del f["kspace"]
        f["kspace"] = kspace
        for key, value in extra.items():
            f[key] = value


# ---------------------------------------------------------------------------- predict: seg


def seg(build_input: Callable[[Path], Path], *extra: str) -> Callable[[Path, Path], Run]:
    def build(tmp: Path, project: Path) -> Run:
        inp = build_input(tmp)
        out = tmp / "out" / "labels.nii.gz"
        if inp.suffix in (".png", ".jpg"):
            out = tmp / "out" / "labels.png"
        return Run(predict_seg(inp, out, "--root", str(project), *extra), [out], [inp])

    return build


def _same_path(tmp: Path, project: Path) -> Run:
    inp = scan(tmp / "scan.nii.gz")
    return Run(predict_seg(inp, inp, "--root", str(project)), [], [inp])


def _dotted_path(tmp: Path, project: Path) -> Run:
    inp = scan(tmp / "scan.nii.gz")
    (tmp / "sub").mkdir()
    return Run(
        predict_seg(inp, tmp / "sub" / ".." / "scan.nii.gz", "--root", str(project)), [], [inp]
    )


def _symlink(tmp: Path, project: Path) -> Run:
    inp = scan(tmp / "scan.nii.gz")
    (tmp / "link.nii.gz").symlink_to(inp)
    return Run(predict_seg(inp, tmp / "link.nii.gz", "--root", str(project)), [], [inp])


def _hardlink(tmp: Path, project: Path) -> Run:
    inp = scan(tmp / "scan.nii.gz")
    os.link(inp, tmp / "hard.nii.gz")
    return Run(predict_seg(inp, tmp / "hard.nii.gz", "--root", str(project)), [], [inp])


def _pixdim_zero(tmp: Path) -> Path:
    path = scan(tmp / "pixdim0.nii")
    zero_pixdim(path)
    return path


def zero_pixdim(path: Path) -> None:
    """Set the stored dx (pixdim[1], bytes 80-84 of a NIfTI-1 header) to 0, as a header
    without voxel sizes has it (nibabel itself would not write it)."""
    gz = path.name.endswith(".gz")
    raw = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    raw[80:84] = np.float32(0).tobytes()
    path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))


def _huge_header(tmp: Path) -> Path:
    """A header declaring 20000 x 20000 x 1000 voxels in front of a few bytes of data."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((20000, 20000, 1000))
    hdr.set_data_dtype(np.float32)
    hdr.set_zooms((0.5, 0.5, 1.0))
    hdr["vox_offset"] = 352
    path = tmp / "huge.nii"
    path.write_bytes(hdr.binaryblock + b"\0" * 4 + b"\0" * 64)
    return path


def _label_map(tmp: Path) -> Path:
    data = np.zeros((40, 36, 3), np.uint8)
    data[10:20, 10:20] = 1
    data[12:18, 12:18] = 3
    data[25:30, 5:9] = 2
    return nifti(tmp / "patient001_frame01_gt.nii.gz", data, dtype=np.uint8)


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _png(tmp: Path, array: np.ndarray, name: str = "slice.png") -> Path:
    Image.fromarray(array).save(tmp / name)
    return tmp / name


def _poisoned(tmp: Path, project: Path) -> Run:
    root = tmp / "project"
    shutil.copytree(project, root)
    ckpt = root / "models" / "segmentation" / "unet" / "best.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "spec": Poison(tmp / MARKER_NAME)}, ckpt)
    inp = scan(tmp / "scan.nii.gz")
    out = tmp / "labels.nii.gz"
    return Run(
        predict_seg(inp, out, "--root", str(root), "--model", "unet"),
        [out, tmp / MARKER_NAME],
        [inp, ckpt],
    )


def _locked(tmp: Path, project: Path) -> Run:
    """Another run holds the output's lock (as a concurrent predict would)."""
    inp = scan(tmp / "scan.nii.gz")
    out = tmp / "labels.nii.gz"
    fd = os.open(tmp / ".labels.nii.gz.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _HELD.append(fd)
    return Run(predict_seg(inp, out, "--root", str(project)), [out], [inp])


_HELD: list[int] = []


def _parent_is_a_file(tmp: Path, project: Path) -> Run:
    inp = scan(tmp / "scan.nii.gz")
    (tmp / "results").write_text("a file where the output folder should be")
    out = tmp / "results" / "labels.nii.gz"
    return Run(predict_seg(inp, out, "--root", str(project)), [], [inp, tmp / "results"])


def _stale_tmp(tmp: Path, project: Path) -> Run:
    """A killed run left a full-size temporary: the next run on that output removes it."""
    inp = scan(tmp / "scan.nii.gz")
    out = tmp / "out" / "labels.nii.gz"
    out.parent.mkdir()
    stale = out.parent / ".labels.nii.gz.k1ll3d.tmp"
    stale.write_bytes(b"\0" * 4096)

    def check() -> None:
        assert out.is_file() and not stale.exists()
        assert sorted(p.name for p in out.parent.iterdir()) == [
            "labels.nii.gz", "labels_uncertainty.nii.gz",
        ]  # no lock or temporary left  # fmt: skip
        assert nib.load(out).shape == (40, 36, 3)

    return Run(predict_seg(inp, out, "--root", str(project)), [], [inp], check=check)


# ---------------------------------------------------------------------------- predict: recon


def recon(edit: Callable[[Path, np.ndarray], None] | None = None, *, same: bool = False):
    def build(tmp: Path, project: Path) -> Run:
        inp, k = recon_file(tmp)
        if edit is not None:
            edit(inp, k)
        out = inp if same else tmp / "out" / "recon.h5"
        return Run(predict_recon(inp, out, "--root", str(project)), [] if same else [out], [inp])

    return build


def recon_scaled(factor: float) -> Callable[[Path, Path], Run]:
    """k-space times ``factor``: handled in float64, the result finite and scaled alike."""

    def build(tmp: Path, project: Path) -> Run:
        inp, k = recon_file(tmp)
        ref = tmp / "ref" / inp.name  # the same name: the same mask
        ref.parent.mkdir()
        shutil.copy(inp, ref)
        with h5py.File(inp, "a") as f:
            target = f["reconstruction_rss"][()]
            del f["reconstruction_rss"], f["kspace"]
            f["kspace"] = (k.astype(np.complex128) * factor).astype(np.complex64)
            f["reconstruction_rss"] = (target.astype(np.float64) * factor).astype(np.float32)
        out, ref_out = tmp / "recon.h5", tmp / "ref_recon.h5"

        def check() -> None:
            assert cli_main_code(predict_recon(ref, ref_out, "--root", str(project))) == 0
            with h5py.File(out) as f, h5py.File(ref_out) as g:
                got, want = f["reconstruction"][()].astype(np.float64), g["reconstruction"][()]
            assert np.isfinite(got).all() and np.abs(got).max() > 0
            np.testing.assert_allclose(
                got / factor, want, rtol=2e-3, atol=2e-3 * np.abs(want).max()
            )

        return Run(predict_recon(inp, out, "--root", str(project)), [], [inp], check=check)

    return build


def _zero(inp: Path, k: np.ndarray) -> None:
    rewrite_kspace(inp, np.zeros_like(k))


def _zero_slice(inp: Path, k: np.ndarray) -> None:
    k = k.copy()
    k[1] = 0
    rewrite_kspace(inp, k)


def _single_coil(inp: Path, k: np.ndarray) -> None:
    with h5py.File(inp, "a") as f:
        del f["kspace"], f["reconstruction_rss"]
        f["kspace"] = k[:, 0]


def _few_coils(inp: Path, k: np.ndarray) -> None:
    rewrite_kspace(inp, k[:, :2])


def _empty_mask(inp: Path, k: np.ndarray) -> None:
    rewrite_kspace(inp, k, mask=np.zeros(k.shape[-1], np.uint8))


def _nan(inp: Path, k: np.ndarray) -> None:
    k = k.copy()
    k[0, 1, 2, 3] = np.nan
    rewrite_kspace(inp, k)


def _real(inp: Path, k: np.ndarray) -> None:
    rewrite_kspace(inp, k.real.copy())


def _no_kspace(inp: Path, k: np.ndarray) -> None:
    with h5py.File(inp, "a") as f:
        del f["kspace"]


def _no_centre_line(inp: Path, k: np.ndarray) -> None:
    mask = (np.arange(k.shape[-1]) % 3 == 0).astype(np.uint8)
    mask[k.shape[-1] // 2] = 0
    rewrite_kspace(inp, k * mask, mask=mask)


def _huge_kspace(inp: Path, k: np.ndarray) -> None:
    """A dataset declared 64 x 32 x 4096 x 4096 whose chunks were never written: a tiny file."""
    with h5py.File(inp, "a") as f:
        del f["kspace"]
        f.create_dataset("kspace", shape=(64, 32, 4096, 4096), dtype=np.complex64, chunks=True)


def _narrow_undersampled(inp: Path, k: np.ndarray) -> None:
    mask = np.zeros(k.shape[-1] - 2, np.uint8)
    mask[::2] = 1
    rewrite_kspace(inp, k[..., :-2] * mask, mask=mask)


# ---------------------------------------------------------------------------- ingest: ACDC


def acdc_case(edit: Callable[[Path], None], **extra) -> Callable[[Path, Path], Run]:
    def build(tmp: Path, project: Path) -> Run:
        root = tmp / "acdc"
        shutil.copytree(ACDC_TEMPLATE, root)
        edit(root / "training")
        return Run(["--task", "segmentation", "--out", "prep"], [tmp / "prep"],
                   stage="stages.ingest", params=ingest_params(root, **extra))  # fmt: skip

    return build


def _frame(root: Path, n: int, gt: bool = False) -> Path:
    return root / f"patient{n:03d}" / f"patient{n:03d}_frame01{'_gt' if gt else ''}.nii.gz"


def _resave(path: Path, data: np.ndarray | None = None, zooms=None) -> None:
    img = nib.load(path)
    new = nib.Nifti1Image(np.asarray(img.dataobj) if data is None else data, img.affine, img.header)
    if data is not None:
        new.set_data_dtype(data.dtype)
    if zooms is not None:
        new.header.set_zooms(zooms)
    nib.save(new, path)


def _bad_label_and_corrupt(root: Path) -> None:
    gt = _frame(root, 3, gt=True)
    data = np.asarray(nib.load(gt).dataobj).copy()
    data[0, 0, 0] = 7
    _resave(gt, data)
    _frame(root, 1).write_bytes(b"\x1f\x8b garbage")


def _micrometre(root: Path) -> None:
    for gt in (False, True):
        z = nib.load(_frame(root, 2, gt)).header.get_zooms()
        _resave(_frame(root, 2, gt), zooms=(z[0] * 1000, z[1] * 1000, z[2]))


def _acdc_pixdim_zero(root: Path) -> None:
    zero_pixdim(_frame(root, 2))


def _duplicate_scan(root: Path) -> None:
    for gt in (False, True):
        shutil.copy(_frame(root, 1, gt), _frame(root, 3, gt))


def _gt_as_image(root: Path) -> None:
    shutil.copy(_frame(root, 2, gt=True), _frame(root, 2))


def _one_voxel(root: Path) -> None:
    for gt in (False, True):
        img = nib.load(_frame(root, 1, gt))
        nib.save(
            nib.Nifti1Image(np.asarray(img.dataobj)[:1, :1, :1], img.affine, img.header),
            _frame(root, 1, gt),
        )


def _constant_image(root: Path) -> None:
    shape = nib.load(_frame(root, 3)).shape
    _resave(_frame(root, 3), np.full(shape, 7.5, np.float32))


def _missing_gt(root: Path) -> None:
    _frame(root, 2, gt=True).unlink()


def _nan_image(root: Path) -> None:
    data = np.asarray(nib.load(_frame(root, 1)).dataobj).astype(np.float32)
    data[3, 3, 0] = np.nan
    _resave(_frame(root, 1), data)


def _shape_mismatch(root: Path) -> None:
    gt = _frame(root, 3, gt=True)
    img = nib.load(gt)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-2], img.affine, img.header), gt)


def _capital_patient(root: Path) -> None:
    """Patient005-style names: the folder and its files keep the user's spelling."""
    old = root / "patient002"
    new = root / "Patient002"
    old.rename(new)
    for f in new.iterdir():
        f.rename(new / f.name.replace("patient002", "Patient002"))


def _stray_folder(root: Path) -> None:
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a patient")


def accepted_acdc(edit: Callable[[Path], None], expect: str) -> Callable[[Path, Path], Run]:
    inner = acdc_case(edit)

    def build(tmp: Path, project: Path) -> Run:
        run = inner(tmp, project)

        def check() -> None:
            split = yaml.safe_load((tmp / "prep" / "split.json").read_text())
            names = sorted(n for members in split["patients"].values() for n in members)
            assert names == sorted(expect.split(","))

        return Run(run.argv, [], stage=run.stage, params=run.params, check=check)

    return build


# ---------------------------------------------------------------------------- ingest: fastMRI


def fastmri_case(edit: Callable[[Path], None]) -> Callable[[Path, Path], Run]:
    def build(tmp: Path, project: Path) -> Run:
        raw = tmp / "raw"
        write_fastmri_folder(raw)
        edit(raw)
        return Run(["--task", "reconstruction", "--out", "prep"], [tmp / "prep"],
                   stage="stages.ingest", params=recon_params(raw))  # fmt: skip

    return build


def _fm_edit(name: str, fn: Callable[[np.ndarray], np.ndarray], **extra) -> Callable[[Path], None]:
    def edit(raw: Path) -> None:
        with h5py.File(raw / name, "r") as f:
            k = f["kspace"][()]
        rewrite_kspace(raw / name, fn(k), **{key: v(k) for key, v in extra.items()})

    return edit


def _fm_two_bad(raw: Path) -> None:
    _fm_edit("file_0.h5", np.zeros_like)(raw)
    _fm_edit("file_2.h5", lambda k: k[:, 0])(raw)


def _fm_duplicate(raw: Path) -> None:
    shutil.copy(raw / "file_0.h5", raw / "file_3.h5")


def _fm_variants(raw: Path) -> None:
    (raw / "file_1.h5").rename(raw / "file_1.H5")
    (raw / "file_2.h5").rename(raw / "file_2.hdf5")
    (raw / "notes.txt").write_text("skipped, and named in a warning")


def _fm_same_stem(raw: Path) -> None:
    shutil.copy(raw / "file_1.h5", raw / "file_1.hdf5")


def _fm_small(raw: Path) -> None:
    write_fastmri(raw / "file_9.h5", np.ones((1, 4, 10, 10), np.complex64))


def accepted_fastmri(edit: Callable[[Path], None]) -> Callable[[Path, Path], Run]:
    inner = fastmri_case(edit)

    def build(tmp: Path, project: Path) -> Run:
        run = inner(tmp, project)

        def check() -> None:
            split = yaml.safe_load((tmp / "prep" / "split.json").read_text())
            names = sorted(n for members in split["volumes"].values() for n in members)
            assert names == ["file_0", "file_1", "file_2"]

        return Run(run.argv, [], stage=run.stage, params=run.params, check=check)

    return build


# ---------------------------------------------------------------------------- other stages


def _evaluate_poisoned(tmp: Path, project: Path) -> Run:
    ckpt = tmp / "best.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "spec": Poison(tmp / MARKER_NAME)}, ckpt)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    argv = [
        "--name",
        "segmentation-unet",
        "--checkpoint",
        str(ckpt),
        "--data",
        "prep",
        "--out",
        "ev",
    ]
    return Run(
        argv, [tmp / "ev", tmp / MARKER_NAME], [ckpt], stage="stages.evaluate", params=params
    )


def _evaluate_missing(tmp: Path, project: Path) -> Run:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    argv = [
        "--name",
        "segmentation-unet",
        "--checkpoint",
        "nope/best.pt",
        "--data",
        "prep",
        "--out",
        "ev",
    ]
    return Run(argv, [tmp / "ev"], stage="stages.evaluate", params=params)


def _train_missing_data(tmp: Path, project: Path) -> Run:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    argv = ["--name", "segmentation-unet", "--train", "missing.h5", "--val", "missing.h5",
            "--out", "m", "--history", "h.csv"]  # fmt: skip
    return Run(argv, [tmp / "m", tmp / "h.csv"], stage="stages.train", params=params)


def _ingest_unknown_task(tmp: Path, project: Path) -> Run:
    return Run(["--task", "dicom", "--out", "prep"], [tmp / "prep"], stage="stages.ingest",
               params=yaml.safe_load((ROOT / "params.yaml").read_text()))  # fmt: skip


ROOT = Path(__file__).resolve().parents[1]
ACDC_TEMPLATE: Path  # set by the module fixture

Z = np.zeros
CASES = [
    # --- predict: never overwrite what the user gave -----------------------------------
    Case("seg-output-is-input", _same_path, 2, ("scan.nii.gz", "never overwrites")),
    Case("seg-output-resolves-to-input", _dotted_path, 2, ("never overwrites",)),
    Case("seg-output-symlink-to-input", _symlink, 2, ("link.nii.gz", "never overwrites")),
    Case("seg-output-hardlink-to-input", _hardlink, 2, ("hard.nii.gz", "never overwrites")),
    Case("seg-output-locked-by-another-run", _locked, 2, ("labels.nii.gz", "another run")),
    Case("seg-stale-temporary-cleaned", _stale_tmp, 0),
    Case("seg-output-folder-is-a-file", _parent_is_a_file, 2, ("results", "cannot write")),
    Case(
        "seg-output-wrong-suffix",
        lambda t, p: Run(
            predict_seg(scan(t / "s.nii.gz"), t / "l.png", "--root", str(p)),
            [t / "l.png"],
            [t / "s.nii.gz"],
        ),
        2,
        ("--output", ".nii"),
    ),  # fmt: skip
    # --- predict: untrusted checkpoint -------------------------------------------------------
    Case("seg-poisoned-checkpoint", _poisoned, 2, ("best.pt", "posix.system", "refused")),
    # --- predict segmentation: implausible input ---------------------------------------
    Case(
        "seg-micrometre-spacing",
        seg(lambda t: scan(t / "um.nii.gz", (1580.0, 1580.0, 8.0))),
        2,
        ("um.nii.gz", "1580"),
    ),  # fmt: skip
    Case("seg-pixdim-zero", seg(_pixdim_zero), 2, ("pixdim0.nii", "zooms")),
    Case(
        "seg-spacing-too-fine",
        seg(lambda t: scan(t / "fine.nii.gz", (0.001, 0.001, 8.0))),
        2,
        ("fine.nii.gz", "0.001"),
    ),  # fmt: skip
    Case(
        "seg-slice-thickness-500mm",
        seg(lambda t: scan(t / "thick.nii.gz", (1.5, 1.5, 500.0))),
        2,
        ("thick.nii.gz", "dz = 500"),
    ),  # fmt: skip
    Case(
        "seg-resampled-too-large",
        seg(lambda t: scan(t / "fov.nii.gz", (19.0, 19.0, 8.0), (1000, 8, 1))),
        2,
        ("fov.nii.gz", "resampled"),
    ),  # fmt: skip
    Case(
        "seg-one-voxel",
        seg(lambda t: scan(t / "one.nii.gz", shape=(1, 1, 1))),
        2,
        ("one.nii.gz", "in-plane size 1 x 1"),
    ),  # fmt: skip
    Case("seg-label-map-as-image", seg(_label_map), 2, ("frame01_gt.nii.gz", "label map")),
    Case("seg-huge-header", seg(_huge_header), 2, ("huge.nii", "400,000,000,000 voxels")),
    Case(
        "seg-constant-image",
        seg(lambda t: nifti(t / "flat.nii.gz", np.zeros((30, 30, 2), np.float32))),
        2,
        ("flat.nii.gz", "constant"),
    ),
    Case(
        "seg-nan-intensities",
        seg(lambda t: nifti(t / "nan.nii", np.full((20, 20, 2), np.nan, np.float32))),
        2,
        ("nan.nii", "finite"),
    ),  # fmt: skip
    Case(
        "seg-corrupt-nifti",
        seg(lambda t: _bytes(t / "bad.nii.gz", b"\x1f\x8bxx")),
        2,
        ("bad.nii.gz", "corrupt"),
    ),  # fmt: skip
    Case("seg-missing-input", seg(lambda t: t / "absent.nii.gz"), 2, ("absent.nii.gz",)),
    Case(
        "seg-hdf5-input",
        seg(lambda t: recon_file(t)[0]),
        2,
        ("file_brain_tiny.h5", "wrong file type"),
    ),
    Case(
        "seg-png-mask-as-image",
        seg(lambda t: _png(t, np.repeat(np.arange(4, dtype=np.uint8), 10)[None].repeat(30, 0))),
        2,
        ("slice.png", "label map"),
    ),  # fmt: skip
    Case(
        "seg-png-2x2",
        seg(lambda t: _png(t, np.array([[0, 90], [200, 255]], np.uint8))),
        2,
        ("slice.png", "too small"),
    ),  # fmt: skip
    Case(
        "seg-pixel-mm-micrometres",
        seg(
            lambda t: _png(t, (np.arange(900) % 251).astype(np.uint8).reshape(30, 30)),
            "--pixel-mm",
            "1580",
        ),
        2,
        ("--pixel-mm", "1580"),
    ),  # fmt: skip
    Case(
        "seg-pixel-mm-zero",
        seg(
            lambda t: _png(t, (np.arange(900) % 251).astype(np.uint8).reshape(30, 30)),
            "--pixel-mm",
            "0",
        ),
        2,
        ("--pixel-mm",),
    ),  # fmt: skip
    # --- predict reconstruction ---------------------------------------------------------
    Case("recon-output-is-input", recon(same=True), 2, ("file_brain_tiny.h5", "never overwrites")),
    Case("recon-all-zero-kspace", recon(_zero), 2, ("file_brain_tiny.h5", "all zero")),
    Case("recon-zero-slice", recon(_zero_slice), 2, ("file_brain_tiny.h5", "slice 1")),
    Case("recon-kspace-x1e30-handled", recon_scaled(1e30), 0),
    Case("recon-kspace-x1e-30-handled", recon_scaled(1e-30), 0),
    Case(
        "recon-3d-kspace-single-coil",
        recon(_single_coil),
        2,
        ("file_brain_tiny.h5", "single-coil", "multi-coil"),
    ),  # fmt: skip
    Case(
        "recon-two-coils", recon(_few_coils), 2, ("file_brain_tiny.h5", "has 2 coils", "multi-coil")
    ),
    Case(
        "recon-mask-without-sampled-line",
        recon(_empty_mask),
        2,
        ("file_brain_tiny.h5", "at least one sampled line"),
    ),  # fmt: skip
    Case(
        "recon-huge-kspace", recon(_huge_kspace), 2, ("file_brain_tiny.h5", "34,359,738,368 values")
    ),
    Case("recon-nan-kspace", recon(_nan), 2, ("file_brain_tiny.h5", "finite")),
    Case("recon-real-kspace", recon(_real), 2, ("file_brain_tiny.h5", "complex")),
    Case("recon-no-kspace", recon(_no_kspace), 2, ("file_brain_tiny.h5", "'kspace'")),
    Case(
        "recon-mask-without-centre-line",
        recon(_no_centre_line),
        2,
        ("file_brain_tiny.h5", "centre column 12"),
    ),
    Case(
        "recon-undersampled-wrong-width",
        recon(_narrow_undersampled),
        2,
        ("file_brain_tiny.h5", "width 24"),
    ),  # fmt: skip
    Case(
        "recon-nifti-input",
        lambda t, p: Run(
            predict_recon(scan(t / "s.nii.gz"), t / "r.h5", "--root", str(p)),
            [t / "r.h5"],
            [t / "s.nii.gz"],
        ),
        2,
        ("s.nii.gz", "wrong file type"),
    ),  # fmt: skip
    # --- ingest, ACDC / phantom layout: the whole dataset first --------------------------
    Case(
        "acdc-two-bad-files-one-message",
        acdc_case(_bad_label_and_corrupt),
        2,
        ("patient001_frame01.nii.gz", "patient003_frame01_gt.nii.gz", "2 problems"),
    ),  # fmt: skip
    Case(
        "acdc-micrometre-spacing",
        acdc_case(_micrometre),
        2,
        ("patient002_frame01.nii.gz", "implausible"),
    ),
    Case(
        "acdc-pixdim-zero", acdc_case(_acdc_pixdim_zero), 2, ("patient002_frame01.nii.gz", "zooms")
    ),
    Case(
        "acdc-same-scan-two-ids",
        acdc_case(_duplicate_scan),
        2,
        ("patient001", "patient003", "same scan"),
    ),
    Case(
        "acdc-gt-as-image", acdc_case(_gt_as_image), 2, ("patient002_frame01.nii.gz", "label map")
    ),
    Case(
        "acdc-one-voxel", acdc_case(_one_voxel), 2, ("patient001_frame01.nii.gz", "in-plane size")
    ),
    Case(
        "acdc-constant-image",
        acdc_case(_constant_image),
        2,
        ("patient003_frame01.nii.gz", "constant"),
    ),
    Case("acdc-missing-gt", acdc_case(_missing_gt), 2, ("patient002_frame01_gt.nii.gz",)),
    Case("acdc-nan-image", acdc_case(_nan_image), 2, ("patient001_frame01.nii.gz", "finite")),
    Case(
        "acdc-shape-mismatch",
        acdc_case(_shape_mismatch),
        2,
        ("patient003_frame01_gt.nii.gz", "shape"),
    ),
    Case("acdc-bad-spacing-param", acdc_case(lambda r: None, spacing_mm=-1.0), 2, ("spacing_mm",)),
    Case(
        "acdc-capital-patient-accepted",
        accepted_acdc(_capital_patient, "Patient002,patient001,patient003"),
        0,
    ),  # fmt: skip
    Case(
        "acdc-stray-folder-skipped",
        accepted_acdc(_stray_folder, "patient001,patient002,patient003"),
        0,
    ),
    # --- ingest, fastMRI --------------------------------------------------------------------
    Case(
        "fastmri-all-zero-kspace",
        fastmri_case(_fm_edit("file_1.h5", np.zeros_like)),
        2,
        ("file_1.h5", "all zero"),
    ),  # fmt: skip
    Case(
        "fastmri-two-bad-files-one-message",
        fastmri_case(_fm_two_bad),
        2,
        ("file_0.h5", "file_2.h5", "2 problems", "single-coil"),
    ),  # fmt: skip
    Case(
        "fastmri-same-scan-two-names",
        fastmri_case(_fm_duplicate),
        2,
        ("file_0.h5", "file_3.h5", "same scan"),
    ),
    Case("fastmri-same-volume-name", fastmri_case(_fm_same_stem), 2, ("file_1.h5", "file_1.hdf5")),
    Case("fastmri-too-small", fastmri_case(_fm_small), 2, ("file_9.h5", "at least 16 x 16")),
    Case(
        "fastmri-undersampled",
        fastmri_case(
            _fm_edit("file_2.h5", lambda k: k, mask=lambda k: np.arange(k.shape[-1]) % 2 == 0)
        ),
        2,
        ("file_2.h5", "undersampled"),
    ),  # fmt: skip
    Case(
        "fastmri-empty-mask",
        fastmri_case(
            _fm_edit("file_2.h5", lambda k: k, mask=lambda k: np.zeros(k.shape[-1], bool))
        ),
        2,
        ("file_2.h5", "sampled line"),
    ),  # fmt: skip
    Case("fastmri-H5-and-hdf5-accepted", accepted_fastmri(_fm_variants), 0),
    # --- other stage CLIs ----------------------------------------------------------------------
    Case("evaluate-poisoned-checkpoint", _evaluate_poisoned, 2, ("best.pt", "posix.system")),
    Case("evaluate-missing-checkpoint", _evaluate_missing, 2, ("nope/best.pt", "not found")),
    Case("train-missing-data", _train_missing_data, 2, ("missing.h5",)),
    Case("ingest-unknown-task", _ingest_unknown_task, 2, ("dicom",)),
]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    global ACDC_TEMPLATE
    ACDC_TEMPLATE = tmp_path_factory.mktemp("acdc") / "acdc"
    write_acdc_phantom(ACDC_TEMPLATE, n_patients=3, seed=0, write_4d=False)
    return make_project(tmp_path_factory.mktemp("project"))


def cli_main_code(argv: list[str]) -> int:
    try:
        cli_main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def run_case(run: Run, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    if run.stage is None:
        return cli_main_code(run.argv)
    (tmp / "params.yaml").write_text(yaml.safe_dump(run.params))
    monkeypatch.chdir(tmp)
    monkeypatch.setattr(sys, "argv", [run.stage, *run.argv])
    try:
        importlib.import_module(run.stage).main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, project: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    tmp = tmp_path / "case"
    tmp.mkdir()
    run = case.build(tmp, project)
    before = {p: _digest(p) for p in run.inputs}
    listing = sorted(p.name for p in tmp.iterdir())
    try:
        code = run_case(run, tmp, monkeypatch)
    finally:
        while _HELD:
            os.close(_HELD.pop())
    err = capsys.readouterr().err
    assert code == case.code, err
    assert "Traceback" not in err
    if case.code == 0:
        assert run.check is not None
        run.check()
        return
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip() == errors[0], err  # one line, nothing else
    for needle in case.needles:
        assert needle in errors[0], errors[0]
    for out in run.outputs:  # nothing written: no output, no marker of executed code
        assert not out.exists(), out
    for p, digest in before.items():
        assert _digest(p) == digest, f"{p} changed"
    leftovers = [p.name for p in tmp.rglob(".*") if p.name.endswith((".tmp", ".lock"))]
    if case.id != "seg-output-locked-by-another-run":  # that lock belongs to the other run
        assert not leftovers, leftovers
    new = sorted(p.name for p in tmp.iterdir())
    assert set(new) - set(listing) <= {"params.yaml"}, new


def test_the_catalogue_covers_every_class() -> None:
    """At least 40 cases over predict (both tasks), ingest (both sources) and stage CLIs."""
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    prefixes = {c.id.split("-")[0] for c in CASES}
    assert {"seg", "recon", "acdc", "fastmri", "evaluate", "train", "ingest"} <= prefixes


def test_registry_pyfunc_refuses_a_poisoned_member(project: Path, tmp_path: Path) -> None:
    """The MLflow pyfunc loads its members through the same safe loader."""
    from types import SimpleNamespace

    from stages.registry import EnsembleModel

    bundle = tmp_path / "bundle"
    shutil.copytree(project, bundle)
    (bundle / "task.json").write_text('{"task": "segmentation"}')
    ckpt = bundle / "models" / "segmentation" / "small" / "best.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "x": Poison(tmp_path / MARKER_NAME)}, ckpt)
    with pytest.raises(DataError, match=r"small/best.pt: refused.*posix.system"):
        EnsembleModel().load_context(SimpleNamespace(artifacts={"project": str(bundle)}))
    assert not (tmp_path / MARKER_NAME).exists()


def test_checkpoints_the_engine_writes_still_load(tmp_path: Path) -> None:
    """fit's best.pt / last.pt (optimizer, scheduler, scaler, rng, history) load safely."""
    from test_train import run

    from mri_ensemble.train import load_checkpoint, load_model

    run(tmp_path, epochs=1, scheduler="step", step_epochs=(1,))
    for name in ("best.pt", "last.pt"):
        assert load_checkpoint(tmp_path / name)["epoch"] == 1
    model, _ = load_model(tmp_path / "best.pt")
    assert model(torch.zeros(1, 1, 16, 16)).shape == (1, 4, 16, 16)


def test_help_says_what_happens_to_the_output(capsys) -> None:
    assert cli_main_code(["predict", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "missing parent folders are created" in text and "never the input" in text
