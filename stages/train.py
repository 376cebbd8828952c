"""train@<task>-<model>: train one network, checkpoint it, log it to MLflow.

A killed run resumes from ``.resume/<task>/<model>/last.pt`` (and continues its MLflow
run) when rerun with the same params and data; the finished checkpoints are moved into
the DVC out ``models/<task>/<model>/`` in one rename.

``optim: {ddp: N}`` trains one model data-parallel over N processes: the stage starts
``torchrun --standalone --nproc_per_node=N`` on its own command line (one process per GPU,
or N CPU processes sharing the cores); rank 0 alone writes the outs and logs to MLflow.
On a cluster worker (``MRI_ENSEMBLE_SHARE_CHECKPOINTS=1``, set by the flow) every epoch's
checkpoints also go to the run's ``resume/`` artifacts, and a training that finds no local
``last.pt`` resumes from those an unfinished run of the same training shared.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from mri_ensemble import distributed
from mri_ensemble.data.augment import mixup_batch
from mri_ensemble.errors import ConfigError
from mri_ensemble.io import atomic_path, write_json
from mri_ensemble.nets import count_parameters
from mri_ensemble.tasks import get_task
from mri_ensemble.tasks.base import Training
from mri_ensemble.train import (
    BatchTransform,
    ModelSpec,
    TrainConfig,
    Validate,
    fit,
    resolve_device,
    set_threads_from_env,
    training_fingerprint,
)

from .common import cli, flatten, get, load_params, log, model_entry
from .tracking import SHARE_ENV, mlflow_run, remember_run, shared_checkpoint

RESUME_ROOT = Path(".resume")
KNOWN_KEYS = {"task", "model", "arch", "net", "loss", "loss_config", "optim", "mixup_alpha"}


def file_identity(path: Path) -> dict[str, object]:
    """Identity of an input by content (not mtime: a fresh clone must give the same bytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path), "size": path.stat().st_size, "sha256": digest.hexdigest()}


def write_history_csv(path: Path, history: list[dict[str, float]]) -> None:
    cols = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    writer.writerows(history)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def setup_task(
    entry: dict, train_path: Path, val_path: Path, seed: int
) -> tuple[ModelSpec, nn.Module, Dataset, Validate]:
    """Network spec, loss, training set and validation function of one params entry."""
    task = get_task(entry["task"])
    task.check_arch(entry["arch"])
    return task.training(entry, train_path, val_path, seed)


def mixup_transform(entry: dict, n_classes: int) -> BatchTransform | None:
    """Batch-level mixup (lambda ~ Beta(alpha, alpha)) when ``mixup_alpha`` > 0 (segmentation)."""
    alpha = float(entry.get("mixup_alpha") or 0.0)
    if alpha <= 0:
        return None
    if not get_task(entry["task"]).mixup or n_classes < 2:
        raise ConfigError(
            f"params.yaml: train.{entry['task']}-{entry['model']}.mixup_alpha needs a "
            "multi-class segmentation loss (not reconstruction, not 'bce')"
        )

    def mix(inputs: tuple, targets: tuple, gen: torch.Generator) -> tuple[tuple, tuple]:
        x, y = mixup_batch(inputs[0], targets[0], n_classes, alpha, gen)
        return (x,), (y,)

    return mix


def ddp_processes(name: str, optim: dict) -> int:
    """Pop ``optim.ddp`` (processes for one data-parallel training; default 1)."""
    n = optim.pop("ddp", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(
            f"params.yaml: train.{name}.optim.ddp should be an integer >= 1, got {n!r}"
        )
    return n


def _torchrun_dies_with_us() -> None:
    distributed.die_with_parent(signal.SIGTERM)  # torchrun stops its ranks on SIGTERM


def launch_ddp(n: int) -> None:
    """This stage's own command line again under ``torchrun``, ``n`` processes on this machine.

    torchrun sets ``OMP_NUM_THREADS=1`` unless told: the stage's thread share
    (``MRI_ENSEMBLE_THREADS``, else every core) is split between the processes instead.
    """
    threads = max(1, int(os.environ.get("MRI_ENSEMBLE_THREADS") or os.cpu_count() or 1) // n)
    env = {**os.environ, "MRI_ENSEMBLE_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={n}", "-m", "stages.train", *sys.argv[1:]]  # fmt: skip
    log.info("data-parallel training: %s", " ".join(cmd[1:]))
    code = subprocess.run(cmd, env=env, preexec_fn=_torchrun_dies_with_us).returncode
    if code:
        sys.exit(code)


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
    set_threads_from_env()
    optim = dict(entry.get("optim") or {})
    ddp = ddp_processes(args.name, optim)
    cfg = TrainConfig.from_params(
        {**optim, "seed": get(params, "seed"), "device": get(params, "device")}
    )
    if cfg.batch_size % ddp:
        raise ConfigError(
            f"params.yaml: train.{args.name}.optim.batch_size {cfg.batch_size} does not split "
            f"over ddp {ddp} processes"
        )
    spec, loss_fn, train_set, validate = setup_task(entry, args.train, args.val, cfg.seed)
    batch_transform = mixup_transform(entry, spec.out_channels)  # config errors before MLflow
    if ddp > 1 and not distributed.launched():
        launch_ddp(ddp)  # the ranks write the outs
        return
    world = distributed.init(resolve_device(cfg.device).type == "cuda")
    n_params = count_parameters(spec.build())
    meta = {
        "task": task,
        "model": model_name,
        "entry": entry,
        "data": {"train": file_identity(args.train), "val": file_identity(args.val)},
    }
    work = RESUME_ROOT / task / model_name
    if not world.main:  # rank 0 prepares the work folder, trains with us, writes everything
        distributed.barrier()
        fit(spec, train_set, loss_fn, validate, cfg, work, meta, None, False, batch_transform)
        distributed.shutdown()
        return
    tags = {"task": task, "model": model_name, "arch": entry["arch"], "kind": "model"}
    run_params = {**flatten(entry), "seed": cfg.seed, "n_params": n_params,
                  "n_train": len(train_set)}  # fmt: skip
    fit_and_save(params, args.name, (spec, loss_fn, train_set, validate), cfg, meta, work,
                 args.out, args.history, tags, run_params, batch_transform)  # fmt: skip


def fit_and_save(
    params: dict,
    name: str,
    training: Training,
    cfg: TrainConfig,
    meta: dict,
    work: Path,
    out: Path,
    history: Path,
    tags: dict[str, str],
    run_params: dict,
    batch_transform: BatchTransform | None = None,
    init: dict | None = None,
) -> dict:
    """Rank 0's part of one training (``name``: its ``<task>-<model>`` key): resume from
    ``work`` (and its MLflow run) when the fingerprint matches, fit, then move the finished
    checkpoints, history and summary into ``out`` in one rename and write ``history``
    (CSV); ``init``: weights to start from (:func:`fit`). Returns the final state. train@
    and distill@ both train through it."""
    spec, loss_fn, train_set, validate = training
    fp = training_fingerprint(spec, cfg, meta)
    run_file = work / "mlflow_run.json"
    run_id = None
    if run_file.is_file() and (work / "last.pt").is_file():
        saved = json.loads(run_file.read_text())
        run_id = saved["run_id"] if saved.get("fingerprint") == fp else None
    if run_id is None and work.exists():
        shutil.rmtree(work)
    share = os.environ.get(SHARE_ENV) == "1"
    if share and run_id is None:  # a worker that died mid-training may have shared last.pt
        run_id = shared_checkpoint(params, fp, work)
        if run_id is not None:
            write_json(run_file, {"fingerprint": fp, "run_id": run_id})
            log.info("resuming from the last.pt that MLflow run %s shared", run_id)
    distributed.barrier()

    model_name = meta["model"]
    with mlflow_run(params, model_name, {**tags, "fingerprint": fp}, run_id=run_id) as run:
        if not run.resumed:
            write_json(run_file, {"fingerprint": fp, "run_id": run.run_id})
            run.log_params(run_params)

        spent = {"cpu": 0.0, "wall": 0.0}  # this process's share (a resumed run adds its own)

        def on_epoch(row: dict[str, float]) -> None:
            spent["cpu"] += row["epoch_cpu_seconds"]
            spent["wall"] += row["epoch_wall_seconds"]
            run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

        def on_checkpoint(paths: list[Path]) -> None:
            for path in paths:
                run.log_artifact(path, artifact_path="resume")

        state = fit(
            spec,
            train_set,
            loss_fn,
            validate,
            cfg,
            work,
            meta,
            on_epoch,
            batch_transform=batch_transform,
            on_checkpoint=on_checkpoint if share else None,
            init=init,
        )
        distributed.shutdown()
        summary = {
            "task": meta["task"],
            "model": model_name,
            "arch": spec.arch,
            "params": int(run_params["n_params"]),
            "best_epoch": state["best_epoch"],
            "best_val_loss": state["best_val_loss"],
            "epochs_run": state["epoch"],
            "stopped_early": state["stopped_early"],
            "samples_seen": state["samples_seen"],
        }
        with atomic_path(out) as tmp:
            tmp.mkdir()
            for f in ("best.pt", "last.pt"):
                shutil.copy2(work / f, tmp / f)
            (tmp / "history.json").write_text(json.dumps(state["history"], indent=1) + "\n")
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        write_history_csv(history, state["history"])
        remember_run(name, run.run_id, {"cpu_seconds": spent["cpu"], "wall_seconds": spent["wall"]})
        run.log_metrics(
            {
                "best_val_loss": state["best_val_loss"],
                "best_epoch": state["best_epoch"],
                "samples_seen": state["samples_seen"],
                "train_cpu_seconds": spent["cpu"],
                "train_wall_seconds": spent["wall"],
            }
        )
        run.log_artifact(out / "best.pt", artifact_path="checkpoint")
    shutil.rmtree(work, ignore_errors=True)
    log.info("trained %s: best epoch %d, val_loss %.4f", name, state["best_epoch"],
             state["best_val_loss"])  # fmt: skip
    return state


if __name__ == "__main__":
    main()
