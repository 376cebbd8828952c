"""Multi-coil brain k-space simulated from the MNI152 T1 template, in the fastMRI layout.

The embedded default data of the reconstruction task. ``nilearn`` ships the skull-stripped
ICBM152 2009a T1 template (197 x 233 x 189 voxels of 1 mm, values 0..1) in its wheel, so
nothing is downloaded. :func:`simulate_brain` cuts it into axial slabs and writes one
fastMRI file per slab (``file_brain_AXT1_sim_NNN.h5``); the same reader that reads real
fastMRI data (:func:`mri_ensemble.data.fastmri.read_fastmri`) reads them back.

Geometry. Slices are axial (x, y planes of the template) and displayed as radiologists do:
rows H run anterior (row 0) to posterior, columns W from the patient's right to left. H is
the readout (fully sampled), W the phase-encode direction that sampling masks undersample.
Each slice averages the template over its thickness (``slice_step_mm``, contiguous slices)
with a Gaussian slice profile. Slice positions run every ``slice_step_mm`` through the
range where a slice holds more than 10 % of the largest slice's signal; consecutive slabs
of ``slices_per_volume`` positions are separated by ``gap_slices`` unused positions, so no
slice of one volume is adjacent to a slice of another (a volume is a "subject": splits by
volume cannot leak neighbouring slices).

Each volume draws, from ``default_rng([seed, index])``, an in-plane rotation, scale and
shift and an intensity gamma (one "subject", identical for its slices), a smooth phase
map, and a birdcage-like coil array: ``n_coils`` coils evenly spaced on a circle around
the field of view with a random global rotation, magnitude falling off as 1/r (Biot-Savart
of a wire a little out of plane) and the azimuthal phase of a loop (as sigpy's
``birdcage_maps``), scaled so that sum |S|^2 averages 1 in the brain.

Avoiding the "data crimes" of Shimron et al. (PNAS 2022): the template is resampled in the
image domain, with a Gaussian anti-aliasing prefilter, straight onto the final matrix; the
FFT is taken at that size, so k-space is never zero-padded or cropped; complex Gaussian
noise (std ``noise`` x the volume's mean image magnitude, independent per coil) is added in
k-space; everything is float32/complex64 and stored uncompressed.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from mri_ensemble.data.fastmri import write_fastmri
from mri_ensemble.errors import ConfigError, PipelineError
from mri_ensemble.mri.fft import fft2c, ifft2c, rss

logger = logging.getLogger(__name__)

ACQUISITION = "AXT1"
MIN_SIGNAL_FRACTION = 0.1  # slices with less than this fraction of the largest slice's signal
ROTATION_DEG = 8.0  # per-volume in-plane rotation, uniform in +-this
SCALE_RANGE = (0.92, 1.08)
SHIFT_PX = 3.0  # per-volume in-plane shift, uniform in +-this (output pixels)
GAMMA_RANGE = (0.8, 1.25)  # log-uniform
COIL_RADIUS_RANGE = (1.05, 1.25)  # coil circle radius, in units of half the larger FOV side
COIL_HEIGHT = 0.3  # coils sit this far out of plane (same units): softens 1/r near a coil


@dataclass(frozen=True)
class Subject:
    """Per-volume draws: geometry and contrast of one simulated subject."""

    rotation_deg: float
    scale: float
    shift_px: tuple[float, float]  # (rows, columns)
    gamma: float
    phase_coeffs: tuple[float, ...]  # offset, y, x, yx, y^2, x^2 (radians)
    coil_rotation: float  # radians
    coil_radius: float


@functools.lru_cache(maxsize=1)
def load_template() -> tuple[np.ndarray, tuple[float, float, float], float]:
    """The MNI152 T1 template: (x, y, z) float32 in 0..1, voxel sizes (mm), z of index 0 (mm).

    ``nilearn`` is imported here, not at module level: only simulation needs it.
    """
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=1)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))) or np.any(
        np.diag(affine)[:3] <= 0
    ):
        raise RuntimeError(f"expected an axis-aligned RAS template affine, found {affine}")
    data = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
    vox = (float(affine[0, 0]), float(affine[1, 1]), float(affine[2, 2]))
    return data, vox, float(affine[2, 3])


def slab_positions(
    signal: np.ndarray,
    voxel_z: float,
    z0: float,
    *,
    slices_per_volume: int,
    slice_step_mm: float,
    gap_slices: int,
) -> list[np.ndarray]:
    """Slice positions (mm) of each volume, from the signal sum of every template z-slice.

    Candidate positions run every ``slice_step_mm`` through the range where the (linearly
    interpolated) signal exceeds ``MIN_SIGNAL_FRACTION`` of its maximum, the grid and the
    slabs centred in that range. Slab ``j`` takes ``slices_per_volume`` consecutive positions,
    then ``gap_slices`` positions are skipped. Returns one float64 array per volume.
    """
    z_mm = z0 + voxel_z * np.arange(signal.size)
    keep = np.flatnonzero(signal > MIN_SIGNAL_FRACTION * signal.max())
    lo, hi = float(z_mm[keep[0]]), float(z_mm[keep[-1]])
    n_pos = int(math.floor((hi - lo) / slice_step_mm + 1e-9)) + 1
    start = lo + 0.5 * ((hi - lo) - (n_pos - 1) * slice_step_mm)
    period = slices_per_volume + gap_slices
    n_vol = (n_pos + gap_slices) // period
    first = (n_pos - (n_vol * period - gap_slices)) // 2
    slabs = []
    for j in range(n_vol):
        k = first + j * period + np.arange(slices_per_volume)
        positions = np.round(start + k * slice_step_mm, 6)
        if np.all(np.interp(positions, z_mm, signal) > MIN_SIGNAL_FRACTION * signal.max()):
            slabs.append(positions)
    return slabs


def _draw_subject(rng: np.random.Generator) -> Subject:
    return Subject(
        rotation_deg=float(rng.uniform(-ROTATION_DEG, ROTATION_DEG)),
        scale=float(rng.uniform(*SCALE_RANGE)),
        shift_px=(float(rng.uniform(-SHIFT_PX, SHIFT_PX)), float(rng.uniform(-SHIFT_PX, SHIFT_PX))),
        gamma=float(np.exp(rng.uniform(np.log(GAMMA_RANGE[0]), np.log(GAMMA_RANGE[1])))),
        phase_coeffs=tuple(float(v) for v in rng.uniform(-1.0, 1.0, size=6)),
        coil_rotation=float(rng.uniform(0.0, 2.0 * np.pi)),
        coil_radius=float(rng.uniform(*COIL_RADIUS_RANGE)),
    )


def _render_slices(
    volume: np.ndarray,
    vox: tuple[float, float, float],
    z0: float,
    positions: np.ndarray,
    subject: Subject,
    size: tuple[int, int],
    pixel_mm: float,
    thickness_mm: float,
) -> np.ndarray:
    """Magnitude images (S, H, W) float32 of one subject at slice positions (mm)."""
    h, w = size
    out = np.empty((positions.size, h, w), dtype=np.float32)
    # output pixel o -> template display index q = centre_in + M (o - centre_out - shift)
    theta = math.radians(subject.rotation_deg)
    rot_inv = np.array([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
    step = np.array([pixel_mm / (subject.scale * vox[1]), pixel_mm / (subject.scale * vox[0])])
    matrix = step[:, None] * rot_inv  # display rows/cols are the template's y/x (in voxels)
    centre_out = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    centre_in = np.array([(volume.shape[1] - 1) / 2.0, (volume.shape[0] - 1) / 2.0])
    offset = centre_in - matrix @ (centre_out + np.asarray(subject.shift_px))
    sigma = (
        max(0.0, 0.5 * (step[0] - 1.0)),  # anti-aliasing before downsampling (skimage's rule)
        max(0.0, 0.5 * (step[1] - 1.0)),
    )
    for i, z in enumerate(positions):
        # slice profile: Gaussian of FWHM = slice thickness around z, over the template's z
        zi = (z - z0) / vox[2]
        sig_z = max(thickness_mm / vox[2], 1.0) / 2.355
        idx = np.arange(max(0, int(zi - 3 * sig_z)), min(volume.shape[2], int(zi + 3 * sig_z) + 2))
        weights = np.exp(-0.5 * ((idx - zi) / sig_z) ** 2)
        slab = np.tensordot(volume[:, :, idx], weights / weights.sum(), axes=([2], [0]))  # (x, y)
        display = np.ascontiguousarray(slab[::-1, ::-1].T, dtype=np.float32)  # (y: A->P, x: R->L)
        display = ndimage.gaussian_filter(display, sigma, mode="constant")
        image = ndimage.affine_transform(
            display, matrix, offset=offset, output_shape=size, order=3, mode="constant"
        )
        out[i] = np.clip(image, 0.0, None) ** subject.gamma
    return out


def phase_map(coeffs: tuple[float, ...], size: tuple[int, int]) -> np.ndarray:
    """Smooth phase (H, W) float32: a constant in [-pi, pi) plus a quadratic surface of
    amplitude up to pi over the field of view (``coeffs`` in [-1, 1])."""
    y = np.linspace(-1.0, 1.0, size[0])[:, None]
    x = np.linspace(-1.0, 1.0, size[1])[None, :]
    terms = [y, x, y * x, y**2 - 1 / 3, x**2 - 1 / 3]  # each broadcasts to (H, W)
    surface = np.zeros(size, dtype=np.float64)
    for c, t in zip(coeffs[1:], terms, strict=True):
        surface = surface + c * t
    amplitude = np.pi * (0.5 + 0.5 * abs(coeffs[0]))
    surface = amplitude * surface / max(float(np.abs(surface).max()), 1e-6)
    return (np.pi * coeffs[0] + surface).astype(np.float32)


def birdcage_sensitivities(
    n_coils: int, size: tuple[int, int], rotation: float, radius: float
) -> np.ndarray:
    """Coil sensitivities (C, H, W) complex64 of a birdcage-like array, unnormalised.

    Coil k sits at angle ``rotation + 2 pi k / C`` on a circle of ``radius`` (units: half the
    larger side of the field of view) and ``COIL_HEIGHT`` out of plane; its magnitude is
    1 / distance and its phase the azimuth around the coil plus the coil's angle (sigpy's
    ``birdcage_maps`` in 2-D).
    """
    h, w = size
    half = 0.5 * max(h, w)
    y = ((np.arange(h) - (h - 1) / 2.0) / half)[:, None]
    x = ((np.arange(w) - (w - 1) / 2.0) / half)[None, :]
    maps = np.empty((n_coils, h, w), dtype=np.complex64)
    for k in range(n_coils):
        angle = rotation + 2.0 * np.pi * k / n_coils
        yc, xc = radius * math.sin(angle), radius * math.cos(angle)
        dist = np.sqrt((y - yc) ** 2 + (x - xc) ** 2 + COIL_HEIGHT**2)
        phase = np.arctan2(x - xc, -(y - yc)) + angle
        maps[k] = np.exp(1j * phase) / dist
    return maps


def simulate_volume(
    volume: np.ndarray,
    vox: tuple[float, float, float],
    z0: float,
    positions: np.ndarray,
    rng: np.random.Generator,
    *,
    n_coils: int,
    size: tuple[int, int],
    pixel_mm: float,
    thickness_mm: float,
    noise: float,
) -> tuple[np.ndarray, np.ndarray, Subject]:
    """k-space (S, C, H, W) complex64, target (S, H, W) float32 and draws of one volume."""
    subject = _draw_subject(rng)
    magnitude = _render_slices(
        volume, vox, z0, positions, subject, size, pixel_mm, thickness_mm
    )  # (S, H, W)
    image = magnitude * np.exp(1j * phase_map(subject.phase_coeffs, size))  # (S, H, W)
    sens = birdcage_sensitivities(n_coils, size, subject.coil_rotation, subject.coil_radius)
    brain = magnitude.mean(axis=0) > 0.05 * magnitude.max()  # (H, W)
    energy = np.sum(np.abs(sens) ** 2, axis=0)  # (H, W)
    sens = sens / np.sqrt(energy[brain].mean() if brain.any() else energy.mean())
    coil_images = sens[None] * image[:, None]  # (S, C, H, W)
    kspace = fft2c(coil_images.astype(np.complex64))
    sigma = noise * float(np.abs(image).mean())  # orthonormal FFT: same std in both domains
    draws = rng.standard_normal((*kspace.shape, 2), dtype=np.float32)  # (S, C, H, W, re/im)
    kspace = (kspace + (sigma / math.sqrt(2.0)) * draws.view(np.complex64)[..., 0]).astype(
        np.complex64
    )
    target = rss(ifft2c(kspace)).astype(np.float32)
    return kspace, target, subject


def _header(size: tuple[int, int], pixel_mm: float, thickness_mm: float, n_coils: int) -> bytes:
    """A minimal ISMRMRD header: matrix, FOV, phase-encode limits (read by fastMRI's loader),
    receiver channels. x is the readout (H), y the phase encode (W)."""
    h, w = size
    fov = f"<x>{h * pixel_mm:.2f}</x><y>{w * pixel_mm:.2f}</y><z>{thickness_mm:.2f}</z>"
    matrix = f"<x>{h}</x><y>{w}</y><z>1</z>"
    space = f"<matrixSize>{matrix}</matrixSize><fieldOfView_mm>{fov}</fieldOfView_mm>"
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">'
        f"<acquisitionSystemInformation><receiverChannels>{n_coils}</receiverChannels>"
        "</acquisitionSystemInformation>"
        f"<encoding><encodedSpace>{space}</encodedSpace><reconSpace>{space}</reconSpace>"
        "<encodingLimits><kspace_encoding_step_1><minimum>0</minimum>"
        f"<maximum>{w - 1}</maximum><center>{w // 2}</center></kspace_encoding_step_1>"
        "</encodingLimits><trajectory>cartesian</trajectory></encoding>"
        "<sequenceParameters><TR>0</TR></sequenceParameters>"
        "</ismrmrdHeader>\n"
    ).encode()


def _check(
    n_coils: int,
    size: tuple[int, int],
    pixel_mm: float,
    slices_per_volume: int,
    slice_step_mm: float,
    gap_slices: int,
    noise: float,
    seed: int,
) -> None:
    def is_int(v: object) -> bool:
        return not isinstance(v, bool) and isinstance(v, int | np.integer)

    for key, value, low in (
        ("n_coils", n_coils, 1),
        ("slices_per_volume", slices_per_volume, 1),
        ("gap_slices", gap_slices, 0),
        ("seed", seed, 0),
    ):
        if not is_int(value) or value < low:
            raise ConfigError(f"{key}: expected an integer >= {low}, found {value!r}")
    if len(size) != 2 or not all(is_int(n) and n >= 8 for n in size):
        raise ConfigError(f"size: expected two integers >= 8 (H, W), found {size!r}")
    for key, number, positive in (
        ("pixel_mm", pixel_mm, True),
        ("slice_step_mm", slice_step_mm, True),
        ("noise", noise, False),
    ):
        ok = isinstance(number, int | float) and not isinstance(number, bool)
        if not (ok and math.isfinite(number) and (number > 0 if positive else number >= 0)):
            kind = "a positive number" if positive else "a number >= 0"
            raise ConfigError(f"{key}: expected {kind}, found {number!r}")


def simulate_brain(
    out_dir: Path,
    *,
    n_coils: int = 8,
    size: tuple[int, int] = (112, 96),
    pixel_mm: float = 2.0,
    slices_per_volume: int = 5,
    slice_step_mm: float = 2.0,
    gap_slices: int = 1,
    noise: float = 0.02,
    seed: int = 0,
    progress: bool = False,
) -> list[Path]:
    """Write simulated multi-coil brain volumes to ``out_dir/file_brain_AXT1_sim_NNN.h5``.

    Each file holds kspace complex64 (S, n_coils, H, W), ``reconstruction_rss`` float32
    (S, H, W) (RSS of the fully sampled noisy coil images), attributes ``max``, ``norm``,
    ``acquisition``, ``patient_id``, ``slice_positions_mm`` (z of each slice in MNI space)
    and the subject's draws, and an ISMRMRD header. The same arguments give the same bytes.
    Returns the paths in volume order. See the module docstring for the model.
    """
    _check(n_coils, size, pixel_mm, slices_per_volume, slice_step_mm, gap_slices, noise, seed)
    size = (int(size[0]), int(size[1]))  # a list from YAML becomes a tuple
    volume, vox, z0 = load_template()
    signal = volume.sum(axis=(0, 1))  # (z,)
    slabs = slab_positions(
        signal,
        vox[2],
        z0,
        slices_per_volume=slices_per_volume,
        slice_step_mm=slice_step_mm,
        gap_slices=gap_slices,
    )
    if not slabs:
        raise ConfigError(
            f"slices_per_volume, slice_step_mm: expected slabs that fit in the brain, found "
            f"none for {slices_per_volume} slices every {slice_step_mm} mm"
        )
    header = _header(size, pixel_mm, slice_step_mm, n_coils)
    paths = []
    for i, positions in enumerate(
        tqdm(slabs, desc="simulated volumes", unit="volume", disable=None if progress else True)
    ):
        rng = np.random.default_rng([seed, i])
        kspace, target, subject = simulate_volume(
            volume,
            vox,
            z0,
            positions,
            rng,
            n_coils=n_coils,
            size=size,
            pixel_mm=pixel_mm,
            thickness_mm=slice_step_mm,
            noise=noise,
        )
        attrs = {
            "max": float(target.max()),
            "norm": float(np.linalg.norm(target)),
            "acquisition": ACQUISITION,
            "patient_id": f"sim{i:03d}",
            "slice_positions_mm": positions.astype(np.float64),
            "pixel_mm": float(pixel_mm),
            "noise": float(noise),
            "seed": int(seed),
            "rotation_deg": subject.rotation_deg,
            "scale": subject.scale,
            "shift_px": np.asarray(subject.shift_px, dtype=np.float64),
            "gamma": subject.gamma,
            "source": "MNI152 T1 2009a template (nilearn), simulated multi-coil k-space",
        }
        path = Path(out_dir) / f"file_brain_{ACQUISITION}_sim_{i:03d}.h5"
        write_fastmri(path, kspace, target, attrs=attrs, header=header)
        paths.append(path)
    n_slices = sum(len(p) for p in slabs)
    logger.info(
        "wrote %d simulated volumes (%d slices, %d coils, %d x %d, seed %d) to %s",
        len(paths),
        n_slices,
        n_coils,
        size[0],
        size[1],
        seed,
        out_dir,
    )
    return paths


def main(argv: list[str] | None = None) -> None:
    """``python -m mri_ensemble.data.simulate OUT``: write the simulated brain data to look at."""
    import argparse

    ap = argparse.ArgumentParser(
        description="Write multi-coil brain k-space simulated from MNI152 in the fastMRI layout."
    )
    ap.add_argument("out", type=Path, help="folder to write file_brain_AXT1_sim_NNN.h5 into")
    ap.add_argument("--seed", type=int, default=42, help="params.yaml's seed gives ingest's data")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        simulate_brain(args.out, seed=args.seed, progress=True)
    except PipelineError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
