"""Multi-coil brain k-space of many virtual subjects, simulated from MNI152, in the fastMRI layout.

The embedded default data of the reconstruction task. ``nilearn`` ships the skull-stripped
ICBM152 2009a template (197 x 233 x 189 voxels of 1 mm) with its grey- and white-matter
probability maps in its wheel, so nothing is downloaded. :func:`simulate_brain` draws every
volume from its own *virtual subject* and writes one fastMRI file per volume
(``file_brain_<ACQ>_sim_NNN.h5``, ``ACQ`` = orientation + contrast as fastMRI names its
files, e.g. ``AXT2``, ``COPD``, ``SAT1``); the same reader that reads real fastMRI data
(:func:`mri_ensemble.data.fastmri.read_fastmri`) reads them back.

A virtual subject (:class:`Subject`, drawn from ``default_rng([seed, index])``) is

- a **contrast**: tissue intensities of CSF, grey and white matter (T1-, T2-, PD-weighted,
  or FLAIR-like), each jittered by +-15 %, mixed by the template's tissue maps (CSF = the
  brain minus grey and white matter);
- an **orientation**: axial (``AX``), coronal (``CO``) or sagittal (``SA``) slices,
  displayed as radiologists do (patient's right on the image's left; anterior or superior
  at the top);
- a **deformation**: in-plane rotation, anisotropic scale and shift (affine) and a smooth
  random elastic displacement, one per subject;
- a **coil array**: a ring (``ring``: coils on an ellipse around the head, as a birdcage
  head array) or two flat panels (``panel``: anterior and posterior rows of coils, as a
  head-neck or spine array), with a drawn coil count (at least ``n_coils``; the pipeline
  SVD-compresses real and simulated data alike to ``n_coils``), radius, aspect, height and
  rotation; magnitude ``1 / distance``, the azimuthal phase of a loop (sigpy's
  ``birdcage_maps`` in 2-D), scaled so that sum |S|^2 averages 1 in the brain;
- a smooth **bias field** (multiplicative, exp of a quadratic), a smooth **phase** map and
  a **noise** level drawn log-uniformly in the ``noise`` range.

Which contrasts, orientations and arrays a volume can draw is its :class:`Regime`. The
in-distribution volumes (train, val and test after ingest's split) use ``SUPPORT``; each
named shifted test set in ``SHIFTS`` holds out one axis of it: a contrast (FLAIR-like), an
orientation (sagittal), a coil geometry (panels) that no training volume has. Contrasts
and orientations cycle with the volume index, so every split sees each of them.

Slabs. Per orientation, candidate slice positions run every ``slice_step_mm`` through the
range where a template slice holds more than 10 % of the largest slice's signal;
consecutive slabs of ``slices_per_volume`` positions are separated by ``gap_slices``
unused positions. Every volume takes its own slab (drawn without replacement per
orientation), so no two volumes -- in particular no val or test volume and a training one
-- share a slab or touch, and no two share a deformation.

Avoiding the "data crimes" of Shimron et al. (PNAS 2022): the template is resampled in the
image domain, with a Gaussian anti-aliasing prefilter, straight onto the final matrix; the
FFT is taken at that size, so k-space is never zero-padded or cropped; complex Gaussian
noise (std ``noise`` x the volume's mean image magnitude, independent per coil) is added in
k-space; everything is float32/complex64.
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

MIN_SIGNAL_FRACTION = 0.2  # slices with less than this fraction of the largest slice's signal
ROTATION_DEG = 10.0  # per-subject in-plane rotation, uniform in +-this
SCALE_RANGE = (0.88, 1.12)  # per axis (anisotropic)
SHIFT_PX = 4.0  # per-subject in-plane shift, uniform in +-this (output pixels)
ELASTIC_SIGMA = 0.12  # smoothness of the elastic field (x the smaller image side)
ELASTIC_PX = 0.035  # its largest displacement (x the smaller image side)
TISSUE_JITTER = 0.15  # each tissue's intensity x uniform(1 -+ this)
BIAS_STD = 0.15  # std of the bias field's log-polynomial coefficients
COIL_RADIUS_RANGE = (1.02, 1.35)  # ring radius / panel distance, x half the larger FOV side
COIL_HEIGHT_RANGE = (0.2, 0.45)  # coils sit this far out of plane (same units)
COIL_ASPECT_RANGE = (0.85, 1.15)  # ring: ellipse axis ratio
COIL_FACTORS = (1.0, 1.5, 2.0)  # coil count = n_coils x one of these (ring; panel: the larger two)

# (CSF, grey matter, white matter) relative intensities of each contrast
CONTRASTS: dict[str, tuple[float, float, float]] = {
    "T1": (0.25, 0.62, 1.0),
    "T2": (1.0, 0.62, 0.42),
    "PD": (0.9, 0.85, 0.68),
    "FLAIR": (0.1, 0.85, 0.55),
}
ORIENTATIONS = ("AX", "CO", "SA")
ARRAYS = ("ring", "panel")


@dataclass(frozen=True)
class Regime:
    """The contrasts, orientations and coil arrays a set's volumes are drawn from."""

    contrasts: tuple[str, ...]
    orientations: tuple[str, ...]
    arrays: tuple[str, ...]


SUPPORT = Regime(("T1", "T2", "PD"), ("AX", "CO"), ("ring",))  # train, val and test
SHIFTS: dict[str, Regime] = {  # named shifted test sets: one axis held out of SUPPORT each
    "contrast": Regime(("FLAIR",), SUPPORT.orientations, SUPPORT.arrays),
    "orientation": Regime(SUPPORT.contrasts, ("SA",), SUPPORT.arrays),
    "coils": Regime(SUPPORT.contrasts, SUPPORT.orientations, ("panel",)),
}


@dataclass(frozen=True)
class Subject:
    """The draws of one virtual subject (one volume)."""

    contrast: str
    tissue: tuple[float, float, float]  # CSF, GM, WM intensity
    orientation: str
    rotation_deg: float
    scale: tuple[float, float]  # (rows, columns)
    shift_px: tuple[float, float]  # (rows, columns)
    elastic_seed: int
    bias_coeffs: tuple[float, ...]  # y, x, yx, y^2, x^2 of the log bias field
    phase_coeffs: tuple[float, ...]  # offset, y, x, yx, y^2, x^2 (radians)
    array: str
    n_coils: int
    coil_rotation: float  # radians
    coil_radius: float
    coil_aspect: float
    coil_height: float
    noise: float

    @property
    def acquisition(self) -> str:
        return f"{self.orientation}{self.contrast}"


@dataclass(frozen=True)
class Template:
    """The tissue maps (x, y, z) float32 in 0..1, voxel sizes and origin (mm) of MNI152."""

    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    vox: tuple[float, float, float]
    origin: tuple[float, float, float]


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """MNI152 2009a tissue maps. ``nilearn`` is imported here: only simulation needs it."""
    from nilearn.datasets import (
        load_mni152_gm_template,
        load_mni152_template,
        load_mni152_wm_template,
    )

    imgs = [f(resolution=1) for f in (load_mni152_template, load_mni152_gm_template)]
    imgs.append(load_mni152_wm_template(resolution=1))
    affine = np.asarray(imgs[0].affine, dtype=np.float64)
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))) or np.any(
        np.diag(affine)[:3] <= 0
    ):
        raise RuntimeError(f"expected an axis-aligned RAS template affine, found {affine}")
    for img in imgs[1:]:
        if img.shape != imgs[0].shape or not np.allclose(img.affine, affine):
            raise RuntimeError("MNI152 tissue maps are not on the T1 template's grid")
    t1, gm, wm = (np.asarray(i.get_fdata(dtype=np.float32), dtype=np.float32) for i in imgs)
    gm, wm = np.clip(gm, 0.0, 1.0), np.clip(wm, 0.0, 1.0)
    brain = ndimage.binary_fill_holes(t1 > 0.01)
    csf = np.clip(brain.astype(np.float32) - gm - wm, 0.0, 1.0)
    vox = (float(affine[0, 0]), float(affine[1, 1]), float(affine[2, 2]))
    origin = (float(affine[0, 3]), float(affine[1, 3]), float(affine[2, 3]))
    return Template(csf, gm, wm, vox, origin)


# orientation -> axis order (display columns, display rows, slice) of the (x, y, z) volume;
# display = slab[::-1, ::-1].T puts the patient's right on the left and A / S at the top
_AXES = {"AX": (0, 1, 2), "CO": (0, 2, 1), "SA": (1, 2, 0)}


def slab_positions(
    signal: np.ndarray,
    voxel_z: float,
    z0: float,
    *,
    slices_per_volume: int,
    slice_step_mm: float,
    gap_slices: int,
) -> list[np.ndarray]:
    """Slice positions (mm) of each slab, from the signal sum of every template slice.

    Candidate positions run every ``slice_step_mm`` through the range where the (linearly
    interpolated) signal exceeds ``MIN_SIGNAL_FRACTION`` of its maximum, the grid and the
    slabs centred in that range. Slab ``j`` takes ``slices_per_volume`` consecutive positions,
    then ``gap_slices`` positions are skipped. Returns one float64 array per slab.
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


def draw_subject(
    rng: np.random.Generator, regime: Regime, index: int, n_coils: int, noise: tuple[float, float]
) -> Subject:
    """One virtual subject of ``regime``; contrast and orientation cycle with ``index``."""
    contrast = regime.contrasts[index % len(regime.contrasts)]
    orientation = regime.orientations[(index // len(regime.contrasts)) % len(regime.orientations)]
    base = np.asarray(CONTRASTS[contrast])
    tissue = base * rng.uniform(1.0 - TISSUE_JITTER, 1.0 + TISSUE_JITTER, size=3)
    array = regime.arrays[int(rng.integers(len(regime.arrays)))]
    factors = COIL_FACTORS if array == "ring" else COIL_FACTORS[1:]
    count = int(round(n_coils * factors[int(rng.integers(len(factors)))]))
    lo, hi = noise
    return Subject(
        contrast=contrast,
        tissue=tuple(float(v) for v in tissue),  # type: ignore[arg-type]
        orientation=orientation,
        rotation_deg=float(rng.uniform(-ROTATION_DEG, ROTATION_DEG)),
        scale=(float(rng.uniform(*SCALE_RANGE)), float(rng.uniform(*SCALE_RANGE))),
        shift_px=(float(rng.uniform(-SHIFT_PX, SHIFT_PX)), float(rng.uniform(-SHIFT_PX, SHIFT_PX))),
        elastic_seed=int(rng.integers(2**31)),
        bias_coeffs=tuple(float(v) for v in rng.normal(0.0, BIAS_STD, size=5)),
        phase_coeffs=tuple(float(v) for v in rng.uniform(-1.0, 1.0, size=6)),
        array=array,
        n_coils=count,
        coil_rotation=float(rng.uniform(0.0, 2.0 * np.pi)),
        coil_radius=float(rng.uniform(*COIL_RADIUS_RANGE)),
        coil_aspect=float(rng.uniform(*COIL_ASPECT_RANGE)),
        coil_height=float(rng.uniform(*COIL_HEIGHT_RANGE)),
        noise=float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) if lo > 0 else float(hi),
    )


def elastic_field(seed: int, size: tuple[int, int]) -> np.ndarray:
    """A smooth random displacement (2, H, W) float64 in pixels, largest ``ELASTIC_PX`` x
    the smaller side (Simard et al.'s elastic deformation)."""
    rng = np.random.default_rng(seed)
    sigma = ELASTIC_SIGMA * min(size)
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal(size), sigma) for _ in "yx"])
    return field * (ELASTIC_PX * min(size) / max(float(np.abs(field).max()), 1e-12))


def _smooth_surface(coeffs: tuple[float, ...], size: tuple[int, int]) -> np.ndarray:
    """``sum c_i t_i`` over the terms y, x, yx, y^2 - 1/3, x^2 - 1/3 on [-1, 1]^2: (H, W)."""
    y = np.linspace(-1.0, 1.0, size[0])[:, None]
    x = np.linspace(-1.0, 1.0, size[1])[None, :]
    terms = [y, x, y * x, y**2 - 1 / 3, x**2 - 1 / 3]
    surface = np.zeros(size, dtype=np.float64)
    for c, t in zip(coeffs, terms, strict=True):
        surface = surface + c * t
    return surface


def render_slices(
    template: Template,
    positions: np.ndarray,
    subject: Subject,
    size: tuple[int, int],
    pixel_mm: float,
    thickness_mm: float,
) -> np.ndarray:
    """Magnitude images (S, H, W) float32 of one subject at slice positions (mm)."""
    axes = _AXES[subject.orientation]
    vox = tuple(template.vox[a] for a in axes)
    z0 = template.origin[axes[2]]
    maps = [np.transpose(m, axes) for m in (template.csf, template.gm, template.wm)]
    h, w = size
    shape = maps[0].shape  # (columns, rows, slices) of the display
    # output pixel o -> template display index q = centre_in + M (o + d(o) - centre_out - shift)
    theta = math.radians(subject.rotation_deg)
    rot_inv = np.array([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
    step = np.array(
        [pixel_mm / (subject.scale[0] * vox[1]), pixel_mm / (subject.scale[1] * vox[0])]
    )
    matrix = step[:, None] * rot_inv  # display rows/cols are the volume's axes 1/0 (voxels)
    centre_out = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    centre_in = np.array([(shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0])
    grid = np.mgrid[0:h, 0:w].astype(np.float64) + elastic_field(subject.elastic_seed, size)
    rel = grid - (centre_out + np.asarray(subject.shift_px))[:, None, None]  # (2, H, W)
    coords = np.einsum("ij,jhw->ihw", matrix, rel) + centre_in[:, None, None]
    sigma = (max(0.0, 0.5 * (step[0] - 1.0)), max(0.0, 0.5 * (step[1] - 1.0)))  # anti-aliasing
    bias = np.exp(_smooth_surface(subject.bias_coeffs, size))
    out = np.empty((positions.size, h, w), dtype=np.float32)
    for i, z in enumerate(positions):
        # slice profile: Gaussian of FWHM = slice thickness around z
        zi = (z - z0) / vox[2]
        sig_z = max(thickness_mm / vox[2], 1.0) / 2.355
        idx = np.arange(max(0, int(zi - 3 * sig_z)), min(shape[2], int(zi + 3 * sig_z) + 2))
        weights = np.exp(-0.5 * ((idx - zi) / sig_z) ** 2)
        weights = weights / weights.sum()
        slab = sum(
            t * np.tensordot(m[:, :, idx], weights, axes=([2], [0]))
            for t, m in zip(subject.tissue, maps, strict=True)
        )  # (columns, rows)
        display = np.ascontiguousarray(np.asarray(slab)[::-1, ::-1].T, dtype=np.float32)
        display = ndimage.gaussian_filter(display, sigma, mode="constant")
        image = ndimage.map_coordinates(display, coords, order=3, mode="constant")
        out[i] = np.clip(image, 0.0, None) * bias
    return out


def phase_map(coeffs: tuple[float, ...], size: tuple[int, int]) -> np.ndarray:
    """Smooth phase (H, W) float32: a constant in [-pi, pi) plus a quadratic surface of
    amplitude up to pi over the field of view (``coeffs`` in [-1, 1])."""
    surface = _smooth_surface(coeffs[1:], size)
    amplitude = np.pi * (0.5 + 0.5 * abs(coeffs[0]))
    surface = amplitude * surface / max(float(np.abs(surface).max()), 1e-6)
    return (np.pi * coeffs[0] + surface).astype(np.float32)


def coil_positions(subject: Subject) -> np.ndarray:
    """(C, 2) in-plane (y, x) coil centres, in units of half the larger FOV side."""
    n, r = subject.n_coils, subject.coil_radius
    if subject.array == "ring":
        angle = subject.coil_rotation + 2.0 * np.pi * np.arange(n) / n
        return np.stack([r * np.sin(angle), r * subject.coil_aspect * np.cos(angle)], axis=1)
    # panel: two rows of coils, anterior and posterior, rotated as a whole by a small angle
    half = n // 2
    x = np.concatenate([np.linspace(-0.8, 0.8, half), np.linspace(-0.8, 0.8, n - half)])
    y = np.concatenate([np.full(half, -r), np.full(n - half, r)])
    tilt = 0.25 * math.sin(subject.coil_rotation)  # up to about 14 degrees
    c, s = math.cos(tilt), math.sin(tilt)
    return np.stack([c * y - s * x, s * y + c * x], axis=1)


def coil_sensitivities(subject: Subject, size: tuple[int, int]) -> np.ndarray:
    """Coil sensitivities (C, H, W) complex64 of the subject's array, unnormalised.

    Each coil's magnitude is 1 / distance (a coil ``coil_height`` out of plane softens it
    near the coil) and its phase the azimuth around the coil plus the coil's angle (sigpy's
    ``birdcage_maps`` in 2-D).
    """
    h, w = size
    half = 0.5 * max(h, w)
    y = ((np.arange(h) - (h - 1) / 2.0) / half)[:, None]
    x = ((np.arange(w) - (w - 1) / 2.0) / half)[None, :]
    centres = coil_positions(subject)
    maps = np.empty((len(centres), h, w), dtype=np.complex64)
    for k, (yc, xc) in enumerate(centres):
        dist = np.sqrt((y - yc) ** 2 + (x - xc) ** 2 + subject.coil_height**2)
        phase = np.arctan2(x - xc, -(y - yc)) + math.atan2(yc, xc)
        maps[k] = np.exp(1j * phase) / dist
    return maps


def simulate_volume(
    template: Template,
    positions: np.ndarray,
    subject: Subject,
    rng: np.random.Generator,
    *,
    size: tuple[int, int],
    pixel_mm: float,
    thickness_mm: float,
) -> tuple[np.ndarray, np.ndarray]:
    """k-space (S, C, H, W) complex64 and target (S, H, W) float32 of one subject."""
    magnitude = render_slices(template, positions, subject, size, pixel_mm, thickness_mm)
    image = magnitude * np.exp(1j * phase_map(subject.phase_coeffs, size))  # (S, H, W)
    sens = coil_sensitivities(subject, size)
    brain = magnitude.mean(axis=0) > 0.05 * magnitude.max()  # (H, W)
    energy = np.sum(np.abs(sens) ** 2, axis=0)  # (H, W)
    sens = sens / np.sqrt(energy[brain].mean() if brain.any() else energy.mean())
    coil_images = sens[None] * image[:, None]  # (S, C, H, W)
    kspace = fft2c(coil_images.astype(np.complex64))
    sigma = subject.noise * float(np.abs(image).mean())  # orthonormal FFT: same std both ways
    draws = rng.standard_normal((*kspace.shape, 2), dtype=np.float32)  # (S, C, H, W, re/im)
    kspace = (kspace + (sigma / math.sqrt(2.0)) * draws.view(np.complex64)[..., 0]).astype(
        np.complex64
    )
    target = rss(ifft2c(kspace)).astype(np.float32)
    return kspace, target


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


def _is_int(v: object) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | np.integer)


def _noise_range(noise: float | tuple[float, float] | list[float]) -> tuple[float, float]:
    """``noise`` as a (low, high) range; one number is a fixed level."""
    values = list(noise) if isinstance(noise, list | tuple) else [noise, noise]
    ok = len(values) == 2 and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        for v in values
    )
    if not ok or values[0] > values[1]:
        raise ConfigError(
            f"noise: expected a number >= 0 or a range [low, high] of them, found {noise!r}"
        )
    return float(values[0]), float(values[1])


def _check(
    n_coils: int,
    size: tuple[int, int],
    pixel_mm: float,
    volumes: int,
    slices_per_volume: int,
    slice_step_mm: float,
    gap_slices: int,
    shifted: dict[str, int],
    seed: int,
) -> None:
    for key, value, low in (
        ("n_coils", n_coils, 1),
        ("volumes", volumes, 1),
        ("slices_per_volume", slices_per_volume, 1),
        ("gap_slices", gap_slices, 0),
        ("seed", seed, 0),
    ):
        if not _is_int(value) or value < low:
            raise ConfigError(f"{key}: expected an integer >= {low}, found {value!r}")
    if len(size) != 2 or not all(_is_int(n) and n >= 8 for n in size):
        raise ConfigError(f"size: expected two integers >= 8 (H, W), found {size!r}")
    for key, number in (("pixel_mm", pixel_mm), ("slice_step_mm", slice_step_mm)):
        ok = isinstance(number, int | float) and not isinstance(number, bool)
        if not (ok and math.isfinite(number) and number > 0):
            raise ConfigError(f"{key}: expected a positive number, found {number!r}")
    if not isinstance(shifted, dict):
        raise ConfigError(f"shifted: expected a mapping name -> volumes, found {shifted!r}")
    for name, count in shifted.items():
        if name not in SHIFTS:
            raise ConfigError(f"shifted: expected sets of {', '.join(SHIFTS)}, found {name!r}")
        if not _is_int(count) or count < 0:
            raise ConfigError(f"shifted.{name}: expected an integer >= 0, found {count!r}")


def simulate_brain(
    out_dir: Path,
    *,
    n_coils: int = 8,
    size: tuple[int, int] = (112, 96),
    pixel_mm: float = 2.0,
    volumes: int = 30,
    slices_per_volume: int = 3,
    slice_step_mm: float = 1.5,
    gap_slices: int = 1,
    noise: float | tuple[float, float] | list[float] = (0.01, 0.04),
    shifted: dict[str, int] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, list[Path]]:
    """Write ``volumes`` in-distribution virtual subjects to ``out_dir`` and each shifted
    set ``name`` (``shifted``: name -> volumes, names from ``SHIFTS``) to
    ``out_dir/shift_<name>/``, one ``file_brain_<ACQ>_sim_NNN.h5`` per volume (NNN runs on
    across sets, so every file name is unique).

    Each file holds kspace complex64 (S, C, H, W) (C: the subject's coil count, at least
    ``n_coils``), ``reconstruction_rss`` float32 (S, H, W) (RSS of the fully sampled noisy
    coil images), attributes ``max``, ``norm``, ``acquisition``, ``patient_id``,
    ``slice_positions_mm`` and the subject's draws, and an ISMRMRD header. The same
    arguments give the same bytes. Returns ``{"support": paths, <shift name>: paths}``.
    """
    shifted = dict(shifted or {})
    _check(
        n_coils, size, pixel_mm, volumes, slices_per_volume, slice_step_mm, gap_slices,
        shifted, seed,
    )  # fmt: skip
    noise_range = _noise_range(noise)
    size = (int(size[0]), int(size[1]))  # a list from YAML becomes a tuple
    template = load_template()
    pools: dict[str, list[np.ndarray]] = {}
    for o, axes in _AXES.items():
        signal = (template.csf + template.gm + template.wm).sum(
            axis=tuple(a for a in range(3) if a != axes[2])
        )
        slabs = slab_positions(
            signal,
            template.vox[axes[2]],
            template.origin[axes[2]],
            slices_per_volume=slices_per_volume,
            slice_step_mm=slice_step_mm,
            gap_slices=gap_slices,
        )
        order = np.random.default_rng([seed, 1000 + ORIENTATIONS.index(o)]).permutation(len(slabs))
        pools[o] = [slabs[j] for j in order]
    sets = [("support", SUPPORT, volumes, Path(out_dir))]
    sets += [(n, SHIFTS[n], k, Path(out_dir) / f"shift_{n}") for n, k in shifted.items() if k]
    plan = []  # (set name, folder, subject, positions, rng) per volume, in file order
    index = 0
    for name, regime, count, folder in sets:
        for j in range(count):
            rng = np.random.default_rng([seed, index])
            subject = draw_subject(rng, regime, j, n_coils, noise_range)
            if not pools[subject.orientation]:
                raise ConfigError(
                    f"volumes, shifted, slices_per_volume: the brain holds too few "
                    f"{subject.orientation} slabs of {slices_per_volume} slices every "
                    f"{slice_step_mm} mm for {volumes} + {sum(shifted.values())} volumes"
                )
            plan.append((name, folder, subject, pools[subject.orientation].pop(), rng, index))
            index += 1
    header_of = {c: _header(size, pixel_mm, slice_step_mm, c) for c in {p[2].n_coils for p in plan}}
    out: dict[str, list[Path]] = {name: [] for name, *_ in sets}
    for name, folder, subject, positions, rng, i in tqdm(
        plan, desc="simulated volumes", unit="volume", disable=None if progress else True
    ):
        kspace, target = simulate_volume(
            template, positions, subject, rng, size=size, pixel_mm=pixel_mm,
            thickness_mm=slice_step_mm,
        )  # fmt: skip
        attrs = {
            "max": float(target.max()),
            "norm": float(np.linalg.norm(target)),
            "acquisition": subject.acquisition,
            "patient_id": f"sim{i:03d}",
            "slice_positions_mm": positions.astype(np.float64),
            "pixel_mm": float(pixel_mm),
            "seed": int(seed),
            "set": name,
            "contrast": subject.contrast,
            "orientation": subject.orientation,
            "coil_array": subject.array,
            "noise": subject.noise,
            "rotation_deg": subject.rotation_deg,
            "scale": np.asarray(subject.scale, dtype=np.float64),
            "shift_px": np.asarray(subject.shift_px, dtype=np.float64),
            "tissue_csf_gm_wm": np.asarray(subject.tissue, dtype=np.float64),
            "source": "MNI152 2009a tissue maps (nilearn), virtual subject, simulated k-space",
        }
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"file_brain_{subject.acquisition}_sim_{i:03d}.h5"
        write_fastmri(path, kspace, target, attrs=attrs, header=header_of[subject.n_coils])
        out[name].append(path)
    logger.info(
        "wrote %s simulated volumes (%d slices each, >= %d coils, %d x %d, seed %d) to %s",
        {k: len(v) for k, v in out.items()},
        slices_per_volume,
        n_coils,
        size[0],
        size[1],
        seed,
        out_dir,
    )
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m mri_ensemble.data.simulate OUT``: write the simulated brain data to look at."""
    import argparse

    ap = argparse.ArgumentParser(
        description="Write multi-coil k-space of virtual MNI152 subjects in the fastMRI layout."
    )
    ap.add_argument("out", type=Path, help="folder to write file_brain_<ACQ>_sim_NNN.h5 into")
    ap.add_argument("--seed", type=int, default=42, help="params.yaml's seed gives ingest's data")
    ap.add_argument("--volumes", type=int, default=30)
    ap.add_argument("--shifted", type=int, default=4, help="volumes of each shifted set (0: none)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        simulate_brain(
            args.out,
            seed=args.seed,
            volumes=args.volumes,
            shifted=dict.fromkeys(SHIFTS, args.shifted),
            progress=True,
        )
    except PipelineError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
