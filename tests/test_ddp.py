"""One model over several processes: the engine under ``torchrun`` (gloo on CPU).

- Two ranks end with the weights of one process that steps on the union of the two ranks'
  batches (gradients averaged over the ranks = the mean over the global batch). The net
  here uses InstanceNorm: BatchNorm normalises each rank's half-batch on CPU (SyncBatchNorm
  runs on CUDA only, where the engine converts to it).
- The stage launches torchrun itself for ``optim: {ddp: 2}``; rank 0 alone writes the outs
  and MLflow; a DDP training killed after an epoch resumes to the weights of an
  uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_stages import ROOT, ingest_params, one_line_error, run_stage
from torch.utils.data import DistributedSampler

from mri_ensemble.data.phantom import write_acdc_phantom
from mri_ensemble.errors import ConfigError
from mri_ensemble.losses import build_loss
from mri_ensemble.train import ModelSpec, TrainConfig, load_checkpoint, seed_everything

SPEC = {"arch": "fc_attention_unet", "config": {"channels": [4, 8], "fc_hidden": 16,
        "fc_dropout": 0.0}, "in_channels": 1, "out_channels": 4}  # fmt: skip
CFG = {"epochs": 2, "batch_size": 4, "lr": 1e-2, "patience": 50, "seed": 1, "scheduler": "cosine"}

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from test_train import toy_data, make_validate
    from mri_ensemble.losses import build_loss
    from mri_ensemble.train import ModelSpec, TrainConfig, fit

    spec, cfg = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    ds = toy_data(n=10)
    loss_fn = build_loss("dice_focal")
    fit(ModelSpec(**spec), ds, loss_fn, make_validate(ds, loss_fn), TrainConfig(**cfg),
        Path(sys.argv[3]), {"m": 1}, progress=False)
    """
)


def torchrun(n: int, *args: str, cwd: Path, env: dict | None = None, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
         *args], cwd=cwd, env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}",
         "OMP_NUM_THREADS": "1", **(env or {})}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw,
    )  # fmt: skip


def test_two_ranks_equal_one_process_on_the_union_of_their_batches(tmp_path):
    from test_train import make_validate, toy_data

    (tmp_path / "run.py").write_text(SCRIPT)
    proc = torchrun(
        2, "run.py", json.dumps(SPEC), json.dumps(CFG), str(tmp_path / "w"), cwd=tmp_path
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    ddp = load_checkpoint(tmp_path / "w" / "last.pt")

    # one process: the same init, each step on rank 0's batch + rank 1's batch
    ds, cfg = toy_data(n=10), TrainConfig(**CFG)
    loss_fn = build_loss("dice_focal")
    seed_everything(cfg.seed)
    model = ModelSpec(**SPEC).build()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    half = cfg.batch_size // 2
    for epoch in (1, 2):
        ranks = []
        for rank in (0, 1):
            sampler = DistributedSampler(ds, 2, rank, seed=cfg.seed)
            sampler.set_epoch(epoch)
            ranks.append(list(sampler))  # 5 each: 10 samples split evenly, no padding
        model.train()
        for start in range(0, len(ranks[0]), half):
            idx = ranks[0][start : start + half] + ranks[1][start : start + half]
            x, y = ds[idx]
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        sched.step()
    assert ddp["epoch"] == 2 and len(ddp["history"]) == 2
    # a bias right before an InstanceNorm has a true gradient of 0: Adam turns its rounding
    # noise into steps of up to lr, so it matches to lr only; every other weight to 1e-5
    dead = {n for n, q in model.named_parameters() if q.grad.abs().max() < 1e-6}
    assert dead <= {n for n in dead if n.endswith(".bias")} and len(dead) < 3, dead
    for key, value in model.state_dict().items():
        atol = cfg.lr if key in dead else 1e-5
        torch.testing.assert_close(ddp["state_dict"][key], value, rtol=1e-4, atol=atol, msg=key)
    # the history's train loss is the global mean (both ranks' samples), val from rank 0
    assert ddp["history"][1]["val_loss"] == pytest.approx(
        make_validate(ds, loss_fn)(model.eval(), torch.device("cpu"))["val_loss"], rel=1e-4
    )


def stage_project(tmp: Path, epochs: int, ingest: bool = True) -> tuple[dict, list[str]]:
    """A tiny ACDC ingest in ``tmp`` and a U-Net entry trained with ``ddp: 2``."""
    if ingest and not (tmp / "prep").exists():
        write_acdc_phantom(tmp / "acdc", n_patients=3, seed=0, write_4d=False)
        proc = run_stage(
            tmp, ingest_params(tmp / "acdc"), "stages.ingest", "--task", "segmentation",
            "--out", "prep",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    p = ingest_params(tmp / "acdc")
    p["mlflow"]["tracking_uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    p["device"] = "cpu"
    entry = p["train"]["segmentation-unet"]
    entry["net"] = {"features": [4, 8], "dropout": 0.0}
    entry["optim"] = {"epochs": epochs, "batch_size": 4, "patience": 50, "ddp": 2}
    args = ["--name", "segmentation-unet", "--train", "prep/train.h5", "--val", "prep/val.h5",
            "--out", "m", "--history", "h.csv"]  # fmt: skip
    return p, args


def _runs(uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_the_stage_launches_torchrun_and_a_killed_ddp_run_resumes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    p, args = stage_project(a, epochs=4)
    done = run_stage(a, p, "stages.train", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data-parallel training" in done.stderr and "--nproc_per_node=2" in done.stderr
    whole = load_checkpoint(a / "m" / "best.pt")
    history = json.loads((a / "m" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]  # rank 0 alone wrote it, once
    assert len((a / "h.csv").read_text().splitlines()) == 5
    (run,) = _runs(p["mlflow"]["tracking_uri"])  # one run, not one per rank
    assert run.info.status == "FINISHED" and run.data.params["optim.ddp"] == "2"

    # the same training, killed (torchrun and both ranks) once an epoch is checkpointed
    b.mkdir()
    (b / "prep").mkdir()
    for f in (a / "prep").iterdir():
        (b / "prep" / f.name).write_bytes(f.read_bytes())
    p, args = stage_project(b, epochs=4)
    (b / "params.yaml").write_text(yaml.safe_dump(p))
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.train", *args], cwd=b, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    last = b / ".resume" / "segmentation" / "unet" / "last.pt"
    deadline = time.monotonic() + 240
    while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.is_file() and not (b / "m").exists(), (
        "killed before its first epoch or after the end"
    )
    killed_at = load_checkpoint(last)["epoch"]
    assert 1 <= killed_at < 4
    again = run_stage(b, p, "stages.train", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"from epoch {killed_at}" in again.stderr
    resumed = load_checkpoint(b / "m" / "best.pt")
    assert resumed["best_epoch"] == whole["best_epoch"]
    for key, value in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    (run,) = _runs(p["mlflow"]["tracking_uri"])  # the killed run, continued
    assert run.info.status == "FINISHED"


@pytest.mark.parametrize("value", [0, -1, "two", True, 1.5])
def test_bad_ddp_values_are_refused_naming_the_key(value):
    from stages.train import ddp_processes

    with pytest.raises(ConfigError, match=r"train\.segmentation-unet\.optim\.ddp"):
        ddp_processes("segmentation-unet", {"ddp": value})
    assert ddp_processes("segmentation-unet", {}) == 1


def test_a_batch_that_does_not_split_over_the_ranks_is_one_line(tmp_path):
    p, args = stage_project(tmp_path, epochs=1, ingest=False)  # refused before any data
    p["train"]["segmentation-unet"]["optim"].update(ddp=3)  # batch_size 4
    one_line_error(run_stage(tmp_path, p, "stages.train", *args), "does not split")
    assert not (tmp_path / "m").exists()
