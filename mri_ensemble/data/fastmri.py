"""Reader and writer for k-space in the fastMRI HDF5 layout.

One file per volume (``file_brain_AXT1_201_6002717.h5`` and the like) holds

==========================  =========================  ====================================
dataset                     dtype, shape               meaning
==========================  =========================  ====================================
``kspace``                  complex64 (S, C, H, W)     multi-coil k-space, H the readout
                            or (S, H, W)               (single-coil files)
``reconstruction_rss``      float32 (S, h, w)          RSS of the fully sampled coil images,
                                                       centre-cropped (320 x 320 in fastMRI)
``reconstruction_esc``      float32 (S, h, w)          single-coil target (knee files)
``ismrmrd_header``          bytes (scalar)             ISMRMRD XML: matrix sizes, FOV, ...
==========================  =========================  ====================================

plus file attributes ``max`` (target volume maximum, the SSIM data range), ``norm`` (l2
norm of the target volume), ``acquisition`` (``AXT1``, ``CORPD_FBK``, ...) and
``patient_id``. Test files have no target. Real fastMRI data and the simulated default
(:mod:`mri_ensemble.data.simulate`) both go through :func:`read_fastmri`, and
:func:`prepare_volume` brings either to the pipeline's common grid (image-domain crop,
SVD coil compression).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mri_ensemble.errors import ConfigError, DataError
from mri_ensemble.io import atomic_path
from mri_ensemble.mri.fft import fft2c, ifft2c, rss

logger = logging.getLogger(__name__)

KSPACE = "kspace"
TARGET_MULTICOIL = "reconstruction_rss"
TARGET_SINGLECOIL = "reconstruction_esc"
HEADER = "ismrmrd_header"
MASK = "mask"
MAX_KSPACE_VALUES = 2**30  # 8 GiB as complex64; fastMRI's largest volumes hold ~2**27


@dataclass
class FastMRIFile:
    """One fastMRI volume as read from disk.

    ``kspace`` complex64 (S, C, H, W) (single-coil files get C = 1); ``target`` float32
    (S, h, w) or None (test files); ``attrs`` the file attributes (``max``, ``norm``,
    ``acquisition``, ``patient_id`` when present; numpy scalars as Python scalars, byte
    strings decoded); ``header`` the raw ``ismrmrd_header`` XML or None; ``mask`` the
    (W,) sampling mask that fastMRI's test and challenge files carry (their k-space is
    already undersampled), else None.
    """

    path: Path
    kspace: np.ndarray
    target: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    header: bytes | None = None
    mask: np.ndarray | None = None  # (W,) bool of already-undersampled (test) files
    single_coil: bool = False  # the file's kspace was 3-D (S, H, W), read as one coil

    @property
    def n_slices(self) -> int:
        return int(self.kspace.shape[0])

    @property
    def n_coils(self) -> int:
        return int(self.kspace.shape[1])


HDF5_SUFFIXES: tuple[str, ...] = (".h5", ".hdf5")  # any case: .H5, .HDF5


def list_fastmri(root: Path) -> list[Path]:
    """The HDF5 files (``.h5`` / ``.hdf5``, any case) directly in ``root``, sorted by name;
    other files are named in a warning as skipped.

    Raises DataError when ``root`` is not an existing folder, holds no HDF5 file, or two
    files share a volume name (``a.h5`` and ``a.hdf5``).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"fastMRI root {root}: expected an existing folder, found nothing there")
    entries = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    files = [p for p in entries if p.suffix.lower() in HDF5_SUFFIXES]
    skipped = [p.name for p in entries if p.suffix.lower() not in HDF5_SUFFIXES]
    if skipped:
        logger.warning(
            "fastMRI root %s: skipped %d files that are not .h5/.hdf5: %s",
            root,
            len(skipped),
            ", ".join(skipped[:10]),
        )
    if not files:
        raise DataError(f"fastMRI root {root}: expected fastMRI .h5/.hdf5 files in it, found none")
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise DataError(
                f"fastMRI root {root}: {stems[f.stem].name} and {f.name} name the same volume "
                f"{f.stem!r}; keep one"
            )
        stems[f.stem] = f
    return files


def _plain(value: Any) -> Any:
    """An HDF5 attribute value as a plain Python value (arrays stay numpy arrays)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return _plain(value.item())
    return value


def _nonfinite(array: np.ndarray) -> str:
    """'3 NaN and 1 Inf' counts of a float or complex array ('' when all finite)."""
    if np.isfinite(array).all():
        return ""
    nan = np.isnan(array)  # complex: NaN in either part
    n_inf = int((np.isinf(array) & ~nan).sum())
    return f"{int(nan.sum())} NaN and {n_inf} Inf"


def _read_target(path: Path, hf: h5py.File, n_slices: int, single_coil: bool) -> np.ndarray | None:
    names = (
        (TARGET_SINGLECOIL, TARGET_MULTICOIL) if single_coil else (TARGET_MULTICOIL,)
    )  # fastMRI single-coil files carry reconstruction_esc (and sometimes _rss too)
    name = next((n for n in names if n in hf), None)
    if name is None:
        return None
    node = hf[name]
    if not isinstance(node, h5py.Dataset):
        raise DataError(f"{path}: expected '{name}' to be a dataset, found a group")
    if node.ndim != 3:
        raise DataError(f"{path}: expected '{name}' of shape (S, h, w), found shape {node.shape}")
    if node.dtype.kind not in "fiu":
        raise DataError(f"{path}: expected a real-valued '{name}', found dtype {node.dtype}")
    if node.shape[0] != n_slices:
        raise DataError(
            f"{path}: expected '{name}' with {n_slices} slices like kspace, found {node.shape[0]}"
        )
    target = np.asarray(node[()], dtype=np.float32)
    bad = _nonfinite(target)
    if bad:
        raise DataError(f"{path}: expected finite '{name}' values, found {bad}")
    return target


def _read(path: Path, hf: h5py.File) -> FastMRIFile:
    if KSPACE not in hf or not isinstance(hf[KSPACE], h5py.Dataset):
        found = ", ".join(sorted(hf.keys())) or "nothing"
        raise DataError(f"{path}: expected a '{KSPACE}' dataset, found {found}")
    node = hf[KSPACE]
    if node.ndim not in (3, 4):
        raise DataError(
            f"{path}: expected kspace of shape (S, C, H, W) or (S, H, W), found shape {node.shape}"
        )
    if node.dtype.kind != "c":
        raise DataError(f"{path}: expected complex kspace, found dtype {node.dtype}")
    if node.shape[0] < 1 or min(node.shape) < 1:
        raise DataError(f"{path}: expected at least one slice of kspace, found shape {node.shape}")
    n = int(np.prod(node.shape, dtype=np.float64))
    if n > MAX_KSPACE_VALUES:  # checked on the dataset's shape, before reading it
        raise DataError(
            f"{path}: kspace of shape {node.shape} holds {n:,} values, more than the "
            f"{MAX_KSPACE_VALUES:,} of any fastMRI volume"
        )
    kspace = np.asarray(node[()], dtype=np.complex64)
    bad = _nonfinite(kspace)
    if bad:
        raise DataError(f"{path}: expected finite kspace values, found {bad}")
    single_coil = kspace.ndim == 3
    if single_coil:
        logger.info("%s: kspace %s is 3-D, read as single-coil", path.name, kspace.shape)
        kspace = kspace[:, None]  # (S, H, W) -> (S, 1, H, W)
    target = _read_target(path, hf, kspace.shape[0], single_coil)
    header: bytes | None = None
    if HEADER in hf:
        raw = hf[HEADER][()]
        if isinstance(raw, np.ndarray):
            raw = raw.tobytes() if raw.dtype.kind in "SUV" else raw.item()
        header = raw.encode() if isinstance(raw, str) else bytes(raw)
    attrs = {key: _plain(value) for key, value in hf.attrs.items()}
    mask = None
    if MASK in hf:
        mask = np.asarray(hf[MASK][()]).reshape(-1)
        if mask.shape != (kspace.shape[-1],):
            raise DataError(
                f"{path}: expected a mask of {kspace.shape[-1]} columns (kspace width), "
                f"found {mask.size}"
            )
        mask = mask.astype(bool)
        if not mask.any():
            raise DataError(
                f"{path}: expected a mask with at least one sampled line, found none of "
                f"{mask.size} sampled"
            )
    return FastMRIFile(
        path=path,
        kspace=kspace,
        target=target,
        attrs=attrs,
        header=header,
        mask=mask,
        single_coil=single_coil,
    )


def read_fastmri(path: Path) -> FastMRIFile:
    """Read and validate one fastMRI HDF5 file.

    Checks that the file exists and is HDF5, has a 3-D or 4-D complex, finite ``kspace`` with
    at least one slice, and that the target (if any) has as many slices and is finite. Each
    failure raises a one-line DataError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: expected a fastMRI HDF5 file, found nothing there")
    try:
        with h5py.File(path, "r") as hf:
            return _read(path, hf)
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        msg = str(exc).splitlines()[0].replace(str(path), path.name) if str(exc) else ""
        raise DataError(
            f"{path}: expected a readable HDF5 file, found a corrupt or non-HDF5 one "
            f"({msg or type(exc).__name__})"
        ) from exc


def write_fastmri(
    path: Path,
    kspace: np.ndarray,
    target: np.ndarray | None = None,
    attrs: Mapping[str, Any] | None = None,
    header: bytes | str | None = None,
) -> None:
    """Write one volume in the fastMRI layout, atomically.

    ``kspace`` (S, C, H, W) or single-coil (S, H, W), stored as complex64; ``target``
    (S, h, w) stored as float32 ``reconstruction_rss`` (``reconstruction_esc`` for
    single-coil k-space); ``attrs`` scalars, strings or numeric arrays as file attributes;
    ``header`` the ISMRMRD XML, stored as a scalar byte string. Uncompressed, no timestamps:
    the same arguments give the same bytes.
    """
    kspace = np.asarray(kspace)
    if kspace.ndim not in (3, 4):
        raise ValueError(f"expected kspace of 3 or 4 dimensions, found shape {kspace.shape}")
    if target is not None:
        target = np.asarray(target)
        if target.ndim != 3 or target.shape[0] != kspace.shape[0]:
            raise ValueError(
                f"expected target (S, h, w) with S = {kspace.shape[0]}, found shape {target.shape}"
            )
    path = Path(path)
    try:
        with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=False) as hf:
            hf.create_dataset(KSPACE, data=kspace.astype(np.complex64), track_times=False)
            if target is not None:
                name = TARGET_SINGLECOIL if kspace.ndim == 3 else TARGET_MULTICOIL
                hf.create_dataset(name, data=target.astype(np.float32), track_times=False)
            if header is not None:
                raw = header.encode() if isinstance(header, str) else bytes(header)
                hf.create_dataset(HEADER, data=np.bytes_(raw), track_times=False)
            for key, value in (attrs or {}).items():
                hf.attrs[key] = np.asarray(value) if isinstance(value, list | tuple) else value
    except OSError as exc:
        raise DataError(f"{path}: could not write the fastMRI file ({exc})") from exc


def _center_crop(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre-crop the last two axes to ``size`` (fastMRI's convention: start (n - m) // 2)."""
    h, w = images.shape[-2:]
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return images[..., top : top + size[0], left : left + size[1]]


def coil_compression_matrix(coil_images: np.ndarray, n_coils: int) -> np.ndarray:
    """SVD (PCA) coil compression: (n_coils, C) complex matrix from (S, C, H, W) coil images.

    Rows are the conjugated leading eigenvectors of the coil covariance over all pixels of
    all slices (largest first), so ``einsum('vc,schw->svhw', A, images)`` gives virtual coils
    ordered by energy. Each eigenvector's phase is fixed (largest entry real positive) so the
    result is deterministic.
    """
    s, c = coil_images.shape[:2]
    flat = coil_images.reshape(s, c, -1)  # (S, C, H*W)
    cov = np.zeros((c, c), dtype=np.complex128)
    for sl in flat:  # slice by slice: no (C, S*H*W) float64 copy
        cov += sl.astype(np.complex128) @ sl.conj().T.astype(np.complex128)
    _, vecs = np.linalg.eigh(cov)  # ascending eigenvalues
    vecs = vecs[:, ::-1][:, :n_coils]  # (C, n_coils), largest first
    lead = vecs[np.argmax(np.abs(vecs), axis=0), np.arange(n_coils)]
    vecs = vecs * (np.abs(lead) / lead)[None, :]
    return vecs.conj().T.astype(np.complex64)  # (n_coils, C)


def check_coils(f: FastMRIFile, n_coils: int) -> None:
    """DataError naming the file when it has fewer coils than ``n_coils`` (the models are
    trained on ``n_coils`` virtual coils: they need multi-coil data)."""
    if f.n_coils >= n_coils:
        return
    if f.single_coil:
        raise DataError(
            f"{f.path}: kspace is 3-D (S, H, W), read as single-coil data; the models "
            f"need multi-coil data, kspace (S, C, H, W) with at least coils={n_coils} coils"
        )
    raise DataError(
        f"{f.path}: has {f.n_coils} coils; the models need multi-coil data with at least "
        f"coils={n_coils} coils"
    )


def prepare_volume(
    f: FastMRIFile, size: tuple[int, int], n_coils: int
) -> tuple[np.ndarray, np.ndarray]:
    """Bring one volume to the pipeline's common grid.

    Coil images ``ifft2c(kspace)`` are centre-cropped in the image domain to ``size`` (H, W)
    (this removes fastMRI's 2x readout oversampling, as its 320 x 320 crop does), compressed
    to ``n_coils`` virtual coils by SVD when the file has more (one transform for the whole
    volume), and transformed back with ``fft2c``.

    Returns kspace complex64 (S, n_coils, H, W) and target float32 (S, H, W): the file's
    target when its shape is (S, H, W), else the RSS of the cropped coil images before
    compression. Raises DataError when the images are smaller than ``size`` or the file has
    fewer than ``n_coils`` coils.
    """
    if len(size) != 2 or any(
        isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1 for n in size
    ):
        raise ConfigError(f"size: expected two positive integers (H, W), found {size!r}")
    if isinstance(n_coils, bool) or not isinstance(n_coils, int | np.integer) or n_coils < 1:
        raise ConfigError(f"coils: expected a positive integer, found {n_coils!r}")
    check_preparable(f, size)
    s, c, h, w = f.kspace.shape
    check_coils(f, n_coils)
    images = _center_crop(ifft2c(f.kspace), size).astype(np.complex64)  # (S, C, H, W)
    if f.target is not None and f.target.shape == (s, *size):
        target = f.target.astype(np.float32)
    else:
        target = rss(images).astype(np.float32)
    if c > n_coils:
        matrix = coil_compression_matrix(images, n_coils)  # (n_coils, C)
        images = np.einsum("vc,schw->svhw", matrix, images)  # (S, n_coils, H, W)
        logger.debug("%s: compressed %d coils to %d", f.path.name, c, n_coils)
    kspace = np.ascontiguousarray(fft2c(images), dtype=np.complex64)
    return kspace, target


def check_signal(f: FastMRIFile) -> float:
    """The largest k-space magnitude (float64); DataError naming the file when it is 0 (no
    signal: the networks would invent an image from their biases) or a slice is all zero."""
    peak = np.abs(f.kspace).reshape(f.n_slices, -1).max(axis=1).astype(np.float64)  # (S,)
    if not peak.max() > 0:
        raise DataError(f"{f.path}: kspace is all zero (no signal to reconstruct)")
    empty = np.flatnonzero(peak == 0)
    if empty.size:
        raise DataError(
            f"{f.path}: kspace of slice {int(empty[0])} is all zero "
            f"({empty.size} of {f.n_slices} slices without signal)"
        )
    return float(peak.max())


def check_preparable(f: FastMRIFile, size: tuple[int, int]) -> None:
    """DataError unless ``f`` is fully sampled and at least ``size`` (H, W) pixels."""
    h, w = f.kspace.shape[2:]
    if f.mask is not None and not f.mask.all():
        raise DataError(
            f"{f.path}: k-space is already undersampled ({w / f.mask.sum():.1f}x, a test/"
            "challenge file); ingest needs fully-sampled files (fastMRI train/val)"
        )
    if h < size[0] or w < size[1]:
        raise DataError(
            f"{f.path}: expected images of at least {size[0]} x {size[1]} pixels, found {h} x {w}"
        )


def verify_fastmri(
    files: list[Path], size: tuple[int, int], n_coils: int, progress: bool = False
) -> None:
    """Read every file once before anything is written (readable, complex, finite, with
    signal, large enough, enough coils, fully sampled, no volume twice); one DataError
    listing every problem found, each naming its file."""
    from tqdm.auto import tqdm

    problems: list[str] = []
    seen: dict[str, Path] = {}
    for path in tqdm(files, desc="verify fastMRI", leave=False, disable=None if progress else True):
        try:
            f = read_fastmri(path)
            check_signal(f)
            check_preparable(f, size)
            check_coils(f, n_coils)
        except DataError as exc:
            problems.append(str(exc))
            continue
        digest = hashlib.sha256(f.kspace.tobytes() + str(f.kspace.shape).encode()).hexdigest()
        if digest in seen:
            problems.append(
                f"{path}: kspace identical to {seen[digest]} (the same scan under two volume "
                "names: a leak between splits)"
            )
        seen.setdefault(digest, path)
    if problems:
        raise DataError(
            f"{len(problems)} problem{'s' * (len(problems) > 1)} in {len(files)} fastMRI "
            f"files, nothing written: "
            f"{' | '.join(problems)}"
        )
