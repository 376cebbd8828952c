"""ensemble@<task>: search ensemble weights on val outputs only, apply them to test.

Reads every model's saved probabilities (never re-runs a network), scores the ensemble,
the unweighted mean and the non-learned baselines, and writes ``<out>/ensemble.json``
(weights, search trace) and ``<out>/metrics.json`` (the committed DVC metrics).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mri_ensemble.baselines import threshold_segmentation
from mri_ensemble.data.predictions import read_probabilities
from mri_ensemble.data.prepared import read_segmentation_h5
from mri_ensemble.ensemble import combine, search_weights
from mri_ensemble.errors import ConfigError, DataError
from mri_ensemble.io import write_json
from mri_ensemble.metrics import segmentation_scores

from .common import cli, flatten, get, load_params, log, mlflow_run, task_models


def load_stack(pred_dir: Path, models: list[str], split: str, case: np.ndarray) -> np.ndarray:
    """Probabilities of every model for ``split``: (M, N, K, H, W), checked against ``case``."""
    stack = []
    for m in models:
        path = pred_dir / m / f"{split}.h5"
        probs, c = read_probabilities(path)
        if not np.array_equal(c, case):
            raise DataError(f"{path}: case order differs from the prepared {split} set")
        stack.append(probs)
    return np.stack(stack)


def scores_of(probs: np.ndarray, weights: np.ndarray, label: np.ndarray, case: np.ndarray) -> dict:
    pred = combine(probs, weights).argmax(1).astype(np.uint8)
    return segmentation_scores(pred, label, case)


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
    if args.task != "segmentation":
        raise ConfigError(f"ensemble: unknown task {args.task!r}; known: ['segmentation']")
    models = task_models(params, args.task)
    if not models:
        raise ConfigError(f"params.yaml: no train entries with task {args.task!r}")
    val = read_segmentation_h5(args.data / "val.h5")
    test = read_segmentation_h5(args.data / "test.h5")
    val_probs = load_stack(args.predictions, models, "val", val.case)

    t0 = time.perf_counter()
    result = search_weights(
        val_probs,
        val.label,
        val.case,
        method=p.get("method", "random+nelder_mead"),
        n_random=int(p.get("n_random", 200)),
        seed=int(get(params, "seed")),
    )
    search_s = time.perf_counter() - t0
    test_probs = load_stack(args.predictions, models, "test", test.case)
    uniform = np.full(len(models), 1 / len(models))
    ens = {
        "method": result.method,
        "weights": dict(zip(models, map(float, result.weights), strict=True)),
        "val": scores_of(val_probs, result.weights, val.label, val.case),
        "test": scores_of(test_probs, result.weights, test.label, test.case),
    }
    mean = {
        "val": scores_of(val_probs, uniform, val.label, val.case),
        "test": scores_of(test_probs, uniform, test.label, test.case),
    }
    per_model = {}
    for m in models:
        mj = json.loads((args.predictions / m / "metrics.json").read_text())
        per_model[m] = {"val": mj["val"], "test": mj["test"], "params": mj["params"]}
    baseline = {
        "test": segmentation_scores(
            threshold_segmentation(test.image, test.case), test.label, test.case
        )
    }
    metrics = {"models": per_model, "ensemble": ens, "baselines": {"threshold": baseline}}
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
    best_single = max(per_model, key=lambda m: per_model[m]["val"]["iou"])
    log.info(
        "ensemble %s weights %s: val IoU %.4f (best single %s %.4f), test IoU %.4f (best single %.4f)",
        result.method,
        {k: round(v, 3) for k, v in ens["weights"].items()},
        ens["val"]["iou"],
        best_single,
        per_model[best_single]["val"]["iou"],
        ens["test"]["iou"],
        per_model[best_single]["test"]["iou"],
    )


if __name__ == "__main__":
    main()
