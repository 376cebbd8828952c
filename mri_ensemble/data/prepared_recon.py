"""Prepared reconstruction HDF5 files: the contract between ingest, train and evaluate.

One file per split (``data/prepared/reconstruction/{train,val,test}.h5``) holds

=============  ======================  ================================================
dataset        dtype, shape            meaning
=============  ======================  ================================================
``kspace``     complex64 (N, C, H, W)  fully-sampled multi-coil k-space (centred)
``mask``       bool (N, W)             the slice's undersampling mask (fixed per volume)
``target``     float32 (N, H, W)       fully-sampled RSS image (the reference)
``grappa``     float32 (N, H, W)       GRAPPA reconstruction from ``kspace * mask``
``case``       str (N,)                id of the volume each slice comes from
``max``        float32 (N,)            the slice's *volume* target maximum (the SSIM
                                       data range, as fastMRI's ``max`` attribute)
=============  ======================  ================================================

plus file attributes (source, size, coils, mask parameters, seed, ...). Networks only ever
see ``kspace * mask``: the fully-sampled k-space is kept so that training can draw a
fresh mask every epoch. Storage is chunked per slice with deterministic lossless deflate
(``prepared.COMPRESSION``); files are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mri_ensemble.data.prepared import _JSON_ATTRS, COMPRESSION, _encode_attrs
from mri_ensemble.errors import DataError
from mri_ensemble.io import atomic_path

logger = logging.getLogger(__name__)

REQUIRED_KEYS: tuple[str, ...] = ("kspace", "mask", "target", "grappa", "case", "max")
_ACQUISITION = re.compile(r"^file_brain_(AX|CO|SA)?([A-Za-z0-9]+?)_")


def contrast_group(case: str) -> str:
    """The contrast of a volume named as fastMRI names brain files, its val/test group:
    ``file_brain_AXT2_200_6002217`` -> ``T2``, ``file_brain_COFLAIR_sim_004`` -> ``FLAIR``;
    ``all`` for other names (knee files, custom names)."""
    match = _ACQUISITION.match(str(case).split("~")[0])
    return match.group(2) if match else "all"


def contrast_groups(case: np.ndarray) -> np.ndarray:
    """:func:`contrast_group` of every slice's case: (N,) str."""
    return np.array([contrast_group(c) for c in np.asarray(case)], dtype=str)


@dataclass
class ReconstructionSet:
    """Slices of one split; shapes as in the module table."""

    kspace: np.ndarray
    mask: np.ndarray
    target: np.ndarray
    grappa: np.ndarray
    case: np.ndarray
    max: np.ndarray
    attrs: dict[str, Any]

    def __len__(self) -> int:
        return int(self.kspace.shape[0])

    def subset(self, index: np.ndarray) -> ReconstructionSet:
        """The slices at ``index`` (in that order), sharing ``attrs``."""
        return ReconstructionSet(
            self.kspace[index],
            self.mask[index],
            self.target[index],
            self.grappa[index],
            self.case[index],
            self.max[index],
            self.attrs,
        )


def write_reconstruction_h5(path: Path, data: ReconstructionSet) -> None:
    """Write ``data`` to ``path`` atomically. ValueError on inconsistent arrays (a bug)."""
    n, _, h, w = data.kspace.shape
    expected = {
        "mask": (n, w),
        "target": (n, h, w),
        "grappa": (n, h, w),
        "case": (n,),
        "max": (n,),
    }
    for key, shape in expected.items():
        if np.shape(getattr(data, key)) != shape:
            raise ValueError(f"{key}: expected shape {shape}, got {np.shape(getattr(data, key))}")
    plain, as_json = _encode_attrs(data.attrs)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset(
            "kspace",
            data=data.kspace.astype(np.complex64),
            chunks=(1, *data.kspace.shape[1:]),
            **COMPRESSION,
        )
        f.create_dataset("mask", data=data.mask.astype(bool))
        for key in ("target", "grappa"):
            f.create_dataset(
                key,
                data=getattr(data, key).astype(np.float32),
                chunks=(1, h, w),
                **COMPRESSION,
            )
        f.create_dataset(
            "case", data=np.asarray(data.case).astype(str).astype(object), dtype=h5py.string_dtype()
        )
        f.create_dataset("max", data=data.max.astype(np.float32))
        for key, value in plain.items():
            f.attrs[key] = value
        f.attrs[_JSON_ATTRS] = json.dumps(as_json)
    logger.info("wrote %d slices (%d coils, %dx%d) to %s", n, data.kspace.shape[1], h, w, path)


def read_reconstruction_h5(path: Path) -> ReconstructionSet:
    """Read a prepared reconstruction file; DataError naming the file if it is not one."""
    if not path.is_file():
        raise DataError(f"{path}: prepared file not found (run the ingest stage first)")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in REQUIRED_KEYS if k not in f]
            if missing:
                raise DataError(f"{path}: not a prepared reconstruction file (missing {missing})")
            arrays = {k: f[k][...] for k in REQUIRED_KEYS if k != "case"}
            case = f["case"].asstr()[...]
            attrs = dict(f.attrs)
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from exc
    for key in json.loads(str(attrs.pop(_JSON_ATTRS, "[]"))):
        attrs[key] = json.loads(attrs[key])
    data = ReconstructionSet(case=case, attrs=attrs, **arrays)
    if data.kspace.ndim != 4 or not np.iscomplexobj(data.kspace):
        raise DataError(f"{path}: kspace should be complex (N, C, H, W), found {data.kspace.shape}")
    n, _, h, w = data.kspace.shape
    if data.mask.shape != (n, w) or data.target.shape != (n, h, w) or case.shape != (n,):
        raise DataError(f"{path}: mask/target/case shapes do not match kspace {data.kspace.shape}")
    return data
