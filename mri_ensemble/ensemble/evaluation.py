"""The evaluation protocol of an ensemble, on the members' saved outputs only.

For one method (a :class:`SearchConfig`): weights searched on all of val, a cross-fitted
val score (weights searched on val folds of whole cases, scored on the held-out fold: the
honest estimate), and the scores on test and every shifted test set; for the shipped
method also the ensembles of size 1..M in greedy order and the re-search without each
member (leave-one-out). Reconstruction ensembles may put the acquired k-space lines back
into the fused image (hard data consistency), chosen on val.

``t`` is what :meth:`Task.ensemble_inputs <mri_ensemble.tasks.base.Task.ensemble_inputs>`
returns: objectives per split, class names, baselines, and what data consistency needs.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataError
from ..mri.consistency import consistent_image_np
from ..tta import trained_models
from .fusion import SearchResult
from .optimise import SearchConfig, crossfit, forward_selection, leave_one_out, search

if TYPE_CHECKING:
    from ..tasks import Task

log = logging.getLogger(__name__)


def weights_json(weights: np.ndarray, models: list[str], names: list[str]) -> dict:
    """{model: w} for shared weights, {model: {class: w}} for per-class weights."""
    if weights.ndim == 1:
        return dict(zip(models, map(float, weights), strict=True))
    return {
        m: dict(zip(names, map(float, row), strict=True))
        for m, row in zip(models, weights, strict=True)
    }


def fuse(t: dict, split: str, result: SearchResult, models: list[int] | None = None) -> np.ndarray:
    """The fused output of ``split``; reconstruction: with the acquired k-space lines put
    back (hard data consistency) when ``t["data_consistency"]``."""
    fused = t["objs"][split].fuse(result, models=models)
    if t.get("measured") and t.get("data_consistency", True):
        fused = consistent_image_np(fused, *t["measured"][split])
    return fused


def choose_data_consistency(task: Task, t: dict, cfg: SearchConfig, param: bool | str) -> bool:
    """Whether the fused image gets hard data consistency: ``param`` itself, or for ``auto``
    whichever scores better on val for the shipped method's weights (val only: the test and
    shifted sets never decide). Sets ``t["data_consistency"]``; False without k-space."""
    if not t.get("measured"):
        t["data_consistency"] = False
        return False
    if param != "auto":
        t["data_consistency"] = bool(param)
        return bool(param)
    val = t["objs"]["val"]
    result = search(val, cfg, exclude=t.get("exclude", {}))
    scores = {}
    for flag in (True, False):
        t["data_consistency"] = flag
        fused = fuse(t, "val", result)
        scores[flag] = task.score(fused, val.target, val.case, t["names"])[task.key_metric]
    chosen = bool(scores[True] > scores[False])
    t["data_consistency"] = chosen
    log.info(
        "data consistency on the fused image: val %.4f with, %.4f without -> %s",
        scores[True],
        scores[False],
        "on" if chosen else "off",
    )
    return chosen


def method_key(cfg: SearchConfig) -> str:
    """A method's name in the outputs: ``<method>/worst_group`` for robust selection."""
    return f"{cfg.method}/worst_group" if cfg.robust else cfg.method


def eval_splits(t: dict) -> list[str]:
    """The splits scored after the search: test and the shifted test sets."""
    return [s for s in t["objs"] if s != "val"]


def run_method(task: Task, t: dict, cfg: SearchConfig, folds: int, models: list[str]) -> dict:
    """One method: weights on all of val, cross-fitted val score, test and shifted scores."""
    val = t["objs"]["val"]
    exclude = t.get("exclude", {})
    t0 = time.perf_counter()
    result = search(val, cfg, exclude=exclude)
    seconds = time.perf_counter() - t0
    crossfitted = {}
    if folds:  # 0: the user asked for no cross-fitting; anything else must work
        try:
            fused_cf, _ = crossfit(val, cfg, folds, exclude=exclude)
        except DataError as exc:  # e.g. a val set of one patient: nothing to hold out
            raise DataError(
                f"ensemble@{task.name}: method {cfg.method!r}: {exc} in the val split; add val "
                f"cases or set ensemble.{task.name}.crossfit_folds: 0 to skip cross-fitting"
            ) from exc
        if t.get("measured") and t.get("data_consistency", True):
            fused_cf = consistent_image_np(fused_cf, *t["measured"]["val"])
        crossfitted = task.score(fused_cf, val.target, val.case, t["names"])
    scored = {
        s: task.score(fuse(t, s, result), t["objs"][s].target, t["objs"][s].case, t["names"])
        for s in eval_splits(t)
    }
    return {
        "method": method_key(cfg),
        "weights": weights_json(result.weights, models, t["names"]),
        "val": task.score(fuse(t, "val", result), val.target, val.case, t["names"]),
        "crossfit": crossfitted,
        **scored,
        "val_search_score": result.score,
        "candidates_evaluated": result.candidates_evaluated,
        "note": result.note,
        "trace": result.trace,
        "_result": result,
        "_seconds": seconds,  # machine timing: logged, never written into an output
    }


def sizes_and_leave_one_out(
    task: Task, t: dict, cfg: SearchConfig, models: list[str], params_of: dict[str, int]
) -> tuple[list[dict], dict[str, dict]]:
    """Gain versus size in greedy order, and each member's leave-one-out contribution."""
    key = task.key_metric
    val, test = t["objs"]["val"], t["objs"]["test"]

    def test_score(result: SearchResult, members: list[int]) -> float:
        fused = fuse(t, "test", result, models=members)
        return float(task.score(fused, test.target, test.case, t["names"])[key])

    sizes: list[dict[str, Any]] = []
    for order, result in forward_selection(val, cfg):
        members = sorted(order)  # the weights' order
        names = [models[i] for i in members]
        sizes.append(
            {
                "size": len(members),
                "added": models[order[-1]],
                "members": names,
                "weights": weights_json(result.weights, names, t["names"]),
                f"val_{key}": result.score,
                f"test_{key}": test_score(result, members),
                # a TTA candidate runs its model's weights: each set counted once
                "params": int(sum(params_of[n] for n in trained_models(names))),
            }
        )
    full = sizes[-1]
    loo = {}
    for i, dropped in enumerate(leave_one_out(val, cfg)):
        if dropped is None:
            continue
        rest = [j for j in range(len(models)) if j != i]
        without = test_score(dropped, rest)
        loo[models[i]] = {
            f"val_{key}_without": dropped.score,
            f"test_{key}_without": without,
            "val_contribution": full[f"val_{key}"] - dropped.score,
            "test_contribution": full[f"test_{key}"] - without,
        }
    return sizes, loo


def case_scores(task: Task, fused: np.ndarray, truth: np.ndarray, case: np.ndarray, names) -> dict:
    """The task's ``flag_metric`` (Dice, SSIM) of each case's fused output."""
    case = np.asarray(case)
    return {
        str(c): float(task.score(fused[case == c], truth[case == c], case[case == c], names)[
            task.flag_metric
        ])
        for c in np.unique(case)
    }  # fmt: skip


def uncertainty_study(task: Task, t: dict, result: SearchResult, fraction: float = 0.2) -> dict:
    """Per scored split after the search (test, the shifted sets): the mean of each
    uncertainty map of the shipped ensemble, the per-case correlation of the first map with
    the error map, and the most uncertain ``fraction`` of cases against the rest
    (:func:`~mri_ensemble.ensemble.uncertainty.error_agreement`)."""
    from .uncertainty import error_agreement

    out = {}
    for s in eval_splits(t):
        obj = t["objs"][s]
        maps = task.uncertainty_maps(obj.outputs, result.weights)
        name = next(iter(maps))
        fused = fuse(t, s, result)
        scores = case_scores(task, fused, obj.target, obj.case, t["names"])
        study = error_agreement(maps[name], task.error_map(fused, obj.target), obj.case, scores,
                                fraction)  # fmt: skip
        out[s] = {
            "map": name,
            "means": {k: float(v.mean()) for k, v in maps.items()},
            "metric": task.flag_metric,
            "case_scores": scores,
            **study,
        }
    return out


def _fused_probabilities(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The weighted average of member probabilities, renormalised over the classes (per-class
    weights fuse each class on its own)."""
    from .fusion import combine

    p = combine(stack, weights)
    return p / np.clip(p.sum(axis=1, keepdims=True), 1e-12, None)


def calibration_study(t: dict, result: SearchResult, models: list[str], seed: int) -> dict:
    """Top-label ECE and reliability of each member and of the shipped ensemble on every
    scored split after the search, before and after temperature scaling: one temperature
    per member fitted on val (the shipped weights were chosen on val too), applied to the
    member's probabilities before fusion. A vote has no probabilities: its members' mean
    stands for it."""
    from .calibration import expected_calibration_error, fit_temperature, reliability, temper

    val = t["objs"]["val"]
    weights = np.ones(len(models)) if result.method == "vote" else result.weights
    temps = [fit_temperature(val.outputs[m], val.target, seed=seed) for m in range(len(models))]
    out: dict[str, Any] = {"temperatures": dict(zip(models, temps, strict=True)), "splits": {}}
    for s in ["val", *eval_splits(t)]:
        obj = t["objs"][s]
        tempered = np.stack([temper(obj.outputs[m], temps[m]) for m in range(len(models))])
        fused = _fused_probabilities(obj.outputs, weights)
        fused_t = _fused_probabilities(tempered, weights)
        out["splits"][s] = {
            "ensemble": {
                "ece": expected_calibration_error(fused, obj.target),
                "ece_tempered": expected_calibration_error(fused_t, obj.target),
                "reliability": reliability(fused, obj.target),
                "reliability_tempered": reliability(fused_t, obj.target),
            },
            "members": {
                m: {
                    "ece": expected_calibration_error(obj.outputs[i], obj.target),
                    "ece_tempered": expected_calibration_error(tempered[i], obj.target),
                }
                for i, m in enumerate(models)
            },
        }
    return out
