"""Procedural cardiac cine phantom written in the real ACDC layout.

``write_acdc_phantom`` writes ``root/training/patientNNN/`` folders holding what an ACDC
download holds: the cine ``patientNNN_4d.nii.gz`` (x, y, slice, frame), the ED and ES frames
``patientNNN_frameXX.nii.gz`` with their ``_gt`` labels (0 background, 1 RV cavity,
2 myocardium, 3 LV cavity) and ``Info.cfg``. The same ACDC reader that reads real data then
reads it back.

Each patient is drawn from its own random stream (``default_rng([seed, patient_id])``), so a
patient's files depend only on ``seed`` and its id. Anatomy is drawn per patient
(:class:`Anatomy`), every slice and cardiac phase is rasterised into internal tissue classes
(:func:`rasterize_slice`), and tissues become MR-like intensities with per-patient contrast,
partial-volume blur, a multiplicative bias field and Rician noise (:func:`render_frames`).
Internally a slice is a display image (rows = y, columns = x) of shape (ny, nx); files store
the transposed (x, y, slice) arrays, as ACDC does.

``regime`` (one of :data:`REGIMES`) picks the acquisition. ``"default"`` is the phantom that
training sees. ``"shifted"`` is an acquisition outside training's range, for a test set
training never sees: the anatomy is drawn exactly as in ``"default"`` (the same random
stream, so the labels are identical), then a separate stream
``default_rng([seed, patient_id, 7])`` overrides the acquisition: Rician noise sigma
uniform in (0.10, 0.15) x gain (default 0.03-0.08), log bias-field coefficients normal with
std 0.3 clipped to +-0.8 (default std 0.12, clip +-0.4), partial-volume blur 1.0-1.4 px
(default 0.5-0.9) and myocardium at 0.45-0.6 of blood (default 0.22-0.45; skeletal muscle,
RV wall and papillary muscles are rescaled with it). Only the intensities change.
"""

from __future__ import annotations

import gzip
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from mri_ensemble.errors import ConfigError, DataError
from mri_ensemble.io import atomic_path

logger = logging.getLogger(__name__)

GROUPS: tuple[str, ...] = ("DCM", "HCM", "MINF", "NOR", "RV")  # patient ids cycle through these
REGIMES: tuple[str, ...] = ("default", "shifted")  # acquisition regimes (see the module doc)

# Internal tissue classes; only the heart classes carry an ACDC label.
AIR, MUSCLE, FAT, LUNG, LIVER, VESSEL, BONE = range(7)
LV_BLOOD, RV_BLOOD, LV_MYO, RV_WALL, PAPILLARY = range(7, 12)
N_TISSUES = 12
TISSUE_LABEL = np.zeros(N_TISSUES, dtype=np.uint8)
TISSUE_LABEL[[RV_BLOOD, LV_MYO, LV_BLOOD, PAPILLARY]] = (1, 2, 3, 3)

# group -> ranges of (LV EF, ED LV cavity radius at the base mm, ED wall mm, RV size, RV EF)
_GROUP_RANGES: dict[str, tuple[tuple[float, float], ...]] = {
    "NOR": ((0.55, 0.68), (21.0, 26.0), (6.5, 9.0), (0.9, 1.1), (0.45, 0.60)),
    "DCM": ((0.15, 0.35), (29.0, 35.0), (5.0, 7.0), (0.95, 1.2), (0.30, 0.50)),
    "HCM": ((0.60, 0.75), (16.0, 21.0), (12.0, 17.0), (0.8, 1.0), (0.50, 0.65)),
    "MINF": ((0.30, 0.45), (25.0, 30.0), (7.0, 9.5), (0.9, 1.1), (0.40, 0.55)),
    "RV": ((0.50, 0.65), (19.0, 24.0), (6.0, 8.5), (1.45, 1.8), (0.20, 0.35)),
}


@dataclass(frozen=True)
class Anatomy:
    """Per-patient anatomy, acquisition and contrast of one phantom patient.

    Lengths are in mm, angles in radians (display plane, 0 = +x, counter-clockwise with
    rows pointing down), ``slice_z`` is the long-axis position of each slice (0 base, 1 apex).
    """

    group: str
    height_cm: float
    weight_kg: float
    shape: tuple[int, int]  # display (ny, nx)
    spacing: tuple[float, float, float]  # (dx, dy, slice thickness)
    slice_z: tuple[float, ...]
    n_frames: int
    es_index: int  # 0-based frame index of end-systole
    lv_center: tuple[float, float]  # (y, x) of the LV centre at the base, from image centre
    lv_drift: tuple[float, float]  # (y, x) shift of the LV centre from base to apex
    rv_angle: float  # direction LV -> RV
    ellipticity: float
    cavity_radius: float  # ED LV cavity radius at the base
    cavity_apex: float  # z where the LV cavity closes (the epicardium closes at z = 1)
    wall: float  # ED wall thickness at the base
    ef: float
    rv_ef: float
    rv_depth: float  # ED RV crescent thickness at the base
    rv_wrap: float  # how far the crescent wraps around the LV (x LV radius)
    rv_apex: float  # z where the RV vanishes
    long_shortening: float  # fraction the apex moves towards the base at ES
    harmonics: tuple[float, ...]  # (amplitude, phase) pairs of the cavity outline, k = 2, 3, 4
    infarct: tuple[float, float, float]  # (angle, half width, wall thinning 0..1)
    papillary: tuple[float, float]  # (angle of the pair, radius)
    fat: tuple[float, float]  # (angle of epicardial fat, thickness)
    body: tuple[float, float, float, float]  # chest (y offset, x offset, semi-axis y, semi-axis x)
    liver_start: float  # z where the liver appears
    lung_vessels: tuple[float, ...]  # (y, x, r) triples, relative to the LV centre
    intensities: tuple[float, ...]  # relative intensity of each tissue class
    gain: float  # intensity of blood (before bias and noise)
    noise: float  # Rician noise sigma (x gain)
    blur: float  # partial-volume Gaussian sigma (pixels)
    bias: tuple[float, ...]  # coefficients of the log bias field
    bias_clip: float = 0.4  # the log bias field is clipped to +-bias_clip


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _check_regime(regime: object) -> str:
    if not isinstance(regime, str) or regime not in REGIMES:
        raise ConfigError(f"regime: expected one of {', '.join(REGIMES)}, found {regime!r}")
    return regime


def draw_anatomy(seed: int, patient_id: int, n_frames: int, regime: str = "default") -> Anatomy:
    """Draw the anatomy of patient ``patient_id``; depends only on (seed, patient_id, frames,
    regime). ``"shifted"`` keeps the default anatomy and redraws only the acquisition fields
    (noise, bias field and its clip, blur, myocardial contrast) from
    ``default_rng([seed, patient_id, 7])``. Raises ConfigError for an unknown regime.
    """
    regime = _check_regime(regime)
    a = _draw_default(seed, patient_id, n_frames)
    if regime == "default":
        return a
    rng = np.random.default_rng([seed, patient_id, 7])  # acquisition only: anatomy untouched
    noise = _u(rng, 0.10, 0.15)
    bias = tuple(float(v) for v in rng.normal(0.0, 0.3, size=6))
    blur = _u(rng, 1.0, 1.4)
    myo = _u(rng, 0.45, 0.6)  # relative to blood (1.0)
    intensities = np.asarray(a.intensities)
    # every tissue drawn relative to the myocardium keeps its ratio to it
    intensities[[MUSCLE, LV_MYO, RV_WALL, PAPILLARY]] *= myo / intensities[LV_MYO]
    return replace(
        a,
        intensities=tuple(float(v) for v in intensities),
        noise=noise,
        blur=blur,
        bias=bias,
        bias_clip=0.8,
    )


def _draw_default(seed: int, patient_id: int, n_frames: int) -> Anatomy:
    """The default regime's patient (the stream of draws that pins the training phantom)."""
    rng = np.random.default_rng([seed, patient_id])
    group = GROUPS[(patient_id - 1) % len(GROUPS)]
    ef_r, cav_r, wall_r, rv_r, rvef_r = _GROUP_RANGES[group]
    size = _u(rng, 0.9, 1.1)  # body size factor
    dx = round(_u(rng, 1.2, 1.6), 4)
    shape = (int(rng.integers(112, 145)), int(rng.integers(112, 145)))
    n_slices = int(rng.integers(7, 11))
    z0, z1 = _u(rng, -0.03, 0.06), _u(rng, 0.9, 1.08)
    cavity, wall = _u(rng, *cav_r) * size, _u(rng, *wall_r) * size
    rv_depth = _u(rng, 14.0, 20.0) * _u(rng, *rv_r) * size
    extent = cavity + wall + rv_depth  # how far the heart reaches from the LV centre
    slack = [max(0.0, 0.5 * n * dx - extent - 4.0) for n in shape]
    centre = tuple(float(rng.uniform(-min(12.0, s), min(12.0, s))) for s in slack)
    rv_angle = math.radians(_u(rng, 130.0, 190.0))
    # shift the LV so that the LV + RV complex, not the LV alone, sits near the image centre
    shift = 0.5 * rv_depth
    lv_center = (centre[0] + shift * math.sin(rv_angle), centre[1] - shift * math.cos(rv_angle))
    infarct_depth = _u(rng, 0.4, 0.65) if group == "MINF" else 0.0
    blood = 1.0
    myo = _u(rng, 0.22, 0.45)
    intensities = np.zeros(N_TISSUES)
    intensities[[MUSCLE, FAT, LUNG, LIVER, VESSEL, BONE]] = (
        myo * _u(rng, 0.9, 1.25),
        _u(rng, 0.7, 1.0),
        _u(rng, 0.03, 0.1),
        _u(rng, 0.4, 0.6),
        blood * _u(rng, 0.8, 1.05),
        _u(rng, 0.3, 0.55),
    )
    intensities[[LV_BLOOD, RV_BLOOD, LV_MYO, RV_WALL, PAPILLARY]] = (
        blood,
        blood * _u(rng, 0.85, 1.0),
        myo,
        myo * _u(rng, 1.0, 1.2),
        myo * _u(rng, 1.0, 1.3),
    )
    vessels = []
    for side in (-1.0, 1.0):
        for _ in range(int(rng.integers(3, 7))):
            vessels += [_u(rng, -50, 50), side * _u(rng, 60, 110), _u(rng, 1.5, 3.5)]
    return Anatomy(
        group=group,
        height_cm=float(round(_u(rng, 150, 195))),
        weight_kg=float(round(_u(rng, 48, 110))),
        shape=shape,
        spacing=(dx, dx, round(_u(rng, 8.0, 10.0), 2)),
        slice_z=tuple(float(z) for z in np.linspace(z0, z1, n_slices)),
        n_frames=n_frames,
        es_index=min(n_frames - 1, max(1, round(_u(rng, 0.3, 0.45) * n_frames) - 1)),
        lv_center=lv_center,
        lv_drift=(_u(rng, -6, 6), _u(rng, -6, 6)),
        rv_angle=rv_angle,
        ellipticity=_u(rng, 0.0, 0.12),
        cavity_radius=cavity,
        cavity_apex=_u(rng, 0.78, 0.9),
        wall=wall,
        ef=_u(rng, *ef_r),
        rv_ef=_u(rng, *rvef_r),
        rv_depth=rv_depth,
        rv_wrap=_u(rng, 1.2, 1.45) * (1.1 if group == "RV" else 1.0),
        rv_apex=_u(rng, 0.65, 0.85),
        long_shortening=_u(rng, 0.04, 0.1),
        harmonics=tuple(float(v) for v in rng.uniform([0, 0] * 3, [0.05, 2 * np.pi] * 3)),
        infarct=(_u(rng, 0, 2 * np.pi), _u(rng, 0.5, 0.9), infarct_depth),
        papillary=(_u(rng, -0.5, 0.5), _u(rng, 2.5, 4.0) * size),
        fat=(_u(rng, 0, 2 * np.pi), _u(rng, 2.0, 4.5)),
        body=(_u(rng, 20, 35) * size, _u(rng, -15, 25), _u(rng, 100, 120) * size, 165 * size),
        liver_start=_u(rng, 0.35, 0.6),
        lung_vessels=tuple(vessels),
        intensities=tuple(float(v) for v in intensities),
        gain=_u(rng, 450.0, 1000.0),
        noise=_u(rng, 0.03, 0.08),
        blur=_u(rng, 0.5, 0.9),
        bias=tuple(float(v) for v in rng.normal(0.0, 0.12, size=6)),
    )


def _contraction(frame: int, anatomy: Anatomy) -> float:
    """Cosine cardiac cycle: 0 at ED (frame 0), 1 at ES, relaxing back towards ED."""
    es, n = anatomy.es_index, anatomy.n_frames
    if frame <= es:
        return 0.5 * (1.0 - math.cos(math.pi * frame / es))
    return 0.5 * (1.0 + math.cos(math.pi * (frame - es) / (n - es)))


def _ellipse(
    y: np.ndarray, x: np.ndarray, cy: float, cx: float, ay: float, ax: float
) -> np.ndarray:
    return ((y - cy) / ay) ** 2 + ((x - cx) / ax) ** 2 < 1.0


def _background(a: Anatomy, y: np.ndarray, x: np.ndarray, z: float) -> np.ndarray:
    """Tissues around the heart at slice position ``z``: (ny, nx) int8, coords relative to LV."""
    t = np.full(y.shape, AIR, dtype=np.int8)
    by, bx, ay, ax = a.body
    t[_ellipse(y, x, by, bx, ay, ax)] = FAT  # subcutaneous fat rim ...
    t[_ellipse(y, x, by, bx, ay - 9.0, ax - 12.0)] = MUSCLE  # ... around chest-wall muscle
    heart = a.cavity_radius + a.wall
    for cy, cx, ry, rx in ((0.0, -heart - 50.0, 80.0, 55.0), (8.0, heart + 38.0, 75.0, 45.0)):
        t[_ellipse(y, x, cy, cx, ry, rx)] = LUNG
    for cy, cx, r in np.asarray(a.lung_vessels).reshape(-1, 3):
        t[_ellipse(y, x, cy, cx, r, r) & (t == LUNG)] = VESSEL
    # mediastinum: soft tissue around the LV + RV complex
    my = -0.5 * a.rv_depth * math.sin(a.rv_angle)
    mx = 0.5 * a.rv_depth * math.cos(a.rv_angle)
    reach = heart + 0.5 * a.rv_depth + 12.0
    t[_ellipse(y, x, my, mx, reach, reach)] = MUSCLE
    t[_ellipse(y, x, by + ay - 40.0, bx - 5.0, 17.0, 16.0)] = BONE  # vertebral body
    t[_ellipse(y, x, by + ay - 58.0, bx + 25.0, 12.0, 12.0)] = VESSEL  # descending aorta
    if z > a.liver_start:
        grow = math.sqrt(min(1.0, (z - a.liver_start) / 0.4))
        t[_ellipse(y, x, 75.0, -55.0, 60.0 * grow, 85.0 * grow)] = LIVER
    if z < 0.15:  # aortic root above the base, beside the heart
        ang = a.rv_angle - 1.3
        dist = heart + 18.0
        t[_ellipse(y, x, -dist * math.sin(ang), dist * math.cos(ang), 13.0, 13.0)] = VESSEL
    return t


@dataclass(frozen=True)
class _Geometry:
    """Phase-independent pixel geometry of one slice, all arrays (ny, nx)."""

    y: np.ndarray  # mm from the LV centre, rows
    x: np.ndarray  # mm from the LV centre, columns
    u: np.ndarray  # heart frame, towards the RV
    v: np.ndarray  # heart frame, across
    rho: np.ndarray  # elliptic radius
    outline: np.ndarray  # cavity outline factor
    bump: np.ndarray  # infarct sector weight 0..1
    wall: np.ndarray  # wall thickness factor (septum thicker, infarct thinner)
    fat_side: np.ndarray  # sector with epicardial fat


def slice_geometry(a: Anatomy, slice_index: int) -> _Geometry:
    """Precompute the phase-independent geometry of slice ``slice_index``."""
    ny, nx = a.shape
    frac = min(max(a.slice_z[slice_index], 0.0), 1.0)
    cy = a.lv_center[0] + a.lv_drift[0] * frac
    cx = a.lv_center[1] + a.lv_drift[1] * frac
    y = (np.arange(ny, dtype=np.float32)[:, None] - 0.5 * (ny - 1)) * a.spacing[0] - cy
    x = (np.arange(nx, dtype=np.float32)[None, :] - 0.5 * (nx - 1)) * a.spacing[0] - cx
    y, x = (np.ascontiguousarray(g) for g in np.broadcast_arrays(y, x))
    cos_r, sin_r = math.cos(a.rv_angle), math.sin(a.rv_angle)
    u = x * cos_r - y * sin_r  # display y points down, hence the signs
    v = -x * sin_r - y * cos_r
    e = a.ellipticity
    phi = np.arctan2(v, u)  # 0 points at the septum / RV
    h = a.harmonics
    outline = 1.0 + sum(h[2 * i] * np.cos((i + 2) * phi + h[2 * i + 1]) for i in range(3))
    ang = np.abs(np.angle(np.exp(1j * (phi - a.infarct[0]))))
    bump = np.where(ang < a.infarct[1], np.cos(0.5 * np.pi * ang / a.infarct[1]), 0.0)
    wall = (1.0 + 0.12 * np.cos(phi)) * (1.0 - a.infarct[2] * bump)
    return _Geometry(
        y=y,
        x=x,
        u=u,
        v=v,
        rho=np.hypot(u / (1.0 + e), v / (1.0 - e)),
        outline=np.asarray(outline, dtype=np.float32),
        bump=bump.astype(np.float32),
        wall=wall.astype(np.float32),
        fat_side=np.cos(phi - a.fat[0]) > -0.3,
    )


def rasterize_slice(
    a: Anatomy,
    slice_index: int,
    contraction: float,
    dz: float = 0.0,
    geometry: _Geometry | None = None,
    background: np.ndarray | None = None,
) -> np.ndarray:
    """Tissue classes of one slice at one cardiac phase: (ny, nx) int8.

    ``contraction`` is 0 at ED and 1 at ES; ``dz`` shifts the long-axis position (used to
    sample through the slice thickness). ``geometry`` (from :func:`slice_geometry`) and
    ``background`` (tissue around the heart, not modified) may be passed to save time.
    Map tissues to ACDC labels with ``TISSUE_LABEL[tissue]``.
    """
    g = slice_geometry(a, slice_index) if geometry is None else geometry
    z = a.slice_z[slice_index] + dz
    tissue = (_background(a, g.y, g.x, z) if background is None else background).copy()
    c = contraction
    zz = max(z, 0.0) * (1.0 + a.long_shortening * c)  # the apex moves towards the base
    if zz >= 1.0:
        return tissue
    rho, u, v = g.rho, g.u, g.v
    wall0 = a.wall * (1.0 - 0.3 * zz)
    wall = wall0 * g.wall
    k_lv = 1.0 - c * (1.0 - math.sqrt(1.0 - a.ef))  # cavity radius factor
    if zz < a.cavity_apex:
        cav0 = a.cavity_radius * math.sqrt(1.0 - (zz / a.cavity_apex) ** 2)
        cav_ed = cav0 * g.outline
        cav = cav_ed * (k_lv + (1.0 - k_lv) * 0.8 * a.infarct[2] * g.bump)  # akinetic infarct
        epi = np.sqrt((cav_ed + wall) ** 2 - cav_ed**2 + cav**2)  # myocardial area is kept
        r_mean = math.sqrt((cav0 + wall0) ** 2 - cav0**2 + (cav0 * k_lv) ** 2)
    else:
        cav0 = 0.0
        cav = None
        r_mean = wall0 * math.sqrt(
            max(0.0, 1.0 - ((zz - a.cavity_apex) / (1.0 - a.cavity_apex)) ** 2)
        )
        epi = r_mean * g.wall
    myo = rho < epi
    tissue[(rho < epi + a.fat[1] + 1.0) & g.fat_side] = FAT  # epicardial fat
    # RV: an ellipse beside the LV minus the LV, i.e. a crescent hugging the septum
    grow = math.sqrt(max(0.0, 1.0 - (zz / a.rv_apex) ** 2))
    if grow > 0.0:
        k_rv = 1.0 - c * (1.0 - (1.0 - a.rv_ef) ** 0.7)
        depth = a.rv_depth * grow * k_rv
        au = 0.5 * r_mean + depth
        av = r_mean * (1.0 + (a.rv_wrap - 1.0) * grow) * (1.0 - 0.25 * c * (1.0 - k_rv))
        d = 0.5 * r_mean
        tissue[_ellipse(u, v, d, 0.0, au + 5.0, av + 5.0) & ~myo & g.fat_side] = FAT
        tissue[_ellipse(u, v, d, 0.0, au + 3.0, av + 3.0) & ~myo] = RV_WALL
        tissue[_ellipse(u, v, d, 0.0, au, av) & ~myo] = RV_BLOOD
    tissue[myo] = LV_MYO
    if cav is None:
        return tissue
    blood = rho < cav
    tissue[blood] = LV_BLOOD
    if 0.15 < zz < 0.75 and cav0 * k_lv > 7.0:  # two papillary muscles on the lateral wall
        pr = a.papillary[1] * (1.0 + 0.4 * c) * math.sin(math.pi * zz)
        for offset in (-0.9, 0.9):
            ang_p = math.pi + a.papillary[0] + offset
            pu, pv = 0.7 * cav0 * k_lv * math.cos(ang_p), 0.7 * cav0 * k_lv * math.sin(ang_p)
            tissue[_ellipse(u, v, pu, pv, pr, pr) & blood] = PAPILLARY
    return tissue


def render_frames(
    a: Anatomy, frames: list[int], seed: int, patient_id: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Image and labels of cine frames: each (ny, nx, S) int16 intensities, (ny, nx, S) uint8.

    Images average three tissue samples through the slice thickness (through-plane partial
    volume), add slice texture, in-plane Gaussian blur, a multiplicative bias field and Rician
    noise drawn from ``default_rng([seed, patient_id, 1, frame])``: a frame does not depend
    on which other frames are rendered.
    """
    ny, nx = a.shape
    n_slices = len(a.slice_z)
    table = np.asarray(a.intensities, dtype=np.float32)
    step = (a.slice_z[-1] - a.slice_z[0]) / max(1, n_slices - 1)
    offsets = (0.0, -0.3 * step, 0.3 * step)
    geometry = [slice_geometry(a, s) for s in range(n_slices)]
    backgrounds = [
        [_background(a, g.y, g.x, a.slice_z[s] + dz) for dz in offsets]
        for s, g in enumerate(geometry)
    ]
    tex_rng = np.random.default_rng([seed, patient_id, 2])  # texture is static over frames
    texture = ndimage.gaussian_filter(tex_rng.standard_normal((ny, nx, n_slices)), (1.5, 1.5, 0))
    texture = (1.0 + 0.4 * texture).astype(np.float32)
    yy = np.linspace(-1.0, 1.0, ny, dtype=np.float32)[:, None, None]
    xx = np.linspace(-1.0, 1.0, nx, dtype=np.float32)[None, :, None]
    zs = np.linspace(-1.0, 1.0, n_slices, dtype=np.float32)[None, None, :]
    b = a.bias
    log_bias = b[0] * yy + b[1] * xx + b[2] * yy * xx + b[3] * yy**2 + b[4] * xx**2 + b[5] * zs
    scale = a.gain * np.exp(np.clip(log_bias, -a.bias_clip, a.bias_clip)) * texture  # (ny, nx, S)
    sigma = a.noise * a.gain
    out = []
    for frame in frames:
        c = _contraction(frame, a)
        image = np.empty((ny, nx, n_slices), dtype=np.float32)
        label = np.empty((ny, nx, n_slices), dtype=np.uint8)
        for s in range(n_slices):
            t = [
                rasterize_slice(a, s, c, dz, geometry[s], bg)
                for dz, bg in zip(offsets, backgrounds[s], strict=True)
            ]
            label[..., s] = TISSUE_LABEL[t[0]]
            image[..., s] = (2.0 * table[t[0]] + table[t[1]] + table[t[2]]) / 4.0
        image = ndimage.gaussian_filter(image, (a.blur, a.blur, 0.0)) * scale
        rng = np.random.default_rng([seed, patient_id, 1, frame])
        real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
        imag = sigma * rng.standard_normal(image.shape, dtype=np.float32)
        magnitude = np.sqrt(real**2 + imag**2)  # Rician
        out.append((np.clip(np.rint(magnitude), 0, 32767).astype(np.int16), label))
    return out


def _nifti_bytes(data: np.ndarray, zooms: tuple[float, ...]) -> bytes:
    """Gzipped NIfTI-1 bytes of ``data`` (x, y, slice[, frame]); mtime 0 so bytes are stable."""
    affine = np.diag([*zooms[:3], 1.0])
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_zooms(zooms)
    img.header.set_xyzt_units("mm", "msec")
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def write_patient(
    folder: Path,
    patient_id: int,
    seed: int,
    n_frames: int,
    write_4d: bool,
    regime: str = "default",
) -> None:
    """Write one patient folder: ED/ES frames and ``_gt`` labels, optional cine, Info.cfg.

    The folder is built under a temporary name and renamed into place (replacing an older
    one), and each file in it is itself written through ``atomic_path``.
    """
    a = draw_anatomy(seed, patient_id, n_frames, regime)
    name = folder.name
    ed, es = 0, a.es_index
    frames = list(range(n_frames)) if write_4d else [ed, es]
    rendered = dict(zip(frames, render_frames(a, frames, seed, patient_id), strict=True))
    files: dict[str, bytes] = {}
    for f in (ed, es):
        image, label = rendered[f]  # (ny, nx, S) -> stored as (x, y, slice)
        files[f"{name}_frame{f + 1:02d}.nii.gz"] = _nifti_bytes(image.transpose(1, 0, 2), a.spacing)
        files[f"{name}_frame{f + 1:02d}_gt.nii.gz"] = _nifti_bytes(
            label.transpose(1, 0, 2), a.spacing
        )
    if write_4d:
        cine = np.stack([rendered[f][0] for f in frames], axis=-1)  # (ny, nx, S, T)
        dt = round(900.0 / n_frames, 2)  # frame interval of a 900 ms RR interval
        files[f"{name}_4d.nii.gz"] = _nifti_bytes(cine.transpose(1, 0, 2, 3), (*a.spacing, dt))
    files["Info.cfg"] = (
        f"ED: {ed + 1}\nES: {es + 1}\nGroup: {a.group}\nHeight: {a.height_cm:.1f}\n"
        f"NbFrame: {n_frames}\nWeight: {a.weight_kg:.1f}\n"
    ).encode()
    target = folder
    try:
        with atomic_path(folder) as tmp_folder:
            tmp_folder.mkdir()
            for file_name, payload in files.items():
                target = folder / file_name
                with atomic_path(tmp_folder / file_name) as tmp:
                    tmp.write_bytes(payload)
            target = folder
    except OSError as exc:
        raise DataError(f"{target}: could not write the phantom file ({exc})") from exc


def write_acdc_phantom(
    root: Path,
    n_patients: int,
    seed: int,
    *,
    first_id: int = 1,
    n_frames: int = 10,
    write_4d: bool = True,
    regime: str = "default",
) -> list[Path]:
    """Write ``n_patients`` phantom patients to ``root/training/patientNNN/``; return the folders.

    Patient ids run from ``first_id``; groups cycle DCM, HCM, MINF, NOR, RV by id. The same
    arguments give the same bytes. ``regime`` (see :data:`REGIMES`) picks the acquisition;
    a patient's labels are the same in every regime. Raises ConfigError for invalid
    arguments and DataError (naming the file) when a file cannot be written.
    """
    _check_regime(regime)
    for key, value, low in (
        ("n_patients", n_patients, 0),
        ("seed", seed, 0),
        ("first_id", first_id, 1),
        ("n_frames", n_frames, 2),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ConfigError(f"{key}: expected an integer >= {low}, found {value!r}")
    if first_id + n_patients - 1 > 999:
        raise ConfigError(
            f"first_id, n_patients: expected patient ids up to 999 (patientNNN), "
            f"found ids up to {first_id + n_patients - 1}"
        )
    folders = []
    for pid in range(first_id, first_id + n_patients):
        folder = Path(root) / "training" / f"patient{pid:03d}"
        write_patient(folder, pid, seed, n_frames, write_4d, regime)
        folders.append(folder)
    logger.info(
        "wrote %d phantom patients (seed %d, %s regime) to %s",
        n_patients,
        seed,
        regime,
        Path(root) / "training",
    )
    return folders


def main(argv: list[str] | None = None) -> None:
    """``python -m mri_ensemble.data.phantom OUT [--regime shifted]``: write the phantom."""
    import argparse

    ap = argparse.ArgumentParser(description="Write the cardiac phantom in the ACDC layout.")
    ap.add_argument("out", type=Path, help="folder to create (gets training/patientNNN/)")
    ap.add_argument("--patients", type=int, default=30)
    ap.add_argument(
        "--seed", type=int, default=42, help="params.yaml's seed gives ingest's phantom"
    )
    ap.add_argument("--first-id", type=int, default=1, help="id of the first patient")
    ap.add_argument(
        "--regime",
        choices=REGIMES,
        default="default",
        help="acquisition: default (training's) or shifted (outside training's range)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_acdc_phantom(
        args.out, args.patients, args.seed, first_id=args.first_id, regime=args.regime
    )


if __name__ == "__main__":
    main()
