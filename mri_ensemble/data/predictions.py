"""Saved model outputs for the ensemble: ``data/predictions/<task>/<model>/{val,test}.h5``.

Segmentation: ``probs`` float16 (N, K, H, W) softmax probabilities; reconstruction:
``recon`` float32 (N, H, W) images (float32: SSIM at 1e-4 resolution needs more than
float16's 11 bits). Both in the case order of the prepared file, with ``case`` (N,)
strings. The ensemble reads these and never re-runs a network.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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


def write_reconstructions(
    path: Path, recon: np.ndarray, case: np.ndarray, attrs: Mapping[str, Any]
) -> None:
    if recon.ndim != 3 or len(recon) != len(case):
        raise ValueError(f"recon (N, H, W) with N={len(case)} expected, got {recon.shape}")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("recon", data=recon.astype(np.float32), chunks=(1, *recon.shape[1:]))
        f.create_dataset("case", data=np.asarray(case, dtype=object), dtype=h5py.string_dtype())
        f.attrs.update(dict(attrs))


def read_reconstructions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(recon float32 (N, H, W), case (N,) str); DataError naming the file if bad."""
    if not path.is_file():
        raise DataError(f"{path}: predictions not found (run the evaluate stage first)")
    try:
        with h5py.File(path, "r") as f:
            for key in ("recon", "case"):
                if key not in f:
                    raise DataError(f"{path}: missing dataset {key!r}")
            recon = f["recon"][...].astype(np.float32)
            case = f["case"].asstr()[...]
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from exc
    if recon.ndim != 3 or len(recon) != len(case):
        raise DataError(f"{path}: recon should be (N, H, W) matching case, found {recon.shape}")
    if not np.isfinite(recon).all():
        raise DataError(f"{path}: recon contains NaN or Inf")
    return recon, case


def load_stack(
    pred_dir: Path,
    models: list[str],
    split: str,
    case: np.ndarray,
    read: Callable[[Path], tuple[np.ndarray, np.ndarray]] = read_probabilities,
) -> np.ndarray:
    """Saved outputs of every model for ``split`` (``read``: probabilities -> (M, N, K, H, W),
    or ``read_reconstructions`` -> (M, N, H, W)), checked against the prepared ``case``."""
    stack = []
    for m in models:
        path = pred_dir / m / f"{split}.h5"
        out, c = read(path)
        if not np.array_equal(c, case):
            raise DataError(f"{path}: case order differs from the prepared {split} set")
        stack.append(out)
    return np.stack(stack)
