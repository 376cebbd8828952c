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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mri_ensemble.ensemble import SearchConfig, SearchResult, ensemble_members, members_below
from mri_ensemble.ensemble.evaluation import (
    calibration_study,
    choose_data_consistency,
    eval_splits,
    fuse,
    method_key,
    run_method,
    sizes_and_leave_one_out,
    uncertainty_study,
)
from mri_ensemble.errors import ConfigError, DataError
from mri_ensemble.io import write_json
from mri_ensemble.tasks import Task, get_task
from mri_ensemble.tta import base_model, best_single, candidate, is_candidate, trained_models

from .common import cli, flatten, get, load_params, log, task_models
from .tracking import mlflow_run, remembered_cost


def ensemble_candidates(params: Mapping[str, Any], task: str) -> list[str]:
    """What the weight search chooses from: the trained models of ``task``, then the TTA
    candidates of ``tta`` (``<model>-flip``, tta@<task>-<model>), in params.yaml order."""
    node = params.get("tta") or {}
    if not isinstance(node, Mapping):
        raise ConfigError(f"params.yaml: tta should be a mapping, found {type(node).__name__}")
    trained = get(params, "train", kind=dict)
    clash = sorted(k for k, e in trained.items() if is_candidate(str(e.get("model", ""))))
    if clash:
        raise ConfigError(f"params.yaml: train entries {clash}: a model name ending in "
                          f"'{candidate('')}' is a TTA candidate's; rename the model")  # fmt: skip
    missing = sorted(k for k in node if k not in trained)
    if missing:
        raise ConfigError(f"params.yaml: tta entries {missing} name no train entry")
    flips = [candidate(e["model"]) for e in node.values()
             if isinstance(e, Mapping) and e.get("task") == task]  # fmt: skip
    return [*task_models(params, task), *flips]


@cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--task", required=True)
    ap.add_argument("--predictions", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    params = load_params()
    task = get_task(args.task)
    p = get(params, f"ensemble.{task.name}", kind=dict)
    models = ensemble_candidates(params, args.task)  # the trained models and their TTA
    if not models:
        raise ConfigError(f"params.yaml: no train entries with task {args.task!r}")
    configs, folds = search_configs(p, task, int(get(params, "seed")))
    per_model = {}
    for m in models:
        path = args.predictions / m / "metrics.json"
        if not path.is_file():
            stage = "tta" if is_candidate(m) else "evaluate"
            raise DataError(f"{path}: missing; run {stage}@{args.task}-{base_model(m)} first")
        mj = json.loads(path.read_text())
        per_model[m] = {
            k: v
            for k, v in mj.items()
            if k in ("val", "test", "params", "training") or k.startswith("shift_")
        }
    t = task.ensemble_inputs(models, args.predictions, args.data)
    key = task.key_metric
    guard = p.get("guard", task.guard)
    if guard not in {task.guard, "none"}:
        raise ConfigError(
            f"params.yaml: ensemble.{task.name}.guard should be {task.guard} or none, found {guard!r}"
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

    dc = choose_data_consistency(task, t, configs[0], dc_param)
    methods = {}
    for cfg in tqdm(configs, desc=f"ensemble methods ({args.task})", disable=None):
        name = method_key(cfg)
        methods[name] = run_method(task, t, cfg, folds, models)
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
    sizes, loo = sizes_and_leave_one_out(task, t, shipped, models, params_of)
    results = {name: entry.pop("_result") for name, entry in methods.items()}
    seconds = {name: entry.pop("_seconds") for name, entry in methods.items()}

    scored = ["val", "crossfit", *eval_splits(t)]
    shipped_result = results[method_key(shipped)]
    trust = uncertainty_study(task, t, shipped_result)
    calibration = (
        calibration_study(t, shipped_result, models, int(get(params, "seed")))
        if task.probabilistic
        else None
    )

    def summary(entry: dict) -> dict:
        return {k: entry[k] for k in ("method", "weights", *scored)}

    ens = summary(methods[method_key(shipped)])
    metrics = {
        "models": per_model,
        "ensemble": ens,
        "methods": {
            name: {split: _key_scores(e[split], task) for split in scored}
            for name, e in methods.items()
        },
        "baselines": t["baselines"],
        "guard": {"baseline": guard, "dropped": dropped, "all_below": len(dropped) == len(models)},
        "uncertainty": {s: _trust_summary(u) for s, u in trust.items()},
        "training": training_cost(per_model, ens["weights"]),
    }
    if calibration is not None:
        metrics["calibration"] = _calibration_summary(calibration)
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
        "uncertainty": trust,
        "calibration": calibration,
    }
    if t.get("measured"):  # the fused image with and without data consistency, every split
        result = results[method_key(shipped)]
        with_dc = {}
        for flag in (True, False):
            t["data_consistency"] = flag
            with_dc[str(flag).lower()] = {
                s: _key_scores(task.score(fuse(t, s, result), o.target, o.case, []), task)
                for s, o in t["objs"].items()
            }
        t["data_consistency"] = dc
        details["data_consistency"] = {"on": dc, "param": dc_param, "scores": with_dc}
    write_json(args.out / "ensemble.json", details)
    write_json(args.out / "metrics.json", metrics)
    log_methods(params, args.task, models, methods, results, seconds, method_key(shipped),
                ensemble_cost(task.name, metrics["training"], ens["weights"]))  # fmt: skip

    best = best_single(per_model, key)
    log.info(
        "shipped ensemble %s: val %s %.4f (best single %s %.4f), cross-fitted %.4f, test %.4f "
        "(best single %.4f)",
        method_key(shipped),
        key,
        ens["val"][key],
        best,
        per_model[best]["val"][key],
        ens["crossfit"].get(key, float("nan")),
        ens["test"][key],
        per_model[best]["test"][key],
    )


def ensemble_cost(task: str, samples: dict, weights: dict) -> dict[str, float]:
    """The shipped ensemble's training cost for its MLflow run: samples seen, and where every
    member was trained on this machine the core-seconds and wall seconds they measured."""
    out = {}
    if samples:
        out["train_samples_seen"] = float(samples["ensemble_samples_seen"])
    measured = [remembered_cost(f"{task}-{m}") for m in trained_models(ensemble_members(weights))]
    if measured and all(measured):
        out["train_cpu_seconds"] = sum(c["cpu_seconds"] for c in measured)
        out["train_wall_seconds"] = sum(c["wall_seconds"] for c in measured)
    return out


def training_cost(per_model: dict, weights: dict) -> dict:
    """Samples each trained member saw in training, the shipped ensemble's total (the
    trainings its members run: a TTA candidate's is its model's, counted once) and all
    trainings' total (the compute the search chose from)."""
    seen = {m: e["training"]["samples_seen"] for m, e in per_model.items() if "training" in e}
    if len(seen) < len(per_model):
        return {}
    seen = {m: n for m, n in seen.items() if not is_candidate(m)}
    shipped = trained_models(ensemble_members(weights))
    return {
        "samples_seen": seen,
        "ensemble_samples_seen": sum(seen[m] for m in shipped),
        "all_samples_seen": sum(seen.values()),
    }


def _trust_summary(study: dict) -> dict:
    """What metrics.json keeps of a split's uncertainty study (ensemble.json has it all)."""
    flag = study["flag"]
    return {
        "map": study["map"],
        "mean": study["mean_uncertainty"],
        "correlation": study["correlation"],
        "flagged": {k: flag[k] for k in ("flagged_score", "rest_score", "loss")},
    }


def _calibration_summary(study: dict) -> dict:
    return {
        "temperatures": study["temperatures"],
        **{
            split: {
                "ensemble": {k: e["ensemble"][k] for k in ("ece", "ece_tempered")},
                "members": e["members"],
            }
            for split, e in study["splits"].items()
        },
    }


def _key_scores(scores: dict, task: Task) -> dict:
    return {k: scores[k] for k in task.summary_metrics if k in scores}


def search_configs(p: dict, task: Task, seed: int) -> tuple[list[SearchConfig], int]:
    """The shipped method first, then the compared ones (params ``ensemble.<task>``)."""
    known = task.ensemble_keys
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
    allowed = task.ensemble_methods
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
    cost: dict[str, float],
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
                | (cost if name == shipped else {})
            )


if __name__ == "__main__":
    main()
