"""Distillation (distill@<task>): the student's targets, its training against a fixed
teacher, and the stage's params checks and gain arithmetic.

The pipeline run of the stage (student checkpoint, scores, cost, report, predict serving
``--model student``) is in tests/test_pipeline.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mri_ensemble import inference
from mri_ensemble.data.prepared import SoftTargetDataset, read_segmentation_h5
from mri_ensemble.data.prepared import write_segmentation_arrays as write_set
from mri_ensemble.errors import ConfigError, DataError
from mri_ensemble.tasks import get_task
from mri_ensemble.train import TrainConfig, fit
from stages.distill import alpha_of, comparison, init_of, student_entry

K = 4


class Fixed(nn.Module):
    """A teacher member: fixed logits from a 1x1 convolution of the image."""

    def __init__(self, scale: float, bias: list[float]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, K, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.linspace(-scale, scale, K).reshape(K, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def make_split(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(n, 16, 16)).astype(np.float32)
    label = rng.integers(0, K, size=(n, 16, 16)).astype(np.uint8)
    case = [f"p{i // 2}" for i in range(n)]
    write_set(path, image, label, case, {"class_names": '["background", "a", "b", "c"]'})
    return path


def teacher() -> inference.Predictor:
    members = [
        inference.Member("a", Fixed(2.0, [0.0, 0.5, 0.0, -0.5]), 1.0),
        inference.Member("b", Fixed(-1.0, [0.3, 0.0, 0.0, 0.0]), 3.0),
    ]
    return inference.Predictor(
        "segmentation", members, {}, class_names=["background", "a", "b", "c"]
    )


ENTRY = {"task": "segmentation", "model": "student", "arch": "unet",
         "net": {"features": [4, 8]}, "loss": "dice_ce"}  # fmt: skip


def teacher_probabilities(images: np.ndarray) -> np.ndarray:
    t = teacher()
    x = torch.from_numpy(images[:, None])
    with torch.no_grad():
        pa = torch.softmax(t.members[0].model(x), 1)
        pb = torch.softmax(t.members[1].model(x), 1)
    return (0.25 * pa + 0.75 * pb).numpy()  # weights 1 : 3


def test_soft_targets_blend_the_teacher_and_the_labels(tmp_path: Path):
    data = read_segmentation_h5(make_split(tmp_path / "t.h5", 4, 0))
    soft = teacher_probabilities(data.image)
    hard = np.eye(K, dtype=np.float32)[data.label].transpose(0, 3, 1, 2)
    for alpha, want in ((1.0, soft), (0.0, hard), (0.25, 0.25 * soft + 0.75 * hard)):
        ds = SoftTargetDataset(data, soft, alpha)
        image, target = ds[2]
        assert image.shape == (1, 16, 16) and target.shape == (K, 16, 16)
        np.testing.assert_allclose(target.numpy(), want[2], atol=1e-6)
        np.testing.assert_allclose(target.sum(0).numpy(), 1.0, atol=1e-5)
    with pytest.raises(DataError, match="do not match 4 slices"):
        SoftTargetDataset(data, soft[:3], 0.5)
    with pytest.raises(ValueError, match="alpha"):
        SoftTargetDataset(data, soft, 1.5)


def test_the_task_distils_the_fused_ensemble_and_validates_on_labels(tmp_path: Path):
    train, val = make_split(tmp_path / "train.h5", 6, 1), make_split(tmp_path / "val.h5", 4, 2)
    task = get_task("segmentation")
    spec, loss_fn, dataset, validate = task.distillation(ENTRY, train, val, 0, teacher(), 1.0)
    assert spec.out_channels == K and len(dataset) == 6
    want = teacher_probabilities(read_segmentation_h5(train).image)  # weights 1 : 3, fused
    np.testing.assert_allclose(dataset[4][1].numpy(), want[4], atol=1e-5)
    assert {"val_loss", "val_iou", "val_dice"} <= set(validate(spec.build(), torch.device("cpu")))
    with pytest.raises(ConfigError, match="multi-class loss, not 'bce'"):
        task.distillation({**ENTRY, "loss": "bce"}, train, val, 0, teacher(), 1.0)
    with pytest.raises(ConfigError, match="not available for reconstruction"):
        get_task("reconstruction").distillation(ENTRY, train, val, 0, teacher(), 1.0)


def kl_to_teacher(model: nn.Module, images: np.ndarray, soft: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.from_numpy(images[:, None])), 1)
    t = torch.from_numpy(soft)
    return float((t * (torch.log(t.clamp_min(1e-8)) - logp)).sum(1).mean())


def test_distillation_against_a_fixed_teacher_reduces_the_distance_to_it(tmp_path: Path):
    """Known answer: trained on the teacher's probabilities alone (alpha 1), the student's
    KL divergence from the teacher on the training images falls, and fine-tuning from
    given weights (``init``) starts from exactly them."""
    train, val = make_split(tmp_path / "train.h5", 8, 3), make_split(tmp_path / "val.h5", 4, 4)
    task = get_task("segmentation")
    spec, _, dataset, validate = task.distillation(ENTRY, train, val, 0, teacher(), 1.0)
    images = read_segmentation_h5(train).image
    soft = teacher_probabilities(images)
    torch.manual_seed(0)
    start = spec.build()
    before = kl_to_teacher(start, images, soft)
    cfg = TrainConfig(epochs=30, batch_size=8, lr=0.01, patience=30, seed=0, device="cpu")
    loss = nn.CrossEntropyLoss()  # against soft targets: KL to the teacher plus its entropy
    fit(spec, dataset, lambda out, target: loss(out, target), validate, cfg,
        tmp_path / "work", {"test": 1}, progress=False, init=start.state_dict())  # fmt: skip
    student = torch.load(tmp_path / "work" / "last.pt", weights_only=False)
    trained = spec.build()
    trained.load_state_dict(student["state_dict"])
    after = kl_to_teacher(trained, images, soft)
    assert after < 0.5 * before, (before, after)

    one = TrainConfig(epochs=1, batch_size=8, lr=1e-12, patience=1, seed=0, device="cpu")
    fit(spec, dataset, lambda out, target: loss(out, target), validate, one,
        tmp_path / "w2", {"test": 2}, progress=False, init=trained.state_dict())  # fmt: skip
    again = torch.load(tmp_path / "w2" / "last.pt", weights_only=False)["state_dict"]
    for k, v in trained.named_parameters():  # lr ~ 0: the given weights, not a fresh start
        torch.testing.assert_close(again[k], v.detach(), atol=1e-6, rtol=0)  # (BN stats move)


def params(distill: dict, models: tuple[str, ...] = ("unet", "resnet34_unet")) -> dict:
    train = {f"segmentation-{m}": {"task": "segmentation", "model": m, "arch": m,
             "optim": {"epochs": 12, "lr": 0.001}} for m in models}  # fmt: skip
    return {"train": train, "distill": {"segmentation": distill}}


def test_the_student_entry_is_the_named_or_best_model_with_its_own_optim(tmp_path: Path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"models": {"unet": {"val": {"iou": 0.8}}, "resnet34_unet": '
                       '{"val": {"iou": 0.9}}}}')  # fmt: skip
    source, entry = student_entry(params({"optim": {"epochs": 3}}), "segmentation", metrics)
    assert source == "resnet34_unet" and entry["model"] == "student"
    assert entry["arch"] == "resnet34_unet" and entry["optim"] == {"epochs": 3, "lr": 0.001}
    source, entry = student_entry(params({"student": "unet"}), "segmentation", metrics)
    assert source == "unet" and entry["optim"] == {"epochs": 12, "lr": 0.001}
    with pytest.raises(ConfigError, match="'fpn' is not a segmentation model of train"):
        student_entry(params({"student": "fpn"}), "segmentation", metrics)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['temperature'\]"):
        student_entry(params({"temperature": 2}), "segmentation", metrics)
    with pytest.raises(ConfigError, match="the name 'student' is the distilled model's"):
        student_entry(params({}, ("unet", "student")), "segmentation", metrics)
    with pytest.raises(DataError, match="missing; run ensemble@segmentation first"):
        student_entry(params({}), "segmentation", tmp_path / "none.json")
    assert alpha_of(params({}), "segmentation") == 0.5
    with pytest.raises(ConfigError, match="alpha should be in"):
        alpha_of(params({"alpha": 2}), "segmentation")
    assert init_of(params({"init": "trained"}), "segmentation") == "trained"
    with pytest.raises(ConfigError, match="init should be one of trained, scratch"):
        init_of(params({"init": "imagenet"}), "segmentation")


def test_gain_kept_is_the_students_share_of_the_ensembles_gain():
    metrics = {
        "models": {"a": {"val": {"iou": 0.8}, "test": {"iou": 0.80}, "shift": {"iou": 0.7}},
                   "b": {"val": {"iou": 0.7}, "test": {"iou": 0.90}, "shift": {"iou": 0.6}}},
        "ensemble": {"test": {"iou": 0.84}, "shift": {"iou": 0.65}},
    }  # fmt: skip
    out = comparison({"test": {"iou": 0.83}, "shift": {"iou": 0.72}}, metrics, "iou")
    assert out["best_single_model"] == "a"  # best on val, not on test
    assert out["splits"]["test"]["gain_kept"] == pytest.approx(0.75)  # 0.03 of 0.04
    assert out["splits"]["test"]["best_single"] == 0.80
    assert math.isnan(out["splits"]["shift"]["gain_kept"])  # the ensemble lost there
