"""A tiny project folder for the predict / UI tests: params.yaml, untrained checkpoints in
the engine's format, ensemble weights, and inputs (a phantom NIfTI with a rotated,
translated affine; a fully sampled multi-coil file in the fastMRI layout).

Nothing here trains: shape and geometry tests need networks, not good ones.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from mri_ensemble.data.fastmri import write_fastmri
from mri_ensemble.data.phantom import write_acdc_phantom
from mri_ensemble.mri.fft import fft2c, ifft2c, rss
from mri_ensemble.train import CHECKPOINT_FORMAT, ModelSpec, save_checkpoint

PARAMS = """\
seed: 3
device: cpu
ingest:
  segmentation:
    source: phantom
    size: 32
    spacing_mm: 4.0
  reconstruction:
    source: simulated
    coils: 4
    size: [32, 24]
    mask: {kind: equispaced_fraction, center_fractions: [0.25], accelerations: [2]}
    grappa: {kernel_size: [3, 3], lamda: 0.01}
"""

SEG_MEMBERS = {
    "unet": ("unet", {"features": [4, 8], "dropout": 0.0}),
    "small": ("unet", {"features": [4, 8, 16], "dropout": 0.0, "convs": 1}),
}
SEG_WEIGHTS = {"unet": 0.25, "small": 0.75}
RECON_MEMBERS = {
    "varnet": (
        "varnet",
        {"cascades": 1, "chans": 4, "pools": 2, "sens_chans": 2, "sens_pools": 2},
        (2, 1),
    ),
    "attention_unet": (
        "recon_attention_unet",
        {"channels": [4, 8], "fc_hidden": 16},
        (2, 1),
    ),
}
RECON_WEIGHTS = {"varnet": 0.4, "attention_unet": 0.6}


def save_member(
    root: Path, task: str, name: str, arch: str, config: dict, channels: tuple[int, int], seed: int
) -> Path:
    """An untrained network saved as ``models/<task>/<name>/best.pt`` in the engine's format."""
    torch.manual_seed(seed)
    spec = ModelSpec(arch, config, *channels)
    model = spec.build()
    for p in model.parameters():  # zero-initialised heads would hide differences between members
        if p.dim() > 1 and not p.abs().sum():
            torch.nn.init.normal_(p, std=0.01)
    path = root / "models" / task / name / "best.pt"
    save_checkpoint(
        path,
        {
            "format": CHECKPOINT_FORMAT,
            "spec": asdict(spec),
            "meta": {"task": task, "model": name},
            "epoch": 1,
            "state_dict": model.state_dict(),
        },
    )
    return path


def make_project(root: Path, *, trained: bool = True) -> Path:
    """params.yaml; with ``trained`` also both tasks' members and ensemble weights."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(PARAMS)
    if not trained:
        return root
    for i, (name, (arch, cfg)) in enumerate(SEG_MEMBERS.items()):
        save_member(root, "segmentation", name, arch, cfg, (1, 4), seed=i)
    for i, (name, (arch, cfg, ch)) in enumerate(RECON_MEMBERS.items()):
        save_member(root, "reconstruction", name, arch, cfg, ch, seed=10 + i)
    for task, weights in (("segmentation", SEG_WEIGHTS), ("reconstruction", RECON_WEIGHTS)):
        report = root / "reports" / task / "ensemble.json"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps({"method": "random", "weights": weights}))
    return root


def oblique_affine(zooms: tuple[float, float, float]) -> np.ndarray:
    """A rotated (30 degrees about z, 10 about x), translated affine with these voxel sizes."""
    a, b = np.deg2rad(30.0), np.deg2rad(10.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(zooms)
    affine[:3, 3] = (-91.5, 12.25, 40.0)
    return affine


def phantom_nifti(folder: Path, name: str = "scan.nii.gz") -> Path:
    """A phantom ED frame (ACDC layout, read back) re-saved with :func:`oblique_affine`."""
    write_acdc_phantom(folder / "acdc", n_patients=1, seed=5, n_frames=2, write_4d=False)
    src = nib.load(folder / "acdc" / "training" / "patient001" / "patient001_frame01.nii.gz")
    zooms = tuple(float(z) for z in src.header.get_zooms()[:3])
    img = nib.Nifti1Image(np.asarray(src.dataobj), oblique_affine(zooms))  # type: ignore[arg-type]
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=2)
    img.header.set_xyzt_units("mm", "sec")
    path = folder / name
    nib.save(img, path)
    return path


def fastmri_file(folder: Path, name: str = "file_brain_AXT1_tiny.h5") -> Path:
    """A fully sampled 2-slice, 6-coil volume of 40 x 24 (cropped to 32 x 24 by prepare)."""
    h, w, coils = 40, 24, 6
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    rng = np.random.default_rng(1)
    slices = []
    for s in range(2):
        img = np.exp(-((yy - 0.5) ** 2 + (xx - 0.3) ** 2) / (0.03 + 0.01 * s))
        img += 0.5 * ((np.abs(yy - 0.45) < 0.12) & (np.abs(xx - 0.3) < 0.1))
        sens = np.stack(
            [np.exp(1j * (k + 1) * (xx + yy)) * (0.6 + 0.4 * np.cos(k + yy)) for k in range(coils)]
        )
        coil_images = sens * img * (1 + 0.02 * rng.standard_normal((h, w)))
        slices.append(fft2c(coil_images).astype(np.complex64))
    kspace = np.stack(slices)  # (S, C, H, W)
    target = rss(ifft2c(kspace)).astype(np.float32)
    path = folder / name
    write_fastmri(path, kspace, target, {"acquisition": "AXT1", "patient_id": "tiny"})
    return path
