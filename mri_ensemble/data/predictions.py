"""Saved model outputs for the ensemble: ``data/predictions/<task>/<model>/{val,test}.h5``.

``probs`` float16 (N, K, H, W) softmax probabilities in the case order of the prepared
file, ``case`` (N,) strings. The ensemble reads these and never re-runs a network.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import DataError
from ..io import atomic_path


def write_probabilities(
    path: Path, probs: np.ndarray, case: np.ndarray, attrs: Mapping[str, Any]
) -> None:
    if probs.ndim != 4 or len(probs) != len(case):
        raise ValueError(f"probs (N, K, H, W) with N={len(case)} expected, got {probs.shape}")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("probs", data=probs.astype(np.float16), chunks=(1, *probs.shape[1:]))
        f.create_dataset("case", data=np.asarray(case, dtype=object), dtype=h5py.string_dtype())
        f.attrs.update(dict(attrs))


def read_probabilities(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(probs float32 (N, K, H, W), case (N,) str); DataError naming the file if bad."""
    if not path.is_file():
        raise DataError(f"{path}: predictions not found (run the evaluate stage first)")
    try:
        with h5py.File(path, "r") as f:
            for key in ("probs", "case"):
                if key not in f:
                    raise DataError(f"{path}: missing dataset {key!r}")
            probs = f["probs"][...].astype(np.float32)
            case = f["case"].asstr()[...]
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from exc
    if probs.ndim != 4 or len(probs) != len(case):
        raise DataError(f"{path}: probs should be (N, K, H, W) matching case, found {probs.shape}")
    if not np.isfinite(probs).all():
        raise DataError(f"{path}: probs contain NaN or Inf")
    return probs, case
