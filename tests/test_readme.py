"""The README's results come from the committed metrics: its blocks between
``<!-- results:begin <task> -->`` and ``<!-- results:end <task> -->`` are exactly what
``stages.report`` generates from ``reports/<task>/metrics.json`` and ``cost.json``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mri_ensemble.errors import DataError
from stages.report import readme_blocks, results_block, sync_readme, val_guarantees

ROOT = Path(__file__).resolve().parents[1]


def test_readme_results_are_the_committed_metrics():
    blocks = readme_blocks(ROOT / "reports")
    assert set(blocks) == {"segmentation", "reconstruction", "methods", "trust", "distill", "tta"}
    stale = sync_readme(ROOT / "README.md", blocks, check=True)
    assert not stale, (
        f"README results of {stale} differ: python -m stages.report --readme README.md"
    )
    assert not val_guarantees(ROOT / "reports")


def test_a_changed_metric_makes_the_block_stale(tmp_path: Path):
    shutil.copytree(ROOT / "reports", tmp_path / "reports", ignore=shutil.ignore_patterns("*.png"))
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    path = tmp_path / "reports/segmentation/metrics.json"
    metrics = json.loads(path.read_text())
    metrics["ensemble"]["test"]["iou"] -= 0.001
    path.write_text(json.dumps(metrics))
    assert sync_readme(readme, readme_blocks(tmp_path / "reports"), check=True) == ["segmentation"]
    assert readme.read_text() == (ROOT / "README.md").read_text(), "--check writes nothing"
    assert sync_readme(readme, readme_blocks(tmp_path / "reports"), check=False) == ["segmentation"]
    assert sync_readme(readme, readme_blocks(tmp_path / "reports"), check=True) == []
    metrics["ensemble"]["val"]["iou"] = 0.0
    path.write_text(json.dumps(metrics))
    assert val_guarantees(tmp_path / "reports")[0].startswith(f"{path}: ensemble val iou 0.0 <")


def test_gains_are_computed_from_unrounded_values():
    """+0.0049 - 0.0046 rounds to +0.0004 from the unrounded values, not +0.0003 (rounded)."""
    scores = {"iou": 0.0, "dice": 0.0}
    metrics = {
        "models": {
            "a": {"params": 10, "val": {"iou": 0.80}, "test": {"iou": 0.80046, "dice": 0.9}},
            "b": {"params": 30, "val": {"iou": 0.70}, "test": {"iou": 0.70, "dice": 0.8}},
        },
        "ensemble": {
            "method": "random",
            "weights": {"a": 0.75, "b": 0.25},
            "val": {"iou": 0.81},
            "test": {"iou": 0.80084, "dice": 0.91},
        },  # fmt: skip
        "methods": {"mean": {"val": scores, "test": {"iou": 0.79, "dice": 0.85}}},
        "baselines": {},
    }
    block = results_block("segmentation", metrics, None)
    assert "changes test IoU by +0.0004 (0.8008 vs 0.8005) for 4.00x its parameters" in block
    assert "The unweighted mean of all 2 changes test IoU by -0.0105." in block
    assert "| **ensemble** (random: a 0.75, b 0.25) | 40 | 0.8100 | 0.8008 | 0.9100 |" in block


def test_a_readme_without_markers_is_one_error(tmp_path: Path):
    readme = tmp_path / "README.md"
    readme.write_text("# no results here\n")
    with pytest.raises(DataError, match="no '<!-- results:begin segmentation -->'"):
        sync_readme(readme, {"segmentation": "x"}, check=True)
