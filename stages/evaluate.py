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
from pathlib import Path

import numpy as np

from mri_ensemble.data.predictions import write_probabilities, write_reconstructions
from mri_ensemble.data.prepared import read_segmentation_h5, scored_splits
from mri_ensemble.data.prepared_recon import read_reconstruction_h5
from mri_ensemble.io import atomic_path, write_json
from mri_ensemble.metrics import segmentation_scores
from mri_ensemble.mri.quality import reconstruction_scores
from mri_ensemble.nets import count_parameters
from mri_ensemble.reconstruction import predict_reconstructions
from mri_ensemble.segmentation import class_names_of, predict_probabilities
from mri_ensemble.train import load_model, resolve_device, set_threads_from_env

from .common import (
    KEY_METRIC,
    cli,
    flatten,
    get,
    load_params,
    log,
    model_entry,
)
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
    set_threads_from_env()
    device = resolve_device(get(params, "device"))
    model, ckpt = load_model(args.checkpoint, device)
    metrics: dict = {"params": count_parameters(model), "best_epoch": ckpt["epoch"]}
    task = entry["task"]
    splits = scored_splits(args.data)
    with atomic_path(args.out) as tmp:
        tmp.mkdir()
        for split in splits:
            path, attrs = args.data / f"{split}.h5", {"model": entry["model"]}
            if task == "reconstruction":
                recon_set = read_reconstruction_h5(path)
                recon = predict_reconstructions(model, recon_set, device, progress=True, desc=split)
                metrics[split] = reconstruction_scores(recon, recon_set.target, recon_set.case)
                write_reconstructions(tmp / f"{split}.h5", recon, recon_set.case, attrs)
            else:
                data = read_segmentation_h5(path)
                probs = predict_probabilities(model, data.image, device, progress=True, desc=split)
                pred = probs.argmax(1).astype(np.uint8)
                metrics[split] = segmentation_scores(
                    pred, data.label, data.case, class_names_of(data)
                )
                write_probabilities(tmp / f"{split}.h5", probs, data.case, attrs)
        write_json(tmp / "metrics.json", metrics)
    run_id = remembered_run(args.name)
    tags = {"task": entry["task"], "model": entry["model"], "kind": "model"}
    with mlflow_run(params, entry["model"], tags, run_id=run_id) as run:
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
    key = KEY_METRIC[task]
    log.info(
        "%s: %s %s",
        args.name,
        key,
        ", ".join(f"{split} {metrics[split][key]:.4f}" for split in splits),
    )


if __name__ == "__main__":
    main()
