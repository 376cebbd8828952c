"""distill@<task>: one student network trained on the shipped ensemble's soft outputs.

The student is an ordinary model of the task afterwards (``models/<task>/student/``:
predict, the UI and the registry serve it as model ``student``), trained by the same
engine, with the same checkpoints, resume and MLflow run as any train@ stage, from the
``train`` entry that ``distill.<task>.student`` names (``best_single``: the model with the
best val score in ``reports/<task>/metrics.json``). Its targets blend the ensemble's
outputs on every training slice with the labels (``alpha``: the ensemble's share,
:meth:`mri_ensemble.tasks.Task.distillation`); ``init: trained`` fine-tunes that model's
weights (``optim`` over its entry's: fewer epochs, a lower lr), ``scratch`` starts afresh.
Its checkpoint is chosen, and its training stopped early, on the val key metric (IoU), the
ensemble's own objective, on val only.

Writes ``reports/<task>/student.json``: the student's scores on val, test and every
shifted set beside the ensemble's and the best single model's, and the share of the
ensemble's gain over the best single model that the student keeps. The members'
checkpoints are read through ``reports/<task>/ensemble.json``; their predictions (a dep)
change whenever they do.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mri_ensemble.data.prepared import scored_splits
from mri_ensemble.errors import ConfigError, DataError
from mri_ensemble.inference import load_predictor
from mri_ensemble.io import write_json
from mri_ensemble.nets import count_parameters
from mri_ensemble.project import STUDENT, checkpoint_path
from mri_ensemble.tasks import get_task
from mri_ensemble.train import (
    TrainConfig,
    Validate,
    load_model,
    resolve_device,
    set_threads_from_env,
)
from mri_ensemble.tta import best_single

from .common import cli, flatten, get, load_params, log, model_entry, task_models
from .tracking import mlflow_run, remembered_run
from .train import RESUME_ROOT, file_identity, fit_and_save

KEYS = {"student", "alpha", "init", "optim"}
INITS = ("trained", "scratch")


def student_entry(params: dict, task: str, metrics: Path) -> tuple[str, dict]:
    """(the train entry's model name, the student's entry: that entry as model ``student``)."""
    p = get(params, f"distill.{task}", kind=dict)
    unknown = sorted(set(p) - KEYS)
    if unknown:
        raise ConfigError(f"params.yaml: distill.{task}: unknown key(s) {unknown}")
    models = task_models(params, task)
    if STUDENT in models:
        raise ConfigError(
            f"params.yaml: train.{task}-{STUDENT}: the name {STUDENT!r} is the distilled model's"
        )
    source = p.get("student", "best_single")
    if source == "best_single":
        if not metrics.is_file():
            raise DataError(f"{metrics}: missing; run ensemble@{task} first")
        per_model = json.loads(metrics.read_text())["models"]
        key = get_task(task).key_metric
        source = best_single(per_model, key)
    if source not in models:
        raise ConfigError(
            f"params.yaml: distill.{task}.student {source!r} is not a {task} model of train "
            f"(known: {', '.join(models)}, or best_single)"
        )
    entry = {**model_entry(params, f"{task}-{source}"), "model": STUDENT}
    optim = p.get("optim") or {}
    if not isinstance(optim, dict):
        raise ConfigError(f"params.yaml: distill.{task}.optim should be a mapping, got {optim!r}")
    entry["optim"] = {**(entry.get("optim") or {}), **optim}  # the student's own epochs, lr
    return source, entry


def init_of(params: dict, task: str) -> str:
    init = get(params, f"distill.{task}.init", "scratch")
    if init not in INITS:
        raise ConfigError(
            f"params.yaml: distill.{task}.init should be one of {', '.join(INITS)}, got {init!r}"
        )
    return str(init)


def alpha_of(params: dict, task: str) -> float:
    alpha = get(params, f"distill.{task}.alpha", 0.5)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ConfigError(f"params.yaml: distill.{task}.alpha should be in [0, 1], got {alpha!r}")
    return float(alpha)


def chosen_on_metric(validate: Validate, key: str) -> Validate:
    """``validate`` whose ``val_loss`` (what the engine keeps the best checkpoint and stops
    early on) is 1 - the val key metric, the ensemble's own objective; the label loss stays
    in the history as ``val_label_loss``. A student's soft-target loss and the metric part
    ways: fine-tuned, its label loss can rise while its val IoU does."""

    def on_metric(model: nn.Module, device: torch.device) -> dict[str, float]:
        row = validate(model, device)
        return {**row, "val_loss": 1.0 - row[f"val_{key}"], "val_label_loss": row["val_loss"]}

    return on_metric


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def comparison(scores: dict, metrics: dict, key: str) -> dict:
    """Per scored split: the student's, the ensemble's and the best single model's (best on
    val) key score, and the share of the ensemble's gain over that model the student keeps
    (NaN where the ensemble gains nothing)."""
    per_model = metrics["models"]
    best = best_single(per_model, key)
    splits = {}
    for split, s in scores.items():
        student, ens = s[key], metrics["ensemble"][split][key]
        single = per_model[best][split][key]
        gain = ens - single
        splits[split] = {
            "student": student,
            "ensemble": ens,
            "best_single": single,
            "gain_kept": (student - single) / gain if gain > 0 else math.nan,
        }
    return {"best_single_model": best, "splits": splits}


@cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--task", required=True)
    ap.add_argument("--train", type=Path, required=True, help="augmented train.h5")
    ap.add_argument("--data", type=Path, required=True, help="prepared folder (val, test, shift)")
    ap.add_argument("--ensemble", type=Path, required=True, help="reports/<task>/ensemble.json")
    ap.add_argument("--metrics", type=Path, required=True, help="reports/<task>/metrics.json")
    ap.add_argument("--out", type=Path, required=True, help="models/<task>/student")
    ap.add_argument("--history", type=Path, required=True)
    ap.add_argument("--scores", type=Path, required=True, help="reports/<task>/student.json")
    args = ap.parse_args()
    params = load_params()
    task = get_task(args.task)
    source, entry = student_entry(params, task.name, args.metrics)
    alpha = alpha_of(params, task.name)
    init = init_of(params, task.name)
    set_threads_from_env()
    cfg = TrainConfig.from_params(
        {**(entry.get("optim") or {}), "seed": get(params, "seed"), "device": get(params, "device")}
    )
    if not args.ensemble.is_file():
        raise DataError(f"{args.ensemble}: missing; run ensemble@{task} first")
    teacher = load_predictor(Path("."), task.name, device=get(params, "device"))
    log.info("teacher: %s; student: %s (%s), alpha %.2f", teacher.describe(), source,
             entry["arch"], alpha)  # fmt: skip
    training = task.distillation(entry, args.train, args.data / "val.h5", cfg.seed, teacher, alpha)
    del teacher
    training = (*training[:3], chosen_on_metric(training[3], task.key_metric))
    spec = training[0]
    n_params = count_parameters(spec.build())
    start = None
    if init == "trained":  # fine-tune the trained model rather than learn from scratch
        trained = checkpoint_path(Path("."), task.name, source)
        start = load_model(trained, "cpu")[0].state_dict()
    meta = {
        "task": task.name,
        "model": STUDENT,
        "entry": entry,
        "distill": {
            "from": source,
            "alpha": alpha,
            "init": init,
            "ensemble": sha256(args.ensemble),
            **({"init_checkpoint": sha256(trained)} if start is not None else {}),
        },
        "data": {
            "train": file_identity(args.train),
            "val": file_identity(args.data / "val.h5"),
        },
    }
    tags = {"task": task.name, "model": STUDENT, "arch": entry["arch"], "kind": "model",
            "distilled_from": "ensemble"}  # fmt: skip
    run_params = {**flatten(entry), "seed": cfg.seed, "n_params": n_params,
                  "n_train": len(training[2]), "distill_from": source, "distill_alpha": alpha,
                  "distill_init": init}  # fmt: skip
    name = f"{task.name}-{STUDENT}"
    state = fit_and_save(params, name, training, cfg, meta, RESUME_ROOT / task.name / STUDENT,
                         args.out, args.history, tags, run_params, init=start)  # fmt: skip

    device = resolve_device(get(params, "device"))
    model, _ = load_model(args.out / "best.pt", device)
    scores = {}
    for split in scored_splits(args.data):
        data = task.read(args.data / f"{split}.h5")
        outputs = task.predict(model, data, device, True, f"student {split}")
        scores[split] = task.score(outputs, task.truth(data), data.case, task.class_names(data))
    key = task.key_metric
    compared = comparison(scores, json.loads(args.metrics.read_text()), key)
    result = {
        "student": {
            "trained_from": source,
            "arch": entry["arch"],
            "alpha": alpha,
            "init": init,
            "params": n_params,
            "best_epoch": state["best_epoch"],
            "training": {"samples_seen": state["samples_seen"], "epochs_run": state["epoch"]},
        },
        **scores,
        "compared": compared,
    }
    write_json(args.scores, result)
    with mlflow_run(params, STUDENT, tags, run_id=remembered_run(name)) as run:
        run.log_metrics(
            {
                f"{'best_val' if split == 'val' else split}_{k}".replace(".", "_"): v
                for split in scores
                for k, v in flatten(scores[split]).items()
                if isinstance(v, float) and np.isfinite(v)
            }
            | {
                f"{split}_gain_kept": c["gain_kept"]
                for split, c in compared["splits"].items()
                if np.isfinite(c["gain_kept"])
            }
        )
    log.info(
        "student (%s): %s",
        source,
        ", ".join(
            f"{s} {key} {c['student']:.4f} (ensemble {c['ensemble']:.4f}, best single "
            f"{c['best_single']:.4f})"
            for s, c in compared["splits"].items()
        ),
    )


if __name__ == "__main__":
    main()
