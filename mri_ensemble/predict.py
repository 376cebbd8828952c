"""Run the trained networks (one of them, or the weighted ensemble) on a user's own files.

The predict CLI (:mod:`mri_ensemble.cli`) and the browser UI (:mod:`mri_ensemble.app`) both
go through this module. A *project root* is a folder laid out as the pipeline writes it:

- ``params.yaml``: the preprocessing settings (``ingest.<task>``) and ``seed``;
- ``models/<task>/<model>/best.pt``: the trained members (self-describing checkpoints);
- ``reports/<task>/ensemble.json``: the ensemble weights (``"weights": {model: w}``).

:func:`load_predictor` loads one member (``model=NAME``) or the ensemble (``model=None``
or ``"ensemble"``). Every member runs on the same batch tensor; the ensemble is the
weighted average of member probabilities (segmentation, then argmax; weights shared or per
class, ``{model: {class: w}}``; ``method: vote`` is the members' majority vote) or the
weighted sum of member images (reconstruction), as in :mod:`mri_ensemble.ensemble`.
Members whose weight share is below ``ensemble.MIN_WEIGHT`` are not run (the one membership rule,
:func:`mri_ensemble.ensemble.ensemble_members`): their share is below float32
resolution.

Segmentation inputs are brought to the network grid as ingest brings the training data:

- NIfTI volumes (3-D ``(x, y, z)``, 2-D ``(x, y)``, or 4-D ``(x, y, z, t)`` of which the
  first frame is used): slices ``(z, y, x)``, in-plane resampling to ``spacing_mm`` from
  the header's voxel sizes (linear), 1st-99th percentile normalisation over the volume,
  centre crop / pad to ``size``. Labels are mapped back exactly: un-crop (background
  outside the network's field of view), un-pad, nearest-neighbour resampling to the input
  grid, so the output has the input's shape and is saved with its affine and header.
- PNG/JPEG slices: greyscale, resized to ``size`` x ``size`` (bilinear) and normalised,
  as the image-folder source does; with ``pixel_mm`` (the slice's pixel size) they are
  resampled and cropped like a NIfTI slice instead. Labels come back at the input's size.
- When the models were trained on the image-folder source (``ingest.segmentation.source:
  folder``), every slice is resized that way.

Reconstruction inputs are fastMRI HDF5 files (:func:`~mri_ensemble.data.fastmri.read_fastmri`),
brought to the task's grid by :func:`~mri_ensemble.data.fastmri.prepare_volume` (image-domain
crop to ``size``, SVD coil compression to ``coils``):

- a fully sampled file (no ``mask`` dataset, or an all-ones one) is undersampled with the
  mask ingest would give it (``ingest.reconstruction.mask`` and ``seed``, drawn per file
  name), so a file of the prepared val/test split gets exactly its evaluation mask; the
  fully sampled RSS image (or the file's own target) is returned as ``target``;
- an already undersampled file (fastMRI test/challenge files carry a ``mask``) is used
  with its own mask. Its width must equal the task's W: cropping along the phase-encode
  axis would mix acquired and missing lines. Its target is returned only if the file
  carries one on the task's grid (test files have none).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import json
import logging
import os
import shutil
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import h5py
import nibabel as nib
import numpy as np
import torch
import yaml
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from nibabel.wrapstruct import WrapStructError
from scipy import ndimage
from torch import nn
from tqdm.auto import tqdm

from .data.acdc import (
    INPLANE_SPACING_MM,
    LABEL_MAP_VALUES,
    MIN_INPLANE_PX,
    center_crop_or_pad,
    check_contrast,
    check_not_label_map,
    check_plausible,
    check_voxel_count,
    normalize_intensity,
    raw_zooms,
    resample_inplane,
    resampled_hw,
)
from .data.fastmri import FastMRIFile, check_coils, check_signal, prepare_volume, read_fastmri
from .data.folder import BINARY_CLASSES
from .ensemble import combine, ensemble_members, vote
from .errors import ConfigError, DataError, OutputError
from .io import atomic_path
from .metrics import CLASS_NAMES
from .mri.consistency import consistent_image_np
from .mri.fft import ifft2c, rss
from .mri.grappa import grappa_image
from .mri.masks import MaskSpec, acs_bounds, volume_mask
from .reconstruction import input_scale, uses_grappa
from .segmentation import probabilities
from .train import load_model, resolve_device

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("segmentation", "reconstruction")
ENSEMBLE = "ensemble"
TRAIN_COMMAND = "`make run` (or `python -m flows.pipeline`)"

InputKind = Literal["nifti", "image", "hdf5"]
NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
HDF5_SUFFIXES: tuple[str, ...] = (".h5", ".hdf5")
_MAGIC: tuple[tuple[bytes, InputKind], ...] = (
    (b"\x89HDF\r\n\x1a\n", "hdf5"),
    (b"\x89PNG\r\n\x1a\n", "image"),
    (b"\xff\xd8\xff", "image"),
    (b"\x1f\x8b", "nifti"),  # gzip: .nii.gz is the only gzipped input we take
)
_NIFTI_ERRORS = (
    ImageFileError,
    HeaderDataError,
    WrapStructError,
    OSError,  # includes gzip.BadGzipFile
    EOFError,  # truncated gzip stream
    zlib.error,
    ValueError,  # e.g. a data block shorter than the header says
)
EXPECTED_INPUTS = {
    "segmentation": "a NIfTI volume (.nii, .nii.gz) or a PNG/JPEG slice",
    "reconstruction": "a fastMRI HDF5 file (.h5)",
}


# ---------------------------------------------------------------------------- project


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def load_project_params(root: Path) -> dict[str, Any]:
    """``root/params.yaml`` as a mapping; ConfigError if missing or not YAML."""
    path = Path(root) / "params.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (the root should be the project folder)")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML ({first})") from exc
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return params


def _ingest_settings(params: Mapping[str, Any], task: str) -> dict[str, Any]:
    node = params.get("ingest")
    settings = node.get(task) if isinstance(node, Mapping) else None
    if not isinstance(settings, Mapping):
        raise ConfigError(f"params.yaml: missing section 'ingest.{task}'")
    return dict(settings)


def checkpoint_path(root: Path, task: str, model: str) -> Path:
    return Path(root) / "models" / task / model / "best.pt"


def ensemble_path(root: Path, task: str) -> Path:
    return Path(root) / "reports" / task / "ensemble.json"


def trained_models(root: Path, task: str) -> list[str]:
    """Names of the ``task`` models that have a ``best.pt`` under ``root``, sorted."""
    _check_task(task)
    folder = Path(root) / "models" / task
    if not folder.is_dir():
        return []
    return sorted(p.parent.name for p in folder.glob("*/best.pt") if p.is_file())


def _no_models_message(root: Path, task: str) -> str:
    return (
        f"no trained {task} models yet (no {Path(root) / 'models' / task}/<model>/best.pt); "
        f"train them with {TRAIN_COMMAND}"
    )


Weight = float | dict[str, float]  # shared, or per class {class name: weight}


def read_ensemble(root: Path, task: str) -> tuple[str, dict[str, Weight]]:
    """(method, ``{model: weight}``) of ``reports/<task>/ensemble.json``; a weight is a number
    or, for per-class ensembles, ``{class name: number}``. DataError naming the file."""
    path = ensemble_path(root, task)
    if not path.is_file():
        raise DataError(
            f"{path}: no ensemble weights for {task} yet; search them with {TRAIN_COMMAND}, "
            "or pick one model"
        )
    try:
        report = json.loads(path.read_text())
        method = str(report.get("method", "weighted"))
        weights: dict[str, Weight] = {
            str(m): {str(c): float(x) for c, x in w.items()} if isinstance(w, dict) else float(w)
            for m, w in report["weights"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(
            f"{path}: expected JSON with a 'weights' mapping {{model: weight}}, found an "
            f"unreadable file ({type(exc).__name__})"
        ) from exc
    values = [x for w in weights.values() for x in (w.values() if isinstance(w, dict) else [w])]
    if not values or any(not np.isfinite(x) or x < 0 for x in values) or sum(values) <= 0:
        raise DataError(f"{path}: expected non-negative weights, not all zero, found {weights}")
    return method, weights


def _fused_consistency(root: Path, task: str) -> bool:
    """Whether ``ensemble.json`` asks for data consistency on the fused image (reconstruction;
    files written before it existed: no)."""
    try:
        report = json.loads(ensemble_path(root, task).read_text())
        return bool((report.get("data_consistency") or {}).get("on", False))
    except (OSError, ValueError, AttributeError):
        return False


def model_choices(root: Path, task: str) -> list[str]:
    """What can be chosen: ``"ensemble"`` (when its weights exist) then the trained models."""
    models = trained_models(root, task)
    if models and ensemble_path(root, task).is_file():
        return [ENSEMBLE, *models]
    return models


# ---------------------------------------------------------------------------- predictor


@dataclass
class Member:
    """One trained network and its (unnormalised) ensemble weight: a number, or per class
    ``{class name: number}``."""

    name: str
    model: nn.Module
    weight: Weight = 1.0


@dataclass
class Predictor:
    """Members on ``device`` plus the task's preprocessing settings (``ingest.<task>``).

    ``name`` is the model name or ``"ensemble"``; ``method`` the ensemble's (``"vote"``:
    majority vote of the members' labels; anything else: weighted average); ``class_names``
    (segmentation) names label 0..K-1; ``seed`` is params.yaml's, for reconstruction masks.
    """

    task: str
    members: list[Member]
    settings: dict[str, Any]
    name: str = ENSEMBLE
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    seed: int = 0
    method: str = "weighted"
    data_consistency: bool = False  # reconstruction ensembles: put acquired lines back

    @property
    def weights(self) -> np.ndarray:
        """(M,) float64 weights, or (M, K) per class, normalised over the members."""
        if any(isinstance(m.weight, dict) for m in self.members):
            w = np.array([_class_weights(m, self.class_names) for m in self.members])
        else:
            w = np.array([m.weight for m in self.members], dtype=np.float64)
        return w / w.sum(axis=0)

    def describe(self) -> str:
        if self.name != ENSEMBLE:
            return f"{self.task} model {self.name}"
        if self.method == "vote":
            return (
                f"{self.task} ensemble (majority vote of {', '.join(m.name for m in self.members)})"
            )
        w = self.weights
        shares = w if w.ndim == 1 else w.mean(axis=1)
        parts = ", ".join(f"{m.name} {x:.2f}" for m, x in zip(self.members, shares, strict=True))
        kind = "per-class weights, mean" if w.ndim == 2 else "weights"
        return f"{self.task} ensemble ({kind} {parts})"


def _class_weights(member: Member, class_names: Sequence[str]) -> list[float]:
    """A member's weight per class, in ``class_names`` order (a number: the same for all)."""
    w = member.weight
    if not isinstance(w, dict):
        return [float(w)] * len(class_names)
    missing = [c for c in class_names if c not in w]
    if missing:
        raise DataError(
            f"per-class weights of {member.name} name classes {sorted(w)}, the models "
            f"predict {list(class_names)}"
        )
    return [w[c] for c in class_names]


def _segmentation_classes(root: Path, params: Mapping[str, Any], n_classes: int) -> list[str]:
    """Class names from the prepared files' attributes, else params.yaml, else generic."""
    names: list[str] | None = None
    for split in ("test", "val", "train"):
        path = Path(root) / "data" / "prepared" / "segmentation" / f"{split}.h5"
        if not path.is_file():
            continue
        try:
            with h5py.File(path, "r") as f:
                raw = f.attrs.get("class_names")
            if raw is not None:
                raw = raw.decode() if isinstance(raw, bytes) else raw
                names = [str(n) for n in (json.loads(raw) if isinstance(raw, str) else raw)]
                break
        except (OSError, ValueError, TypeError) as exc:
            log.warning("%s: class names unreadable (%s); using params.yaml", path, exc)
    if names is None:
        settings = _ingest_settings(params, "segmentation")
        if settings.get("source") == "folder":
            names = [str(n) for n in settings.get("class_names") or BINARY_CLASSES]
        else:
            names = list(CLASS_NAMES)
    if len(names) != n_classes:
        names = ["background", *(f"class {k}" for k in range(1, n_classes))]
    return names


def _load_member(path: Path, task: str, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    try:
        model, ckpt = load_model(path, device)
    except (RuntimeError, KeyError, TypeError) as exc:  # weights that do not fit the spec
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: checkpoint does not rebuild its network ({first})") from exc
    found = (ckpt.get("meta") or {}).get("task")
    if found is not None and found != task:
        raise DataError(f"{path}: expected a {task} checkpoint, found a {found} one")
    return model, ckpt


def load_predictor(
    root: Path, task: str, model: str | None = None, device: str = "auto"
) -> Predictor:
    """Load model ``model`` of ``task`` from project ``root``, or the ensemble (``None`` or
    ``"ensemble"``), on ``device`` (auto | cpu | cuda).

    ConfigError: unknown task or model (naming the trained ones), bad params.yaml.
    DataError: nothing trained yet (naming the command that trains), missing or
    unreadable checkpoints or ensemble weights (naming the file).
    """
    _check_task(task)
    root = Path(root)
    params = load_project_params(root)
    settings = _ingest_settings(params, task)
    trained = trained_models(root, task)
    if not trained:
        raise DataError(_no_models_message(root, task))
    method = "single"
    chosen: dict[str, Weight]
    if model is None or model == ENSEMBLE:
        name = ENSEMBLE
        method, chosen = read_ensemble(root, task)
        missing = sorted(set(chosen) - set(trained))
        if missing:
            raise DataError(
                f"{ensemble_path(root, task)}: ensemble members {', '.join(missing)} have no "
                f"checkpoint under {root / 'models' / task}; rerun {TRAIN_COMMAND}"
            )
        if task == "reconstruction" and (
            method == "vote" or any(isinstance(w, dict) for w in chosen.values())
        ):
            raise DataError(
                f"{ensemble_path(root, task)}: reconstruction ensembles are weighted sums "
                f"with one weight per model, found method {method!r} with weights {chosen}"
            )
        if method != "vote":
            chosen = {m: chosen[m] for m in ensemble_members(chosen)}
    elif model in trained:
        name, chosen = model, {model: 1.0}
    else:
        raise ConfigError(
            f"unknown {task} model {model!r}; trained: {', '.join(trained)} "
            f"(or {ENSEMBLE!r} for the ensemble)"
        )
    dev = resolve_device(device)
    members, specs = [], {}
    for m, w in chosen.items():
        net, ckpt = _load_member(checkpoint_path(root, task, m), task, dev)
        members.append(Member(m, net, w))
        specs[m] = ckpt["spec"]
    class_names: list[str] = []
    if task == "segmentation":
        counts = {m: max(2, int(s.get("out_channels", 2))) for m, s in specs.items()}
        if len(set(counts.values())) > 1:
            raise DataError(f"ensemble members predict different numbers of classes: {counts}")
        class_names = _segmentation_classes(root, params, next(iter(counts.values())))
    pred = Predictor(
        task=task,
        members=members,
        settings=settings,
        name=name,
        device=dev,
        class_names=class_names,
        seed=int(params.get("seed", 0)),
        method=method,
        data_consistency=name == ENSEMBLE and _fused_consistency(root, task),
    )
    _ = pred.weights  # per-class weights must name the models' classes
    log.info("loaded %s on %s", pred.describe(), dev)
    return pred


# ---------------------------------------------------------------------------- input files


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
    expected = EXPECTED_INPUTS.get(task or "", "; ".join(EXPECTED_INPUTS.values()))
    if kind is None:
        raise DataError(
            f"{path.name}: wrong file type ({suffix or 'no suffix'}); expected {expected}"
        )
    if task == "segmentation" and kind == "hdf5":
        raise DataError(
            f"{path.name}: wrong file type for segmentation (an HDF5 file is a "
            f"reconstruction input); expected {expected}"
        )
    if task == "reconstruction" and kind != "hdf5":
        what = "a NIfTI volume" if kind == "nifti" else "a PNG/JPEG image"
        raise DataError(
            f"{path.name}: wrong file type for reconstruction ({what} is a segmentation "
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


# ---------------------------------------------------------------------------- segmentation


@torch.no_grad()
def member_probabilities(
    predictor: Predictor,
    images: np.ndarray,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "segment",
) -> Iterator[np.ndarray]:
    """Per batch of images (N, H, W) on the network grid, every member's class
    probabilities (M, B, K, H, W) float32: all members run on the same batch tensor."""
    if predictor.task != "segmentation":
        raise ConfigError(f"segmentation needs a segmentation predictor, not {predictor.task}")
    dev = predictor.device
    starts = range(0, len(images), batch_size)
    for i in tqdm(starts, desc=desc, unit="batch", disable=None if progress else True):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size, None], np.float32))
        x = x.to(dev)  # (B, 1, H, W)
        probs = []
        for m in predictor.members:
            m.model.eval()
            with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
                logits = m.model(x)  # (B, K, H, W)
            probs.append(probabilities(logits).cpu().numpy())  # (B, K, H, W) float32
        yield np.stack(probs)  # (M, B, K, H, W)


def predict_probabilities(
    predictor: Predictor, images: np.ndarray, batch_size: int = 32, progress: bool = False
) -> np.ndarray:
    """Class probabilities (N, K, H, W) float32 of images (N, H, W) on the network grid: the
    weighted average of the members' (:func:`mri_ensemble.ensemble.combine`)."""
    if predictor.method == "vote":
        raise ConfigError("a majority-vote ensemble has labels, not probabilities")
    w = predictor.weights
    return np.concatenate(
        [combine(p, w) for p in member_probabilities(predictor, images, batch_size, progress)]
    )


def predict_labels(
    predictor: Predictor, images: np.ndarray, batch_size: int = 32, progress: bool = False
) -> np.ndarray:
    """Labels (N, H, W) uint8 of images (N, H, W) on the network grid: argmax of the
    weighted average, or the members' majority vote for a ``vote`` ensemble."""
    out = []
    w = None if predictor.method == "vote" else predictor.weights
    for p in member_probabilities(predictor, images, batch_size, progress):
        if w is None:
            out.append(vote(p))
        else:
            out.append(combine(p, w).argmax(axis=1).astype(np.uint8))
    return np.concatenate(out)


@dataclass(frozen=True)
class _Grid:
    """How slices (S, H, W) were brought to the network grid (S, size, size)."""

    shape_hw: tuple[int, int]
    size: int
    ratio: tuple[float, float] | None  # (target / dy, target / dx); None: resized
    resampled_hw: tuple[int, int]


def _resize(slices: np.ndarray, hw: tuple[int, int], nearest: bool) -> np.ndarray:
    """Resize every slice (S, h, w) to ``hw`` with PIL (bilinear, or nearest for labels).

    uint8 slices go through PIL's "L" mode (as the image-folder source reads images),
    labels through "L" with nearest neighbour, anything else through float "F" mode."""
    from PIL import Image

    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    out = []
    for s in slices:
        im = Image.fromarray(s) if s.dtype == np.uint8 else Image.fromarray(s.astype(np.float32))
        out.append(np.asarray(im.resize((hw[1], hw[0]), resample=resample)))
    return np.stack(out)


def to_network_grid(
    slices: np.ndarray,
    spacing_hw: tuple[float, float] | None,
    settings: Mapping[str, Any],
    name: str | Path = "input",
) -> tuple[np.ndarray, _Grid]:
    """Slices (S, H, W) as ingest prepares them -> (images (S, size, size) float32, grid).

    ``spacing_hw`` (dy, dx) mm resamples to ``spacing_mm`` and crops/pads (ACDC, phantom);
    ``None`` (or an image-folder source) resizes to ``size`` x ``size``."""
    try:
        size = int(settings["size"])
        resize = spacing_hw is None or settings.get("source") == "folder"
        target = None if resize else float(settings["spacing_mm"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"params.yaml: ingest.segmentation needs size (and spacing_mm), found {dict(settings)}"
        ) from exc
    if size < 1 or (target is not None and not target > 0):
        raise ConfigError(f"params.yaml: bad ingest.segmentation size {size} / spacing {target}")
    shape_hw = (int(slices.shape[1]), int(slices.shape[2]))
    if target is None or spacing_hw is None:
        images = normalize_intensity(
            _resize(slices, (size, size), nearest=False).astype(np.float32)
        )
        return images, _Grid(shape_hw, size, None, (size, size))
    ratio = (target / spacing_hw[0], target / spacing_hw[1])
    resampled_hw(name, shape_hw, spacing_hw, target)  # bounded before anything is allocated
    resampled = resample_inplane(slices.astype(np.float32), spacing_hw, target, order=1)
    resampled = normalize_intensity(resampled)  # over the whole field of view, before cropping
    images = center_crop_or_pad(resampled, size, fill=float(resampled.min()))
    grid = _Grid(shape_hw, size, ratio, (int(resampled.shape[1]), int(resampled.shape[2])))
    return np.ascontiguousarray(images, np.float32), grid


def _uncrop(labels: np.ndarray, hw: tuple[int, int], size: int) -> np.ndarray:
    """Invert ``center_crop_or_pad`` of (S, size, size) labels to (S, *hw); background where
    the crop cut the field of view."""
    out = labels
    for axis, n in ((1, hw[0]), (2, hw[1])):
        if n > size:
            before = (n - size) // 2
            pad = [(0, 0)] * out.ndim
            pad[axis] = (before, n - size - before)
            out = np.pad(out, pad, mode="constant", constant_values=0)
        elif n < size:
            start = (size - n) // 2
            out = np.take(out, np.arange(start, start + n), axis=axis)
    return out


def from_network_grid(labels: np.ndarray, grid: _Grid) -> np.ndarray:
    """Labels (S, size, size) on the network grid -> (S, H, W) on the input grid
    (nearest neighbour), exactly inverting :func:`to_network_grid`'s geometry."""
    labels = np.asarray(labels, dtype=np.uint8)
    if grid.ratio is None:
        return _resize(labels, grid.shape_hw, nearest=True)
    out = _uncrop(labels, grid.resampled_hw, grid.size)  # (S, Hr, Wr)
    rh, rw = grid.ratio
    s = out.shape[0]
    if out.shape[1:] == grid.shape_hw and abs(rh - 1) < 1e-6 and abs(rw - 1) < 1e-6:
        return out.copy()
    # input pixel i sits at resampled coordinate (i + 0.5) / r - 0.5 (pixel centres aligned)
    return ndimage.affine_transform(
        out,
        np.array([1.0, 1.0 / rh, 1.0 / rw]),
        offset=np.array([0.0, 0.5 / rh - 0.5, 0.5 / rw - 0.5]),
        output_shape=(s, *grid.shape_hw),
        order=0,
        mode="nearest",
    )


@dataclass
class SegmentationResult:
    """Labels in the input's shape plus what a viewer needs.

    ``labels`` uint8: NIfTI input's spatial shape (x, y[, z]) or image (H, W);
    ``slices`` float32 (S, H, W) and ``slice_labels`` uint8 (S, H, W) the same data in
    display order (rows = y, columns = x); ``spacing`` (dz, dy, dx) mm or None (images).
    """

    labels: np.ndarray
    slices: np.ndarray
    slice_labels: np.ndarray
    class_names: list[str]
    model: str
    spacing: tuple[float, float, float] | None = None
    scan: NiftiScan | None = None


def segment_slices(
    predictor: Predictor,
    slices: np.ndarray,
    spacing_hw: tuple[float, float] | None,
    batch_size: int = 32,
    progress: bool = False,
    name: str | Path = "input",
) -> np.ndarray:
    """Labels uint8 (S, H, W) of slices (S, H, W) on their own grid (see the module doc);
    ``name`` (the file) is what an implausible field of view is reported against."""
    images, grid = to_network_grid(slices, spacing_hw, predictor.settings, name)
    return from_network_grid(predict_labels(predictor, images, batch_size, progress), grid)


def segment_nifti(
    predictor: Predictor, path: Path, batch_size: int = 32, progress: bool = False
) -> SegmentationResult:
    """Segment a NIfTI volume; labels have its spatial shape (4-D: the first frame's)."""
    scan = read_nifti(path)
    dx, dy, dz = scan.zooms
    slices = np.transpose(scan.data, (2, 1, 0))  # (x, y, z) -> (S, H, W)
    slice_labels = segment_slices(predictor, slices, (dy, dx), batch_size, progress, path)
    labels = np.transpose(slice_labels, (2, 1, 0)).reshape(scan.shape)  # back to (x, y[, z])
    return SegmentationResult(
        labels=np.ascontiguousarray(labels, np.uint8),
        slices=np.ascontiguousarray(slices),
        slice_labels=slice_labels,
        class_names=predictor.class_names,
        model=predictor.name,
        spacing=(dz, dy, dx),
        scan=scan,
    )


def segment_image(
    predictor: Predictor,
    path: Path,
    pixel_mm: float | None = None,
    batch_size: int = 32,
) -> SegmentationResult:
    """Segment a PNG/JPEG slice (greyscale); labels (H, W). ``pixel_mm``: see the module doc."""
    image = read_slice_image(path)
    check_pixel_mm(pixel_mm)
    spacing = None if pixel_mm is None else (float(pixel_mm), float(pixel_mm))
    labels = segment_slices(predictor, image[None], spacing, batch_size, name=path)
    return SegmentationResult(
        labels=labels[0],
        slices=image[None].astype(np.float32),
        slice_labels=labels,
        class_names=predictor.class_names,
        model=predictor.name,
        spacing=None if pixel_mm is None else (1.0, float(pixel_mm), float(pixel_mm)),
    )


def segment_file(
    predictor: Predictor,
    path: Path,
    batch_size: int = 32,
    progress: bool = False,
    pixel_mm: float | None = None,
) -> SegmentationResult:
    """:func:`segment_nifti` or :func:`segment_image` by the input's type."""
    kind = input_kind(path, "segmentation")
    if kind == "nifti":
        return segment_nifti(predictor, path, batch_size, progress)
    return segment_image(predictor, path, pixel_mm, batch_size)


def save_labels_nifti(labels: np.ndarray, scan: NiftiScan, out: Path) -> None:
    """Write labels uint8 of ``scan``'s spatial shape as NIfTI (``.nii`` or ``.nii.gz`` by
    name), with the input's affine, sform/qform codes and header, atomically."""
    out = Path(out)
    if file_suffix(out) not in NIFTI_SUFFIXES:
        raise ConfigError(f"{out}: a NIfTI output needs a .nii or .nii.gz name")
    labels = np.asarray(labels, dtype=np.uint8)
    if labels.shape != scan.shape:
        raise ValueError(f"labels shape {labels.shape} differs from the input's {scan.shape}")
    header = scan.image.header.copy()
    img = type(scan.image)(labels, scan.affine, header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0, int(labels.max())
    img.header["descrip"] = b"mri-ensemble labels"
    payload = img.to_bytes()
    if file_suffix(out) == ".nii.gz":
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    try:
        with atomic_path(out) as tmp:
            tmp.write_bytes(payload)
    except OSError as exc:
        raise DataError(f"{out}: could not write the labels ({exc})") from exc


def save_labels_png(labels: np.ndarray, out: Path) -> None:
    """Write labels (H, W) as an 8-bit PNG whose pixel values are the class indices."""
    from PIL import Image

    out = Path(out)
    if file_suffix(out) != ".png":
        raise ConfigError(f"{out}: a label image output needs a .png name")
    try:
        with atomic_path(out) as tmp:
            Image.fromarray(np.asarray(labels, dtype=np.uint8)).save(tmp, format="PNG")
    except OSError as exc:
        raise DataError(f"{out}: could not write the labels ({exc})") from exc


def save_segmentation(result: SegmentationResult, out: Path) -> None:
    """NIfTI for NIfTI inputs (with their affine), PNG for image inputs."""
    if result.scan is not None:
        save_labels_nifti(result.labels, result.scan, out)
    else:
        save_labels_png(result.labels, out)


# ---------------------------------------------------------------------------- reconstruction


@dataclass
class ReconstructionResult:
    """Images (S, H, W) float32 on the task's grid, in the file's units.

    ``target`` is None when the file holds no fully sampled data; ``mask`` (W,) bool the
    sampling mask used, ``mask_source`` ``"params"`` (drawn as ingest does) or ``"file"``.
    """

    reconstruction: np.ndarray
    zero_filled: np.ndarray
    target: np.ndarray | None
    mask: np.ndarray
    mask_source: str
    model: str
    weights: dict[str, float]
    path: Path
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def acceleration(self) -> float:
        return float(self.mask.size / max(1, int(self.mask.sum())))


def _recon_settings(settings: Mapping[str, Any]) -> tuple[tuple[int, int], int, MaskSpec, dict]:
    try:
        size = tuple(int(v) for v in settings["size"])
        coils = int(settings["coils"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            "params.yaml: ingest.reconstruction needs size [H, W] and coils, found "
            f"{dict(settings)}"
        ) from exc
    if len(size) != 2:
        raise ConfigError(f"params.yaml: ingest.reconstruction.size should be [H, W], found {size}")
    spec = MaskSpec.from_mapping(settings.get("mask"))
    grappa_cfg = dict(settings.get("grappa") or {})
    return (size[0], size[1]), coils, spec, grappa_cfg


def prepare_input(
    f: FastMRIFile, settings: Mapping[str, Any], seed: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, str]:
    """(kspace (S, C, H, W) on the task grid, target or None, mask (W,), mask source).

    See the module doc for fully sampled versus already undersampled files."""
    size, coils, spec, _ = _recon_settings(settings)
    undersampled = f.mask is not None and not bool(f.mask.all())
    if not undersampled:
        kspace, target = prepare_volume(f, size, coils)
        mask = volume_mask(spec, kspace.shape[-1], seed, f.path.stem)
        return kspace, target, mask, "params"
    assert f.mask is not None
    _check_undersampled_width(f, size[1])
    kspace, _ = prepare_volume(replace(f, mask=None), size, coils)
    kspace = kspace * f.mask  # cropping along H and coil compression keep missing lines at 0
    keep = f.target is not None and f.target.shape == (f.n_slices, *size)
    return kspace.astype(np.complex64), f.target if keep else None, f.mask.copy(), "file"


def _check_undersampled_width(f: FastMRIFile, width: int) -> None:
    """An already undersampled file must have the task's width and an autocalibration
    block (a sampled centre column: GRAPPA and the coil sensitivities need it)."""
    if f.mask is None or f.mask.all():
        return
    if f.kspace.shape[-1] != width:
        raise DataError(
            f"{f.path}: already undersampled k-space {f.kspace.shape[-1]} columns wide; "
            f"the models need width {width} (ingest.reconstruction.size), and cropping the "
            "phase-encode axis would mix acquired and missing lines"
        )
    try:
        acs_bounds(f.mask)
    except DataError as exc:
        raise DataError(f"{f.path}: {exc}") from exc


@torch.no_grad()
def reconstruct_kspace(
    predictor: Predictor,
    masked_kspace: np.ndarray,
    mask: np.ndarray,
    grappa: np.ndarray | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> np.ndarray:
    """Weighted sum of member reconstructions (S, H, W) float32 of undersampled k-space
    (S, C, H, W) with mask (W,); each slice is scaled as in training. ``grappa`` (S, H, W)
    is needed when a member uses it (computed here when None)."""
    if predictor.task != "reconstruction":
        raise ConfigError(
            f"reconstruct_kspace needs a reconstruction predictor, not {predictor.task}"
        )
    s_count = masked_kspace.shape[0]
    if grappa is None:
        grappa = np.zeros((s_count, *masked_kspace.shape[-2:]), np.float32)
        if any(uses_grappa(m.model) for m in predictor.members):
            _, _, _, cfg = _recon_settings(predictor.settings)
            grappa = np.stack(
                [
                    grappa_image(k, mask, **cfg)
                    for k in tqdm(masked_kspace, desc="GRAPPA", disable=None if progress else True)
                ]
            )
    scales = np.array([input_scale(k) for k in masked_kspace], np.float32)  # (S,)
    dev = predictor.device
    w = predictor.weights
    out = []
    starts = range(0, s_count, batch_size)
    for i in tqdm(starts, desc="reconstruct", unit="batch", disable=None if progress else True):
        sl = slice(i, i + batch_size)
        sc = scales[sl][:, None, None]
        k = torch.from_numpy((masked_kspace[sl] / sc[..., None]).astype(np.complex64)).to(dev)
        m = torch.from_numpy(np.repeat(np.asarray(mask, bool)[None], k.shape[0], 0)).to(dev)
        g = torch.from_numpy((grappa[sl] / sc).astype(np.float32)).to(dev)
        acc = np.zeros((k.shape[0], *k.shape[-2:]), np.float64)  # (B, H, W)
        for member, wm in zip(predictor.members, w, strict=True):
            member.model.eval()
            with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
                img = member.model(k, m, g)  # (B, H, W)
            acc += wm * img.float().cpu().numpy().astype(np.float64)
        out.append(acc * sc)
    fused = np.concatenate(out).astype(np.float32)
    if predictor.data_consistency:  # the fused image gets the members' hard DC step
        masks = np.repeat(np.asarray(mask, bool)[None], s_count, 0)
        fused = consistent_image_np(fused, masked_kspace.astype(np.complex64), masks)
    return fused


def reconstruct_file(
    predictor: Predictor, path: Path, batch_size: int = 4, progress: bool = False
) -> ReconstructionResult:
    """Reconstruct a fastMRI HDF5 file (see the module doc for its mask).

    The k-space is divided by its peak magnitude in float64 first, and the images are
    multiplied back in float64, so a file scaled by 1e-30 or 1e30 neither underflows nor
    overflows float32 on the way; all-zero k-space and a non-finite or underflowing result
    are refused (DataError naming the file) rather than written."""
    input_kind(path, "reconstruction")
    f = read_fastmri(Path(path))
    peak = check_signal(f)
    f = replace(
        f,
        kspace=(f.kspace.astype(np.complex128) / peak).astype(np.complex64),
        target=None
        if f.target is None
        else (f.target.astype(np.float64) / peak).astype(np.float32),
    )
    kspace, target, mask, source = prepare_input(f, predictor.settings, predictor.seed)
    masked = (kspace * mask).astype(np.complex64)  # (S, C, H, W)
    recon = _rescale(
        path, reconstruct_kspace(predictor, masked, mask, None, batch_size, progress), peak
    )
    zero = _rescale(path, rss(ifft2c(masked)), peak)  # (S, H, W)
    if target is not None:
        target = _rescale(path, target, peak)
    names = [m.name for m in predictor.members]
    return ReconstructionResult(
        reconstruction=recon,
        zero_filled=zero,
        target=None if target is None else np.asarray(target, np.float32),
        mask=np.asarray(mask, bool),
        mask_source=source,
        model=predictor.name,
        weights=dict(zip(names, map(float, predictor.weights), strict=True)),
        path=Path(path),
        attrs=dict(f.attrs),
    )


def _rescale(path: Path, images: np.ndarray, peak: float) -> np.ndarray:
    """``images * peak`` computed in float64, as float32; DataError naming ``path`` when it is
    not finite or underflows (a non-zero image that float32 cannot hold)."""
    scaled = np.asarray(images, np.float64) * peak
    out = scaled.astype(np.float32)
    check_finite(path, out)
    if np.any(scaled != 0) and not np.any(out != 0):
        raise DataError(
            f"{path}: the reconstruction underflows float32 (k-space peak {peak:.3g}); "
            "rescale the file's k-space"
        )
    return out


def check_finite(path: Path, images: np.ndarray) -> None:
    """DataError naming ``path`` when ``images`` hold NaN or Inf: nothing is written."""
    bad = int(np.size(images) - np.isfinite(images).sum())
    if bad:
        raise DataError(
            f"{path}: the result has {bad} NaN/Inf values of {np.size(images)}; nothing written"
        )


def save_reconstruction(result: ReconstructionResult, out: Path) -> None:
    """Write the fastMRI submission layout: dataset ``reconstruction`` (S, H, W) float32,
    plus attributes (model, weights, input file, mask source, acceleration), atomically."""
    out = Path(out)
    if file_suffix(out) not in HDF5_SUFFIXES:
        raise ConfigError(f"{out}: a reconstruction output needs a .h5 name")
    check_finite(result.path, result.reconstruction)
    try:
        with atomic_path(out) as tmp, h5py.File(tmp, "w") as hf:
            hf.create_dataset("reconstruction", data=result.reconstruction.astype(np.float32))
            hf.attrs["model"] = result.model
            hf.attrs["weights"] = json.dumps(result.weights, sort_keys=True)
            hf.attrs["input"] = result.path.name
            hf.attrs["mask_source"] = result.mask_source
            hf.attrs["acceleration"] = result.acceleration
            hf.attrs["mask"] = result.mask.astype(np.uint8)
            for key in ("acquisition", "patient_id"):
                if isinstance(result.attrs.get(key), str):
                    hf.attrs[key] = result.attrs[key]
    except OSError as exc:
        raise DataError(f"{out}: could not write the reconstruction ({exc})") from exc


def output_suffixes(kind: InputKind) -> Sequence[str]:
    """The output names that fit an input kind."""
    return {"nifti": NIFTI_SUFFIXES, "image": (".png",), "hdf5": HDF5_SUFFIXES}[kind]


# ---------------------------------------------------------------------------- checks up front


def check_pixel_mm(pixel_mm: float | None) -> None:
    """ConfigError unless ``pixel_mm`` is None or a plausible in-plane pixel size (mm)."""
    lo, hi = INPLANE_SPACING_MM
    if pixel_mm is not None and not (np.isfinite(pixel_mm) and lo <= pixel_mm <= hi):
        raise ConfigError(
            f"--pixel-mm: expected a pixel size from {lo:g} to {hi:g} mm, found {pixel_mm}"
        )


def check_input(root: Path, task: str, path: Path, pixel_mm: float | None = None) -> None:
    """Read and check ``path`` before any model is loaded or anything computed: readable,
    of the task's kind, physically plausible (voxel sizes, in-plane size, resampled size,
    not a label map), with signal and enough coils (reconstruction). DataError or
    ConfigError naming the file (or the option) and the value."""
    kind = input_kind(path, task)
    settings = _ingest_settings(load_project_params(root), task)
    if kind == "nifti":
        scan = read_nifti(path)
        dx, dy, _ = scan.zooms
        if settings.get("source") != "folder" and "spacing_mm" in settings:
            target = float(settings["spacing_mm"])
            resampled_hw(path, (scan.data.shape[1], scan.data.shape[0]), (dy, dx), target)
    elif kind == "image":
        read_slice_image(path)
        check_pixel_mm(pixel_mm)
    else:
        f = read_fastmri(path)
        check_signal(f)
        size, coils, _, _ = _recon_settings(settings)
        check_coils(f, coils)
        _check_undersampled_width(f, size[1])


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
