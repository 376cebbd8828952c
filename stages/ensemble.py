"""ensemble@<task>: compare ensemble methods on val outputs only, apply them to test.

Reads every model's saved outputs once (never re-runs a network). For the shipped method
(``ensemble.<task>.method``) and every method in ``compare`` it searches weights on all of
val, cross-fits them on val folds of whole cases (the honest val estimate), and scores
them on test. For the shipped method it also builds ensembles of size 1..M in greedy
order and re-searches without each member (leave-one-out). Baselines: segmentation
multi-Otsu threshold; reconstruction zero-filled and GRAPPA.

Writes ``<out>/ensemble.json`` (every method's weights, scores and trace, the sizes and
the leave-one-out table) and ``<out>/metrics.json`` (the committed DVC metrics), and one
MLflow run per method with the same metric names (``val_*``, ``crossfit_*``, ``test_*``)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mri_ensemble.baselines import threshold_segmentation
from mri_ensemble.data.predictions import read_probabilities, read_reconstructions
from mri_ensemble.data.prepared import read_segmentation_h5, scored_splits
from mri_ensemble.data.prepared_recon import contrast_groups, read_reconstruction_h5
from mri_ensemble.ensemble import (
    METHODS,
    SEGMENTATION_ONLY,
    ImageObjective,
    SearchConfig,
    SearchResult,
    SegmentationObjective,
    crossfit,
    forward_selection,
    leave_one_out,
    members_below,
    search,
)
from mri_ensemble.errors import ConfigError, DataError
from mri_ensemble.io import write_json
from mri_ensemble.metrics import CLASS_NAMES, segmentation_scores
from mri_ensemble.mri.consistency import consistent_image_np
from mri_ensemble.mri.quality import reconstruction_scores
from mri_ensemble.reconstruction import zero_filled
from mri_ensemble.segmentation import class_names_of

from .common import KEY_METRIC, cli, flatten, get, load_params, log, task_models
from .tracking import mlflow_run


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


def _scores(task: str, fused: np.ndarray, truth: np.ndarray, case: np.ndarray, names) -> dict:
    if task == "segmentation":
        return segmentation_scores(fused, truth, case, names)
    return reconstruction_scores(fused, truth, case)


def weights_json(weights: np.ndarray, models: list[str], names: list[str]) -> dict:
    """{model: w} for shared weights, {model: {class: w}} for per-class weights."""
    if weights.ndim == 1:
        return dict(zip(models, map(float, weights), strict=True))
    return {
        m: dict(zip(names, map(float, row), strict=True))
        for m, row in zip(models, weights, strict=True)
    }


def load_task(task: str, models: list[str], predictions: Path, data: Path) -> dict[str, Any]:
    """Objectives (outputs, truth, case) of val, test and every shifted test set, class
    names, baselines, and (reconstruction) what data consistency on the fused image needs."""
    splits = scored_splits(data)
    if task == "segmentation":
        sets = {s: read_segmentation_h5(data / f"{s}.h5") for s in splits}
        objs = {
            s: SegmentationObjective(load_stack(predictions, models, s, d.case), d.label, d.case)
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
    rsets = {s: read_reconstruction_h5(data / f"{s}.h5") for s in splits}
    robjs = {  # val groups: contrasts (robust selection and the guard score per group)
        s: ImageObjective(
            load_stack(predictions, models, s, d.case, read_reconstructions),
            d.target,
            d.case,
            groups=contrast_groups(d.case),
        )
        for s, d in rsets.items()
    }
    zf = {s: zero_filled(d) for s, d in rsets.items()}
    rbaselines = {
        "zero_filled": {
            s: reconstruction_scores(zf[s], d.target, d.case) for s, d in rsets.items()
        },
        "grappa": {s: reconstruction_scores(d.grappa, d.target, d.case) for s, d in rsets.items()},
    }
    measured = {s: (d.kspace * d.mask[:, None, None, :], d.mask) for s, d in rsets.items()}
    return {
        "objs": robjs,
        "names": [],
        "baselines": rbaselines,
        "measured": measured,
        "zero_filled": zf,
    }


def fuse(t: dict, split: str, result: SearchResult, models: list[int] | None = None) -> np.ndarray:
    """The fused output of ``split``; reconstruction: with the acquired k-space lines put
    back (hard data consistency) when ``t["data_consistency"]``."""
    fused = t["objs"][split].fuse(result, models=models)
    if t.get("measured") and t.get("data_consistency", True):
        fused = consistent_image_np(fused, *t["measured"][split])
    return fused


def choose_data_consistency(task: str, t: dict, cfg: SearchConfig, param: bool | str) -> bool:
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
        scores[flag] = _scores(task, fused, val.target, val.case, t["names"])[KEY_METRIC[task]]
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


def run_method(task: str, t: dict, cfg: SearchConfig, folds: int, models: list[str]) -> dict:
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
                f"ensemble@{task}: method {cfg.method!r}: {exc} in the val split; add val "
                f"cases or set ensemble.{task}.crossfit_folds: 0 to skip cross-fitting"
            ) from exc
        if t.get("measured") and t.get("data_consistency", True):
            fused_cf = consistent_image_np(fused_cf, *t["measured"]["val"])
        crossfitted = _scores(task, fused_cf, val.target, val.case, t["names"])
    scored = {
        s: _scores(task, fuse(t, s, result), t["objs"][s].target, t["objs"][s].case, t["names"])
        for s in eval_splits(t)
    }
    return {
        "method": method_key(cfg),
        "weights": weights_json(result.weights, models, t["names"]),
        "val": _scores(task, fuse(t, "val", result), val.target, val.case, t["names"]),
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
    task: str, t: dict, cfg: SearchConfig, models: list[str], params_of: dict[str, int]
) -> tuple[list[dict], dict[str, dict]]:
    """Gain versus size in greedy order, and each member's leave-one-out contribution."""
    key = KEY_METRIC[task]
    val, test = t["objs"]["val"], t["objs"]["test"]

    def test_score(result: SearchResult, members: list[int]) -> float:
        fused = fuse(t, "test", result, models=members)
        return float(_scores(task, fused, test.target, test.case, t["names"])[key])

    sizes = []
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
                "params": int(sum(params_of[n] for n in names)),
            }
        )
    full = sizes[-1]
    loo = {}
    for i, result in enumerate(leave_one_out(val, cfg)):
        if result is None:
            continue
        rest = [j for j in range(len(models)) if j != i]
        without = test_score(result, rest)
        loo[models[i]] = {
            f"val_{key}_without": result.score,
            f"test_{key}_without": without,
            "val_contribution": full[f"val_{key}"] - result.score,
            "test_contribution": full[f"test_{key}"] - without,
        }
    return sizes, loo


@cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--task", required=True)
    ap.add_argument("--predictions", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    params = load_params()
    if args.task not in KEY_METRIC:
        raise ConfigError(f"ensemble: unknown task {args.task!r}; known: {list(KEY_METRIC)}")
    p = get(params, f"ensemble.{args.task}", kind=dict)
    models = task_models(params, args.task)
    if not models:
        raise ConfigError(f"params.yaml: no train entries with task {args.task!r}")
    configs, folds = search_configs(p, args.task, int(get(params, "seed")))
    per_model = {}
    for m in models:
        path = args.predictions / m / "metrics.json"
        if not path.is_file():
            raise DataError(f"{path}: missing; run evaluate@{args.task}-{m} first")
        mj = json.loads(path.read_text())
        per_model[m] = {
            k: v for k, v in mj.items() if k in ("val", "test", "params") or k.startswith("shift_")
        }
    t = load_task(args.task, models, args.predictions, args.data)
    key = KEY_METRIC[args.task]
    guard = p.get("guard", "zero_filled") if args.task == "reconstruction" else "none"
    if guard not in ("zero_filled", "none"):
        raise ConfigError(
            f"params.yaml: ensemble.{args.task}.guard should be zero_filled or none, found {guard!r}"
        )
    dc_param = p.get("data_consistency", "auto")
    if dc_param not in (True, False, "auto"):
        raise ConfigError(
            f"params.yaml: ensemble.{args.task}.data_consistency should be auto, true or "
            f"false, found {dc_param!r}"
        )
    dropped: dict[str, list[str]] = {}
    if guard == "zero_filled":  # never ship a member below zero-filled on any val group
        below = members_below(t["objs"]["val"], t["zero_filled"]["val"])
        dropped = {models[i]: groups for i, groups in below.items() if groups}
        t["exclude"] = {
            i: f"{models[i]}: below zero-filled on val group(s) {', '.join(groups)}"
            for i, groups in below.items()
            if groups
        }
        if len(dropped) == len(models):  # nothing left to ship: say so, do not hide it
            log.warning(
                "guard: every member is below zero-filled on some val group (%s); the guard "
                "cannot apply and the report marks this ensemble as not fit to deploy",
                dropped,
            )
            t["exclude"] = {}
        else:
            for name, groups in dropped.items():
                log.warning(
                    "guard: %s is below zero-filled on val group(s) %s: weight 0", name, groups
                )

    dc = choose_data_consistency(args.task, t, configs[0], dc_param)
    methods = {}
    for cfg in tqdm(configs, desc=f"ensemble methods ({args.task})", disable=None):
        name = method_key(cfg)
        methods[name] = run_method(args.task, t, cfg, folds, models)
        log.info(
            "%s: val %s %.4f in-sample, %.4f cross-fitted; test %.4f (%d candidates, %.2f s)",
            name,
            key,
            methods[name]["val"][key],
            methods[name]["crossfit"].get(key, float("nan")),
            methods[name]["test"][key],
            methods[name]["candidates_evaluated"],
            methods[name]["_seconds"],
        )
    shipped = configs[0]
    params_of = {m: int(per_model[m]["params"]) for m in models}
    sizes, loo = sizes_and_leave_one_out(args.task, t, shipped, models, params_of)
    results = {name: entry.pop("_result") for name, entry in methods.items()}
    seconds = {name: entry.pop("_seconds") for name, entry in methods.items()}

    scored = ["val", "crossfit", *eval_splits(t)]

    def summary(entry: dict) -> dict:
        return {k: entry[k] for k in ("method", "weights", *scored)}

    ens = summary(methods[method_key(shipped)])
    metrics = {
        "models": per_model,
        "ensemble": ens,
        "methods": {
            name: {split: _key_scores(e[split], args.task) for split in scored}
            for name, e in methods.items()
        },
        "baselines": t["baselines"],
        "guard": {"baseline": guard, "dropped": dropped, "all_below": len(dropped) == len(models)},
    }
    details = {
        **ens,
        "crossfit_folds": folds,
        "val_search_score": methods[method_key(shipped)]["val_search_score"],
        "candidates_evaluated": methods[method_key(shipped)]["candidates_evaluated"],
        "trace": methods[method_key(shipped)]["trace"],
        "unweighted_mean": {s: methods["mean"][s] for s in ("val", "test")}
        if "mean" in methods
        else None,
        "methods": methods,
        "sizes": sizes,
        "leave_one_out": loo,
        "guard": metrics["guard"],
        "robust": bool(shipped.robust),
        "val_groups": sorted(set(t["objs"]["val"].groups))
        if t["objs"]["val"].groups is not None
        else [],
    }
    if t.get("measured"):  # the fused image with and without data consistency, every split
        result = results[method_key(shipped)]
        with_dc = {}
        for flag in (True, False):
            t["data_consistency"] = flag
            with_dc[str(flag).lower()] = {
                s: _key_scores(
                    _scores(args.task, fuse(t, s, result), o.target, o.case, []), args.task
                )
                for s, o in t["objs"].items()
            }
        t["data_consistency"] = dc
        details["data_consistency"] = {"on": dc, "param": dc_param, "scores": with_dc}
    write_json(args.out / "ensemble.json", details)
    write_json(args.out / "metrics.json", metrics)
    log_methods(params, args.task, models, methods, results, seconds, method_key(shipped))

    best_single = max(per_model, key=lambda m: per_model[m]["val"][key])
    log.info(
        "shipped ensemble %s: val %s %.4f (best single %s %.4f), cross-fitted %.4f, test %.4f "
        "(best single %.4f)",
        method_key(shipped),
        key,
        ens["val"][key],
        best_single,
        per_model[best_single]["val"][key],
        ens["crossfit"].get(key, float("nan")),
        ens["test"][key],
        per_model[best_single]["test"][key],
    )


def _key_scores(scores: dict, task: str) -> dict:
    keep = ("iou", "dice") if task == "segmentation" else ("ssim", "psnr", "nmse")
    return {k: scores[k] for k in keep if k in scores}


def search_configs(p: dict, task: str, seed: int) -> tuple[list[SearchConfig], int]:
    """The shipped method first, then the compared ones (params ``ensemble.<task>``)."""
    known = {"method", "compare", "n_random", "rounds", "penalty", "crossfit_folds", "robust"}
    if task == "reconstruction":
        known |= {"guard", "data_consistency"}
    unknown = sorted(set(p) - known)
    if unknown:
        raise ConfigError(
            f"params.yaml: ensemble.{task} has unknown keys {unknown}; known: {sorted(known)}"
        )
    compare = p.get("compare", [])
    if not isinstance(compare, list):
        raise ConfigError(
            f"params.yaml: ensemble.{task}.compare should be a list, found {compare!r}"
        )
    names = list(dict.fromkeys([p.get("method", "random+nelder_mead"), *compare]))
    allowed = [m for m in METHODS if task == "segmentation" or m not in SEGMENTATION_ONLY]
    for name in names:
        if name not in allowed:
            raise ConfigError(
                f"params.yaml: ensemble.{task}: unknown method {name!r}; known: {', '.join(allowed)}"
            )
    folds = p.get("crossfit_folds", 3)
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 0 or folds == 1:
        raise ConfigError(
            f"params.yaml: ensemble.{task}.crossfit_folds should be an int >= 2 (or 0: no "
            f"cross-fitting), found {folds!r}"
        )
    robust = p.get("robust", False)
    if not isinstance(robust, bool):
        raise ConfigError(
            f"params.yaml: ensemble.{task}.robust should be true or false, found {robust!r}"
        )
    # robust: the shipped method selects on the worst val group; every compared method,
    # and the shipped method itself, are also run on the val mean, to compare the two
    plan = [(names[0], robust)] + [(n, False) for n in names[1:]]
    if robust:
        plan.insert(1, (names[0], False))
    configs = [
        SearchConfig(
            name,
            n_random=int(p.get("n_random", 200)),
            seed=seed,
            rounds=int(p.get("rounds", 25)),
            penalty=float(p.get("penalty", 0.01)),
            robust=flag,
        )
        for name, flag in dict.fromkeys(plan)
    ]
    return configs, folds


def log_methods(
    params: dict,
    task: str,
    models: list[str],
    methods: dict[str, dict],
    results: dict[str, SearchResult],
    seconds: dict[str, float],
    shipped: str,
) -> None:
    """One MLflow run per method (children of the pipeline's parent run), same metric names."""
    for name, entry in methods.items():
        tags = {
            "task": task,
            "model": "ensemble",
            "kind": "ensemble",
            "method": name,
            "shipped": str(name == shipped).lower(),
        }
        with mlflow_run(params, f"ensemble-{name}", tags) as run:
            flat_w = flatten({"weight": entry["weights"]})
            run.log_params(
                {
                    "method": name,
                    "members": ",".join(models),
                    "candidates_evaluated": results[name].candidates_evaluated,
                    **flat_w,
                }
            )
            run.log_metrics(
                {
                    f"{split}_{k}".replace(".", "_"): v
                    for split in (
                        "val",
                        "crossfit",
                        *(k for k in entry if k.startswith("shift")),
                        "test",
                    )
                    for k, v in flatten(entry[split]).items()
                    if isinstance(v, float) and np.isfinite(v)
                }
                | {"search_seconds": seconds[name]}
            )


if __name__ == "__main__":
    main()
