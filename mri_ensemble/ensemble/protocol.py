"""Objectives and the evaluation protocol's parts: what is scored, on which folds, by whom.

An objective (:class:`SegmentationObjective`, :class:`ImageObjective`) holds a task's val
outputs, target and case ids, checked on creation, and scores and fuses them on subsets of
slices and models; the searches of :mod:`mri_ensemble.ensemble.optimise` run on it.
Objectives take optional ``groups``, one label per slice, constant within a case, read by
robust scoring and by the guard.

Folds (:func:`case_folds`) hold whole case groups (:func:`case_groups`: both phases of one
ACDC patient in the same fold); cross-fitting and the per-class held-out check split on them.

The guard :func:`members_below` lists, per member, the groups on which it scores below a
baseline (the zero-filled images, say); ``search(..., exclude=...)`` or ``guarded_search``
then search the allowed members only and return full-length weights with exact zeros for
the rest.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from mri_ensemble.ensemble.fusion import SearchResult, combine_images, fuse_labels, vote
from mri_ensemble.ensemble.scorers import (
    TIE_ATOL,
    BatchScorer,
    Scorer,
    SSIMScorer,
    WorstGroupScorer,
)
from mri_ensemble.errors import ConfigError, DataError
from mri_ensemble.metrics import case_index


def _validate(probs: np.ndarray, target: np.ndarray, case: np.ndarray) -> None:
    if probs.ndim != 5:
        raise DataError(f"probs must have shape (M, N, C, H, W), found {probs.shape}")
    m, n, c, h, w = probs.shape
    if m == 0:
        raise DataError("probs holds no models (M = 0); the ensemble needs at least one")
    if n == 0:
        raise DataError("probs holds no slices (N = 0); the search needs validation data")
    if c < 2:
        raise DataError(f"probs must have at least 2 classes, found C = {c}")
    if target.shape != (n, h, w):
        raise DataError(
            f"target must have shape (N, H, W) = {(n, h, w)} to match probs {probs.shape}, "
            f"found {target.shape}"
        )
    if np.asarray(case).shape != (n,):
        raise DataError(f"case must have shape ({n},), found {np.asarray(case).shape}")
    if probs.dtype.kind != "f":
        raise DataError(f"probs must be floating point, found dtype {probs.dtype}")
    for i in range(m):
        if not np.all(np.isfinite(probs[i])):
            raise DataError(f"probs of model {i} contain NaN or infinite values")
    if target.dtype.kind not in "iu" or (target.size and (target.min() < 0 or target.max() >= c)):
        raise DataError(f"target must hold integer labels in 0..{c - 1}")


def case_groups(case: np.ndarray) -> np.ndarray:
    """(N,) group id per slice: the case id with an ``_ED``/``_ES``/``_frameNN`` suffix removed,
    so the two phases of one ACDC patient always fall in the same fold."""
    names, idx = case_index(case)
    stripped = [re.sub(r"_(ED|ES|frame\d+)$", "", n) for n in names]
    return np.asarray(stripped)[idx]


def case_folds(case: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Split slice indices into ``min(k, groups)`` folds of whole groups (:func:`case_groups`);
    groups are shuffled by ``seed`` and dealt round-robin. Each fold lists held-out slices."""
    if k < 2:
        raise ConfigError(f"crossfit folds must be >= 2, found {k}")
    groups = case_groups(case)
    unique = np.unique(groups)
    if len(unique) < 2:
        raise DataError(f"cross-fitting needs at least 2 case groups, found {len(unique)}")
    order = np.random.default_rng(seed).permutation(len(unique))
    folds = [unique[order[f :: min(k, len(unique))]] for f in range(min(k, len(unique)))]
    return [np.flatnonzero(np.isin(groups, f)) for f in folds]


ALL_GROUP = "all"  # the one group of an objective without groups


def _validate_groups(groups: np.ndarray | Sequence[str], case: np.ndarray) -> np.ndarray:
    """(N,) group labels -> str array; constant within each case, else DataError."""
    g = np.asarray(groups)
    if g.shape != case.shape:
        raise DataError(f"groups must have shape {case.shape} (one per slice), found {g.shape}")
    names, g_idx = case_index(g)  # decodes bytes (HDF5) like case ids
    if not names:
        return np.asarray(names, dtype=str)[g_idx]
    case_names, c_idx = case_index(case)
    pairs = np.unique(c_idx * len(names) + g_idx)  # distinct (case, group) pairs, sorted
    mixed = np.flatnonzero(np.bincount(pairs // len(names)) > 1)
    if mixed.size:
        found = [names[p % len(names)] for p in pairs if p // len(names) == mixed[0]]
        raise DataError(
            f"groups must be constant within a case: case {case_names[mixed[0]]!r} has "
            f"groups {found} ({mixed.size} case(s) mixed)"
        )
    return np.asarray(names)[g_idx]


class Objective:
    """A task's val outputs, and how to score and fuse them on subsets of slices/models.

    ``groups`` (optional, (N,) str): one group label per slice, constant within a case
    (checked: DataError), read by robust scoring and by :func:`members_below`.
    """

    n_classes: int | None  # None for images (no per-class weights, no vote)

    def __init__(
        self,
        outputs: np.ndarray,
        target: np.ndarray,
        case: np.ndarray,
        groups: np.ndarray | Sequence[str] | None = None,
    ) -> None:
        self.outputs, self.target, self.case = outputs, target, np.asarray(case)
        self.n_models = outputs.shape[0]
        self.groups = None if groups is None else _validate_groups(groups, self.case)

    def take(
        self, slices: np.ndarray | None, models: Sequence[int] | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = self.outputs if models is None else self.outputs[list(models)]
        if slices is None:
            return out, self.target, self.case
        return out[:, slices], self.target[slices], self.case[slices]

    def take_groups(self, slices: np.ndarray | None) -> np.ndarray | None:
        """The groups of ``slices`` (all slices for None); None when the objective has none."""
        if self.groups is None or slices is None:
            return self.groups
        return self.groups[slices]

    def subset(
        self, slices: np.ndarray | None = None, models: Sequence[int] | None = None
    ) -> Objective:
        """A new objective of the same kind on ``slices``/``models``, groups subset alike."""
        return type(self)(*self.take(slices, models), groups=self.take_groups(slices))

    def slice_groups(self, slices: np.ndarray | None = None) -> list[tuple[str, np.ndarray]]:
        """(label, absolute slice indices) of each group among ``slices``, labels sorted;
        a single ``("all", slices)`` when the objective has no groups."""
        idx = np.arange(len(self.case)) if slices is None else np.asarray(slices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        if self.groups is None:
            return [(ALL_GROUP, idx)]
        labels = self.groups[idx]
        return [(str(g), idx[labels == g]) for g in np.unique(labels)]

    def _scorer_of(
        self, outputs: np.ndarray, target: np.ndarray, case: np.ndarray, per_class: bool = False
    ) -> Scorer:
        raise NotImplementedError

    def scorer(self, slices=None, models=None, per_class: bool = False) -> Scorer:
        return self._scorer_of(*self.take(slices, models), per_class=per_class)

    def group_scorer(self, slices=None, models=None, per_class: bool = False) -> Scorer:
        """Worst-group scorer (:class:`WorstGroupScorer`) on ``slices``; the plain
        :meth:`scorer` when the slices hold one group (or the objective has none)."""
        parts = self.slice_groups(slices)
        if len(parts) == 1:
            return self.scorer(slices, models, per_class)
        return WorstGroupScorer(
            [g for g, _ in parts], [self.scorer(idx, models, per_class) for _, idx in parts]
        )

    def as_member(self, outputs: np.ndarray) -> np.ndarray:
        """One member's outputs on every slice (a baseline) -> (1, ...) like ``self.outputs``."""
        raise NotImplementedError

    def fuse(self, result: SearchResult, slices=None, models=None) -> np.ndarray:
        raise NotImplementedError

    def score_vote(self, slices=None, models=None) -> float:
        raise ConfigError("ensemble method 'vote' is for segmentation only")


class SegmentationObjective(Objective):
    """probs (M, N, C, H, W), target (N, H, W) labels, case (N,), optional groups (N,) str;
    checked on creation."""

    def __init__(
        self,
        probs: np.ndarray,
        target: np.ndarray,
        case: np.ndarray,
        groups: np.ndarray | Sequence[str] | None = None,
    ) -> None:
        probs, target = np.asarray(probs), np.asarray(target)
        _validate(probs, target, case)
        super().__init__(probs, target, case, groups)
        self.n_classes = probs.shape[2]

    def _scorer_of(
        self, outputs: np.ndarray, target: np.ndarray, case: np.ndarray, per_class: bool = False
    ) -> Scorer:
        return BatchScorer(outputs, target, case, per_class=per_class)

    def as_member(self, outputs: np.ndarray) -> np.ndarray:
        """(N, C, H, W) probabilities, or (N, H, W) integer labels (made one-hot)."""
        out = np.asarray(outputs)
        n, c, h, w = self.outputs.shape[1:]
        if out.shape == (n, h, w) and out.dtype.kind in "iu":
            if out.size and (out.min() < 0 or out.max() >= c):
                raise DataError(f"baseline labels must lie in 0..{c - 1}")
            onehot = np.zeros((n, c, h, w), dtype=np.float32)
            np.put_along_axis(onehot, out[:, None].astype(np.int64), 1.0, axis=1)
            return onehot[None]
        if out.shape != (n, c, h, w) or out.dtype.kind != "f":
            raise DataError(
                f"a segmentation baseline must be (N, C, H, W) = {(n, c, h, w)} probabilities "
                f"or (N, H, W) integer labels, found {out.shape} {out.dtype}"
            )
        if not np.all(np.isfinite(out)):
            raise DataError("the baseline contains NaN or infinite values")
        return out[None]

    def fuse(self, result: SearchResult, slices=None, models=None) -> np.ndarray:
        return fuse_labels(self.take(slices, models)[0], result)

    def score_vote(self, slices=None, models=None) -> float:
        probs, target, case = self.take(slices, models)
        labels = vote(probs)
        # the vote as a one-hot "model" scored by the same batched counts as any candidate
        onehot = np.zeros((1, *probs.shape[1:]), dtype=np.float32)
        np.put_along_axis(onehot[0], labels[:, None].astype(np.int64), 1.0, axis=1)
        return float(BatchScorer(onehot, target, case)(np.ones((1, 1)))[0])


class ImageObjective(Objective):
    """recons (M, N, H, W), target (N, H, W), case (N,), optional groups (N,) str; checked
    on creation."""

    n_classes = None

    def __init__(
        self,
        recons: np.ndarray,
        target: np.ndarray,
        case: np.ndarray,
        groups: np.ndarray | Sequence[str] | None = None,
    ) -> None:
        recons, target = np.asarray(recons), np.asarray(target)
        if recons.ndim != 4 or recons.shape[0] == 0 or recons.shape[2:] != target.shape[1:]:
            raise DataError(
                f"recons must be (M >= 1, N, H, W) matching target {target.shape}, "
                f"found {recons.shape}"
            )
        if recons.shape[1] != target.shape[0] or np.asarray(case).shape != (target.shape[0],):
            raise DataError("recons, target and case must have the same number of slices")
        if not np.all(np.isfinite(recons)):
            raise DataError("recons contain NaN or infinite values")
        super().__init__(recons, target, case, groups)

    def _scorer_of(
        self, outputs: np.ndarray, target: np.ndarray, case: np.ndarray, per_class: bool = False
    ) -> Scorer:
        return SSIMScorer(outputs, target, case)

    def as_member(self, outputs: np.ndarray) -> np.ndarray:
        """(N, H, W) images, e.g. the zero-filled reconstructions."""
        out = np.asarray(outputs)
        if out.shape != self.outputs.shape[1:]:
            raise DataError(
                f"an image baseline must be (N, H, W) = {self.outputs.shape[1:]}, found {out.shape}"
            )
        if not np.all(np.isfinite(out)):
            raise DataError("the baseline contains NaN or infinite values")
        return out[None]

    def fuse(self, result: SearchResult, slices=None, models=None) -> np.ndarray:
        return combine_images(self.take(slices, models)[0], result.weights)


def group_member_scores(
    obj: Objective, baseline: np.ndarray | None = None, slices: np.ndarray | None = None
) -> tuple[list[str], np.ndarray]:
    """Each member's val score per group (and the baseline's as a last column).

    Returns (group labels, (G, M) scores), or (G, M + 1) with ``baseline`` (one member's
    outputs on every slice, see :func:`members_below`). Groups: the objective's among
    ``slices``, or one ``"all"``. Each score is the plain scorer's on that group's slices.
    """
    extra = None if baseline is None else obj.as_member(baseline)
    labels, rows = [], []
    for g, idx in obj.slice_groups(slices):
        row = obj.scorer(idx)(np.eye(obj.n_models))
        if extra is not None:
            base = obj._scorer_of(extra[:, idx], obj.target[idx], obj.case[idx])(np.ones((1, 1)))
            row = np.concatenate([row, base])
        labels.append(g)
        rows.append(row)
    return labels, np.vstack(rows)


def members_below(
    obj: Objective, baseline: np.ndarray, slices: np.ndarray | None = None
) -> dict[int, list[str]]:
    """The guard: for each member index, the groups on which its mean val score is below the
    baseline's on the same group (empty list: never below).

    baseline: one member's outputs on every slice of ``obj`` (subset by ``slices`` here):
    images (N, H, W) for reconstruction (e.g. zero-filled), probabilities (N, C, H, W) or
    integer labels (N, H, W) for segmentation. Scored by the same scorer as the members.
    Groups: the objective's, or one ``"all"``. A group where either score is NaN (nothing to
    score) flags nobody. Pass the flagged members to ``search(..., exclude=...)``.
    """
    labels, scores = group_member_scores(obj, baseline, slices)
    out: dict[int, list[str]] = {i: [] for i in range(obj.n_models)}
    for g, row in zip(labels, scores, strict=True):
        base = row[-1]
        for i in range(obj.n_models):
            if row[i] < base - TIE_ATOL:  # False for NaN on either side
                out[i].append(g)
    return out
