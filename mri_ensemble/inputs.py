"""A user's input files: what kind each is, reading and checking it, and the output's lock.

Kinds: ``"nifti"`` (.nii, .nii.gz), ``"image"`` (PNG/JPEG slices) and ``"hdf5"`` (fastMRI
.h5), by suffix, or by content when the suffix says nothing (an upload that lost its name).
Which kinds a task takes is the task's (``Task.input_kinds``). Every reader refuses what
cannot be an MRI input with a DataError naming the file and what was wrong.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from .data.acdc import (
    _NIFTI_ERRORS,
    INPLANE_SPACING_MM,
    LABEL_MAP_VALUES,
    MIN_INPLANE_PX,
    check_contrast,
    check_not_label_map,
    check_plausible,
    check_voxel_count,
    raw_zooms,
)
from .errors import ConfigError, DataError, OutputError

log = logging.getLogger(__name__)

InputKind = Literal["nifti", "image", "hdf5"]
NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
HDF5_SUFFIXES: tuple[str, ...] = (".h5", ".hdf5")
KIND_NAMES = {"nifti": "a NIfTI volume", "image": "a PNG/JPEG image", "hdf5": "an HDF5 file"}
_MAGIC: tuple[tuple[bytes, InputKind], ...] = (
    (b"\x89HDF\r\n\x1a\n", "hdf5"),
    (b"\x89PNG\r\n\x1a\n", "image"),
    (b"\xff\xd8\xff", "image"),
    (b"\x1f\x8b", "nifti"),  # gzip: .nii.gz is the only gzipped input we take
)


def file_suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def input_kind(path: Path, task: str | None = None) -> InputKind:
    """``"nifti"``, ``"image"`` (PNG/JPEG) or ``"hdf5"`` by suffix (by content when the
    suffix says nothing). DataError when it is none of them or does not fit ``task``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    suffix = file_suffix(path)
    kind: InputKind | None = None
    if suffix in NIFTI_SUFFIXES:
        kind = "nifti"
    elif suffix in IMAGE_SUFFIXES:
        kind = "image"
    elif suffix in HDF5_SUFFIXES:
        kind = "hdf5"
    elif suffix in ("", ".gz", ".bin", ".dat", ".tmp"):  # e.g. an upload that lost its name
        with path.open("rb") as f:
            head = f.read(8)
        kind = next((k for magic, k in _MAGIC if head.startswith(magic)), None)
    from .tasks import TASKS, get_task

    expected = (
        get_task(task).expected_inputs
        if task
        else "; ".join(t.expected_inputs for t in TASKS.values())
    )
    if kind is None:
        raise DataError(
            f"{path.name}: wrong file type ({suffix or 'no suffix'}); expected {expected}"
        )
    if task and kind not in get_task(task).input_kinds:
        other = next(t.name for t in TASKS.values() if kind in t.input_kinds)
        raise DataError(
            f"{path.name}: wrong file type for {task} ({KIND_NAMES[kind]} is a {other} "
            f"input); expected {expected}"
        )
    return kind


@dataclass
class NiftiScan:
    """A NIfTI input: ``data`` float32 (x, y, z) (2-D inputs get z = 1, 4-D their first
    frame), ``zooms`` (dx, dy, dz) mm, ``shape`` the spatial shape to give back (2-D or 3-D),
    ``image`` the nibabel image (affine and header of the output)."""

    path: Path
    image: nib.Nifti1Image
    data: np.ndarray
    zooms: tuple[float, float, float]
    shape: tuple[int, ...]

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.image.affine)


def _nifti_error(path: Path, exc: BaseException) -> DataError:
    msg = str(exc).splitlines()[0].replace(str(path), path.name) if str(exc) else ""
    return DataError(
        f"{path}: expected a readable NIfTI file, found a corrupt one ({msg or type(exc).__name__})"
    )


def read_nifti(path: Path) -> NiftiScan:
    """Read a NIfTI volume (see :class:`NiftiScan`); DataError naming the file if it is
    missing, corrupt, not 2-D/3-D/4-D, not finite or without positive voxel sizes."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    try:
        with nib.imageglobals.LoggingOutputSuppressor():  # pixdim 0: refused below
            img = nib.load(path, mmap=False)
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise ImageFileError(f"not a NIfTI image ({type(img).__name__})")
        zooms = raw_zooms(path, img)  # as stored: nibabel turns a pixdim of 0 into 1
        full = tuple(int(n) for n in img.shape)
        if len(full) == 4 and full[3] < 1:
            raise DataError(f"{path}: expected a non-empty image, found shape {full}")
        check_voxel_count(path, full[:3])  # from the header, before reading any voxel
        if len(full) in (2, 3) and len(zooms) >= 2 and all(z > 0 for z in zooms[:2]):
            check_plausible(path, (full[0], full[1]), zooms[:2], through_plane=False)
        # 4-D: only the first frame is read
        data = np.asarray(img.dataobj[..., 0] if len(full) == 4 else img.dataobj)
    except _NIFTI_ERRORS as exc:
        raise _nifti_error(path, exc) from exc
    dtype = img.get_data_dtype()
    if len(full) == 4 and full[3] > 1:
        log.info("%s: 4-D (%s), using its first frame", path.name, full)
    if data.ndim == 2:
        shape: tuple[int, ...] = data.shape
        data = data[..., None]
        zooms = (*zooms[:2], 1.0)
    elif data.ndim == 3:
        shape = data.shape
    else:
        raise DataError(f"{path}: expected a 2-D, 3-D or 4-D NIfTI image, found shape {full}")
    if min(data.shape) < 1:
        raise DataError(f"{path}: expected a non-empty image, found shape {data.shape}")
    if data.dtype.kind not in "biuf":
        raise DataError(f"{path}: expected real-valued intensities, found dtype {data.dtype}")
    data = data.astype(np.float32)
    if not np.isfinite(data).all():
        raise DataError(f"{path}: expected finite intensities, found NaN or Inf values")
    if len(zooms) < 3 or not all(np.isfinite(z) and z > 0 for z in zooms[:3]):
        raise DataError(f"{path}: expected positive voxel sizes, found zooms {zooms}")
    check_plausible(path, (data.shape[0], data.shape[1]), zooms[:3], through_plane=len(shape) == 3)
    check_not_label_map(path, data, dtype)
    check_contrast(path, data)
    return NiftiScan(path, img, data, (zooms[0], zooms[1], zooms[2]), shape)


def read_slice_image(path: Path) -> np.ndarray:
    """A PNG/JPEG slice as greyscale uint8 (H, W); DataError naming the file if unreadable."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    try:
        with Image.open(path) as raw:
            raw.load()
            image = np.asarray(raw.convert("L"))
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: image too large to be a slice ({exc})") from exc
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        first = str(exc).splitlines()[0].replace(str(path), path.name) if str(exc) else ""
        raise DataError(
            f"{path}: expected a readable PNG/JPEG image, found a corrupt one "
            f"({first or type(exc).__name__})"
        ) from exc
    if min(image.shape) < MIN_INPLANE_PX:
        raise DataError(
            f"{path}: image size {image.shape[1]} x {image.shape[0]} is too small to segment "
            f"(expected at least {MIN_INPLANE_PX} x {MIN_INPLANE_PX} pixels)"
        )
    if set(np.unique(image).tolist()) <= set(range(LABEL_MAP_VALUES)):  # class indices 0..3
        check_not_label_map(path, image, image.dtype)
    check_contrast(path, image)
    return image


def check_pixel_mm(pixel_mm: float | None) -> None:
    """ConfigError unless ``pixel_mm`` is None or a plausible in-plane pixel size (mm)."""
    lo, hi = INPLANE_SPACING_MM
    if pixel_mm is not None and not (np.isfinite(pixel_mm) and lo <= pixel_mm <= hi):
        raise ConfigError(
            f"--pixel-mm: expected a pixel size from {lo:g} to {hi:g} mm, found {pixel_mm}"
        )


def check_output(inp: Path, out: Path) -> None:
    """OutputError when ``out`` is, or resolves to, the input file ``inp`` (the same path,
    a symlink or a hard link to it): predict never replaces what it was given."""
    same = Path(inp).resolve() == Path(out).resolve()
    if not same and Path(out).exists():
        try:
            same = os.path.samefile(inp, out)
        except OSError:
            same = False
    if same:
        raise OutputError(
            f"--output {out}: is the input file {inp}; predict never overwrites its input, "
            "choose another name"
        )


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on output ``out`` (``flock`` on the sibling ``.<name>.lock``)
    while a run writes it, so two runs on one output cannot both report success: the second
    fails at once with OutputError. Under the lock, temporaries that a killed run left
    (``.<name>.*.tmp``, :func:`~mri_ensemble.io.atomic_path`'s names) are removed. The
    output's missing parent folders are created."""
    out = Path(out)
    created = [d for d in (out.parent, *out.parent.parents) if not d.exists()]
    lock_path = out.parent / f".{out.name}.lock"
    while True:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(
                f"--output {out}: cannot write in {out.parent} ({exc.strerror or exc})"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(
                f"--output {out}: another run is writing it now (lock {lock_path.name} held); "
                "wait for it or choose another name"
            ) from None
        try:  # the holder before us may have removed the lock file: lock the current one
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        for stale in out.parent.glob(f".{out.name}.*.tmp"):
            log.warning("removing %s, left by a run that was killed", stale)
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        yield
    except BaseException:
        lock_path.unlink(missing_ok=True)
        for d in created:  # a refused run leaves no empty folder behind either
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)
