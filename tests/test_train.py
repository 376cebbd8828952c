"""The training engine: checkpoints describe themselves, a killed run resumes exactly."""

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from mri_ensemble.errors import ConfigError, DataError
from mri_ensemble.losses import build_loss
from mri_ensemble.train import ModelSpec, TrainConfig, fit, load_checkpoint, load_model

SPEC = ModelSpec("unet", {"features": [4, 8], "dropout": 0.0}, 1, 4)


def toy_data(n=16, size=16, seed=0):
    rng = np.random.default_rng(seed)
    label = np.zeros((n, size, size), np.int64)
    label[:, 4:12, 4:12] = 3
    label[:, 6:10, 6:10] = 1
    image = (label / 3 + 0.1 * rng.standard_normal(label.shape)).astype(np.float32)
    return TensorDataset(torch.from_numpy(image[:, None]), torch.from_numpy(label))


def make_validate(ds, loss_fn):
    def validate(model, device):
        x, y = ds.tensors
        return {"val_loss": float(loss_fn(model(x), y))}

    return validate


def run(tmp_path, epochs, **kw):
    ds = toy_data()
    loss_fn = build_loss("dice_focal")
    cfg = TrainConfig(
        **{"epochs": epochs, "batch_size": 4, "lr": 1e-2, "patience": 50, "seed": 1, **kw}
    )
    meta = {"task": "segmentation", "model": "toy"}
    state = fit(SPEC, ds, loss_fn, make_validate(ds, loss_fn), cfg, tmp_path, meta, progress=False)
    return state, cfg


def test_checkpoint_rebuilds_model_alone_and_loss_falls(tmp_path):
    state, _ = run(tmp_path, epochs=3)
    hist = state["history"]
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    model, ckpt = load_model(tmp_path / "best.pt")
    assert ckpt["spec"]["arch"] == "unet" and ckpt["meta"]["model"] == "toy"
    assert ckpt["epoch"] == state["best_epoch"] and "optimizer" in ckpt and "git_rev" not in ckpt
    assert model(torch.zeros(1, 1, 16, 16)).shape == (1, 4, 16, 16)
    assert not list(tmp_path.glob(".*.tmp")), "no temporary files left behind"


def test_killed_run_resumes_to_identical_weights_and_bytes(tmp_path):
    full, cfg = run(tmp_path / "full", epochs=4)
    ds, loss_fn = toy_data(), build_loss("dice_focal")
    meta = {"task": "segmentation", "model": "toy"}
    killed = tmp_path / "killed"

    class Kill(Exception):
        pass

    def kill_after_two(row):
        if row["epoch"] == 2:
            raise Kill

    with pytest.raises(Kill):
        fit(SPEC, ds, loss_fn, make_validate(ds, loss_fn), cfg, killed, meta, kill_after_two, False)
    assert load_checkpoint(killed / "last.pt")["epoch"] == 1  # killed before saving epoch 2
    resumed = fit(SPEC, ds, loss_fn, make_validate(ds, loss_fn), cfg, killed, meta, None, False)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3, 4]
    a = load_checkpoint(killed / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "full" / "last.pt")["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert resumed["history"] == full["history"]
    assert resumed["samples_seen"] == full["samples_seen"] == 4 * len(ds)  # counted across the kill
    # byte for byte (the DVC out's hash): the resumed rows' keys pickle as the fresh ones
    for name in ("last.pt", "best.pt"):
        assert (killed / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name


def test_training_cost_is_counted_in_samples_and_measured_in_core_seconds(tmp_path):
    """Samples seen are in the state (the same on every machine); the measured CPU and wall
    seconds reach ``on_epoch`` (MLflow) only, never the history or a checkpoint."""
    ds, loss_fn = toy_data(), build_loss("dice_focal")
    cfg = TrainConfig(epochs=3, batch_size=4, lr=1e-2, patience=50, seed=1)
    rows = []
    state = fit(SPEC, ds, loss_fn, make_validate(ds, loss_fn), cfg, tmp_path,
                {"task": "segmentation", "model": "toy"}, rows.append, False)  # fmt: skip
    assert state["samples_seen"] == 3 * len(ds)
    assert [r["samples_seen"] for r in rows] == [16.0, 32.0, 48.0]
    assert all(r["epoch_cpu_seconds"] > 0 and r["epoch_wall_seconds"] > 0 for r in rows)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["samples_seen"] == 48
    assert not any("seconds" in k for r in ckpt["history"] for k in r)
    assert not any("seconds" in k for r in state["history"] for k in r)


def test_changed_params_start_afresh(tmp_path):
    run(tmp_path, epochs=2)
    state, _ = run(tmp_path, epochs=3, lr=5e-3)  # different config: no resume
    assert [r["epoch"] for r in state["history"]] == [1, 2, 3]
    assert load_checkpoint(tmp_path / "last.pt")["train_config"]["lr"] == 5e-3


def test_early_stopping(tmp_path):
    ds = toy_data()
    loss_fn = build_loss("dice_focal")
    cfg = TrainConfig(epochs=10, batch_size=4, lr=1e-9, patience=2, seed=0)
    calls = iter([1.0, 0.9, 0.95, 0.97, 0.5, 0.4])  # improves at 1, 2; then 2 bad epochs

    def validate(model, device):
        return {"val_loss": next(calls)}

    state = fit(SPEC, ds, loss_fn, validate, cfg, tmp_path, {"m": 1}, progress=False)
    assert state["stopped_early"] and state["epoch"] == 4 and state["best_epoch"] == 2


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown training param.*'epoch'"):
        TrainConfig.from_params({"epoch": 3})
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig.from_params({"lr": -1})
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt")


def test_batch_transform_mixup_is_applied_and_reproducible(tmp_path):
    from mri_ensemble.data.augment import mixup_batch

    seen = []

    def mix(inputs, targets, gen):
        x, y = mixup_batch(inputs[0], targets[0], 4, 0.4, gen)
        seen.append(not torch.equal(x, inputs[0]) and y.shape == (4, 4, 16, 16))  # mixed, soft
        return (x,), (y,)

    ds = toy_data()
    loss_fn = build_loss("dice_focal")
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-2, patience=50, seed=1)
    states = []
    for run_dir in ("a", "b"):
        states.append(
            fit(
                SPEC,
                ds,
                loss_fn,
                make_validate(ds, loss_fn),
                cfg,
                tmp_path / run_dir,
                {"m": 1},
                progress=False,
                batch_transform=mix,
            )  # fmt: skip
        )
    assert len(seen) == 2 * 2 * 4  # two runs x two epochs x four batches
    assert any(seen)  # mixed images with soft (N, K, H, W) labels reached the loss
    a, b = (load_checkpoint(tmp_path / d / "last.pt")["state_dict"] for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same mixup draws
