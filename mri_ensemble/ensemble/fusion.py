"""Fusion: how an ensemble combines its members' outputs, and which members it runs.

Segmentation fuses probabilities, ``argmax_c sum_m W[m, c] p_m[c]`` (:func:`combine`, then
:func:`fuse_labels`). ``W`` is one weight per model (``(M,)``, shared by every class) or, for
``per_class``, an ``(M, C)`` matrix whose every column lies on the simplex. ``vote`` is the
members' majority vote instead, ties broken by the mean probability (:func:`vote`).
Reconstruction fuses images, ``sum_m w_m x_m`` (:func:`combine_images`). Weights are
normalised over the models here (:func:`normalise`).

:func:`ensemble_members` is the one membership rule (predict, registry, cost, report, UI): a
member whose share of the weight is below ``MIN_WEIGHT`` is not run. :class:`SearchResult` is
what a weight search (:mod:`mri_ensemble.ensemble.optimise`) returns and the fusion applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mri_ensemble.ensemble.scorers import CHUNK_ELEMENTS
from mri_ensemble.errors import DataError


@dataclass
class SearchResult:
    """Outcome of a search.

    weights: (M,) on the simplex, or (M, C) with every column on the simplex (per_class).
    score: the val score of ``weights`` (IoU or SSIM). trace: (weights, score) of the
    notable candidates: each one-hot, uniform, the chosen weights. order: members in the
    order greedy selection first added them (greedy only). note: what a guard decided, ``"; "``
    joined: the per-class held-out check, robust scoring (``"robust: ..."``), excluded
    members (``"excluded members [..]: ..."``); empty for a plain search.
    group_scores: robust searches only, each group's val score of ``weights`` (``score`` is
    their minimum).
    """

    method: str
    weights: np.ndarray
    score: float
    candidates_evaluated: int
    trace: list[tuple[list, float]] = field(default_factory=list)
    order: list[int] = field(default_factory=list)
    note: str = ""
    group_scores: dict[str, float] = field(default_factory=dict)


def normalise(weights: np.ndarray | Sequence[float], n_models: int) -> np.ndarray:
    """(M,) or (M, C) weights -> normalised to sum to 1 over the model axis (per column)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim not in (1, 2) or w.shape[0] != n_models:
        raise DataError(
            f"weights must have shape ({n_models},) or ({n_models}, C), found {w.shape}"
        )
    if not np.all(np.isfinite(w)) or np.any(w < 0) or np.any(w.sum(axis=0) <= 0):
        raise DataError(f"weights must be finite, non-negative and not all zero, found {w}")
    return w / w.sum(axis=0)


MIN_WEIGHT = 1e-8  # a member whose share is below this (below float32 resolution) is not run


def ensemble_members(weights: dict[str, Any]) -> list[str]:
    """The one membership rule (predict, registry, cost, report, UI): the members whose
    share of the total weight (of some class, for per-class weights) is at least
    ``MIN_WEIGHT``. ``weights``: ensemble.json's ``{model: w}`` or ``{model: {class: w}}``."""
    keys = sorted({c for w in weights.values() if isinstance(w, dict) for c in w})
    names = list(weights)
    if not keys:
        table = np.array([[float(weights[m])] for m in names])
    else:
        table = np.array(
            [[w.get(c, 0.0) if isinstance(w, dict) else w for c in keys] for w in weights.values()],
            dtype=np.float64,
        )
    totals = table.sum(0)
    share = table / np.where(totals > 0, totals, 1.0)
    return [m for m, row in zip(names, share, strict=True) if np.any(row >= MIN_WEIGHT)]


def combine(probs: np.ndarray, weights: np.ndarray | Sequence[float]) -> np.ndarray:
    """Weighted average of model probabilities.

    probs: (M, N, C, H, W) any float dtype; weights: (M,) or per class (M, C), non-negative,
    normalised here over the models -> (N, C, H, W) float32. Works in chunks of slices.
    """
    probs = np.asarray(probs)
    if probs.ndim != 5 or probs.shape[0] == 0:
        raise DataError(f"probs must have shape (M >= 1, N, C, H, W), found {probs.shape}")
    w = normalise(weights, probs.shape[0]).astype(np.float32)
    if w.ndim == 2 and w.shape[1] != probs.shape[2]:
        raise DataError(f"per-class weights {w.shape} do not match {probs.shape[2]} classes")
    w = w if w.ndim == 2 else np.repeat(w[:, None], probs.shape[2], axis=1)  # (M, C)
    out = np.empty(probs.shape[1:], dtype=np.float32)
    step = max(1, CHUNK_ELEMENTS // max(1, int(np.prod(probs.shape[2:]))))
    for s in range(0, probs.shape[1], step):
        chunk = probs[:, s : s + step].astype(np.float32)  # (M, n, C, H, W)
        out[s : s + step] = np.einsum("mc,mnchw->nchw", w, chunk)  # (n, C, H, W)
    return out


def vote(probs: np.ndarray) -> np.ndarray:
    """Majority vote of the members' labels -> (N, H, W) uint8; ties -> larger mean probability.

    probs: (M, N, C, H, W). A class's score is its vote count plus its mean probability,
    which lies in [0, 1], so it only ever breaks ties between equal counts.
    """
    probs = np.asarray(probs)
    m, n, c = probs.shape[:3]
    out = np.empty((n, *probs.shape[3:]), dtype=np.uint8)
    step = max(1, CHUNK_ELEMENTS // max(1, int(np.prod(probs.shape[2:]))))
    for s in range(0, n, step):
        chunk = probs[:, s : s + step].astype(np.float32)  # (M, n, C, H, W)
        labels = chunk.argmax(axis=2)  # (M, n, H, W)
        counts = np.stack([(labels == k).sum(axis=0) for k in range(c)], axis=1)  # (n, C, H, W)
        out[s : s + step] = (counts + chunk.mean(axis=0) * (1 - 1e-6)).argmax(axis=1)
    return out


def fuse_labels(probs: np.ndarray, result: SearchResult) -> np.ndarray:
    """Labels (N, H, W) uint8 of the ensemble ``result`` on ``probs`` (M, N, C, H, W)."""
    if result.method == "vote":  # members with weight 0 (excluded ones) have no vote
        keep = np.flatnonzero(np.asarray(result.weights) > 0)
        return vote(probs if len(keep) == len(probs) else probs[keep])
    return combine(probs, result.weights).argmax(axis=1).astype(np.uint8)


def combine_images(recons: np.ndarray, weights: np.ndarray | Sequence[float]) -> np.ndarray:
    """Weighted sum of reconstructions (M, N, H, W) with simplex ``weights`` -> (N, H, W)."""
    recons = np.asarray(recons)
    w = normalise(weights, recons.shape[0])
    if w.ndim != 1:
        raise DataError(f"image ensembles take one weight per model, found shape {w.shape}")
    return np.einsum("m,mnhw->nhw", w, recons.astype(np.float64)).astype(np.float32)
