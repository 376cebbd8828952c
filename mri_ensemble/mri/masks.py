"""Cartesian undersampling masks with fastMRI's semantics.

k-space is ``(..., coils, H, W)`` and a mask selects columns (phase-encode lines) along W:
a ``(W,)`` bool array. Every mask keeps a fully sampled centre block of
``num_low = round(W * center_fraction)`` columns starting at ``(W - num_low + 1) // 2``, so
column ``W // 2`` (the DC line) is always sampled when ``num_low >= 1``. The outer columns
follow one of three rules, as in ``fastmri/data/subsample.py``:

- ``"random"`` (``RandomMaskFunc``): each column is kept with probability
  ``(W / acc - num_low) / (W - num_low)``, so the *expected* acceleration is ``acc``.
- ``"equispaced"`` (``EquispacedMaskFunc``): every ``acc``-th column from a random offset in
  ``[0, acc)``, on top of the centre; the achieved acceleration is below ``acc``.
- ``"equispaced_fraction"`` (``EquispacedMaskFractionFunc``): lines spaced by
  ``adjusted = acc * (num_low - W) / (num_low * acc - W)`` so that the centre plus the lines
  make about ``W / acc`` columns in all.

When several ``(center_fraction, acceleration)`` pairs are given, one pair is drawn per mask
with a single random index, as fastMRI does.
"""

from __future__ import annotations

import hashlib
import logging
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError

log = logging.getLogger(__name__)

MASK_KINDS = ("random", "equispaced", "equispaced_fraction")


@dataclass(frozen=True)
class MaskSpec:
    """Which mask family to draw and its (center_fraction, acceleration) pairs."""

    kind: str = "equispaced_fraction"
    center_fractions: tuple[float, ...] = (0.08,)
    accelerations: tuple[int, ...] = (4,)

    def __post_init__(self) -> None:
        if self.kind not in MASK_KINDS:
            raise ConfigError(
                f"mask kind: expected one of {', '.join(MASK_KINDS)}, found {self.kind!r}"
            )
        cfs, accs = self.center_fractions, self.accelerations
        if len(cfs) == 0 or len(cfs) != len(accs):
            raise ConfigError(
                "center_fractions and accelerations: expected two non-empty lists of equal "
                f"length, found {len(cfs)} and {len(accs)} entries"
            )
        for cf in cfs:
            if isinstance(cf, bool) or not isinstance(cf, numbers.Real) or not 0.0 < cf < 1.0:
                raise ConfigError(f"center_fractions: expected numbers in (0, 1), found {cf!r}")
        for acc in accs:
            if isinstance(acc, bool) or not isinstance(acc, numbers.Integral) or acc < 1:
                raise ConfigError(f"accelerations: expected integers >= 1, found {acc!r}")
        if self.kind != "equispaced":
            for cf, acc in zip(cfs, accs, strict=True):
                if cf * acc >= 1.0:
                    raise ConfigError(
                        f"center_fractions: expected center_fraction * acceleration < 1 for kind "
                        f"{self.kind!r} (the centre alone would exceed 1/acceleration), "
                        f"found {cf} * {acc} = {cf * acc:g}"
                    )

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None) -> MaskSpec:
        """Spec from a params.yaml section; lists become tuples, missing keys take defaults."""
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise ConfigError(f"mask: expected a mapping, found {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"mask: unknown key(s) {', '.join(map(repr, unknown))}; known: "
                f"{', '.join(sorted(known))}"
            )
        kw: dict[str, Any] = {}
        for key, value in d.items():
            if key in ("center_fractions", "accelerations"):
                if isinstance(value, numbers.Real) and not isinstance(value, bool):
                    value = (value,)
                if not isinstance(value, list | tuple):
                    raise ConfigError(
                        f"mask {key}: expected a list of numbers, found {type(value).__name__}"
                    )
                value = tuple(value)
            elif not isinstance(value, str):
                raise ConfigError(f"mask {key}: expected a string, found {type(value).__name__}")
            kw[key] = value
        return cls(**kw)


def _center_block(width: int, num_low: int) -> np.ndarray:
    """(W,) bool with ``num_low`` columns set from ``(W - num_low + 1) // 2``."""
    mask = np.zeros(width, dtype=bool)
    pad = (width - num_low + 1) // 2
    mask[pad : pad + num_low] = True
    return mask


def sample_mask(spec: MaskSpec, width: int, rng: np.random.Generator) -> np.ndarray:
    """One column mask ``(W,)`` bool drawn from ``spec`` with ``rng``."""
    if width < 1:
        raise DataError(f"mask width: expected a positive number of columns, found {width}")
    choice = int(rng.integers(0, len(spec.accelerations)))
    cf, acc = spec.center_fractions[choice], spec.accelerations[choice]
    num_low = int(round(width * cf))
    mask = _center_block(width, num_low)
    if spec.kind == "random":
        if num_low >= width:
            return mask
        prob = (width / acc - num_low) / (width - num_low)
        mask |= rng.uniform(size=width) < prob  # prob < 0 (rounding at tiny W): centre only
    elif spec.kind == "equispaced":
        offset = int(rng.integers(0, acc))
        mask[offset::acc] = True
    else:  # equispaced_fraction
        if num_low * acc >= width:  # rounding at tiny W: the centre already reaches 1/acc
            log.debug("width %d: centre of %d columns reaches 1/%d alone", width, num_low, acc)
            return mask
        adjusted = acc * (num_low - width) / (num_low * acc - width)
        offset = int(rng.integers(0, round(adjusted)))
        lines = np.around(np.arange(offset, width - 1, adjusted)).astype(int)
        mask[lines] = True
    return mask


def _stable_seed(seed: int, case: str) -> int:
    """64-bit seed from sha256 of ``f"{seed}:{case}"`` (same on every run and machine)."""
    digest = hashlib.sha256(f"{seed}:{case}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def volume_mask(spec: MaskSpec, width: int, seed: int, case: str) -> np.ndarray:
    """The mask of volume ``case``: ``(W,)`` bool, the same for every call with equal args."""
    return sample_mask(spec, width, np.random.default_rng(_stable_seed(seed, case)))


def _check_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 1 or mask.size == 0:
        raise DataError(f"mask: expected a non-empty 1-D column mask (W,), found {mask.shape}")
    return mask.astype(bool, copy=False)


def acs_bounds(mask: np.ndarray) -> tuple[int, int]:
    """``[start, stop)`` of the contiguous sampled block containing column ``W // 2``."""
    mask = _check_mask(mask)
    centre = mask.size // 2
    if not mask[centre]:
        raise DataError(
            f"mask: expected the centre column {centre} of {mask.size} to be sampled "
            "(autocalibration block), found it missing"
        )
    missing = np.flatnonzero(~mask)
    left = missing[missing < centre]
    right = missing[missing > centre]
    start = int(left[-1]) + 1 if left.size else 0
    stop = int(right[0]) if right.size else mask.size
    return start, stop


def acceleration(mask: np.ndarray) -> float:
    """Achieved acceleration ``W / number of sampled columns``."""
    mask = _check_mask(mask)
    n = int(mask.sum())
    if n == 0:
        raise DataError(f"mask: expected at least one sampled column, found none of {mask.size}")
    return mask.size / n
