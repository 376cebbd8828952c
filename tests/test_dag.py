"""The flow's stage order is dvc.yaml's, read through DVC (flows/dag.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from flows.dag import read_plan

ROOT = Path(__file__).resolve().parents[1]


def test_the_plan_of_the_default_project():
    train = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    plan = read_plan(ROOT, train)
    tasks = ("segmentation", "reconstruction")
    assert plan.data == {t: [f"ingest@{t}", f"augment@{t}"] for t in tasks}
    tta = yaml.safe_load((ROOT / "params.yaml").read_text())["tta"]  # its TTA candidate too
    assert plan.branches == {
        k: [f"train@{k}", *([f"tta@{k}"] if k in tta else []), f"evaluate@{k}"] for k in train
    }
    assert tta and set(tta) <= set(train)
    assert plan.after == {
        "segmentation": ["ensemble@segmentation", "distill@segmentation", "cost@segmentation"],
        "reconstruction": ["ensemble@reconstruction", "cost@reconstruction"],
    }
    assert plan.joins == ["report"]


def test_a_new_stage_lands_where_its_deps_put_it(tmp_path: Path):
    """A stage after one task's ensemble runs in that task's chain, after the ensemble; one
    that reads both tasks' reports runs with the report; one model fewer, one branch fewer."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    no_scm = true\n")
    dvc = yaml.safe_load((tmp_path / "dvc.yaml").read_text())
    dvc["stages"]["audit"] = {
        "cmd": "true",
        "deps": ["reports/segmentation/ensemble.json"],
        "outs": ["reports/audit.json"],
    }
    dvc["stages"]["summary"] = {
        "cmd": "true",
        "deps": ["reports/audit.json", "reports/reconstruction/metrics.json"],
        "outs": ["reports/summary.md"],
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    del params["train"]["segmentation-unet"]
    params["tta"].pop("segmentation-unet", None)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    plan = read_plan(tmp_path, params["train"])
    seg = plan.after["segmentation"]
    assert "audit" in seg and seg.index("audit") > seg.index("ensemble@segmentation")
    assert sorted(plan.joins) == ["report", "summary"]  # independent: either order
    assert "segmentation-unet" not in plan.branches
    assert all("segmentation-unet" not in s for v in plan.after.values() for s in v)
