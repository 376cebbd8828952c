"""params.yaml itself: every entry (run by default or kept in `zoo`) builds as written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mri_ensemble.losses import build_loss
from mri_ensemble.mri.quality import build_recon_loss
from mri_ensemble.nets import RECONSTRUCTION, SEGMENTATION, build_model
from mri_ensemble.train import TrainConfig
from stages.common import model_entry

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
ENTRIES = {**PARAMS["train"], **PARAMS["zoo"]}


@pytest.mark.parametrize("key", sorted(ENTRIES))
def test_every_entry_builds_its_network_loss_and_optimiser(key):
    entry = model_entry({"train": ENTRIES}, key)
    TrainConfig.from_params(entry.get("optim", {}))
    if entry["task"] == "segmentation":
        assert entry["arch"] in SEGMENTATION
        out = 1 if entry.get("loss") == "bce" else 4
        net = build_model(entry["arch"], 1, out, entry.get("net"))
        loss = build_loss(entry["loss"], entry.get("loss_config"), class_counts=[900, 40, 30, 30])
        net.train()
        logits = net(torch.randn(2, 1, 32, 32))
        value = loss(logits, torch.randint(0, 4, (2, 32, 32)))
    else:
        assert entry["arch"] in RECONSTRUCTION
        net = build_model(entry["arch"], 2, 1, entry.get("net"))
        loss = build_recon_loss(entry["loss"], entry.get("loss_config"))
        mask = torch.zeros(1, 32, dtype=torch.bool)
        mask[:, 12:20] = True
        mask[:, ::4] = True
        kspace = torch.randn(1, 4, 32, 32, dtype=torch.complex64) * mask[:, None, None]
        out = net(kspace, mask, torch.rand(1, 32, 32))
        value = loss(out, torch.rand(1, 32, 32), torch.ones(1))
    assert torch.isfinite(value)


def test_zoo_and_train_cover_every_segmentation_network():
    archs = {e["arch"] for e in ENTRIES.values() if e["task"] == "segmentation"}
    assert archs == set(SEGMENTATION)
