"""evaluate@<task>-<model>: score the best checkpoint on val, test and every shifted test
set, save its outputs.

Writes ``<out>/<split>.h5`` (probabilities or reconstructions for the ensemble) for val,
test and each ``shift_<name>`` the prepared folder holds, and ``<out>/metrics.json``
(segmentation: Dice and IoU per class and mean foreground; reconstruction: SSIM, PSNR,
NMSE per volume and mean), and logs ``best_val_*``, ``test_*`` and ``shift_<name>_*``
metrics to the model's MLflow run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mri_ensemble.data.prepared import scored_splits
from mri_ensemble.io import atomic_path, write_json
from mri_ensemble.nets import count_parameters
from mri_ensemble.tasks import get_task
from mri_ensemble.train import resolve_device, set_threads_from_env
from mri_ensemble.tta import load_member

from .common import cli, flatten, get, load_params, log, model_entry
from .tracking import mlflow_run, remembered_run


@cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--name", required=True)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="prepared folder with val/test.h5")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    params = load_params()
    entry = model_entry(params, args.name)
    evaluate(params, entry["task"], entry["model"], args.checkpoint, args.data, args.out,
             remembered_run(args.name))  # fmt: skip


def evaluate(
    params: dict,
    task_name: str,
    model_name: str,
    checkpoint: Path,
    data_dir: Path,
    out: Path,
    run_id: str | None,
    tags: dict[str, str] | None = None,
) -> dict:
    """Score ``checkpoint`` (as an ensemble runs it: :func:`load_member`) on every scored
    split of ``data_dir``, write its outputs and metrics.json to ``out``, log the scores to
    MLflow run ``run_id`` (None: a new run named ``model_name``); returns the metrics."""
    set_threads_from_env()
    device = resolve_device(get(params, "device"))
    model, ckpt = load_member(checkpoint, device)
    metrics: dict = {"params": count_parameters(model), "best_epoch": ckpt["epoch"]}
    summary = checkpoint.parent / "summary.json"
    if summary.is_file():  # what the training cost, in samples (the same on every machine)
        done = json.loads(summary.read_text())
        if "samples_seen" in done:
            metrics["training"] = {k: int(done[k]) for k in ("samples_seen", "epochs_run")}
    task = get_task(task_name)
    splits = scored_splits(data_dir)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for split in splits:
            data = task.read(data_dir / f"{split}.h5")
            outputs = task.predict(model, data, device, True, split)
            metrics[split] = task.score(
                outputs, task.truth(data), data.case, task.class_names(data)
            )
            task.write_outputs(tmp / f"{split}.h5", outputs, data.case, {"model": model_name})
        write_json(tmp / "metrics.json", metrics)
    tags = {"task": task.name, "model": model_name, "kind": "model", **(tags or {})}
    with mlflow_run(params, model_name, tags, run_id=run_id) as run:
        # val_* is the per-epoch series of the training run; the best checkpoint's val
        # scores are best_val_*, test scores test_*, shifted sets' shift_<name>_* (same
        # names for every model).
        run.log_metrics(
            {
                f"{'best_val' if split == 'val' else split}_{k}".replace(".", "_"): v
                for split in splits
                for k, v in flatten(metrics[split]).items()
                if isinstance(v, float) and np.isfinite(v)
            }
        )
    key = task.key_metric
    log.info(
        "%s-%s: %s %s",
        task.name,
        model_name,
        key,
        ", ".join(f"{split} {metrics[split][key]:.4f}" for split in splits),
    )
    return metrics


if __name__ == "__main__":
    main()
