"""Where the stages' MLflow runs go, and what a tracking outage does to them (no server here:
a store that fails on cue; tests/test_team.py kills a real one)."""

from __future__ import annotations

import logging
import os
import socket
import time

import pytest

from stages.tracking import RunLogger, mlflow_run, tracking_uri


class FlakyClient:
    """An MlflowClient stand-in that refuses the first ``down`` calls."""

    def __init__(self, down: int) -> None:
        self.down, self.sent = down, []

    def _maybe_fail(self) -> None:
        if self.down > 0:
            self.down -= 1
            raise ConnectionError("Connection refused")

    def log_batch(self, run_id, metrics=(), params=()):
        self._maybe_fail()
        self.sent += [("metric", m.key, m.value, m.step, m.timestamp) for m in metrics]
        self.sent += [("param", p.key, p.value) for p in params]

    def log_artifact(self, run_id, path, artifact_path=None):
        self._maybe_fail()
        self.sent.append(("artifact", path, artifact_path))

    def set_terminated(self, run_id, status):
        self._maybe_fail()
        self.sent.append(("end", status))


def test_calls_made_while_tracking_is_down_are_sent_in_order_with_their_times(caplog):
    client = FlakyClient(down=3)
    run = RunLogger(client, "r1", "http://tracking:5000")
    with caplog.at_level(logging.INFO, logger="stages.tracking"):
        run.log_params({"lr": 0.001})  # fails: buffered
        t1 = int(time.time() * 1000)
        run.log_metrics({"loss": 1.0}, step=1)  # fails (backlog first): buffered
        time.sleep(0.01)
        run.log_metrics({"loss": 0.5}, step=2)  # fails: buffered
        assert client.sent == [] and len(run.pending) == 3
        run.log_metrics({"loss": 0.25}, step=3)  # tracking is back: everything, in order
        run.close("FINISHED", wait=0)
    assert [s[:4] for s in client.sent] == [
        ("param", "lr", "0.001"),
        ("metric", "loss", 1.0, 1),
        ("metric", "loss", 0.5, 2),
        ("metric", "loss", 0.25, 3),
        ("end", "FINISHED"),
    ]
    # each point keeps the time of its call, not the time it finally went out
    stamps = [s[4] for s in client.sent if s[0] == "metric"]
    assert abs(stamps[0] - t1) < 50 and stamps[0] < stamps[1] <= stamps[2]
    text = caplog.text
    assert "failed on params (ConnectionError: Connection refused): buffering" in text
    assert "answers again after" in text and "the buffered calls are sent" in text
    assert text.count("buffering") == 1  # said once per outage, not once per call


def test_a_backlog_that_cannot_be_sent_is_named_and_does_not_raise(caplog):
    client = FlakyClient(down=10**6)
    run = RunLogger(client, "r2", "http://tracking:5000")
    run.log_metrics({"loss": 1.0}, step=1)
    run.log_artifact("/x/best.pt", "checkpoint")
    with caplog.at_level(logging.INFO, logger="stages.tracking"):
        run.close("FINISHED", wait=1.5)  # retries with back-off for 1.5 s, then gives up
    assert client.sent == []
    errors = [r.getMessage() for r in caplog.records
              if r.levelno == logging.ERROR and r.name == "stages.tracking"]  # fmt: skip
    assert len(errors) == 1
    assert "3 call(s) of run r2 could not be sent to http://tracking:5000 within 2 s" in errors[0]
    assert "metrics (step 1), artifact best.pt, end of run" in errors[0]
    assert "next try in 1 s" in caplog.text  # it did retry


def test_a_call_the_store_refuses_is_dropped_at_once_and_the_others_go_on(tmp_path, caplog):
    """A real (sqlite) store refusing a param name: one error naming it, no retrying as if
    the store were down, the run's other calls sent and the run ended."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    run = RunLogger(client, run_id, "sqlite")
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="stages.tracking"):
        run.log_params({"weight.a+b": 0.5})  # '+': not a name MLflow takes
        run.log_metrics({"loss": 1.0}, step=1)
        run.close("FINISHED", wait=60)
    assert time.monotonic() - t0 < 30 and run.refused == ["params"] and not run.pending
    assert any("refused params" in r.getMessage() for r in caplog.records)
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED" and got.data.metrics == {"loss": 1.0}


def test_environment_wins_over_params_for_the_tracking_uri(monkeypatch):
    params = {"mlflow": {"tracking_uri": "sqlite:///mlflow.db"}}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(params) == "sqlite:///mlflow.db"
    assert tracking_uri({}) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.lab:5000")
    assert tracking_uri(params) == "http://mlflow.lab:5000"


def test_a_run_in_a_local_store_continues_and_a_foreign_run_id_starts_a_new_one(
    tmp_path, monkeypatch
):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MRI_ENSEMBLE_THREADS", "3")  # the flow's slot, recorded as a tag
    params = {"mlflow": {"experiment": "t"}}
    with mlflow_run(params, "m", {"kind": "model"}) as run:
        assert not run.resumed
        run.log_metrics({"loss": 2.0}, step=1)
    with mlflow_run(params, "m", {"kind": "model"}, run_id=run.run_id) as again:
        assert again.resumed and again.run_id == run.run_id
        again.log_metrics({"loss": 1.0}, step=2)
    client = MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(run.run_id, "loss")] == [1, 2]
    tags = client.get_run(run.run_id).data.tags
    assert tags["pid"] == str(os.getpid()) and tags["host"] == socket.gethostname()
    assert tags["threads"] == "3" and tags["kind"] == "model"
    assert client.get_run(run.run_id).info.status == "FINISHED"
    # a run id remembered from another store (e.g. before MLFLOW_TRACKING_URI was set)
    with mlflow_run(params, "m", {"kind": "model"}, run_id="0" * 32) as fresh:
        assert not fresh.resumed and fresh.run_id != "0" * 32


def test_a_failing_body_ends_the_run_failed(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(RuntimeError, match="boom"), mlflow_run({}, "m", {}) as run:
        raise RuntimeError("boom")
    assert MlflowClient(uri).get_run(run.run_id).info.status == "FAILED"


def test_the_ensemble_run_sums_what_its_members_measured(tmp_path, monkeypatch):
    """train@ remembers its measured cost beside its run id; the shipped ensemble's MLflow
    run gets the sum over the members that run, and only samples when one is unknown."""
    from stages.ensemble import ensemble_cost
    from stages.tracking import remember_run, remembered_cost

    monkeypatch.chdir(tmp_path)
    remember_run("segmentation-a", "r1", {"cpu_seconds": 10.0, "wall_seconds": 6.0})
    remember_run("segmentation-b", "r2", {"cpu_seconds": 5.0, "wall_seconds": 4.0})
    assert remembered_cost("segmentation-a") == {"cpu_seconds": 10.0, "wall_seconds": 6.0}
    samples = {"ensemble_samples_seen": 300}
    weights = {"a": 0.5, "b": 0.5, "c": 0.0}  # c does not run: its cost is not counted
    assert ensemble_cost("segmentation", samples, weights) == {
        "train_samples_seen": 300.0, "train_cpu_seconds": 15.0, "train_wall_seconds": 10.0,
    }  # fmt: skip
    weights["c"] = 0.2  # a member restored from the run-cache: no measured cost here
    assert ensemble_cost("segmentation", samples, weights) == {"train_samples_seen": 300.0}
