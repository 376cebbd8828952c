"""Tests of the report figures: valid PNGs, written atomically, clear errors."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from mri_ensemble.errors import DataError
from mri_ensemble.figures import (
    plot_gain_cost,
    plot_loss_curves,
    plot_metric_bars,
    plot_segmentation_overlays,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ("background", "RV", "myocardium", "LV")


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = mpimg.imread(path, format="png")
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert pixels.std() > 0  # something was drawn
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


def _history(n: int, offset: float, extra: str | None = None) -> list[dict[str, float]]:
    rows = []
    for epoch in range(1, n + 1):
        row = {"epoch": epoch, "train_loss": offset + 1 / epoch, "val_loss": offset + 1.2 / epoch}
        if extra:
            row[extra] = 1 - 1 / (epoch + 1)
        rows.append(row)
    return rows


@pytest.mark.parametrize("extra", [None, "val_iou", "val_ssim"])
def test_loss_curves(tmp_path: Path, extra: str | None) -> None:
    path = tmp_path / "loss.png"
    histories = {"unet": _history(5, 0.1, extra), "fpn": _history(3, 0.2, extra)}
    plot_loss_curves(histories, path, title="segmentation")
    _assert_png(path)


def test_loss_curves_rows_without_epoch_and_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "loss.png"
    path.write_bytes(b"old")
    plot_loss_curves({"unet": [{"train_loss": 1.0}, {"train_loss": 0.5}]}, path)
    _assert_png(path)


def test_loss_curves_empty_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one model"):
        plot_loss_curves({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="train_loss"):
        plot_loss_curves({"unet": [{"epoch": 1, "lr": 0.1}]}, tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_metric_bars(tmp_path: Path) -> None:
    path = tmp_path / "bars.png"
    scores = {
        "unet": {"RV": 0.8, "myocardium": 0.7, "LV": 0.9},
        "fpn": {"RV": 0.75, "myocardium": 0.72, "LV": 0.88},
        "ensemble": {"RV": 0.82, "myocardium": 0.74, "LV": 0.91},
        "threshold": {"LV": 0.4},  # missing classes leave gaps
    }
    plot_metric_bars(scores, path, ylabel="IoU", title="test IoU")
    _assert_png(path)
    with pytest.raises(ValueError, match="at least one"):
        plot_metric_bars({}, tmp_path / "empty.png", ylabel="IoU")


def test_segmentation_overlays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.random((3, 32, 40)).astype(np.float32)
    truth = np.zeros((3, 32, 40), dtype=np.uint8)
    truth[:, 8:24, 10:30] = 2
    truth[:, 12:20, 15:25] = 3
    truth[:, 8:24, 2:8] = 1
    predictions = {"unet": np.roll(truth, 2, axis=2), "ensemble": truth.astype(np.int64)}
    path = tmp_path / "overlays.png"
    plot_segmentation_overlays(images, truth, predictions, path, CLASSES)
    _assert_png(path)


def test_overlays_shape_mismatch_raises(tmp_path: Path) -> None:
    images = np.zeros((2, 16, 16), dtype=np.float32)
    truth = np.zeros((2, 16, 16), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"unet labels.*\(2, 16, 16\).*\(2, 16, 15\)"):
        plot_segmentation_overlays(
            images, truth, {"unet": np.zeros((2, 16, 15))}, tmp_path / "o.png", CLASSES
        )
    with pytest.raises(ValueError, match="truth labels"):
        plot_segmentation_overlays(images, truth[:1], {}, tmp_path / "o.png", CLASSES)
    with pytest.raises(ValueError, match=r"images \(K, H, W\)"):
        plot_segmentation_overlays(images[0], truth[0], {}, tmp_path / "o.png", CLASSES)
    with pytest.raises(ValueError, match="0..3"):
        plot_segmentation_overlays(images, truth + 4, {}, tmp_path / "o.png", CLASSES)
    assert not list(tmp_path.iterdir())


def test_gain_cost(tmp_path: Path) -> None:
    path = tmp_path / "gain_cost.png"
    points = {"unet": (1.0, 0.80), "fpn": (1.3, 0.79), "ensemble (3 models)": (3.4, 0.83)}
    plot_gain_cost(points, path, xlabel="inference time (s)", ylabel="test IoU")
    _assert_png(path)
    with pytest.raises(ValueError, match="at least one"):
        plot_gain_cost({}, tmp_path / "x.png", "x", "y")


def test_unwritable_path_raises_data_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="could not write"):
        plot_gain_cost({"a": (1.0, 1.0)}, blocker / "fig.png", "x", "y")
