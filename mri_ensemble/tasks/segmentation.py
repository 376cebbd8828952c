"""Segmentation: short-axis cardiac MRI (or any image/mask folder) -> class labels.

Networks map images (N, 1, H, W) to logits (N, K, H, W); outputs are fused as class
probabilities (softmax; a one-channel binary network's sigmoid p as [1 - p, p]), scored by
per-case foreground IoU and Dice (:func:`~mri_ensemble.metrics.segmentation_scores`), and
the ensemble searches weights (shared or per class) on val IoU.

A user's input comes to the network grid as ingest brings the training data
(:mod:`mri_ensemble.data.grid`), and the labels go back through the same grid's inverse:

- NIfTI volumes (3-D ``(x, y, z)``, 2-D ``(x, y)``, or 4-D ``(x, y, z, t)`` of which the
  first frame is used): slices ``(z, y, x)``, resampled with the header's voxel sizes; the
  labels have the input's shape and are saved with its affine and header.
- PNG/JPEG slices: resized to ``size`` x ``size`` and normalised, as the image-folder source
  does; with ``pixel_mm`` (the slice's pixel size) resampled and cropped like a NIfTI slice
  instead. Labels come back at the input's size.
- When the models were trained on the image-folder source (``ingest.segmentation.source:
  folder``), every slice is resized that way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.prepared import SegmentationSet, SliceDataset, read_segmentation_h5, scored_splits
from ..errors import ConfigError, DataError
from ..metrics import CLASS_NAMES, segmentation_scores
from .base import Task, Training

if TYPE_CHECKING:
    from ..inference import Predictor
    from ..inputs import NiftiScan

# What a stage runs decides its DVC deps (tests/test_dvc_deps.py): imports that only some
# stages need (training, the ensemble search, predict's file I/O) sit in the functions that
# need them, so that e.g. an ensemble change retrains nothing.

log = logging.getLogger(__name__)

N_CLASSES = len(CLASS_NAMES)


def class_names_of(data: SegmentationSet) -> list[str]:
    """The class names a prepared file declares (cardiac ACDC classes if it has none)."""
    names = data.attrs.get("class_names")
    if isinstance(names, str):
        names = json.loads(names)
    return [str(n) for n in names] if names else list(CLASS_NAMES)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities (N, K, H, W) from logits; one channel (binary mode, BCE) ->
    sigmoid p as the two classes [1 - p, p], so argmax, ensembles and metrics stay the same."""
    logits = logits.float()
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    images: np.ndarray,
    device: torch.device,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "predict",
) -> np.ndarray:
    """Class probabilities of ``model`` (eval mode) for images (N, H, W) -> (N, K, H, W)
    (softmax; sigmoid as two classes for a one-output binary network)."""
    model.eval()
    out = []
    starts = range(0, len(images), batch_size)
    for i in tqdm(starts, desc=desc, leave=False, disable=None if progress else True):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size, None])).to(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            logits = model(x)  # (B, K, H, W)
        out.append(probabilities(logits).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def make_validate(val: SegmentationSet, loss_fn: nn.Module, batch_size: int = 32):
    """A ``validate(model, device)`` for the training engine: val_loss, val_iou, val_dice.

    IoU and Dice are per-case (3-D) foreground means, as in ``metrics.segmentation_scores``.
    """

    names = class_names_of(val)

    def validate(model: nn.Module, device: torch.device) -> dict[str, float]:
        total, count, preds = 0.0, 0, []
        loader = DataLoader(SliceDataset(val), batch_size=batch_size, shuffle=False)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            total += loss_fn(logits, y).item() * x.shape[0]
            count += x.shape[0]
            preds.append(probabilities(logits).argmax(1).cpu().numpy().astype(np.uint8))
        scores = segmentation_scores(np.concatenate(preds), val.label, val.case, names)
        return {"val_loss": total / count, "val_iou": scores["iou"], "val_dice": scores["dice"]}

    return validate


# ---------------------------------------------------------------------------- ensemble inference


@torch.no_grad()
def member_probabilities(
    predictor: Predictor,
    images: np.ndarray,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "segment",
) -> Iterator[np.ndarray]:
    """Per batch of images (N, H, W) on the network grid, every member's class
    probabilities (M, B, K, H, W) float32 (:meth:`EnsembleNet.member_outputs`)."""
    if predictor.task != SEGMENTATION.name:
        raise ConfigError(f"segmentation needs a segmentation predictor, not {predictor.task}")
    net = predictor.net
    starts = range(0, len(images), batch_size)
    for i in tqdm(starts, desc=desc, unit="batch", disable=None if progress else True):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size, None], np.float32))
        yield net.member_outputs(x.to(predictor.device)).cpu().numpy()  # (M, B, K, H, W)


def ensemble_probabilities(
    predictor: Predictor, images: np.ndarray, batch_size: int = 32, progress: bool = False
) -> np.ndarray:
    """Class probabilities (N, K, H, W) float32 of images (N, H, W) on the network grid: the
    weighted average of the members' (:func:`mri_ensemble.ensemble.combine`)."""
    from ..ensemble import combine

    if predictor.method == "vote":
        raise ConfigError("a majority-vote ensemble has labels, not probabilities")
    w = predictor.weights
    return np.concatenate(
        [combine(p, w) for p in member_probabilities(predictor, images, batch_size, progress)]
    )


def labels_and_uncertainty(
    predictor: Predictor, images: np.ndarray, batch_size: int = 32, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N, H, W) uint8 and the predictive entropy (N, H, W) float32 (nats) of images
    (N, H, W) on the network grid: argmax of the weighted average, or the members' majority
    vote for a ``vote`` ensemble (whose entropy is that of the members' mean)."""
    from ..ensemble import combine, vote
    from ..ensemble.uncertainty import entropy

    labels, unsure = [], []
    w = None if predictor.method == "vote" else predictor.weights
    for p in member_probabilities(predictor, images, batch_size, progress):
        fused = combine(p, np.ones(len(p)) if w is None else w)
        labels.append(vote(p) if w is None else fused.argmax(axis=1).astype(np.uint8))
        unsure.append(entropy(fused, axis=1).astype(np.float32))
    return np.concatenate(labels), np.concatenate(unsure)


def ensemble_labels(
    predictor: Predictor, images: np.ndarray, batch_size: int = 32, progress: bool = False
) -> np.ndarray:
    """Labels (N, H, W) uint8 of images (N, H, W) on the network grid
    (:func:`labels_and_uncertainty`)."""
    return labels_and_uncertainty(predictor, images, batch_size, progress)[0]


def grid_settings(settings: Mapping[str, Any], resize: bool) -> tuple[int, float | None]:
    """(size, spacing_mm or None to resize) of ``ingest.segmentation``; ConfigError if bad."""
    try:
        size = int(settings["size"])
        resize = resize or settings.get("source") == "folder"
        target = None if resize else float(settings["spacing_mm"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"params.yaml: ingest.segmentation needs size (and spacing_mm), found {dict(settings)}"
        ) from exc
    if size < 1 or (target is not None and not target > 0):
        raise ConfigError(f"params.yaml: bad ingest.segmentation size {size} / spacing {target}")
    return size, target


def segment_slices(
    predictor: Predictor,
    slices: np.ndarray,
    spacing_hw: tuple[float, float] | None,
    batch_size: int = 32,
    progress: bool = False,
    name: str | Path = "input",
) -> tuple[np.ndarray, np.ndarray]:
    """Labels uint8 and predictive entropy float32, both (S, H, W), of slices (S, H, W) on
    their own grid (see the module doc); ``name`` (the file) is what an implausible field
    of view is reported against. The entropy is 0 where the crop cut the field of view."""
    from ..data.grid import from_grid, to_grid

    size, target = grid_settings(predictor.settings, resize=spacing_hw is None)
    images, grid = to_grid(slices, spacing_hw, size, target, name)
    labels, unsure = labels_and_uncertainty(predictor, images, batch_size, progress)
    return from_grid(labels, grid), from_grid(unsure, grid, nearest=False)


@dataclass
class SegmentationResult:
    """Labels in the input's shape plus what a viewer needs.

    ``labels`` uint8: NIfTI input's spatial shape (x, y[, z]) or image (H, W);
    ``uncertainty`` float32 the same shape: the predictive entropy (nats, 0 .. log K) of
    the fused probabilities; ``slices`` float32 (S, H, W), ``slice_labels`` uint8 and
    ``slice_uncertainty`` float32 (S, H, W) the same data in display order (rows = y,
    columns = x); ``spacing`` (dz, dy, dx) mm or None (images).
    """

    labels: np.ndarray
    slices: np.ndarray
    slice_labels: np.ndarray
    class_names: list[str]
    model: str
    spacing: tuple[float, float, float] | None = None
    scan: NiftiScan | None = None
    uncertainty: np.ndarray | None = None
    slice_uncertainty: np.ndarray | None = None


def segment_nifti(
    predictor: Predictor, path: Path, batch_size: int = 32, progress: bool = False
) -> SegmentationResult:
    """Segment a NIfTI volume; labels have its spatial shape (4-D: the first frame's)."""
    from ..inputs import read_nifti

    scan = read_nifti(path)
    dx, dy, dz = scan.zooms
    slices = np.transpose(scan.data, (2, 1, 0))  # (x, y, z) -> (S, H, W)
    slice_labels, slice_unsure = segment_slices(
        predictor, slices, (dy, dx), batch_size, progress, path
    )
    labels = np.transpose(slice_labels, (2, 1, 0)).reshape(scan.shape)  # back to (x, y[, z])
    unsure = np.transpose(slice_unsure, (2, 1, 0)).reshape(scan.shape)
    return SegmentationResult(
        labels=np.ascontiguousarray(labels, np.uint8),
        slices=np.ascontiguousarray(slices),
        slice_labels=slice_labels,
        class_names=predictor.class_names,
        model=predictor.name,
        spacing=(dz, dy, dx),
        scan=scan,
        uncertainty=np.ascontiguousarray(unsure, np.float32),
        slice_uncertainty=slice_unsure,
    )


def segment_image(
    predictor: Predictor,
    path: Path,
    pixel_mm: float | None = None,
    batch_size: int = 32,
) -> SegmentationResult:
    """Segment a PNG/JPEG slice (greyscale); labels (H, W). ``pixel_mm``: see the module doc."""
    from ..inputs import check_pixel_mm, read_slice_image

    image = read_slice_image(path)
    check_pixel_mm(pixel_mm)
    spacing = None if pixel_mm is None else (float(pixel_mm), float(pixel_mm))
    labels, unsure = segment_slices(predictor, image[None], spacing, batch_size, name=path)
    return SegmentationResult(
        labels=labels[0],
        slices=image[None].astype(np.float32),
        slice_labels=labels,
        class_names=predictor.class_names,
        model=predictor.name,
        spacing=None if pixel_mm is None else (1.0, float(pixel_mm), float(pixel_mm)),
        uncertainty=unsure[0],
        slice_uncertainty=unsure,
    )


def uncertainty_path(out: Path) -> Path:
    """Where the uncertainty map of the result ``out`` goes: beside it, ``<name>_uncertainty``
    with the same suffix (``case.nii.gz`` -> ``case_uncertainty.nii.gz``)."""
    from ..inputs import file_suffix

    out = Path(out)
    suffix = file_suffix(out)
    return out.with_name(f"{out.name[: len(out.name) - len(suffix)]}_uncertainty{suffix}")


def save_nifti(data: np.ndarray, scan: NiftiScan, out: Path, what: str) -> None:
    """Write ``data`` (uint8 labels or a float32 map) of ``scan``'s spatial shape as NIfTI
    (``.nii`` or ``.nii.gz`` by name), with the input's affine, sform/qform codes and
    header, atomically; ``what`` names it in the header and in errors."""
    import gzip

    from ..inputs import NIFTI_SUFFIXES, file_suffix
    from ..io import atomic_path

    out = Path(out)
    if file_suffix(out) not in NIFTI_SUFFIXES:
        raise ConfigError(f"{out}: a NIfTI output needs a .nii or .nii.gz name")
    if data.shape != scan.shape:
        raise ValueError(f"{what} shape {data.shape} differs from the input's {scan.shape}")
    header = scan.image.header.copy()
    img = type(scan.image)(data, scan.affine, header)
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0, float(data.max()) if data.size else 0
    img.header["descrip"] = f"mri-ensemble {what}".encode()[:80]
    payload = img.to_bytes()
    if file_suffix(out) == ".nii.gz":
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    try:
        with atomic_path(out) as tmp:
            tmp.write_bytes(payload)
    except OSError as exc:
        raise DataError(f"{out}: could not write the {what} ({exc})") from exc


def save_labels_nifti(labels: np.ndarray, scan: NiftiScan, out: Path) -> None:
    """Write labels uint8 of ``scan``'s spatial shape as NIfTI (:func:`save_nifti`)."""
    save_nifti(np.asarray(labels, dtype=np.uint8), scan, out, "labels")


def save_png(image: np.ndarray, out: Path, what: str) -> None:
    """Write an 8-bit image (H, W) as PNG, atomically."""
    from PIL import Image

    from ..inputs import file_suffix
    from ..io import atomic_path

    out = Path(out)
    if file_suffix(out) != ".png":
        raise ConfigError(f"{out}: a {what} image output needs a .png name")
    try:
        with atomic_path(out) as tmp:
            Image.fromarray(np.asarray(image, dtype=np.uint8)).save(tmp, format="PNG")
    except OSError as exc:
        raise DataError(f"{out}: could not write the {what} ({exc})") from exc


def save_labels_png(labels: np.ndarray, out: Path) -> None:
    """Write labels (H, W) as an 8-bit PNG whose pixel values are the class indices."""
    save_png(labels, out, "label")


def uncertainty_png(entropy: np.ndarray, n_classes: int) -> np.ndarray:
    """An entropy map (H, W) as 8 bits: 0 certain .. 255 the maximum, log(n_classes)."""
    top = np.log(max(2, n_classes))
    return np.round(np.clip(entropy / top, 0.0, 1.0) * 255).astype(np.uint8)


def _classes_from_files(root: Path, params: Mapping[str, Any], n_classes: int) -> list[str]:
    """Class names from the prepared files' attributes, else params.yaml, else generic."""
    import h5py

    from ..data.folder import BINARY_CLASSES

    names: list[str] | None = None
    for split in ("test", "val", "train"):
        path = Path(root) / "data" / "prepared" / SEGMENTATION.name / f"{split}.h5"
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
        settings = dict((params.get("ingest") or {}).get(SEGMENTATION.name) or {})
        if settings.get("source") == "folder":
            names = [str(n) for n in settings.get("class_names") or BINARY_CLASSES]
        else:
            names = list(CLASS_NAMES)
    if len(names) != n_classes:
        names = ["background", *(f"class {k}" for k in range(1, n_classes))]
    return names


class Segmentation(Task):
    name = "segmentation"
    key_metric = "iou"
    summary_metrics = ("iou", "dice")
    ensemble_keys = frozenset(
        {"method", "compare", "n_random", "rounds", "penalty", "crossfit_folds", "robust"}
    )
    mixup = True
    input_kinds = ("nifti", "image")
    flag_metric = "dice"
    probabilistic = True

    @property
    def nets(self) -> Mapping[str, Any]:
        from ..nets import SEGMENTATION as NETS

        return NETS

    @property
    def ensemble_methods(self) -> tuple[str, ...]:
        from ..ensemble import METHODS

        return METHODS

    expected_inputs = "a NIfTI volume (.nii, .nii.gz) or a PNG/JPEG slice"
    report_columns = (
        ("val", "iou", "val IoU"),
        ("test", "iou", "test IoU"),
        ("test", "dice", "test Dice"),
    )
    report_baselines = (("threshold", "threshold baseline (multi-Otsu, no learning)"),)

    # data
    def ingest(self, p: dict[str, Any], seed: int, out: Path) -> None:
        from ..data.ingest import ingest_segmentation

        ingest_segmentation(p, seed, out)

    def augment(self, p: dict[str, Any], seed: int, train: Path, out: Path) -> tuple[int, int]:
        from ..data.augment import AugmentConfig, augment
        from ..data.prepared import write_segmentation_arrays

        cfg = AugmentConfig.from_mapping(p)
        data = read_segmentation_h5(train)
        image, label, case = augment(data.image, data.label, data.case, cfg, seed)
        write_segmentation_arrays(out, image, label, case, {**data.attrs, "augmented": True})
        return len(data.image), len(image)

    def read(self, path: Path) -> SegmentationSet:
        return read_segmentation_h5(path)

    # training
    def training(self, entry: dict[str, Any], train: Path, val: Path, seed: int) -> Training:
        """``loss_config`` goes to the loss; ``weighted_ce`` gets the class pixel counts that
        ingest measured on the training split (an attribute of the file)."""
        from ..losses import build_loss
        from ..train import ModelSpec

        train_data = read_segmentation_h5(train)
        n_classes = len(class_names_of(train_data))
        binary = entry.get("loss") == "bce"  # binary mode: one output channel
        if binary and n_classes != 2:
            raise ConfigError(f"params.yaml: loss 'bce' needs 2 classes, the data has {n_classes}")
        spec = ModelSpec(entry["arch"], dict(entry.get("net") or {}), 1, 1 if binary else n_classes)
        spec.build()  # validates the net config
        counts = train_data.attrs.get("class_counts")
        loss_fn = build_loss(
            entry.get("loss", "dice_focal"), entry.get("loss_config"), class_counts=counts
        )
        val_set = read_segmentation_h5(val)
        return spec, loss_fn, SliceDataset(train_data), make_validate(val_set, loss_fn)

    def distillation(
        self,
        entry: dict[str, Any],
        train: Path,
        val: Path,
        seed: int,
        teacher: Predictor,
        alpha: float,
    ) -> Training:
        """The student's own loss on ``alpha`` x the ensemble's fused class probabilities +
        (1 - alpha) x the one-hot labels of every training slice (soft Dice and focal terms
        for ``dice_focal``); the teacher runs once over the training set."""
        from ..data.prepared import SoftTargetDataset

        if entry.get("loss") == "bce":
            raise ConfigError(
                "params.yaml: a distillation student needs a multi-class loss, not 'bce' "
                "(it learns the ensemble's class probabilities)"
            )
        spec, loss_fn, _, validate = self.training(entry, train, val, seed)
        data = read_segmentation_h5(train)
        soft = ensemble_probabilities(teacher, data.image, progress=True)
        if soft.shape[1] != spec.out_channels:
            raise DataError(
                f"{train}: the ensemble predicts {soft.shape[1]} classes, the student "
                f"{spec.out_channels}"
            )
        return spec, loss_fn, SoftTargetDataset(data, soft, alpha), validate

    # evaluation
    def predict(
        self,
        model: nn.Module,
        data: SegmentationSet,
        device: torch.device,
        progress: bool,
        desc: str,
    ) -> np.ndarray:
        return predict_probabilities(model, data.image, device, progress=progress, desc=desc)

    def truth(self, data: SegmentationSet) -> np.ndarray:
        return data.label

    def class_names(self, data: SegmentationSet) -> list[str]:
        return class_names_of(data)

    def score(self, outputs: np.ndarray, truth: np.ndarray, case: np.ndarray, names: Any) -> dict:
        """``outputs``: labels (N, H, W), or probabilities (N, K, H, W) (argmax first)."""
        labels = outputs.argmax(1).astype(np.uint8) if outputs.ndim == 4 else outputs
        return segmentation_scores(labels, truth, case, names)

    def write_outputs(
        self, path: Path, outputs: np.ndarray, case: np.ndarray, attrs: Mapping[str, Any]
    ) -> None:
        from ..data.predictions import write_probabilities

        write_probabilities(path, outputs, case, attrs)

    def read_outputs(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        from ..data.predictions import read_probabilities

        return read_probabilities(path)

    # ensemble
    def ensemble_inputs(self, models: list[str], predictions: Path, data: Path) -> dict[str, Any]:
        from ..baselines import threshold_segmentation
        from ..data.predictions import load_stack
        from ..ensemble import SegmentationObjective

        sets = {s: read_segmentation_h5(data / f"{s}.h5") for s in scored_splits(data)}
        objs = {
            s: SegmentationObjective(
                load_stack(predictions, models, s, d.case, self.read_outputs), d.label, d.case
            )
            for s, d in sets.items()
        }
        names = class_names_of(sets["test"])
        baselines: dict[str, dict] = {}
        if names == list(CLASS_NAMES):  # the threshold baseline knows cardiac anatomy only
            baselines["threshold"] = {
                s: segmentation_scores(threshold_segmentation(d.image, d.case), d.label, d.case)
                for s, d in sets.items()
                if s != "val"
            }
        return {"objs": objs, "names": names, "baselines": baselines, "measured": {}}

    def fusable(self, outputs: torch.Tensor) -> torch.Tensor:
        return probabilities(outputs)

    def uncertainty_maps(self, outputs: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Predictive entropy (nats) of the fused probabilities, and the members'
        disagreement (mutual information)."""
        from ..ensemble.uncertainty import segmentation_uncertainty

        entropy, mi = segmentation_uncertainty(outputs, weights)
        return {"entropy": entropy, "mutual_information": mi}

    def error_map(self, fused: np.ndarray, truth: np.ndarray) -> np.ndarray:
        """1 where the fused labels (or the argmax of fused probabilities) are wrong."""
        labels = fused.argmax(1) if fused.ndim == 4 else fused
        return (labels != truth).astype(np.float32)

    def output_classes(
        self, root: Path, params: Mapping[str, Any], specs: Mapping[str, Mapping[str, Any]]
    ) -> list[str]:
        counts = {m: max(2, int(s.get("out_channels", 2))) for m, s in specs.items()}
        if len(set(counts.values())) > 1:
            raise DataError(f"ensemble members predict different numbers of classes: {counts}")
        return _classes_from_files(root, params, next(iter(counts.values())))

    # cost
    def batch_inputs(self, data: Path, batch: int) -> tuple[torch.Tensor, ...]:
        images = read_segmentation_h5(data).image[:batch]
        return (torch.from_numpy(np.ascontiguousarray(images[:, None], dtype=np.float32)),)

    # predict
    def predict_file(
        self,
        predictor: Predictor,
        path: Path,
        batch_size: int | None,
        progress: bool,
        pixel_mm: float | None = None,
    ) -> SegmentationResult:
        """:func:`segment_nifti` or :func:`segment_image` by the input's type."""
        from ..inputs import input_kind

        if input_kind(path, self.name) == "nifti":
            return segment_nifti(predictor, path, batch_size or 32, progress)
        return segment_image(predictor, path, pixel_mm, batch_size or 32)

    def save_result(self, result: SegmentationResult, out: Path) -> None:
        """NIfTI for NIfTI inputs (with their affine), PNG for image inputs; the entropy map
        beside it (:func:`uncertainty_path`): float32 NIfTI in nats, or an 8-bit PNG scaled
        to log K (:func:`uncertainty_png`). The labels are written last."""
        if result.uncertainty is not None:
            side = uncertainty_path(out)
            if result.scan is not None:
                save_nifti(result.uncertainty, result.scan, side, "uncertainty (entropy, nats)")
            else:
                k = len(result.class_names)
                save_png(uncertainty_png(result.uncertainty, k), side, "uncertainty")
        if result.scan is not None:
            save_labels_nifti(result.labels, result.scan, out)
        else:
            save_labels_png(result.labels, out)

    def describe_result(self, result: SegmentationResult) -> str:
        counts = {
            name: int((result.labels == k).sum())
            for k, name in enumerate(result.class_names)
            if k > 0
        }
        found = ", ".join(f"{n} {c} px" for n, c in counts.items())
        return f"shape {result.labels.shape}; {found}"

    def output_suffixes(self, kind: str) -> Sequence[str]:
        from ..inputs import NIFTI_SUFFIXES

        return NIFTI_SUFFIXES if kind == "nifti" else (".png",)

    def check_input(
        self, path: Path, kind: str, settings: Mapping[str, Any], pixel_mm: float | None
    ) -> None:
        from ..data.grid import resampled_hw
        from ..inputs import check_pixel_mm, read_nifti, read_slice_image

        if kind == "nifti":
            scan = read_nifti(path)
            dx, dy, _ = scan.zooms
            if settings.get("source") != "folder" and "spacing_mm" in settings:
                target = float(settings["spacing_mm"])
                resampled_hw(path, (scan.data.shape[1], scan.data.shape[0]), (dy, dx), target)
        else:
            read_slice_image(path)
            check_pixel_mm(pixel_mm)

    def predict_array(self, predictor: Predictor, model_input: Any) -> np.ndarray:
        """Slices (N, H, W) (or one (H, W)) on the network grid -> labels (N, H, W)."""
        images = np.asarray(model_input, dtype=np.float32)
        return ensemble_labels(predictor, images[None] if images.ndim == 2 else images)


SEGMENTATION = Segmentation()
