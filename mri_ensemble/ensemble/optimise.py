"""Ensemble weight search: choose member weights on validation outputs only.

A search runs on an objective (:mod:`mri_ensemble.ensemble.protocol`), scores candidates with
the batched scorers (:mod:`mri_ensemble.ensemble.scorers`) and returns weights for the fusion
(:mod:`mri_ensemble.ensemble.fusion`). Weights are always chosen on val outputs; report R3
searched and reported on the same data, we do not, and :func:`crossfit` estimates how
optimistic the in-sample val score is. :func:`forward_selection` and :func:`leave_one_out`
re-run the search on subsets of the members.

Methods (``METHODS``):

- ``mean``: the unweighted mean (nnU-Net, MONAI Auto3DSeg). ``vote``: majority vote of the
  members' labels, ties broken by the mean probability (segmentation only).
  ``best_single``: the member with the best val score.
- ``random``: R3's random grid: ``n_random`` candidates, each weight drawn uniform in
  [0, 1], then normalised. ``nelder_mead``: Nelder-Mead (SciPy) on softmax logits from the
  best one-hot / uniform start. ``random+nelder_mead``: random, then Nelder-Mead from its
  best. Every candidate pool of these holds each one-hot and the uniform weights.
- ``greedy``: forward selection with replacement (Caruana et al. 2004; auto-sklearn's
  ensemble selection): ``rounds`` times add the member whose addition scores best, weights
  = how often each member was added; the best bag along the path wins.
- ``per_class`` (segmentation): start from ``random+nelder_mead``'s shared weights, then
  coordinate search over the columns of ``W`` (``n_random`` Dirichlet columns + one-hots per
  class and sweep), penalised by ``penalty * ||W - W0||^2 / C`` toward the shared weights;
  an overfitting guard refits both on each half of the val cases and keeps the per-class
  weights only if they beat the shared ones on the other half on average.

Every optimiser (all but ``mean`` and ``vote``) returns a val score no lower than the best
single member. Ties go to the weights nearest to uniform (L2), then the earlier candidate;
a search is deterministic for a seed.

Robust selection and the member guard. A mean val score can be won by a member that is
excellent on the common kind of slice and poor on a rarer one (a contrast, an orientation,
a pathology group). Objectives take optional ``groups``, one label per slice, constant
within a case. With ``SearchConfig(robust=True)`` every candidate is scored by its worst
group: the minimum over groups of the group's mean score, each computed exactly as the plain
scorer does on that group's slices (:class:`WorstGroupScorer`); this is the worst-group
objective of group DRO (Sagawa et al. 2020, "Distributionally Robust Neural Networks for
Group Shifts", ICLR), applied to the choice of ensemble weights rather than to training. All
optimisers run unchanged on it, so the "never below the best single member" promise holds
in the worst-group score, and ``SearchResult.score`` is that score (``group_scores`` holds
each group's). With one group it is the plain score, bit for bit. The guard
:func:`members_below` lists, per member, the groups on which it scores below a baseline (the
zero-filled images, say); ``search(..., exclude=...)`` or :func:`guarded_search` then search
the allowed members only and return full-length weights with exact zeros for the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from mri_ensemble.ensemble.fusion import SearchResult
from mri_ensemble.ensemble.protocol import (
    ImageObjective,
    Objective,
    SegmentationObjective,
    case_folds,
    case_groups,
    members_below,
)
from mri_ensemble.ensemble.scorers import TIE_ATOL, Scorer, WorstGroupScorer
from mri_ensemble.errors import ConfigError, DataError

log = logging.getLogger(__name__)

OPTIMISERS = ("best_single", "random", "nelder_mead", "random+nelder_mead", "greedy", "per_class")
METHODS = ("mean", "vote", *OPTIMISERS)
SEGMENTATION_ONLY = ("vote", "per_class")
NELDER_MEAD_MAX_EVALS = 200  # objective evaluations of one Nelder-Mead refinement
NELDER_MEAD_STEP = 1.0  # initial simplex step in softmax logits (a weight ratio of e)
PER_CLASS_SWEEPS = 2  # passes over the classes of the per-class coordinate search


@dataclass
class SearchConfig:
    """The ``ensemble.<task>`` params a search reads (see params.yaml for meanings)."""

    method: str = "random+nelder_mead"
    n_random: int = 200
    seed: int = 0
    rounds: int = 25  # greedy
    penalty: float = 0.01  # per_class: shrinkage toward the shared weights
    robust: bool = False  # score a candidate by its worst group (needs objective groups)

    def __post_init__(self) -> None:
        if not isinstance(self.robust, bool | np.bool_):
            raise ConfigError(f"robust must be true or false, found {self.robust!r}")
        if self.method not in METHODS:
            raise ConfigError(
                f"unknown ensemble method {self.method!r}; known: {', '.join(METHODS)}"
            )
        if self.n_random < 0:
            raise ConfigError(f"n_random must be >= 0, found {self.n_random}")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, found {self.rounds}")
        if not self.penalty >= 0:
            raise ConfigError(f"penalty must be >= 0, found {self.penalty}")


def _choose(weights: np.ndarray, scores: np.ndarray) -> int:
    """Index of the best score; ties -> nearest to uniform, then earliest. NaN loses."""
    finite = np.where(np.isnan(scores), -np.inf, scores)
    tied = np.flatnonzero(finite >= finite.max() - TIE_ATOL)
    flat = weights.reshape(len(weights), -1)
    uniform = np.full(flat.shape[1], 1.0 / weights.shape[1])
    dist = np.linalg.norm(flat[tied] - uniform, axis=1)
    return int(tied[np.argmin(dist)])  # argmin returns the first of equal distances


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _nelder_mead(scorer: Scorer, start: np.ndarray) -> tuple[list[np.ndarray], list[float]]:
    """Refine ``start`` (M,) by Nelder-Mead on softmax logits; returns every evaluated point."""
    m = start.shape[0]
    seen_w: list[np.ndarray] = []
    seen_s: list[float] = []

    def objective(z: np.ndarray) -> float:
        w = _softmax(z)
        s = float(scorer(w[None])[0])
        seen_w.append(w)
        seen_s.append(s)
        return 1.0 if np.isnan(s) else -s

    # logits of the start, zero weights floored so a one-hot is a finite point
    z0 = np.log(np.maximum(start, 1e-3))
    z0 -= z0.mean()
    simplex = np.vstack([z0, z0 + NELDER_MEAD_STEP * np.eye(m)])  # (M + 1, M)
    minimize(
        objective,
        z0,
        method="Nelder-Mead",
        options={
            "initial_simplex": simplex,
            "maxfev": NELDER_MEAD_MAX_EVALS,
            "xatol": 1e-2,
            "fatol": 1e-6,
        },
    )
    return seen_w, seen_s


def pool_search(scorer: Scorer, m: int, cfg: SearchConfig) -> SearchResult:
    """best_single, random, nelder_mead, random+nelder_mead: one-hots + uniform + ..."""
    parts = cfg.method.split("+")
    pool = [np.eye(m)] if cfg.method == "best_single" else [np.eye(m), np.full((1, m), 1.0 / m)]
    if "random" in parts:
        draws = np.random.default_rng(cfg.seed).uniform(0.0, 1.0, size=(cfg.n_random, m))
        sums = draws.sum(axis=1, keepdims=True)
        pool.append(np.where(sums > 0, draws / np.where(sums > 0, sums, 1.0), 1.0 / m))
    weights = np.vstack(pool)  # (K, M)
    scores = scorer(weights)  # (K,)
    if "nelder_mead" in parts and m > 1:
        nm_w, nm_s = _nelder_mead(scorer, weights[_choose(weights, scores)])
        weights = np.vstack([weights, *nm_w])
        scores = np.concatenate([scores, nm_s])
    best = _choose(weights, scores)
    trace = [(weights[i].tolist(), float(scores[i])) for i in range(min(m + 1, len(weights)))]
    trace.append((weights[best].tolist(), float(scores[best])))
    return SearchResult(cfg.method, weights[best].copy(), float(scores[best]), len(scores), trace)


def _greedy(scorer: Scorer, m: int, cfg: SearchConfig) -> SearchResult:
    """Caruana's forward selection with replacement; the best bag along the path wins."""
    counts = np.zeros(m)
    path_w, path_s, order = [], [], []
    for _ in range(cfg.rounds):
        cands = (counts + np.eye(m)) / (counts.sum() + 1)  # (M, M): add each member once
        s = scorer(cands)
        j = int(np.argmax(np.where(np.isnan(s), -np.inf, s)))  # first best
        counts[j] += 1
        path_w.append(counts / counts.sum())
        path_s.append(float(s[j]))
        if j not in order:
            order.append(j)
    weights, scores = np.vstack(path_w), np.asarray(path_s)
    finite = np.where(np.isnan(scores), -np.inf, scores)
    best = int(np.flatnonzero(finite >= finite.max() - TIE_ATOL)[0])  # the smallest best bag
    trace = [(w.tolist(), s) for w, s in zip(path_w, path_s, strict=True)]
    return SearchResult(
        cfg.method, weights[best].copy(), float(scores[best]), cfg.rounds * m, trace, order
    )


def _per_class_refine(
    scorer: Scorer, w0: np.ndarray, n_classes: int, cfg: SearchConfig
) -> tuple[np.ndarray, int]:
    """Coordinate search over the columns of an (M, C) weight matrix from ``w0`` (M,)."""
    m = w0.shape[0]
    start = np.repeat(w0[:, None], n_classes, axis=1)  # (M, C)
    current, evaluated = start.copy(), 0
    rng = np.random.default_rng(cfg.seed)
    for _ in range(PER_CLASS_SWEEPS):
        for cls in range(n_classes):
            cols = np.vstack([np.eye(m), rng.dirichlet(np.ones(m), cfg.n_random)])  # (R, M)
            cand = np.repeat(current[None], len(cols) + 1, axis=0)  # [0] keeps the current
            cand[1:, :, cls] = cols
            raw = scorer(cand)
            evaluated += len(cand)
            shrink = cfg.penalty * ((cand - start) ** 2).sum(axis=(1, 2)) / n_classes
            penalised = np.where(np.isnan(raw), -np.inf, raw - shrink)
            current = cand[int(np.argmax(penalised))].copy()  # ties keep the current
    return current, evaluated


class SearchGuaranteeError(RuntimeError):
    """An optimiser broke its promise (a bug, not bad input): checked explicitly, so the
    check survives ``python -O``."""


def _check_not_below(method: str, score: float, floor: float, what: str) -> None:
    """Every search keeps its starting points: its val score is never below ``floor``."""
    if not score >= floor - 1e-9:
        raise SearchGuaranteeError(
            f"ensemble method {method!r}: val score {score:.6f} is below {what} ({floor:.6f})"
        )


def _scorer_for(
    obj: Objective,
    cfg: SearchConfig,
    slices: np.ndarray | None,
    models: Sequence[int] | None,
    per_class: bool = False,
) -> Scorer:
    """The plain scorer, or the worst-group one when ``cfg.robust`` and ``obj`` has groups."""
    if cfg.robust and obj.groups is not None:
        return obj.group_scorer(slices, models, per_class)
    return obj.scorer(slices, models, per_class)


def _worst_note(scores: dict[str, float]) -> str:
    finite = {g: v for g, v in scores.items() if not np.isnan(v)}
    worst = min(finite, key=lambda g: finite[g]) if finite else next(iter(scores))
    return (
        f"robust: score is the worst-group val score, min over {len(scores)} groups of "
        f"the group mean (worst {worst!r} {scores[worst]:.4f})"
    )


def _robust_note(
    obj: Objective, scorer: Scorer | None, weights: np.ndarray, slices: np.ndarray | None
) -> tuple[str, dict[str, float]]:
    """What robust scoring did, and each group's score of ``weights``."""
    if obj.groups is None:
        return "robust: the objective has no groups, score is the plain val score", {}
    if isinstance(scorer, WorstGroupScorer):
        per = scorer.per_group(weights[None])[:, 0]
        scores = dict(zip(scorer.labels, map(float, per), strict=True))
        return _worst_note(scores), scores
    (label, _), *_ = obj.slice_groups(slices)
    return f"robust: one group ({label!r}), score equals the plain val score", {}


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def search(
    obj: Objective,
    cfg: SearchConfig,
    slices: np.ndarray | None = None,
    models: Sequence[int] | None = None,
    exclude: Sequence[int] | Mapping[int, str] = (),
) -> SearchResult:
    """Run ``cfg.method`` on the val outputs of ``obj`` (optionally a subset of slices/models).

    ``cfg.robust``: score candidates by their worst group (module doc); the result's score is
    then the worst-group score and ``group_scores`` each group's. ``exclude``: member indices
    of ``obj`` the search may not use, or ``{index: reason}``; the method runs on the others
    only, and the weights keep one row per member searched (``models`` or all) with exact
    zeros for the excluded ones; the note names them and why. Every member excluded:
    DataError.
    """
    if len(exclude):
        return _search_excluding(obj, cfg, slices, models, exclude)
    m = obj.n_models if models is None else len(models)
    if cfg.method in SEGMENTATION_ONLY and obj.n_classes is None:
        raise ConfigError(f"ensemble method {cfg.method!r} is for segmentation only")
    uniform = np.full(m, 1.0 / m)
    if cfg.method == "vote":
        return _search_vote(obj, cfg, slices, models, uniform)
    scorer = _scorer_for(obj, cfg, slices, models)
    if cfg.method == "mean":
        score = float(scorer(uniform[None])[0])
        result = SearchResult("mean", uniform, score, 1, [(uniform.tolist(), score)])
    elif cfg.method == "greedy":
        result = _greedy(scorer, m, cfg)
    elif cfg.method == "per_class":
        result = _per_class(obj, cfg, slices, models)
    else:
        result = pool_search(scorer, m, cfg)
    if cfg.method not in ("mean", "per_class"):  # the optimiser's promise (per_class: inside)
        singles = scorer(np.eye(m))
        best_single = np.nan if np.all(np.isnan(singles)) else np.nanmax(singles)
        if not np.isnan(best_single):
            _check_not_below(cfg.method, result.score, best_single, "the best single model")
    if cfg.robust and cfg.method != "per_class":  # per_class: noted inside
        note, result.group_scores = _robust_note(obj, scorer, result.weights, slices)
        result.note = _join(result.note, note)
    log.debug(
        "ensemble %s: %d candidates, val %.4f",
        cfg.method,
        result.candidates_evaluated,
        result.score,
    )
    return result


def _search_vote(
    obj: Objective,
    cfg: SearchConfig,
    slices: np.ndarray | None,
    models: Sequence[int] | None,
    uniform: np.ndarray,
) -> SearchResult:
    """The vote's val score; robust: the minimum over groups of each group's vote score."""
    parts = obj.slice_groups(slices)
    if not cfg.robust or obj.groups is None or len(parts) == 1:
        result = SearchResult("vote", uniform, obj.score_vote(slices, models), 1)
        if cfg.robust:
            result.note = _robust_note(obj, None, uniform, slices)[0]
        return result
    scores = {g: obj.score_vote(idx, models) for g, idx in parts}
    score = float(np.fmin.reduce(np.fromiter(scores.values(), dtype=np.float64)))
    note = _worst_note(scores)
    return SearchResult("vote", uniform, score, 1, note=note, group_scores=scores)


def _search_excluding(
    obj: Objective,
    cfg: SearchConfig,
    slices: np.ndarray | None,
    models: Sequence[int] | None,
    exclude: Sequence[int] | Mapping[int, str],
) -> SearchResult:
    """:func:`search` on the members not excluded; weights padded with exact zeros."""
    if isinstance(exclude, Mapping):
        reasons = {int(j): str(r) for j, r in exclude.items()}
    else:
        reasons = {int(j): "excluded by the caller" for j in exclude}
    for j in reasons:
        if not 0 <= j < obj.n_models:
            raise DataError(f"exclude: member {j} does not exist (members 0..{obj.n_models - 1})")
    base = list(range(obj.n_models)) if models is None else [int(j) for j in models]
    allowed = [j for j in base if j not in reasons]
    dropped = [j for j in base if j in reasons]
    if not allowed:
        why = "; ".join(f"{j}: {reasons[j]}" for j in dropped)
        raise DataError(
            f"every ensemble member is excluded ({why}); no member is left to search weights "
            f"for (fall back to a baseline, or relax the guard)"
        )
    result = search(obj, cfg, slices, allowed)
    if not dropped:
        return result
    pos = np.array([base.index(j) for j in allowed])

    def pad(w: np.ndarray) -> np.ndarray:
        full = np.zeros((len(base), *w.shape[1:]), dtype=np.float64)
        full[pos] = w
        return full

    result.weights = pad(np.asarray(result.weights))
    result.trace = [(pad(np.asarray(w)).tolist(), s) for w, s in result.trace]
    result.order = [int(pos[i]) for i in result.order]
    note = f"excluded members {dropped}: " + "; ".join(f"member {j}: {reasons[j]}" for j in dropped)
    result.note = _join(result.note, note)
    return result


def guarded_search(
    obj: Objective,
    cfg: SearchConfig,
    baseline: np.ndarray,
    slices: np.ndarray | None = None,
    models: Sequence[int] | None = None,
) -> SearchResult:
    """:func:`search` without the members that :func:`members_below` flags against
    ``baseline`` on ``slices`` (below it on some group); DataError when that is every one."""
    flagged = members_below(obj, baseline, slices)
    candidates = range(obj.n_models) if models is None else models
    exclude = {
        i: f"below the baseline on group(s) {', '.join(map(repr, flagged[i]))}"
        for i in candidates
        if flagged[i]
    }
    result = search(obj, cfg, slices, models, exclude=exclude)
    if not exclude:
        result.note = _join(result.note, "guard: no member below the baseline on any group")
    return result


def _per_class(
    obj: Objective, cfg: SearchConfig, slices: np.ndarray | None, models: Sequence[int] | None
) -> SearchResult:
    assert obj.n_classes is not None
    c = obj.n_classes
    m = obj.n_models if models is None else len(models)
    base_cfg = SearchConfig("random+nelder_mead", cfg.n_random, cfg.seed, robust=cfg.robust)
    all_idx = np.arange(len(obj.case)) if slices is None else np.asarray(slices)

    def fit(idx: np.ndarray) -> tuple[SearchResult, np.ndarray, int]:
        base = pool_search(_scorer_for(obj, cfg, idx, models), m, base_cfg)
        w, n = _per_class_refine(_scorer_for(obj, cfg, idx, models, True), base.weights, c, cfg)
        return base, w, base.candidates_evaluated + n

    base, w, evaluated = fit(all_idx)
    shared = np.repeat(base.weights[:, None], c, axis=1)
    note = ""
    enough = len(np.unique(case_groups(obj.case[all_idx]))) >= 2
    halves = case_folds(obj.case[all_idx], 2, cfg.seed) if enough else []
    if len(halves) == 2 and not np.array_equal(w, shared):
        gains = []
        for held, fitted in ((halves[0], halves[1]), (halves[1], halves[0])):
            b, wf, n = fit(all_idx[fitted])
            evaluated += n
            held_scorer = _scorer_for(obj, cfg, all_idx[held], models, per_class=True)
            s = held_scorer(np.stack([wf, np.repeat(b.weights[:, None], c, axis=1)]))
            gains.append(0.0 if np.any(np.isnan(s)) else float(s[0] - s[1]))
        if np.mean(gains) <= 0:
            w = shared
            note = f"held-out check kept the shared weights (per-class gain {np.mean(gains):+.4f})"
        else:
            note = f"held-out check kept per-class weights (gain {np.mean(gains):+.4f})"
    elif len(halves) < 2:
        note = "held-out check skipped: fewer than 2 case groups"
    final = _scorer_for(obj, cfg, slices, models, per_class=True)
    score = float(final(w[None])[0])
    _check_not_below("per_class", score, base.score, "its shared weights")
    trace = [*base.trace, (w.tolist(), score)]
    group_scores: dict[str, float] = {}
    if cfg.robust:
        robust, group_scores = _robust_note(obj, final, w, slices)
        note = _join(note, robust)
    return SearchResult(
        "per_class", w, score, evaluated, trace, note=note, group_scores=group_scores
    )


def crossfit(
    obj: Objective,
    cfg: SearchConfig,
    folds: int,
    exclude: Sequence[int] | Mapping[int, str] = (),
) -> tuple[np.ndarray, list[SearchResult]]:
    """Cross-fitted val outputs: each fold of whole case groups is fused with weights searched
    on the other folds only. Returns the fused outputs in val order ((N, H, W) labels or
    images) and each fold's result; score them with the task's usual metric. ``cfg.robust``
    scores each fit by the worst group of its own slices (groups subset per fold);
    ``exclude`` as in :func:`search`, for every fold."""
    parts = case_folds(obj.case, folds, cfg.seed)
    fused: np.ndarray | None = None
    results = []
    everything = np.arange(len(obj.case))
    for held in parts:
        fitted = np.setdiff1d(everything, held)
        result = search(obj, cfg, slices=fitted, exclude=exclude)
        out = obj.fuse(result, slices=held)
        if fused is None:
            fused = np.empty((len(everything), *out.shape[1:]), dtype=out.dtype)
        fused[held] = out
        results.append(result)
    assert fused is not None
    return fused, results


def forward_selection(obj: Objective, cfg: SearchConfig) -> list[tuple[list[int], SearchResult]]:
    """Ensembles of size 1..M in greedy order: each step adds the member whose addition gives
    the best val score with weights searched by ``cfg`` (ties: the earlier member).

    Returns (members in the order they were added, result) per size; the result's weights
    follow the members in model order (``sorted(members)``), so the last size is exactly
    the search over every member."""
    chosen: list[int] = []
    out = []
    for _ in range(obj.n_models):
        best: tuple[float, int, SearchResult] | None = None
        for j in range(obj.n_models):
            if j in chosen:
                continue
            r = search(obj, cfg, models=sorted([*chosen, j]))
            s = -np.inf if np.isnan(r.score) else r.score
            if best is None or s > best[0] + TIE_ATOL:
                best = (s, j, r)
        assert best is not None
        chosen.append(best[1])
        out.append((list(chosen), best[2]))
    return out


def leave_one_out(obj: Objective, cfg: SearchConfig) -> list[SearchResult | None]:
    """Per member: the search re-run without it (None when it is the only member)."""
    m = obj.n_models
    return [
        search(obj, cfg, models=[j for j in range(m) if j != i]) if m > 1 else None
        for i in range(m)
    ]


def search_weights(
    probs: np.ndarray,
    target: np.ndarray,
    case: np.ndarray,
    *,
    method: str,
    n_random: int,
    seed: int,
    rounds: int = 25,
    penalty: float = 0.01,
) -> SearchResult:
    """Search segmentation ensemble weights that maximise val mean foreground IoU.

    probs: (M, N, C, H, W) softmax probabilities of M models on the val slices (float16 or
    float32); target: (N, H, W) integer labels; case: (N,) case id per slice. ``method`` as in
    the module doc; n_random, rounds and penalty are read by the methods that use them.
    Raises ConfigError for an unknown method or bad settings, DataError for bad inputs.
    """
    cfg = SearchConfig(method, n_random, seed, rounds, penalty)
    return search(SegmentationObjective(probs, target, case), cfg)


def search_image_weights(
    recons: np.ndarray,
    target: np.ndarray,
    case: np.ndarray,
    *,
    method: str,
    n_random: int,
    seed: int,
    rounds: int = 25,
) -> SearchResult:
    """Search weights of a weighted sum of reconstructions that maximise val SSIM.

    recons: (M, N, H, W) reconstructions of M models on the val slices; target (N, H, W);
    case (N,). SSIM is per volume with data range = the volume's target maximum, averaged
    over volumes (fastMRI). Methods as in the module doc, except the segmentation-only ones.
    """
    cfg = SearchConfig(method, n_random, seed, rounds)
    return search(ImageObjective(recons, target, case), cfg)
