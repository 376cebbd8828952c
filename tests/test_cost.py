"""Ensemble inference and cost: the batched ensemble network, the cost probes, the advice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tiny_project import save_member

from mri_ensemble import cost
from mri_ensemble.cost import latencies, macs_per_slice, peak_memory_mb, recommend
from mri_ensemble.data.prepared import write_segmentation_arrays
from mri_ensemble.errors import DataError
from mri_ensemble.inference import EnsembleNet, load_members
from mri_ensemble.tasks import TASKS
from mri_ensemble.tasks.segmentation import probabilities

ROOT = Path(__file__).resolve().parents[1]
UNET = ("unet", {"features": [4, 8], "dropout": 0.0})
BIG = ("unet", {"features": [64, 128, 256, 512], "dropout": 0.0})  # ~7 M parameters, ~28 MB


def _members(tmp_path: Path, n: int = 2, arch=UNET) -> list[Path]:
    return [save_member(tmp_path, "segmentation", f"m{i}", *arch, (1, 4), seed=i) for i in range(n)]


def test_ensemble_net_is_the_weighted_average_of_its_members(tmp_path: Path) -> None:
    members = load_members(_members(tmp_path, 3))
    x = torch.randn(2, 1, 16, 16)
    each = torch.stack([probabilities(m(x)) for m in members]).detach()  # (M, B, C, H, W)
    shared = EnsembleNet(members, [2.0, 1.0, 1.0], "segmentation")(x)
    torch.testing.assert_close(shared, 0.5 * each[0] + 0.25 * each[1] + 0.25 * each[2])
    per_class = np.array([[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1]], dtype=float)  # (M, C)
    out = EnsembleNet(members, per_class, "segmentation")(x)
    expected = torch.stack(
        [each[0, :, 0], each[1, :, 1], each[2, :, 2], each[:, :, 3].mean(0)], dim=1
    )
    torch.testing.assert_close(out, expected)
    with pytest.raises(DataError, match="3 members but weights"):
        EnsembleNet(members, [1.0, 1.0], "segmentation")
    with pytest.raises(DataError, match="non-negative"):
        EnsembleNet(members, [1.0, -1.0, 1.0], "segmentation")


def _sizes(n: int, gains: list[float], macs: list[float], params: list[int]) -> list[dict]:
    return [
        {
            "size": k + 1,
            "members": [f"m{i}" for i in range(k + 1)],
            "val_iou": 0.80 + gains[k],
            "test_iou": 0.79 + gains[k],
            "macs": macs[k],
            "params": params[k],
        }
        for k in range(n)
    ]


def test_recommendation_picks_the_smallest_ensemble_with_95_percent_of_the_gain() -> None:
    sizes = _sizes(4, [0.0, 0.006, 0.0098, 0.010], [1.0, 2.0, 3.0, 10.0], [1, 2, 3, 4])
    line = recommend(sizes, "iou")
    assert line.startswith("3 models (m0, m1, m2) give 98 % of the full 4-model")
    assert "30 % of its compute (MACs per slice) and 75 % of its parameters" in line
    flat = _sizes(3, [0.0, -0.001, 0.0], [1.0, 2.0, 3.0], [1, 2, 3])
    assert "gains nothing on val over the best single model (m0" in recommend(flat, "iou")


def _prepared(tmp_path: Path, n: int = 4, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "test.h5"
    write_segmentation_arrays(
        path,
        image=rng.random((n, size, size)).astype(np.float32),
        label=rng.integers(0, 4, (n, size, size)).astype(np.uint8),
        case=np.array([f"c{i // 2}" for i in range(n)]),
        slice_index=np.arange(n),
        spacing=np.ones((n, 3), np.float32),
        attrs={"source": "test"},
    )
    return path


def test_latency_of_the_batched_ensemble_and_its_members_side_by_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a fake clock that each member's forward advances by a known time, the ensemble
    and the sum of its members alone come out at exactly those times per slice."""
    clock = [0.0]

    class Timed(torch.nn.Module):
        def __init__(self, net: torch.nn.Module, seconds: float) -> None:
            super().__init__()
            self.net, self.seconds = net, seconds

        def forward(self, *x: torch.Tensor) -> torch.Tensor:
            clock[0] += self.seconds
            return self.net(*x)

    paths = _members(tmp_path, 2)
    real = load_members(paths)
    monkeypatch.setattr(
        cost,
        "load_members",
        lambda p, d: [Timed(n, t) for n, t in zip(real, (0.004, 0.012), strict=True)],
    )
    monkeypatch.setattr(cost, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    inputs = TASKS["segmentation"].batch_inputs(_prepared(tmp_path), 4)
    assert inputs[0].shape == (4, 1, 32, 32)
    plan = [(["m0"], np.array([1.0])), (["m0", "m1"], np.array([0.5, 0.5]))]
    timed = latencies(
        "segmentation", {"m0": paths[0], "m1": paths[1]}, plan, inputs, torch.device("cpu"), 2
    )
    assert timed == [pytest.approx((0.001, 0.001)), pytest.approx((0.004, 0.004))]


def test_macs_per_slice_scale_with_the_image_and_not_with_the_batch(tmp_path: Path) -> None:
    """A fully convolutional member: MACs per slice are the same for a batch of 1 or 3 and
    grow 4x when the image doubles in both axes; the counted value is one conv's by hand
    for a single 3x3 conv layer of known channels."""
    paths = dict(zip(("m0", "m1"), _members(tmp_path, 2), strict=True))
    small = macs_per_slice(paths, (torch.zeros(1, 1, 16, 16),))
    batch = macs_per_slice(paths, (torch.zeros(3, 1, 16, 16),))
    large = macs_per_slice(paths, (torch.zeros(1, 1, 32, 32),))
    assert small == batch
    for m in paths:
        assert large[m] == pytest.approx(4 * small[m], rel=0.02)
    conv = torch.nn.Conv2d(1, 4, 3, padding=1, bias=False)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        conv(torch.zeros(1, 1, 16, 16))
    assert counter.get_total_flops() / 2 == 16 * 16 * 4 * 9  # the counter's unit, by hand


def test_peak_memory_probe_sees_the_members_weights(tmp_path: Path) -> None:
    """Two ~20 MB members: the fresh process's peak grows by at least their weights."""
    paths = _members(tmp_path, 2, BIG)
    n_params = sum(p.numel() for p in load_members(paths[:1])[0].parameters())
    inputs = tmp_path / "inputs.pt"
    torch.save(TASKS["segmentation"].batch_inputs(_prepared(tmp_path), 2), inputs)
    one = peak_memory_mb("segmentation", paths[:1], np.array([1.0]), inputs, "cpu")
    two = peak_memory_mb("segmentation", paths, np.array([0.5, 0.5]), inputs, "cpu")
    weights_mb = 4 * n_params / 2**20
    assert weights_mb > 10
    assert one >= 0.9 * weights_mb
    assert two >= one + 0.5 * weights_mb


def test_cost_stage_without_ensemble_sizes_is_one_line(tmp_path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    ens = tmp_path / "ensemble.json"
    ens.write_text(json.dumps({"method": "mean", "weights": {}}))
    cmd = [
        sys.executable,
        "-m",
        "stages.cost",
        "--task",
        "segmentation",
        "--models",
        str(tmp_path / "models"),
        "--ensemble",
        str(ens),
        "--data",
        str(tmp_path / "t.h5"),
        "--out",
        str(tmp_path / "cost.json"),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {ens}: no 'sizes' (written by an older ensemble stage?)"
    ]
    assert not (tmp_path / "cost.json").exists()
