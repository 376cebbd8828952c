"""Predict library and CLI: geometry kept, ensemble = weighted members, one-line errors."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from tiny_project import (
    RECON_WEIGHTS,
    SEG_WEIGHTS,
    fastmri_file,
    make_project,
    oblique_affine,
    phantom_nifti,
)
from torch import nn

from mri_ensemble import ensemble, inference
from mri_ensemble import project as layout
from mri_ensemble.cli import main
from mri_ensemble.data.fastmri import prepare_volume, read_fastmri, write_fastmri
from mri_ensemble.data.grid import (
    center_crop_or_pad,
    from_grid,
    labels_to_grid,
    resample_inplane,
    to_grid,
)
from mri_ensemble.ensemble import combine, combine_images
from mri_ensemble.ensemble.uncertainty import image_variance
from mri_ensemble.errors import ConfigError, DataError
from mri_ensemble.mri.fft import ifft2c, rss
from mri_ensemble.mri.masks import MaskSpec, volume_mask
from mri_ensemble.tasks import reconstruction as rec
from mri_ensemble.tasks import segmentation as seg


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_project(tmp_path_factory.mktemp("project"))
    phantom_nifti(root)
    fastmri_file(root)
    return root


def run_cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``mri-ensemble`` run in this process."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


class Levels(nn.Module):
    """x (N, 1, H, W) in [0, 1] -> logits (N, 4, H, W) peaking at the nearest of 0, 1/3, 2/3, 1:
    a "network" whose labels are known, to check the geometry of pre- and post-processing."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("levels", torch.linspace(0, 1, 4).view(1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -((x - self.levels) ** 2) * 1000.0


def levels_predictor(size: int, spacing_mm: float) -> inference.Predictor:
    settings = {"source": "phantom", "size": size, "spacing_mm": spacing_mm}
    return inference.Predictor(
        "segmentation", [inference.Member("levels", Levels())], settings, "levels"
    )


def near_edges(levels: np.ndarray, px: int) -> np.ndarray:
    """Pixels within ``px`` in-plane pixels of a change of level (axes 0, 1 of (x, y, z))."""
    edges = np.zeros(levels.shape, bool)
    for axis in (0, 1):
        d = np.diff(levels, axis=axis) != 0
        pad = [(0, 0)] * 3
        pad[axis] = (0, 1)
        edges |= np.pad(d, pad)
        pad[axis] = (1, 0)
        edges |= np.pad(d, pad)
    return ndimage.binary_dilation(edges, np.ones((3, 3, 1), bool), iterations=px)


def test_labels_come_back_on_the_input_grid_through_crop_pad_and_resampling(tmp_path: Path):
    # x (columns) 40 px of 1.2 mm -> 30 px at 1.6 mm, padded to 40; y (rows) 130 px of 0.9 mm
    # -> 73 px, cropped to 40: only y rows ~29..97 are in the network's field of view
    levels = np.zeros((40, 130, 3), np.float32)  # (x, y, z)
    levels[5:20, 40:60] = 1
    levels[22:35, 45:75] = 2
    levels[8:30, 70:95] = 3
    levels[10:30, 3:18] = 3  # outside the field of view: must come back as background
    zooms = (1.2, 0.9, 8.0)
    img = nib.Nifti1Image(levels, oblique_affine(zooms))
    path = tmp_path / "levels.nii"
    nib.save(img, path)

    result = seg.segment_nifti(levels_predictor(40, 1.6), path)

    assert result.labels.shape == levels.shape and result.labels.dtype == np.uint8
    assert result.spacing == pytest.approx((8.0, 0.9, 1.2))
    expected = levels.astype(np.uint8)
    expected[:, :29] = 0
    expected[:, 98:] = 0
    wrong = result.labels != expected
    assert wrong.mean() < 0.06  # linear resampling blurs edges (a 3 -> 0 step passes 2, 1)
    # every disagreement sits at a level edge or the field-of-view border (resampling)
    fov = np.zeros_like(expected)
    fov[:, 29:98] = 1
    assert not (wrong & ~near_edges(levels, 2) & ~near_edges(fov.astype(float), 2)).any()
    assert (result.labels[:, :26] == 0).all() and (result.labels[:, 101:] == 0).all()


def test_label_mapping_exactly_inverts_ingest_geometry():
    """Network-grid labels -> input grid -> ingest's own forward for labels (the same
    :mod:`~mri_ensemble.data.grid` pair) gives the same labels back, pixel for pixel (input
    pixels smaller than the network's: y 0.9 mm cropped, x 1.2 mm padded, to 40 px of 1.6 mm)."""
    slices = np.zeros((2, 130, 40), np.float32)  # (S, H, W): only the grid matters
    _, g = to_grid(slices, (0.9, 1.2), 40, 1.6)
    assert g.resampled_hw == (73, 30)  # H cropped to 40, W padded to 40 (5 + 30 + 5)
    net = np.random.default_rng(0).integers(0, 4, (2, 40, 40)).astype(np.uint8)
    back = from_grid(net, g)
    assert back.shape == slices.shape and back.dtype == np.uint8
    again = labels_to_grid(back, g)
    np.testing.assert_array_equal(again[:, :, 5:35], net[:, :, 5:35])
    assert (again[:, :, :5] == 0).all() and (again[:, :, 35:] == 0).all()
    # the labels functions are the ones the primitives compose (ingest used them inline)
    inline = center_crop_or_pad(resample_inplane(back, (0.9, 1.2), 1.6, order=0), 40, fill=0)
    np.testing.assert_array_equal(again, inline)


@pytest.mark.parametrize("spacing_hw", [(1.25, 1.25), (1.6, 1.6), (0.7, 2.3)])
def test_grid_round_trip_keeps_every_label_inside_the_field_of_view(spacing_hw):
    """Input labels -> network grid -> back: unchanged wherever the network sees them (the
    whole image when it fits; nearest neighbour both ways, pixel centres aligned)."""
    rng = np.random.default_rng(1)
    labels = np.kron(rng.integers(0, 4, (3, 8, 6)), np.ones((1, 4, 4), np.int64)).astype(np.uint8)
    _, g = to_grid(labels.astype(np.float32), spacing_hw, 64, 1.25)
    back = from_grid(labels_to_grid(labels, g), g)
    assert back.shape == labels.shape
    if spacing_hw == (1.25, 1.25):  # same pixel size, padded only: exact
        np.testing.assert_array_equal(back, labels)
    else:  # resampled twice with nearest neighbour: only the blocks' edges may move
        assert (back != labels).mean() < 0.2


def test_ingest_brings_a_scan_to_the_grid_predict_uses(tmp_path: Path):
    """ACDC ingest and predict share one forward: a phantom frame read by ingest equals
    :func:`to_grid` / :func:`labels_to_grid` on the raw NIfTI arrays."""
    from mri_ensemble.data.acdc import read_patient
    from mri_ensemble.data.phantom import write_acdc_phantom

    write_acdc_phantom(tmp_path / "acdc", n_patients=1, seed=2, n_frames=2, write_4d=False)
    folder = tmp_path / "acdc" / "training" / "patient001"
    ed = read_patient(folder, size=40, spacing_mm=1.6)[0]
    img = nib.load(folder / "patient001_frame01.nii.gz")
    gt = nib.load(folder / "patient001_frame01_gt.nii.gz")
    dx, dy, _ = (round(float(z), 6) for z in img.header.get_zooms()[:3])  # as ingest reads them
    slices = np.transpose(np.asarray(img.dataobj, np.float32), (2, 1, 0))
    images, g = to_grid(slices, (dy, dx), 40, 1.6)
    labels = labels_to_grid(np.transpose(np.asarray(gt.dataobj), (2, 1, 0)), g)
    np.testing.assert_array_equal(ed.image, images)
    np.testing.assert_array_equal(ed.label, labels)


def test_segment_nifti_cli_keeps_affine_header_and_shape(project: Path, capsys, tmp_path: Path):
    scan = project / "scan.nii.gz"
    out = tmp_path / "labels.nii.gz"
    code, stdout, err = run_cli(
        capsys, "predict", "--task", "segmentation", "--input", scan, "--output", out,
        "--root", project, "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert "wrote" in stdout and "ensemble" in stdout
    src, lab = nib.load(scan), nib.load(out)
    assert lab.shape == src.shape
    assert np.array_equal(lab.affine, src.affine)
    assert np.allclose(lab.header.get_zooms(), src.header.get_zooms())
    assert int(lab.header["sform_code"]) == 2 and int(lab.header["qform_code"]) == 1
    assert np.allclose(lab.header.get_qform(), src.header.get_qform(), atol=1e-5)
    data = np.asarray(lab.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1, 2, 3}
    # the entropy map beside it: float32 nats on the same grid, highest where labels change
    side = nib.load(tmp_path / "labels_uncertainty.nii.gz")
    unsure = np.asarray(side.dataobj)
    assert side.shape == src.shape and np.array_equal(side.affine, src.affine)
    assert unsure.dtype == np.float32 and 0 <= unsure.min() and unsure.max() <= np.log(4) + 1e-5
    edges = near_edges(data.astype(float), 1)
    assert unsure[edges].mean() > unsure[~edges].mean()


def test_2d_and_4d_nifti_and_uncompressed_output(project: Path, tmp_path: Path):
    predictor = inference.load_predictor(project, "segmentation", "unet", "cpu")
    src = nib.load(project / "scan.nii.gz")
    data = np.asarray(src.dataobj)
    cine = tmp_path / "cine.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([data, data[::-1]], axis=-1), src.affine), cine)
    result = seg.segment_nifti(predictor, cine)
    assert result.labels.shape == data.shape  # the first frame's
    first = seg.segment_nifti(predictor, project / "scan.nii.gz")
    assert np.array_equal(result.labels, first.labels)

    flat = tmp_path / "slice.nii"
    nib.save(nib.Nifti1Image(data[..., 4], src.affine), flat)
    result = seg.segment_nifti(predictor, flat)
    assert result.labels.shape == data.shape[:2]
    seg.save_labels_nifti(result.labels, result.scan, tmp_path / "out.nii")  # type: ignore[arg-type]
    back = nib.load(tmp_path / "out.nii")
    assert back.shape == data.shape[:2] and np.array_equal(back.affine, src.affine)


def test_png_slice_labels_have_the_image_size(tmp_path: Path):
    levels = np.zeros((50, 70), np.uint8)  # (H, W)
    levels[10:30, 10:30] = 1
    levels[15:45, 35:60] = 3
    path = tmp_path / "slice.png"
    Image.fromarray(levels * 85).save(path)
    predictor = levels_predictor(32, 1.6)
    result = seg.segment_image(predictor, path)
    assert result.labels.shape == levels.shape
    wrong = result.labels != levels
    assert not (wrong & ~near_edges(levels[..., None].astype(float), 2)[..., 0]).any()
    out = tmp_path / "labels.png"
    seg.save_labels_png(result.labels, out)
    assert np.array_equal(np.asarray(Image.open(out)), result.labels)
    # with a pixel size it is resampled and cropped like a NIfTI slice
    resampled = seg.segment_image(predictor, path, pixel_mm=1.0)
    assert resampled.labels.shape == levels.shape
    assert (resampled.labels[:, :4] == 0).all()  # 70 px of 1 mm > 32 px of 1.6 mm: cropped


def test_segmentation_ensemble_is_the_weighted_mean_of_its_members(project: Path):
    ensemble = inference.load_predictor(project, "segmentation")
    assert ensemble.name == layout.ENSEMBLE
    assert [m.name for m in ensemble.members] == list(SEG_WEIGHTS)
    images = np.random.default_rng(0).random((5, 32, 32), dtype=np.float32)
    probs = seg.ensemble_probabilities(ensemble, images, batch_size=2)
    members = [
        seg.ensemble_probabilities(inference.load_predictor(project, "segmentation", m), images)
        for m in SEG_WEIGHTS
    ]
    expected = combine(np.stack(members), np.array(list(SEG_WEIGHTS.values())))
    assert probs.shape == (5, 4, 32, 32)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    labels, unsure = seg.labels_and_uncertainty(ensemble, images, batch_size=2)
    np.testing.assert_array_equal(labels, expected.argmax(1))
    np.testing.assert_allclose(unsure, -(expected * np.log(expected)).sum(1), atol=1e-5)
    assert not np.allclose(members[0], members[1], atol=1e-3)  # the members do differ


def _with_ensemble(project: Path, tmp_path: Path, task: str, report: dict) -> Path:
    """A copy of ``project`` whose ``reports/<task>/ensemble.json`` is ``report``."""
    root = tmp_path / "variant"
    shutil.copytree(project / "models", root / "models")
    shutil.copy(project / "params.yaml", root)
    (root / "reports" / task).mkdir(parents=True)
    (root / "reports" / task / "ensemble.json").write_text(json.dumps(report))
    return root


def test_per_class_weights_and_majority_vote(project: Path, tmp_path: Path):
    vote = ensemble.vote
    names = ["background", "RV", "myocardium", "LV"]
    per_class = {
        "unet": dict(zip(names, [0.5, 0.1, 0.9, 0.3], strict=True)),
        "small": dict.fromkeys(names, 0.5),
    }
    images = np.random.default_rng(1).random((3, 32, 32), dtype=np.float32)
    members = np.stack(
        [
            seg.ensemble_probabilities(inference.load_predictor(project, "segmentation", m), images)
            for m in ("unet", "small")
        ]
    )
    root = _with_ensemble(
        project, tmp_path, "segmentation", {"method": "per_class", "weights": per_class}
    )
    predictor = inference.load_predictor(root, "segmentation")
    assert predictor.weights.shape == (2, 4)
    matrix = np.array([[per_class[m][c] for c in names] for m in ("unet", "small")])
    np.testing.assert_array_equal(
        seg.ensemble_labels(predictor, images), combine(members, matrix).argmax(1)
    )
    (root / "reports" / "segmentation" / "ensemble.json").write_text(
        json.dumps({"method": "vote", "weights": {"unet": 0.5, "small": 0.5}})
    )
    predictor = inference.load_predictor(root, "segmentation")
    assert "majority vote" in predictor.describe()
    np.testing.assert_array_equal(seg.ensemble_labels(predictor, images), vote(members))
    with pytest.raises(ConfigError, match="majority-vote"):
        seg.ensemble_probabilities(predictor, images)


def test_reconstruction_ensembles_take_one_weight_per_model(project: Path, tmp_path: Path):
    weights = {"varnet": {"a": 1.0}, "attention_unet": {"a": 1.0}}
    root = _with_ensemble(project, tmp_path, "reconstruction", {"method": "x", "weights": weights})
    with pytest.raises(DataError, match="one weight per model"):
        inference.load_predictor(root, "reconstruction")


def test_members_below_min_weight_are_not_run(project: Path, tmp_path: Path):
    weights = {"unet": 1e-12, "small": 1.0}
    root = _with_ensemble(project, tmp_path, "segmentation", {"method": "x", "weights": weights})
    assert [m.name for m in inference.load_predictor(root, "segmentation").members] == ["small"]


def test_reconstruction_cli_writes_the_submission_layout(project: Path, capsys, tmp_path: Path):
    out = tmp_path / "recon.h5"
    code, stdout, err = run_cli(
        capsys, "predict", "--task", "reconstruction", "--input",
        project / "file_brain_AXT1_tiny.h5", "--output", out, "--root", project, "--ensemble",
    )  # fmt: skip
    assert code == 0, err
    assert "2 slices 32x24" in stdout
    with h5py.File(out, "r") as hf:
        recon = hf["reconstruction"][()]
        attrs = dict(hf.attrs)
    assert recon.shape == (2, 32, 24) and recon.dtype == np.float32
    with h5py.File(out, "r") as hf:
        assert (
            hf["uncertainty"].shape == recon.shape and "variance" in hf["uncertainty"].attrs["kind"]
        )
    assert attrs["model"] == "ensemble" and attrs["mask_source"] == "params"
    total = sum(RECON_WEIGHTS.values())
    assert json.loads(attrs["weights"]) == pytest.approx(
        {m: w / total for m, w in RECON_WEIGHTS.items()}
    )


def test_reconstruction_ensemble_mask_zero_filled_and_target(project: Path):
    path = project / "file_brain_AXT1_tiny.h5"
    ensemble = inference.load_predictor(project, "reconstruction")
    result = rec.reconstruct_file(ensemble, path)
    spec = MaskSpec("equispaced_fraction", (0.25,), (2,))
    assert np.array_equal(result.mask, volume_mask(spec, 24, 3, path.stem))  # as ingest draws it
    assert result.acceleration == pytest.approx(24 / result.mask.sum())
    assert result.target is not None and result.target.shape == (2, 32, 24)
    assert result.zero_filled.shape == (2, 32, 24)
    members = [
        rec.reconstruct_file(
            inference.load_predictor(project, "reconstruction", m), path
        ).reconstruction
        for m in RECON_WEIGHTS
    ]
    expected = combine_images(np.stack(members), np.array(list(RECON_WEIGHTS.values())))
    np.testing.assert_allclose(result.reconstruction, expected, rtol=1e-5, atol=1e-6)
    spread = image_variance(np.stack(members), np.array(list(RECON_WEIGHTS.values())))
    assert result.uncertainty is not None and spread.max() > 0
    np.testing.assert_allclose(result.uncertainty, spread, rtol=1e-4, atol=1e-6 * spread.max())
    assert not np.allclose(members[0], members[1], rtol=1e-3)


def test_undersampled_file_uses_its_own_mask(project: Path, tmp_path: Path):
    path = shutil.copy(project / "file_brain_AXT1_tiny.h5", tmp_path / "test_file.h5")
    mask = np.zeros(24, bool)
    mask[::3] = True
    mask[9:15] = True
    with h5py.File(path, "a") as hf:
        hf["kspace"][...] = hf["kspace"][()] * mask
        hf["mask"] = mask
        del hf["reconstruction_rss"]  # a test file: no target
    predictor = inference.load_predictor(project, "reconstruction", "varnet")
    result = rec.reconstruct_file(predictor, Path(path))
    assert result.mask_source == "file" and np.array_equal(result.mask, mask)
    assert result.target is None
    f = read_fastmri(Path(path))
    kspace, _, _, _ = rec.prepare_input(f, predictor.settings, 0)
    assert np.abs(kspace[..., ~mask]).max() < 1e-4 * np.abs(kspace).max()  # lines stay missing
    np.testing.assert_allclose(result.zero_filled, rss(ifft2c(kspace)), rtol=1e-4, atol=1e-6)


def test_undersampled_file_of_another_width_is_refused(project: Path, tmp_path: Path):
    path = tmp_path / "wide.h5"
    kspace = np.ones((1, 4, 32, 28), np.complex64)
    write_fastmri(path, kspace)
    with h5py.File(path, "a") as hf:
        hf["mask"] = np.arange(28) % 2 == 0
    predictor = inference.load_predictor(project, "reconstruction", "varnet")
    with pytest.raises(DataError, match="already undersampled.*width 24"):
        rec.reconstruct_file(predictor, path)


def test_loading_errors_name_what_is_wrong(project: Path, tmp_path: Path):
    with pytest.raises(
        ConfigError, match="unknown segmentation model 'nope'; trained: small, unet"
    ):
        inference.load_predictor(project, "segmentation", "nope")
    empty = make_project(tmp_path / "empty", trained=False)
    with pytest.raises(DataError, match="no trained reconstruction models yet.*make run"):
        inference.load_predictor(empty, "reconstruction")
    assert layout.model_choices(empty, "segmentation") == []
    assert layout.model_choices(project, "segmentation") == ["ensemble", "small", "unet"]
    no_weights = tmp_path / "no_weights"
    shutil.copytree(project / "models", no_weights / "models")
    shutil.copy(project / "params.yaml", no_weights)
    with pytest.raises(DataError, match="no ensemble weights.*make run"):
        inference.load_predictor(no_weights, "segmentation")
    assert inference.load_predictor(no_weights, "segmentation", "unet").name == "unet"
    broken = tmp_path / "broken"
    shutil.copytree(no_weights, broken)
    (broken / "models" / "segmentation" / "unet" / "best.pt").write_bytes(b"not torch")
    with pytest.raises(DataError, match="best.pt: unreadable checkpoint"):
        inference.load_predictor(broken, "segmentation", "unet")


def _input(project: Path, tmp_path: Path, name: str, payload: bytes | None) -> Path:
    """``name`` in tmp_path holding ``payload`` (None: no file; b"copy": the project's file)."""
    path = tmp_path / name
    if payload == b"copy":
        shutil.copy(project / name, path)
    elif payload is not None:
        path.write_bytes(payload)
    return path


@pytest.mark.parametrize(
    ("task", "name", "payload", "out_name", "extra", "expected"),
    [
        ("segmentation", "missing.nii.gz", None, "o.nii.gz", (), "missing.nii.gz: input file not found"),
        ("segmentation", "bad.nii.gz", gzip.compress(b"x" * 400, mtime=0), "o.nii.gz", (), "bad.nii.gz: expected a readable NIfTI file, found a corrupt one"),
        ("segmentation", "bad.nii.gz", b"\x00" * 10, "o.nii.gz", (), "bad.nii.gz: expected a readable NIfTI file"),
        ("segmentation", "bad.png", b"\x89PNG\r\n\x1a\nbroken", "o.png", (), "bad.png: expected a readable PNG/JPEG image"),
        ("segmentation", "notes.txt", b"hello", "o.nii.gz", (), "notes.txt: wrong file type (.txt)"),
        ("segmentation", "scan.h5", b"\x89HDF\r\n\x1a\n", "o.nii.gz", (), "wrong file type for segmentation"),
        ("reconstruction", "bad.h5", b"not hdf5 at all", "o.h5", (), "bad.h5: expected a readable HDF5 file, found a corrupt"),
        ("reconstruction", "scan.nii.gz", b"", "o.h5", (), "wrong file type for reconstruction"),
        ("segmentation", "scan.nii.gz", b"copy", "o.nii.gz", ("--model", "nope"), "unknown segmentation model 'nope'; trained: small, unet"),
        ("segmentation", "scan.nii.gz", b"copy", "o.png", (), "--output"),
    ],
)  # fmt: skip
def test_cli_errors_are_one_line_and_exit_2(
    project: Path, tmp_path: Path, capsys, task, name, payload, out_name, extra, expected
):
    path = _input(project, tmp_path, name, payload)
    out = tmp_path / out_name
    code, _, err = run_cli(
        capsys, "predict", "--task", task, "--input", path, "--output", out,
        "--root", project, "--no-progress", *extra,
    )  # fmt: skip
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert expected in err
    assert not out.exists()


def test_cli_without_trained_models_names_the_training_command(tmp_path: Path, project: Path):
    """A real process: ``python -m mri_ensemble.cli`` as the console script runs it."""
    empty = make_project(tmp_path / "empty", trained=False)
    proc = subprocess.run(
        [sys.executable, "-m", "mri_ensemble.cli", "predict", "--task", "segmentation",
         "--input", str(project / "scan.nii.gz"), "--output", str(tmp_path / "o.nii.gz"),
         "--root", str(empty)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no trained segmentation models yet")
    assert "make run" in lines[0] and "python -m flows.pipeline" in lines[0]


def test_fused_reconstruction_gets_data_consistency_when_the_ensemble_chose_it(
    project: Path, tmp_path: Path
):
    """ensemble.json's ``data_consistency.on`` (chosen on val by ensemble@reconstruction)
    puts the acquired k-space lines back into the fused image; without it the fused image
    is the plain weighted sum (older files have no such key)."""
    from mri_ensemble.mri.consistency import consistent_image_np

    path = project / "file_brain_AXT1_tiny.h5"
    report = {"weights": RECON_WEIGHTS, "method": "random+nelder_mead"}
    plain = rec.reconstruct_file(inference.load_predictor(project, "reconstruction"), path)
    root = _with_ensemble(
        project, tmp_path, "reconstruction", {**report, "data_consistency": {"on": True}}
    )
    fused = inference.load_predictor(root, "reconstruction")
    assert fused.data_consistency
    dc = rec.reconstruct_file(fused, path)
    kspace, _ = prepare_volume(read_fastmri(path), (32, 24), 4)  # the predictor's grid
    masked = (kspace * plain.mask).astype(np.complex64)
    masks = np.repeat(plain.mask[None], len(masked), 0)
    expected = consistent_image_np(plain.reconstruction, masked, masks)
    np.testing.assert_allclose(dc.reconstruction, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(dc.reconstruction, plain.reconstruction, rtol=1e-3)
    single = inference.load_predictor(
        root, "reconstruction", "varnet"
    )  # one model: its own DC only
    assert not single.data_consistency


def test_cli_predicts_a_folder_loading_the_members_once(
    project: Path, tmp_path: Path, capsys, monkeypatch
):
    """``-i FOLDER -o FOLDER`` (nnU-Net's predict): one output per input under its own name,
    the members loaded once; a corrupt file gets nothing, is named, and the rest go on."""
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(project / "scan.nii.gz", scans / "a.nii.gz")
    nib.save(nib.load(project / "scan.nii.gz"), scans / "b.nii")  # its suffix is kept
    Image.fromarray((np.arange(64 * 48).reshape(48, 64) % 251).astype(np.uint8)).save(
        scans / "c.jpg"
    )
    (scans / "corrupt.nii.gz").write_bytes(gzip.compress(b"x" * 400, mtime=0))
    (scans / "notes.txt").write_text("not an input")  # not a segmentation input: ignored
    loads = []
    real = inference.load_predictor
    monkeypatch.setattr(inference, "load_predictor", lambda *a: loads.append(a) or real(*a))
    out = tmp_path / "labels"
    code, stdout, err = run_cli(
        capsys, "predict", "--task", "segmentation", "-i", scans, "-o", out, "--root", project,
        "--no-progress",
    )  # fmt: skip
    assert code == 2 and len(loads) == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "a.nii.gz", "a_uncertainty.nii.gz", "b.nii", "b_uncertainty.nii", "c.png",
        "c_uncertainty.png",
    ]  # fmt: skip
    assert "3 of 4 written" in stdout and "corrupt.nii.gz: expected a readable NIfTI" in stdout
    single = tmp_path / "single.nii.gz"
    assert run_cli(capsys, "predict", "--task", "segmentation", "--input", scans / "a.nii.gz",
                   "--output", single, "--root", project, "--no-progress")[0] == 0  # fmt: skip
    assert (out / "a.nii.gz").read_bytes() == single.read_bytes()
    assert not list(out.glob(".*"))  # no temporaries or locks left
    # several files (not a folder) go to a folder too; all good: exit 0
    code, stdout, _ = run_cli(
        capsys, "predict", "--task", "segmentation", "-i", scans / "a.nii.gz", scans / "c.jpg",
        "-o", tmp_path / "two", "--root", project, "--no-progress",
    )  # fmt: skip
    assert code == 0 and "2 of 2 written" in stdout
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "a.nii.gz", "a_uncertainty.nii.gz", "c.png", "c_uncertainty.png",
    ]  # fmt: skip


def test_cli_batch_errors_before_any_model_loads(project: Path, tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    code, _, err = run_cli(capsys, "predict", "--task", "reconstruction", "-i", empty, "-o",
                           tmp_path / "o", "--root", project)  # fmt: skip
    assert code == 2 and "no reconstruction inputs in this folder" in err
    afile = tmp_path / "taken.h5"
    afile.write_text("a file")
    shutil.copy(project / "file_brain_AXT1_tiny.h5", empty / "x.h5")
    code, _, err = run_cli(capsys, "predict", "--task", "reconstruction", "-i", empty, "-o",
                           afile, "--root", project)  # fmt: skip
    assert code == 2 and "expected a folder for 1 inputs, found a file" in err
    assert afile.read_text() == "a file"
