"""Reader for cardiac short-axis MRI in the ACDC challenge layout.

Layout (``root`` may hold ``training/`` and/or ``testing/``, or the patient folders directly)::

    <root>/training/patient001/Info.cfg                    ED: 1, ES: 12, Group: DCM, ...
    <root>/training/patient001/patient001_4d.nii.gz        the cine: never opened here
    <root>/training/patient001/patient001_frame01.nii.gz   ED image, (x, y, z)
    <root>/training/patient001/patient001_frame01_gt.nii.gz
    <root>/training/patient001/patient001_frame12.nii.gz   ES image
    <root>/training/patient001/patient001_frame12_gt.nii.gz

Labels are 0 background, 1 right ventricle, 2 myocardium, 3 left-ventricle cavity.

A NIfTI array indexed ``(x, y, z)`` with zooms ``(dx, dy, dz)`` becomes an array indexed
``(S, H, W) = (z, y, x)`` (``np.transpose(data, (2, 1, 0))``, no flips), so that image rows run
along y and columns along x. Each slice is then resampled in-plane to ``spacing_mm`` (image:
linear, label: nearest neighbour; slices are never interpolated across), intensity-normalised
and centre-cropped / padded to ``size`` x ``size``: :func:`mri_ensemble.data.grid.to_grid`,
the forward that predict uses on a user's scan (and inverts for its labels).
"""

from __future__ import annotations

import hashlib
import logging
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError, SpatialImage
from nibabel.wrapstruct import WrapStructError
from tqdm import tqdm

from mri_ensemble.errors import ConfigError, DataError

from .grid import labels_to_grid, resampled_hw, to_grid

logger = logging.getLogger(__name__)

PHASES: tuple[str, str] = ("ED", "ES")
LABEL_VALUES: tuple[int, ...] = (0, 1, 2, 3)
_PATIENT_RE = re.compile(r"^patient\d+$", re.IGNORECASE)  # patient001, Patient001, PATIENT001
# What a clinical MRI voxel can measure, mm per axis: smaller in-plane sizes are micrometre
# headers read as mm (or a scale error), larger ones not an MRI slice at all.
INPLANE_SPACING_MM: tuple[float, float] = (0.05, 20.0)
THROUGHPLANE_SPACING_MM: tuple[float, float] = (0.05, 100.0)
MIN_INPLANE_PX = 4  # fewer pixels per in-plane axis than this cannot show a structure
MAX_VOXELS = 2**27  # per volume (a frame): 512 MiB as float32, far above any MRI scan
LABEL_MAP_VALUES = 4  # an integer image with at most this many distinct values is a label map
_NIFTI_ERRORS = (
    ImageFileError,
    HeaderDataError,
    WrapStructError,
    OSError,  # includes gzip.BadGzipFile
    EOFError,  # truncated gzip stream
    zlib.error,
    ValueError,  # e.g. a data block shorter than the header says
)


@dataclass
class Volume:
    """One cardiac phase of one patient, ready for slice-wise training.

    ``image`` is float32 (S, H, W) in [0, 1]; ``label`` is uint8 (S, H, W) with values in 0-3;
    ``spacing`` is (dz, dy, dx) in mm of the returned arrays.
    """

    case: str
    patient: str
    phase: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    group: str


def list_patients(root: Path) -> list[Path]:
    """Patient folders (``patientNNN``) under ``root``, ``root/training`` and ``root/testing``.

    Returns the folders sorted by patient name. Raises DataError when ``root`` is missing,
    holds no patient folder, or the same patient name appears twice.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"ACDC root {root}: expected an existing folder, found nothing there")
    found: dict[str, Path] = {}
    skipped: list[str] = []
    for parent in (root, root / "training", root / "testing"):
        if not parent.is_dir():
            continue
        for child in sorted(parent.iterdir()):
            if not child.is_dir() or child.name in ("training", "testing"):
                continue
            if not _PATIENT_RE.match(child.name):
                skipped.append(child.name)
                continue
            key = child.name.lower()  # Patient005 and patient005 are one patient
            if key in found:
                raise DataError(
                    f"ACDC root {root}: patient {child.name} found twice "
                    f"({found[key]} and {child}); expected unique patient names"
                )
            found[key] = child
    if skipped:
        logger.warning(
            "ACDC root %s: skipped folders %s (not patientNNN)", root, ", ".join(skipped[:10])
        )
    if not found:
        raise DataError(
            f"ACDC root {root}: expected patient folders (patientNNN/) in it or in its "
            "training/ or testing/ subfolders, found none"
        )
    return [found[name] for name in sorted(found)]


def read_info_cfg(path: Path) -> dict[str, str]:
    """Parse an ACDC ``Info.cfg`` (``Key: value`` lines) into a dict of stripped strings."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: expected the patient's Info.cfg file, found nothing there")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"{path}: expected a readable Info.cfg, got {exc}") from exc
    info: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep or not key.strip():
            raise DataError(f"{path}: line {number}: expected 'Key: value', found {line!r}")
        info[key.strip()] = value.strip()
    return info


def _load_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Load a 3D NIfTI file: returns its (x, y, z) array and zooms (dx, dy, dz) in mm."""
    if not path.is_file():
        raise DataError(f"{path}: expected a NIfTI file, found nothing there")
    try:
        with nib.imageglobals.LoggingOutputSuppressor():  # pixdim 0: we refuse it ourselves
            img = nib.load(path, mmap=False)
        if not isinstance(img, SpatialImage):
            raise ImageFileError(f"not an image file ({type(img).__name__})")
        check_voxel_count(path, img.shape)  # from the header, before reading any voxel
        data = np.asarray(img.dataobj)
        zooms = tuple(round(z, 6) for z in raw_zooms(path, img))
    except _NIFTI_ERRORS as exc:
        msg = str(exc).splitlines()[0].replace(str(path), path.name) if str(exc) else ""
        msg = msg or type(exc).__name__
        raise DataError(
            f"{path}: expected a readable NIfTI file, found a corrupt one ({msg})"
        ) from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D (x, y, z) image, found shape {data.shape}")
    if len(zooms) < 3 or not all(np.isfinite(z) and z > 0 for z in zooms[:3]):
        raise DataError(f"{path}: expected 3 positive voxel sizes, found zooms {zooms}")
    return data, (zooms[0], zooms[1], zooms[2])


def raw_zooms(path: Path, img: SpatialImage) -> tuple[float, ...]:
    """Voxel sizes as the file's header stores them: nibabel replaces a pixdim of 0 with 1
    on load, which would silently make an unknown voxel size 1 mm."""
    try:
        header_class: Any = type(img.header)
        with nib.openers.ImageOpener(str(path)) as f:
            header = header_class.from_fileobj(f, check=False)
        return tuple(float(z) for z in header.get_zooms())
    except (AttributeError, TypeError, *_NIFTI_ERRORS):
        return tuple(float(z) for z in img.header.get_zooms())


def check_plausible(
    path: Path,
    shape_xy: tuple[int, int],
    zooms: Sequence[float],
    *,
    through_plane: bool = True,
) -> None:
    """DataError naming ``path`` and the value unless the voxel sizes (dx, dy[, dz]) mm lie
    in :data:`INPLANE_SPACING_MM` / :data:`THROUGHPLANE_SPACING_MM` and each in-plane axis
    has at least :data:`MIN_INPLANE_PX` pixels."""
    ranges = [("dx", INPLANE_SPACING_MM), ("dy", INPLANE_SPACING_MM)]
    if through_plane:
        ranges.append(("dz", THROUGHPLANE_SPACING_MM))
    for (axis, (lo, hi)), z in zip(ranges, zooms, strict=False):
        if not (np.isfinite(z) and lo <= z <= hi):
            raise DataError(
                f"{path}: voxel size {axis} = {z:g} mm is implausible for MRI "
                f"(expected {lo:g} to {hi:g} mm; a header in micrometres, or none?)"
            )
    if min(shape_xy) < MIN_INPLANE_PX:
        raise DataError(
            f"{path}: in-plane size {shape_xy[0]} x {shape_xy[1]} is too small to segment "
            f"(expected at least {MIN_INPLANE_PX} x {MIN_INPLANE_PX} pixels)"
        )


def check_not_label_map(path: Path, data: np.ndarray, dtype: np.dtype) -> None:
    """DataError if an integer image has at most :data:`LABEL_MAP_VALUES` distinct values:
    it is a label map (e.g. a ``_gt`` file) given as the image."""
    if np.dtype(dtype).kind not in "biu":
        return
    values = np.unique(data)
    if values.size <= LABEL_MAP_VALUES:
        shown = ", ".join(f"{v:g}" for v in values.tolist())
        raise DataError(
            f"{path}: looks like a label map, not a scan (integer image with only "
            f"{values.size} distinct values: {shown}); pass the image, not its _gt labels"
        )


def check_voxel_count(path: Path, shape: Sequence[int]) -> None:
    """DataError naming ``path`` when a volume's header declares more than
    :data:`MAX_VOXELS` voxels: refused before a single voxel is read."""
    n = int(np.prod([int(v) for v in shape], dtype=np.float64))
    if n > MAX_VOXELS:
        raise DataError(
            f"{path}: the header declares shape {tuple(shape)} ({n:,} voxels), more than the "
            f"{MAX_VOXELS:,} of any MRI volume"
        )


def check_contrast(path: Path, data: np.ndarray) -> None:
    """DataError naming ``path`` when every voxel has the same value: no image at all."""
    lo, hi = float(np.min(data)), float(np.max(data))
    if not hi > lo:
        raise DataError(f"{path}: the image is constant (every voxel {lo:g}): nothing to segment")


def _frame_path(folder: Path, stem: str) -> Path:
    """``folder/stem.nii.gz``, or ``folder/stem.nii`` when only that exists."""
    gz = folder / f"{stem}.nii.gz"
    plain = folder / f"{stem}.nii"
    return plain if not gz.exists() and plain.exists() else gz


def _read_phase(
    folder: Path, patient: str, phase: str, frame: int, group: str, size: int, spacing_mm: float
) -> Volume:
    image_path = _frame_path(folder, f"{patient}_frame{frame:02d}")
    label_path = _frame_path(folder, f"{patient}_frame{frame:02d}_gt")
    if not image_path.is_file():
        raise DataError(f"{image_path}: expected the {phase} frame image, found nothing there")
    if not label_path.is_file():
        raise DataError(
            f"{label_path}: expected the {phase} ground-truth labels (_gt), found nothing there"
        )
    image, zooms = _load_nifti(image_path)
    label, label_zooms = _load_nifti(label_path)
    if image.shape != label.shape:
        raise DataError(
            f"{label_path}: expected the shape of {image_path.name} {image.shape}, "
            f"found {label.shape}"
        )
    if not np.allclose(zooms, label_zooms, rtol=1e-3, atol=1e-4):
        raise DataError(
            f"{label_path}: expected the voxel sizes of {image_path.name} {zooms}, "
            f"found {label_zooms}"
        )
    if not np.all(np.isfinite(image)):
        raise DataError(f"{image_path}: expected finite intensities, found NaN or Inf values")
    check_plausible(image_path, (image.shape[0], image.shape[1]), zooms)
    check_not_label_map(image_path, image, image.dtype)
    check_contrast(image_path, image)
    resampled_hw(image_path, (image.shape[1], image.shape[0]), (zooms[1], zooms[0]), spacing_mm)
    values = np.unique(label)
    bad = values[~np.isin(values, LABEL_VALUES)]
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in bad[:10].tolist())
        raise DataError(f"{label_path}: expected label values 0-3, found values {shown}")

    dx, dy, dz = zooms
    image_shw = np.transpose(image.astype(np.float32), (2, 1, 0))  # (x, y, z) -> (S, H, W)
    label_shw = np.transpose(label, (2, 1, 0)).astype(np.uint8)  # (S, H, W)
    image_shw, grid = to_grid(image_shw, (dy, dx), size, spacing_mm, image_path)
    label_shw = labels_to_grid(label_shw, grid)
    return Volume(
        case=f"{patient}_{phase}",
        patient=patient,
        phase=phase,
        image=np.ascontiguousarray(image_shw, dtype=np.float32),
        label=np.ascontiguousarray(label_shw, dtype=np.uint8),
        spacing=(dz, float(spacing_mm), float(spacing_mm)),
        group=group,
    )


def _check_geometry(size: int, spacing_mm: float) -> None:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ConfigError(f"size: expected a positive integer (pixels), found {size!r}")
    if not (
        isinstance(spacing_mm, int | float | np.floating)
        and np.isfinite(spacing_mm)
        and spacing_mm > 0
    ):
        raise ConfigError(f"spacing_mm: expected a positive number (mm), found {spacing_mm!r}")


def read_patient(folder: Path, *, size: int, spacing_mm: float) -> list[Volume]:
    """Read the ED and ES volumes of one patient folder (in that order).

    Each Volume holds image float32 (S, size, size), label uint8 (S, size, size) and spacing
    (dz, spacing_mm, spacing_mm). The cine ``_4d`` file is never opened.
    """
    _check_geometry(size, spacing_mm)
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: expected a patient folder, found nothing there")
    patient = folder.name
    cfg_path = folder / "Info.cfg"
    info = read_info_cfg(cfg_path)
    group = info.get("Group", "unknown")
    volumes = []
    for phase in PHASES:
        if phase not in info:
            raise DataError(f"{cfg_path}: expected a '{phase}:' line (frame number), found none")
        try:
            frame = int(info[phase])
        except ValueError:
            raise DataError(
                f"{cfg_path}: expected an integer frame number for {phase}, found {info[phase]!r}"
            ) from None
        if frame < 1:
            raise DataError(f"{cfg_path}: expected a 1-based frame for {phase}, found {frame}")
        volumes.append(_read_phase(folder, patient, phase, frame, group, size, spacing_mm))
    return volumes


def read_acdc(
    root: Path,
    *,
    size: int,
    spacing_mm: float,
    patients: Sequence[str] | None = None,
    progress: bool = False,
) -> list[Volume]:
    """Read ED and ES volumes of every patient (or of ``patients``) under an ACDC ``root``.

    Returns Volumes sorted by patient, ED before ES; see :func:`read_patient` for shapes.
    """
    _check_geometry(size, spacing_mm)
    folders = list_patients(Path(root))
    if patients is not None:
        by_name = {f.name: f for f in folders}
        missing = sorted(set(patients) - set(by_name))
        if missing:
            raise DataError(
                f"ACDC root {root}: expected patients {', '.join(missing[:10])}, "
                f"found no such folders ({len(by_name)} patients present)"
            )
        folders = [by_name[name] for name in sorted(set(patients))]
    volumes: list[Volume] = []
    for folder in tqdm(
        folders, desc="ACDC patients", unit="patient", disable=None if progress else True
    ):
        volumes.extend(read_patient(folder, size=size, spacing_mm=spacing_mm))
    logger.info("read %d volumes of %d patients from %s", len(volumes), len(folders), root)
    return volumes


def verify_acdc(
    root: Path, *, size: int, spacing_mm: float, progress: bool = False
) -> dict[str, list[Volume]]:
    """Read every patient under ``root`` in one pass before anything is written, like
    nnU-Net's ``--verify_dataset_integrity``: every file's readability, shape, voxel sizes,
    intensities and labels, and no scan under two patient ids (identical voxel data).

    Returns ``{patient: [ED, ES]}``; one DataError listing every problem found (each
    naming its file) otherwise.
    """
    _check_geometry(size, spacing_mm)
    folders = list_patients(Path(root))
    problems: list[str] = []
    out: dict[str, list[Volume]] = {}
    seen: dict[str, tuple[str, Path, str]] = {}
    for folder in tqdm(
        folders, desc="verify ACDC", unit="patient", disable=None if progress else True
    ):
        try:
            vols = read_patient(folder, size=size, spacing_mm=spacing_mm)
        except DataError as exc:
            problems.append(str(exc))
            continue
        out[folder.name] = vols
        for v in vols:
            digest = hashlib.sha256(v.image.tobytes() + str(v.image.shape).encode()).hexdigest()
            first = seen.get(digest)
            if first is not None and first[0] != v.patient:
                problems.append(
                    f"{folder}: the {v.phase} image is identical to the {first[2]} image of "
                    f"{first[1]} (the same scan under patient ids {first[0]} and {v.patient}: "
                    "a leak between splits)"
                )
            seen.setdefault(digest, (v.patient, folder, v.phase))
    if problems:
        raise DataError(
            f"ACDC root {root}: {len(problems)} problem{'s' * (len(problems) > 1)} in "
            f"{len(folders)} patients, "
            f"nothing written: {' | '.join(problems)}"
        )
    logger.info("verified %d patients under %s", len(folders), root)
    return out


def split_patients(
    patients: Sequence[str], fractions: Mapping[str, float], seed: int
) -> dict[str, list[str]]:
    """Split patient ids into named groups by ``fractions`` (e.g. train/val/test), seeded.

    Whole patients are assigned, never slices. Counts follow the fractions by largest
    remainder; every split gets at least one patient. The result keeps the key order of
    ``fractions``, each list sorted, and depends only on the set of ids and ``seed``.
    """
    if not fractions:
        raise ConfigError("fractions: expected at least one split, found an empty mapping")
    for name, frac in fractions.items():
        if not (isinstance(frac, int | float) and np.isfinite(frac) and frac > 0):
            raise ConfigError(f"fractions: expected {name!r} > 0, found {frac!r}")
    total = float(sum(fractions.values()))
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"fractions: expected values summing to 1, found sum {total:.6g}")
    ids = sorted(patients)
    if len(set(ids)) != len(ids):
        dup = sorted({p for p in ids if ids.count(p) > 1})
        raise DataError(f"expected unique patient ids to split, found duplicates {dup[:10]}")
    names = list(fractions)
    n, k = len(ids), len(names)
    if n < k:
        raise DataError(f"expected at least {k} patients to fill splits {names}, found {n}")

    raw = np.array([fractions[name] * n for name in names])
    counts = np.floor(raw).astype(int)
    order = sorted(range(k), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - int(counts.sum())]:
        counts[i] += 1
    for i in range(k):  # every split non-empty: take from the largest one
        if counts[i] == 0:
            counts[int(np.argmax(counts))] -= 1
            counts[i] = 1

    shuffled = [ids[j] for j in np.random.default_rng(seed).permutation(n)]
    out: dict[str, list[str]] = {}
    start = 0
    for name, count in zip(names, counts, strict=True):
        out[name] = sorted(shuffled[start : start + int(count)])
        start += int(count)
    return out
