"""train@<task>-<model>: train one network, checkpoint it, log it to MLflow.

A killed run resumes from ``.resume/<task>/<model>/last.pt`` (and continues its MLflow
run) when rerun with the same params and data; the finished checkpoints are moved into
the DVC out ``models/<task>/<model>/`` in one rename.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
from pathlib import Path

from mri_ensemble.data.prepared import SliceDataset, read_segmentation_h5
from mri_ensemble.errors import ConfigError
from mri_ensemble.io import atomic_path, write_json
from mri_ensemble.losses import build_loss
from mri_ensemble.nets import count_parameters
from mri_ensemble.segmentation import N_CLASSES, make_validate
from mri_ensemble.train import (
    ModelSpec,
    TrainConfig,
    fit,
    set_threads_from_env,
    training_fingerprint,
)

from .common import cli, flatten, get, load_params, log, mlflow_run, model_entry

RESUME_ROOT = Path(".resume")
KNOWN_KEYS = {"task", "model", "arch", "net", "loss", "loss_config", "optim"}


def file_identity(path: Path) -> dict[str, object]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_history_csv(path: Path, history: list[dict[str, float]]) -> None:
    cols = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    writer.writerows(history)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


@cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--name", required=True, help="<task>-<model>, a key of params.yaml train")
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--val", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--history", type=Path, required=True)
    args = ap.parse_args()
    params = load_params()
    entry = model_entry(params, args.name)
    unknown = sorted(set(entry) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"params.yaml: train.{args.name}: unknown key(s) {unknown}")
    task, model_name = entry["task"], entry["model"]
    if task != "segmentation":
        raise ConfigError(f"train: unknown task {task!r}; known: ['segmentation']")
    set_threads_from_env()
    cfg = TrainConfig.from_params(
        {**entry.get("optim", {}), "seed": get(params, "seed"), "device": get(params, "device")}
    )
    spec = ModelSpec(entry["arch"], dict(entry.get("net") or {}), 1, N_CLASSES)
    n_params = count_parameters(spec.build())  # also validates the net config early
    loss_fn = build_loss(entry.get("loss", "dice_focal"), entry.get("loss_config"))
    train_set = read_segmentation_h5(args.train)
    val_set = read_segmentation_h5(args.val)
    meta = {
        "task": task,
        "model": model_name,
        "entry": entry,
        "data": {"train": file_identity(args.train), "val": file_identity(args.val)},
    }
    work = RESUME_ROOT / task / model_name
    fp = training_fingerprint(spec, cfg, meta)
    run_file = work / "mlflow_run.json"
    run_id = None
    if run_file.is_file() and (work / "last.pt").is_file():
        saved = json.loads(run_file.read_text())
        run_id = saved["run_id"] if saved.get("fingerprint") == fp else None
    if run_id is None and work.exists():
        shutil.rmtree(work)

    tags = {"task": task, "model": model_name, "arch": entry["arch"], "kind": "model"}
    with mlflow_run(params, model_name, tags, run_id=run_id) as run:
        import mlflow

        if run_id is None:
            write_json(run_file, {"fingerprint": fp, "run_id": run.info.run_id})
            mlflow.log_params(
                {
                    **flatten(entry),
                    "seed": cfg.seed,
                    "n_params": n_params,
                    "n_train": len(train_set.image),
                }
            )

        def on_epoch(row: dict[str, float]) -> None:
            mlflow.log_metrics(
                {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])
            )

        state = fit(
            spec,
            SliceDataset(train_set),
            loss_fn,
            make_validate(val_set, loss_fn),
            cfg,
            work,
            meta,
            on_epoch,
        )
        summary = {
            "task": task,
            "model": model_name,
            "arch": entry["arch"],
            "params": n_params,
            "best_epoch": state["best_epoch"],
            "best_val_loss": state["best_val_loss"],
            "epochs_run": state["epoch"],
            "stopped_early": state["stopped_early"],
            "mlflow_run_id": run.info.run_id,
        }
        with atomic_path(args.out) as tmp:
            tmp.mkdir()
            for f in ("best.pt", "last.pt"):
                shutil.copy2(work / f, tmp / f)
            (tmp / "history.json").write_text(json.dumps(state["history"], indent=1) + "\n")
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        write_history_csv(args.history, state["history"])
        mlflow.log_metrics(
            {"best_val_loss": state["best_val_loss"], "best_epoch": state["best_epoch"]}
        )
        mlflow.log_artifact(str(args.out / "best.pt"), artifact_path="checkpoint")
    shutil.rmtree(work, ignore_errors=True)
    log.info(
        "trained %s: best epoch %d, val_loss %.4f",
        args.name,
        state["best_epoch"],
        state["best_val_loss"],
    )


if __name__ == "__main__":
    main()
