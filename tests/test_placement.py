"""Where the flow puts its trainings (flows/placement.py): the slot plan for a given device
count, and the flow itself handing each stage process its own GPU / thread share, with at
most one training per slot at a time (a fake ``dvc`` records what each stage got)."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from flows.dag import Plan
from flows.placement import plan_slots, visible_gpus


def envs(slots):
    return [dict(s.env) for s in slots]


def test_one_training_per_gpu_round_robin():
    slots = plan_slots(5, gpus=["0", "1"], cpu_count=16)
    assert [s.name for s in slots] == ["cuda:0/0", "cuda:1/0"]
    assert envs(slots) == [
        {"CUDA_VISIBLE_DEVICES": "0", "MRI_ENSEMBLE_THREADS": "8"},
        {"CUDA_VISIBLE_DEVICES": "1", "MRI_ENSEMBLE_THREADS": "8"},
    ]


def test_trainings_per_device_fills_every_gpu_before_doubling_up():
    slots = plan_slots(3, gpus=["0", "1"], trainings_per_device=2, cpu_count=16)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1", "0"]  # 3 trainings
    slots = plan_slots(9, gpus=["0", "1"], trainings_per_device=2, cpu_count=16)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1", "0", "1"]
    assert {s.env["MRI_ENSEMBLE_THREADS"] for s in slots} == {"4"}


def test_cpu_slots_split_the_cores_or_run_a_fixed_thread_count():
    assert envs(plan_slots(10, gpus=[], cpu_count=2)) == [{"MRI_ENSEMBLE_THREADS": "1"}] * 10
    assert (
        envs(plan_slots(10, gpus=[], parallel=2, cpu_count=16))
        == [{"MRI_ENSEMBLE_THREADS": "8"}] * 2
    )
    # a fixed thread count does not follow the slots: same bytes at any `parallel`
    for parallel in (1, 2):
        assert (
            envs(plan_slots(10, gpus=[], parallel=parallel, threads_per_training=1, cpu_count=16))
            == [{"MRI_ENSEMBLE_THREADS": "1"}] * parallel
        )
    assert (
        envs(plan_slots(3, gpus=[], threads_per_training=4, cpu_count=16))
        == [{"MRI_ENSEMBLE_THREADS": "4"}] * 3
    )
    assert len(plan_slots(2, gpus=[], parallel=4, cpu_count=16)) == 2  # never idle slots
    # device: cpu ignores the GPUs
    assert (
        envs(plan_slots(2, device="cpu", gpus=["0"], cpu_count=4))
        == [{"MRI_ENSEMBLE_THREADS": "2"}] * 2
    )
    assert plan_slots(0, gpus=["0"]) == []


@pytest.mark.parametrize(
    "bad", [{"trainings_per_device": 0}, {"parallel": -1}, {"threads_per_training": -1}]
)
def test_bad_scale_params_are_refused(bad):
    with pytest.raises(ValueError, match="scale."):
        plan_slots(3, gpus=["0"], **bad)


@pytest.mark.parametrize(
    "listed, ids",
    [("0,2", ["0", "2"]), ("", []), ("-1", []), ("1,-1,2", ["1"]), (" GPU-ab12 ", ["GPU-ab12"])],
)
def test_visible_gpus_follow_cuda_visible_devices(listed, ids):
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": listed}, count=8) == ids


def test_visible_gpus_without_the_variable_counts_devices():
    assert visible_gpus({}, count=3) == ["0", "1", "2"]
    assert visible_gpus({}, count=0) == []


FAKE_DVC = """#!/bin/sh
# records each stage with the env the flow gave it; a training takes a moment
stage="$4"
start=$(python3 -c 'import time; print(time.time())')
case "$stage" in train@*) sleep 0.6 ;; esac
end=$(python3 -c 'import time; print(time.time())')
printf '{"stage": "%s", "gpu": "%s", "threads": "%s", "start": %s, "end": %s, "ppid": %s}\\n' \\
  "$stage" "${CUDA_VISIBLE_DEVICES-unset}" "${MRI_ENSEMBLE_THREADS-unset}" "$start" "$end" \\
  "$PPID" >> "$FAKE_DVC_LOG"
"""


@pytest.fixture(scope="module")
def api(prefect_api):
    """The session's Prefect server (an ephemeral API per flow run is slower)."""
    return prefect_api


@pytest.fixture()
def fake_project(tmp_path, monkeypatch, api):
    """A project folder for the flow: params with four models, a fake dvc on PATH, the
    registry step skipped (nothing is trained), MLflow in a temporary sqlite store."""
    import flows.pipeline as fp

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "dvc").write_text(FAKE_DVC)
    (tmp_path / "bin" / "dvc").chmod(0o755)
    (tmp_path / "reports" / "figures").mkdir(parents=True)
    (tmp_path / "reports" / "report.md").write_text("# report\n")
    train = {
        f"segmentation-m{i}": {"task": "segmentation", "model": f"m{i}", "arch": "unet"}
        for i in range(4)
    }
    params = {"device": "auto", "train": train, "scale": {}, "cost": {},
              "mlflow": {"experiment": "placement"}}  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setattr(fp, "ROOT", tmp_path)
    monkeypatch.setattr(fp, "register", lambda t: 0)
    # the DAG of these four models as dvc.yaml would give it (no dvc.yaml here: a fake dvc)
    plan = Plan({"segmentation": ["ingest@segmentation", "augment@segmentation"]},
                {k: [f"train@{k}", f"evaluate@{k}"] for k in train},
                {"segmentation": ["ensemble@segmentation"]}, ["report"])  # fmt: skip
    monkeypatch.setattr(fp, "read_plan", lambda root, entries: plan)
    every = [*plan.data["segmentation"], *(s for b in plan.branches.values() for s in b),
             *plan.after["segmentation"], *plan.joins]  # fmt: skip
    monkeypatch.setattr(fp, "stale_stages", lambda root: every)  # the fake dvc runs each
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DVC_LOG", str(tmp_path / "dvc.log"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    def run(scale: dict, **flow_kwargs) -> list[dict]:
        params["scale"] = scale
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        log = tmp_path / "dvc.log"
        log.unlink(missing_ok=True)
        with api.settings():
            fp.pipeline(**flow_kwargs)
        return [json.loads(line) for line in log.read_text().splitlines()]

    return run


def most_at_once(records: list[dict], key=lambda r: True) -> int:
    spans = [(r["start"], r["end"]) for r in records if r["stage"].startswith("train@") and key(r)]
    return max(sum(s <= t < e for s, e in spans) for t, _ in spans)


def test_the_flow_gives_each_training_its_own_gpu(fake_project, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # two GPUs, whatever torch sees
    records = fake_project({"trainings_per_device": 1})
    by_stage = {r["stage"]: r for r in records}
    for i in range(4):
        train, evaluate = (
            by_stage[f"train@segmentation-m{i}"],
            by_stage[f"evaluate@segmentation-m{i}"],
        )
        assert train["gpu"] in {"0", "1"} and evaluate["gpu"] == train["gpu"]  # fmt: skip
    assert most_at_once(records) == 2  # both GPUs busy, never a third training
    for gpu in ("0", "1"):
        assert most_at_once(records, lambda r, g=gpu: r["gpu"] == g) == 1
    # ingest, augment and the stages after training see every GPU, as the user set them
    assert by_stage["ingest@segmentation"]["gpu"] == "0,1"
    assert by_stage["report"]["gpu"] == "0,1" and by_stage["report"]["threads"] == "unset"

    records = fake_project({"trainings_per_device": 2})
    assert most_at_once(records) == 4
    assert all(most_at_once(records, lambda r, g=g: r["gpu"] == g) == 2 for g in ("0", "1"))


def test_the_flow_on_cpu_runs_parallel_trainings_with_their_thread_count(fake_project, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU
    cores = os.cpu_count() or 1
    records = fake_project({"parallel": 2})  # the cores split
    trains = [r for r in records if r["stage"].startswith("train@")]
    assert len(trains) == 4 and {r["threads"] for r in trains} == {str(max(1, cores // 2))}
    assert most_at_once(records) == 2
    records = fake_project({"parallel": 2, "threads_per_training": 1})
    trains = [r for r in records if r["stage"].startswith("train@")]
    assert {r["threads"] for r in trains} == {"1"}
    records = fake_project({"parallel": 2}, parallel=1)  # the flow's parameter wins
    assert most_at_once(records) == 1


def test_a_local_dask_cluster_runs_the_branches_in_its_worker_processes(fake_project, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    records = fake_project({"parallel": 2}, cluster="local")
    trains = [r for r in records if r["stage"].startswith("train@")]
    assert len(trains) == 4 and most_at_once(records) <= 2
    workers = {r["ppid"] for r in trains}
    assert os.getpid() not in workers and 1 <= len(workers) <= 2  # the LocalCluster's two
    assert {r["ppid"] for r in records if r["stage"] == "report"} == {os.getpid()}
