"""ensemble@<task>: search ensemble weights on val outputs only, apply them to test.

Reads every model's saved outputs (never re-runs a network), scores the ensemble, the
unweighted mean and the non-learned baselines (segmentation: multi-Otsu threshold;
reconstruction: zero-filled and GRAPPA), and writes ``<out>/ensemble.json`` (weights,
search trace) and ``<out>/metrics.json`` (the committed DVC metrics). Segmentation
maximises mean foreground IoU of the averaged probabilities, reconstruction the SSIM of
the weighted sum of images (fastMRI semantics).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mri_ensemble.baselines import threshold_segmentation
from mri_ensemble.data.predictions import read_probabilities, read_reconstructions
from mri_ensemble.data.prepared import read_segmentation_h5
from mri_ensemble.data.prepared_recon import read_reconstruction_h5
from mri_ensemble.ensemble import combine, combine_images, search_image_weights, search_weights
from mri_ensemble.errors import ConfigError, DataError
from mri_ensemble.io import write_json
from mri_ensemble.metrics import CLASS_NAMES, segmentation_scores
from mri_ensemble.mri.quality import reconstruction_scores
from mri_ensemble.reconstruction import zero_filled
from mri_ensemble.segmentation import class_names_of

from .common import KEY_METRIC, cli, flatten, get, load_params, log, mlflow_run, task_models


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


def scores_of(
    probs: np.ndarray, weights: np.ndarray, label: np.ndarray, case: np.ndarray, names: list[str]
) -> dict:
    pred = combine(probs, weights).argmax(1).astype(np.uint8)
    return segmentation_scores(pred, label, case, names)


def segmentation_ensemble(
    p: dict, models: list[str], predictions: Path, data: Path, seed: int
) -> tuple[dict, dict, dict]:
    """(ensemble entry, unweighted-mean entry, baselines) for segmentation."""
    val = read_segmentation_h5(data / "val.h5")
    test = read_segmentation_h5(data / "test.h5")
    val_probs = load_stack(predictions, models, "val", val.case)
    t0 = time.perf_counter()
    result = search_weights(
        val_probs,
        val.label,
        val.case,
        method=p.get("method", "random+nelder_mead"),
        n_random=int(p.get("n_random", 200)),
        seed=seed,
    )
    search_s = time.perf_counter() - t0
    test_probs = load_stack(predictions, models, "test", test.case)
    uniform = np.full(len(models), 1 / len(models))
    names = class_names_of(test)
    ens = {
        "method": result.method,
        "weights": dict(zip(models, map(float, result.weights), strict=True)),
        "val": scores_of(val_probs, result.weights, val.label, val.case, names),
        "test": scores_of(test_probs, result.weights, test.label, test.case, names),
    }
    mean = {
        "val": scores_of(val_probs, uniform, val.label, val.case, names),
        "test": scores_of(test_probs, uniform, test.label, test.case, names),
    }
    baselines = {}
    if names == list(CLASS_NAMES):  # the threshold baseline knows cardiac anatomy only
        threshold = threshold_segmentation(test.image, test.case)
        baselines["threshold"] = {"test": segmentation_scores(threshold, test.label, test.case)}
    return {**ens, "_search": (result, search_s)}, mean, baselines


def reconstruction_ensemble(
    p: dict, models: list[str], predictions: Path, data: Path, seed: int
) -> tuple[dict, dict, dict]:
    """(ensemble entry, unweighted-mean entry, baselines) for reconstruction."""
    sets = {split: read_reconstruction_h5(data / f"{split}.h5") for split in ("val", "test")}
    stacks = {
        s: load_stack(predictions, models, s, d.case, read_reconstructions) for s, d in sets.items()
    }
    val = sets["val"]
    t0 = time.perf_counter()
    result = search_image_weights(
        stacks["val"],
        val.target,
        val.case,
        method=p.get("method", "random+nelder_mead"),
        n_random=int(p.get("n_random", 200)),
        seed=seed,
    )
    search_s = time.perf_counter() - t0
    uniform = np.full(len(models), 1 / len(models))

    def scores(weights: np.ndarray) -> dict:
        return {
            s: reconstruction_scores(combine_images(stacks[s], weights), d.target, d.case)
            for s, d in sets.items()
        }

    ens = {
        "method": result.method,
        "weights": dict(zip(models, map(float, result.weights), strict=True)),
        **scores(result.weights),
    }
    baselines = {
        "zero_filled": {
            s: reconstruction_scores(zero_filled(d), d.target, d.case) for s, d in sets.items()
        },
        "grappa": {s: reconstruction_scores(d.grappa, d.target, d.case) for s, d in sets.items()},
    }
    return {**ens, "_search": (result, search_s)}, scores(uniform), baselines


@cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--task", required=True)
    ap.add_argument("--predictions", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    params = load_params()
    p = get(params, f"ensemble.{args.task}", kind=dict)
    if args.task not in KEY_METRIC:
        raise ConfigError(f"ensemble: unknown task {args.task!r}; known: {list(KEY_METRIC)}")
    models = task_models(params, args.task)
    if not models:
        raise ConfigError(f"params.yaml: no train entries with task {args.task!r}")
    run = segmentation_ensemble if args.task == "segmentation" else reconstruction_ensemble
    ens, mean, baselines = run(p, models, args.predictions, args.data, int(get(params, "seed")))
    result, search_s = ens.pop("_search")
    per_model = {}
    for m in models:
        mj = json.loads((args.predictions / m / "metrics.json").read_text())
        per_model[m] = {"val": mj["val"], "test": mj["test"], "params": mj["params"]}
    metrics = {"models": per_model, "ensemble": ens, "baselines": baselines}
    details = {
        **ens,
        "val_search_score": result.score,
        "candidates_evaluated": result.candidates_evaluated,
        "search_seconds": round(search_s, 3),
        "trace": result.trace,
        "unweighted_mean": mean,
    }
    write_json(args.out / "ensemble.json", details)
    write_json(args.out / "metrics.json", metrics)

    tags = {"task": args.task, "model": "ensemble", "kind": "ensemble"}
    with mlflow_run(params, f"ensemble-{result.method}", tags):
        import mlflow

        mlflow.log_params(
            {
                "method": result.method,
                "members": ",".join(models),
                **{f"weight.{k}": v for k, v in ens["weights"].items()},
            }
        )
        mlflow.log_metrics(
            {
                f"{split}_{k}".replace(".", "_"): v
                for split in ("val", "test")
                for k, v in flatten(ens[split]).items()
                if isinstance(v, float) and np.isfinite(v)
            }
        )
        mlflow.log_artifact(str(args.out / "ensemble.json"))
    key = KEY_METRIC[args.task]
    best_single = max(per_model, key=lambda m: per_model[m]["val"][key])
    log.info(
        "ensemble %s weights %s: val %s %.4f (best single %s %.4f), test %.4f (best single %.4f)",
        result.method,
        {k: round(v, 3) for k, v in ens["weights"].items()},
        key,
        ens["val"][key],
        best_single,
        per_model[best_single]["val"][key],
        ens["test"][key],
        per_model[best_single]["test"][key],
    )


if __name__ == "__main__":
    main()
