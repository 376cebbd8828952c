"""Prepared segmentation HDF5 files: the contract between ingest, augment, train and evaluate.

One file per split (``data/prepared/segmentation/{train,val,test}.h5``) holds

=============  =================  ==================================================
dataset        dtype, shape       meaning
=============  =================  ==================================================
``image``      float32 (N, H, W)  normalised slices
``label``      uint8 (N, H, W)    class per pixel (0 background, 1 RV, 2 myo, 3 LV)
``case``       str (N,)           id of the volume each slice comes from
``slice_index``  int32 (N,)       index of the slice in its volume (optional)
``spacing``    float32 (N, 3)     (dz, dy, dx) in mm of the slice's volume (optional)
=============  =================  ==================================================

plus file attributes (source, size, spacing_mm, seed, class names, ...). Scalar attributes
(str, int, float, bool) are stored as themselves; anything else (lists, dicts, None) as a
JSON string whose key is listed in the ``_json_attrs`` attribute and decoded on reading.
Storage is chunked per slice with lossless deflate (gzip level 1): deterministic, so the
same arrays always give the same bytes. (h5py's LZF is not: its compressor reads an
uninitialised hash table, so identical data compressed to different bytes from run to run.)
Files are written to a temporary name and renamed into place.

Besides ``train``, ``val`` and ``test``, a prepared folder may hold shifted test sets
``shift_<name>.h5`` (same format, both tasks): data from outside training's distribution
(another acquisition regime, contrast, orientation, coil array, site) that no training or
weight search ever sees; evaluate, ensemble and the report score them beside ``test``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from mri_ensemble.errors import DataError
from mri_ensemble.io import atomic_path

if TYPE_CHECKING:
    from mri_ensemble.data.acdc import Volume

logger = logging.getLogger(__name__)

REQUIRED_KEYS: tuple[str, ...] = ("image", "label", "case")
_JSON_ATTRS = "_json_attrs"
SHIFT_PREFIX = "shift_"  # shift_<name>.h5: a shifted test set (module doc)


def shifted_names(folder: Path) -> list[str]:
    """Names of the shifted test sets prepared in ``folder`` (``shift_<name>.h5``), sorted."""
    return sorted(p.stem[len(SHIFT_PREFIX) :] for p in Path(folder).glob(f"{SHIFT_PREFIX}*.h5"))


def scored_splits(folder: Path) -> list[str]:
    """The splits that evaluate scores: val, test, then ``shift_<name>`` of each shifted set."""
    return ["val", "test", *(SHIFT_PREFIX + n for n in shifted_names(folder))]


@dataclass
class SegmentationSet:
    """Slices of one split: image float32 (N, H, W), label uint8 (N, H, W), case str (N,).

    ``slice_index`` int (N,) and ``spacing`` float32 (N, 3) are present when the file has them.
    """

    image: np.ndarray
    label: np.ndarray
    case: np.ndarray
    attrs: dict[str, Any]
    slice_index: np.ndarray | None = None
    spacing: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.image.shape[0])


# deterministic lossless compression of every chunked dataset the pipeline writes
COMPRESSION: dict[str, Any] = {"compression": "gzip", "compression_opts": 1}


def _encode_attrs(attrs: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    plain: dict[str, Any] = {}
    as_json: list[str] = []
    for key, value in attrs.items():
        if key == _JSON_ATTRS:
            raise ValueError(f"attribute name {_JSON_ATTRS!r} is reserved")
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, str | bool | int | float):
            plain[key] = value
        else:
            plain[key] = json.dumps(value.tolist() if isinstance(value, np.ndarray) else value)
            as_json.append(key)
    return plain, as_json


def write_segmentation_arrays(
    path: Path,
    image: np.ndarray,
    label: np.ndarray,
    case: Sequence[str] | np.ndarray,
    attrs: Mapping[str, Any],
    *,
    slice_index: np.ndarray | None = None,
    spacing: np.ndarray | None = None,
) -> None:
    """Write image (N, H, W), label (N, H, W), case (N,) [, slice_index (N,), spacing (N, 3)].

    Raises ValueError on inconsistent arrays (a caller bug, not a data problem).
    """
    image = np.asarray(image, dtype=np.float32)
    label = np.asarray(label)
    case_arr = np.asarray(case, dtype=object)
    if image.ndim != 3 or image.shape[0] == 0:
        raise ValueError(f"image: expected a non-empty (N, H, W) array, got shape {image.shape}")
    n = image.shape[0]
    if label.shape != image.shape:
        raise ValueError(f"label: expected shape {image.shape}, got {label.shape}")
    if not np.issubdtype(label.dtype, np.integer) or label.min() < 0 or label.max() > 255:
        raise ValueError(f"label: expected integers in 0-255, got dtype {label.dtype}")
    if case_arr.shape != (n,):
        raise ValueError(f"case: expected shape ({n},), got {case_arr.shape}")
    if slice_index is not None and np.shape(slice_index) != (n,):
        raise ValueError(f"slice_index: expected shape ({n},), got {np.shape(slice_index)}")
    if spacing is not None and np.shape(spacing) != (n, 3):
        raise ValueError(f"spacing: expected shape ({n}, 3), got {np.shape(spacing)}")
    plain, as_json = _encode_attrs(attrs)
    chunks = (1, *image.shape[1:])
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("image", data=image, chunks=chunks, **COMPRESSION)
        f.create_dataset("label", data=label.astype(np.uint8), chunks=chunks, **COMPRESSION)
        f.create_dataset(
            "case", data=case_arr.astype(str).astype(object), dtype=h5py.string_dtype()
        )
        if slice_index is not None:
            f.create_dataset("slice_index", data=np.asarray(slice_index, dtype=np.int32))
        if spacing is not None:
            f.create_dataset("spacing", data=np.asarray(spacing, dtype=np.float32))
        for key, value in plain.items():
            f.attrs[key] = value
        f.attrs[_JSON_ATTRS] = json.dumps(as_json)
    logger.info("wrote %d slices (%s) to %s", n, "x".join(map(str, image.shape[1:])), path)


def write_segmentation_h5(path: Path, volumes: Sequence[Volume], attrs: Mapping[str, Any]) -> None:
    """Stack the slices of ``volumes`` (each image/label (S, H, W)) into one prepared file.

    Every slice gets its volume's ``case`` id, its index in the volume and the volume's spacing.
    """
    if not volumes:
        raise ValueError("volumes: expected at least one volume, got none")
    shapes = {v.image.shape[1:] for v in volumes}
    if len(shapes) != 1:
        raise ValueError(f"volumes: expected one slice shape, got {sorted(shapes)}")
    write_segmentation_arrays(
        path,
        np.concatenate([v.image for v in volumes]),
        np.concatenate([v.label for v in volumes]),
        [v.case for v in volumes for _ in range(v.image.shape[0])],
        attrs,
        slice_index=np.concatenate([np.arange(v.image.shape[0]) for v in volumes]),
        spacing=np.array([v.spacing for v in volumes for _ in range(v.image.shape[0])]),
    )


def _decode_attrs(raw: Mapping[str, Any], path: Path) -> dict[str, Any]:
    try:
        json_keys = set(json.loads(raw.get(_JSON_ATTRS, "[]")))
        out: dict[str, Any] = {}
        for key, value in raw.items():
            if key == _JSON_ATTRS:
                continue
            if key in json_keys:
                out[key] = json.loads(value)
            else:
                out[key] = value.item() if isinstance(value, np.generic) else value
    except (json.JSONDecodeError, TypeError) as exc:
        raise DataError(f"{path}: expected JSON-encoded attributes, found {exc}") from exc
    return out


def read_segmentation_h5(path: Path) -> SegmentationSet:
    """Read and validate a prepared segmentation file written by this module."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: expected a prepared segmentation HDF5 file, found nothing there")
    if not h5py.is_hdf5(path):
        raise DataError(f"{path}: expected an HDF5 file, found something else (corrupt?)")
    try:
        with h5py.File(path, "r") as f:
            for key in REQUIRED_KEYS:
                if key not in f:
                    raise DataError(
                        f"{path}: expected dataset {key!r}, found only {sorted(f.keys())}"
                    )
            image = f["image"][()]
            label = f["label"][()]
            case = f["case"].asstr()[()] if f["case"].dtype.kind == "O" else f["case"][()]
            slice_index = f["slice_index"][()] if "slice_index" in f else None
            spacing = f["spacing"][()] if "spacing" in f else None
            attrs = _decode_attrs(dict(f.attrs), path)
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise DataError(
            f"{path}: expected a readable HDF5 file, found a corrupt one ({exc})"
        ) from exc

    if image.ndim != 3 or image.shape[0] == 0:
        raise DataError(f"{path}: expected 'image' of shape (N, H, W), N > 0, found {image.shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise DataError(f"{path}: expected float 'image', found dtype {image.dtype}")
    if label.shape != image.shape:
        raise DataError(f"{path}: expected 'label' of shape {image.shape}, found {label.shape}")
    if not np.issubdtype(label.dtype, np.integer):
        raise DataError(f"{path}: expected integer 'label', found dtype {label.dtype}")
    n = image.shape[0]
    if np.shape(case) != (n,):
        raise DataError(f"{path}: expected 'case' of shape ({n},), found {np.shape(case)}")
    if slice_index is not None and slice_index.shape != (n,):
        raise DataError(
            f"{path}: expected 'slice_index' of shape ({n},), found {slice_index.shape}"
        )
    if spacing is not None and spacing.shape != (n, 3):
        raise DataError(f"{path}: expected 'spacing' of shape ({n}, 3), found {spacing.shape}")
    if not np.all(np.isfinite(image)):
        raise DataError(f"{path}: expected finite 'image' values, found NaN or Inf")
    return SegmentationSet(
        image=image.astype(np.float32, copy=False),
        label=label.astype(np.uint8, copy=False),
        case=np.asarray(case, dtype=str),
        attrs=attrs,
        slice_index=slice_index,
        spacing=None if spacing is None else spacing.astype(np.float32, copy=False),
    )


def class_frequencies(label: np.ndarray, n_classes: int) -> np.ndarray:
    """Fraction of pixels of each class in ``label`` (any shape): float64 (n_classes,), sum 1.

    Raises DataError when ``label`` holds values outside 0 .. n_classes - 1.
    """
    flat = np.asarray(label).ravel()
    if flat.size == 0:
        raise ValueError("label: expected at least one pixel, got an empty array")
    if flat.min() < 0 or flat.max() >= n_classes:
        bad = np.unique(flat[(flat < 0) | (flat >= n_classes)])[:10].tolist()
        raise DataError(f"expected label values 0-{n_classes - 1}, found values {bad}")
    counts = np.bincount(flat.astype(np.int64), minlength=n_classes)
    return counts / counts.sum()


class SliceDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Slices of a SegmentationSet: item i -> (image (1, H, W) float32, label (H, W) int64)."""

    def __init__(self, data: SegmentationSet) -> None:
        self.image = data.image
        self.label = data.label

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.tensor(self.image[index][None], dtype=torch.float32)  # (1, H, W)
        label = torch.tensor(self.label[index], dtype=torch.int64)  # (H, W)
        return image, label


class SoftTargetDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Slices with a teacher's class probabilities blended into their labels (distillation):
    item i -> (image (1, H, W), ``alpha * teacher[i] + (1 - alpha) * one_hot(label[i])``
    (K, H, W)) float32. Every multi-class loss takes such soft targets
    (:mod:`mri_ensemble.losses`): ``alpha = 1`` learns the teacher alone, 0 the labels alone."""

    def __init__(self, data: SegmentationSet, teacher: np.ndarray, alpha: float) -> None:
        n, h, w = data.label.shape
        if teacher.ndim != 4 or teacher.shape[0] != n or teacher.shape[2:] != (h, w):
            raise DataError(
                f"teacher probabilities of shape {teacher.shape} do not match {n} slices of {h}x{w}"
            )
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha should be in [0, 1], got {alpha}")
        self.image = data.image
        self.label = data.label
        self.teacher = np.asarray(teacher, dtype=np.float32)
        self.alpha = float(alpha)

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.tensor(self.image[index][None], dtype=torch.float32)  # (1, H, W)
        k = self.teacher.shape[1]
        hard = torch.nn.functional.one_hot(torch.tensor(self.label[index], dtype=torch.int64), k)
        soft = torch.from_numpy(self.teacher[index])
        target = self.alpha * soft + (1.0 - self.alpha) * hard.permute(2, 0, 1).float()
        return image, target
