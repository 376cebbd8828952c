"""The Prefect deployments against a real local Prefect API, in a copy of the tiny run.

The session's ``prefect server start`` (tests/conftest.py: temporary home and database, a
free port), then ``python -m flows.deploy`` serving the deployments from a copy of the
suite's tiny run. The whole pipeline runs through its deployment first (every stage is up
to date, so DVC skips each one, and the flow run completes); then ``prefect deployment run
'mri-ensemble-train-model/local' --param model=unet --watch`` (the documented command)
retrains unet only, an unknown model fails the flow run listing the known ones, and a
training that fails marks the flow run failed, naming the model, while the model trained
beside it finishes and keeps its results. Two more run dvc_stage with a fake dvc: a
transient failure is retried, a stage that rejected its params is not.

The retry tests need the server only (``-k retried``: about 30 s).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import copy_project
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.deployments import run_deployment
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_LOGGING_TO_API_ENABLED,
    temporary_settings,
)
from test_pipeline import env_for, tiny_params

from flows.pipeline import dvc_stage

FLOW_RUN_TIMEOUT = 600  # seconds; a tiny-profile run takes well under two minutes


def deploy_params() -> dict:
    """test_pipeline's tiny profile cut to two segmentation and one reconstruction model."""
    p = tiny_params()
    keep = ("segmentation-unet", "segmentation-attention_unet", "reconstruction-varnet")
    p["train"] = {k: p["train"][k] for k in keep}
    p["tta"] = {}  # the TTA candidate end to end: the tiny run (test_pipeline.py)
    for entry in p["train"].values():
        entry["optim"]["epochs"] = 1
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """A subprocess in a session of its own, so that stop() ends all it started."""
    with log.open("w") as out:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:  # children left in its process group (flow-run subprocesses)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_until(ok, what: str, timeout: float, procs: dict[str, tuple[subprocess.Popen, Path]]):
    deadline = time.monotonic() + timeout
    while not ok():
        for name, (proc, log) in procs.items():
            if proc.poll() is not None:
                pytest.fail(f"{name} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {n}\n{lg.read_text()[-2000:]}" for n, (_, lg) in procs.items())
            pytest.fail(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.5)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@dataclass
class Api:
    """A ``prefect server start`` of this module's: its URL, logs and a client."""

    url: str  # PREFECT_API_URL
    tmp: Path
    procs: dict[str, tuple[subprocess.Popen, Path]]

    @contextlib.contextmanager
    def settings(self) -> Iterator[None]:
        # no logs shipped from this process: none is left to send when the server stops
        updates = {PREFECT_API_URL: self.url, PREFECT_LOGGING_TO_API_ENABLED: False}
        with temporary_settings(updates=updates):
            yield

    @contextlib.contextmanager
    def client(self) -> Iterator[SyncPrefectClient]:
        with self.settings(), get_client(sync_client=True) as client:
            yield client

    def run(self, deployment: str, parameters: dict):
        """Run a deployment and wait for the end of its flow run (the Python client)."""
        with self.settings():
            return run_deployment(
                deployment, parameters=parameters, timeout=FLOW_RUN_TIMEOUT, poll_interval=1
            )

    def wait_until(self, ok, what: str, timeout: float) -> None:
        wait_until(ok, what, timeout, self.procs)

    def tail(self) -> str:
        return "\n".join(f"--- {n}\n{lg.read_text()[-4000:]}" for n, (_, lg) in self.procs.items())


@contextlib.contextmanager
def prefect_server(tmp: Path) -> Iterator[Api]:
    """``prefect server start`` with a temporary home and database on a free port."""
    port = free_port()
    home = tmp / "server-home"
    home.mkdir()
    env = {**env_for(tmp), "PREFECT_HOME": str(home)}
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{home}/prefect.db"
    env.pop("PREFECT_API_URL", None)
    log = tmp / "server.log"
    cmd = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = start(cmd, tmp, env, log)
    try:
        a = Api(f"http://127.0.0.1:{port}/api", tmp, {"prefect server": (server, log)})
        a.wait_until(lambda: healthy(a.url), "the Prefect API", 180)
        yield a
    finally:
        stop(server)


@pytest.fixture(scope="module")
def api(prefect_api: Api, tmp_path_factory) -> Api:
    """The session's Prefect server, with this module's folder and processes."""
    return Api(prefect_api.url, tmp_path_factory.mktemp("deploy"), dict(prefect_api.procs))


@dataclass
class Served:
    api: Api
    proj: Path
    env: dict[str, str]  # for prefect CLI calls against that API, in proj
    pipeline_run: object  # the id of the pipeline deployment's flow run


@pytest.fixture(scope="module")
def served(api: Api, tiny_run: Path) -> Iterator[Served]:
    """The deployments served from a copy of the suite's tiny run; its pipeline deployment
    run once (every stage up to date: DVC skips them, the flow run completes)."""
    proj = copy_project(tiny_run, api.tmp / "proj")
    # one torch thread per training, as each had in the tiny run (six at once on two
    # cores): a retraining rewrites the same bytes (not a stage param: nothing goes stale)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["scale"]["threads_per_training"] = 1
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**env_for(proj), "PREFECT_API_URL": api.url, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    log = api.tmp / "serve.log"
    serve = start([sys.executable, "-m", "flows.deploy"], proj, env, log)
    api.procs["flows.deploy"] = (serve, log)
    try:

        def both_deployed() -> bool:
            with api.client() as client:
                names = {
                    f"{client.read_flow(d.flow_id).name}/{d.name}"
                    for d in client.read_deployments(limit=10, sort="NAME_ASC")
                }
            return {"mri-ensemble-pipeline/local", "mri-ensemble-train-model/local"} <= names

        api.wait_until(both_deployed, "the served deployments", 120)
        run = api.run("mri-ensemble-pipeline/local", {})
        assert run.state is not None and run.state.is_completed(), (
            f"pipeline deployment: {run.state}\n{api.tail()}"
        )
        yield Served(api, proj, env, run.id)
    finally:
        stop(serve)


FAKE_DVC = """#!/bin/sh
# a dvc that fails: once as if MLflow's sqlite store were locked, or always as a stage that
# rejected its params (DVC exits 255 and names the stage's own status, 2)
n=$(($(cat "$FAKE_DVC_CALLS" 2>/dev/null || echo 0) + 1)); echo $n > "$FAKE_DVC_CALLS"
if [ "$FAKE_DVC_MODE" = rejected ]; then
    echo "error: params.yaml: key 'train.x.arch' should be str"
    echo "ERROR: failed to reproduce 'x': failed to run: python -m stages.x, exited with 2"
    exit 255
fi
if [ $n -eq 1 ]; then
    echo "sqlite3.OperationalError: database is locked"
    echo "ERROR: failed to reproduce 'x': failed to run: python -m stages.x, exited with 1"
    exit 255
fi
echo "Stage 'x' didn't change, skipping"
"""


def fake_dvc(tmp: Path, mode: str) -> tuple[dict[str, str], Path]:
    (tmp / "bin").mkdir()
    (tmp / "bin" / "dvc").write_text(FAKE_DVC)
    (tmp / "bin" / "dvc").chmod(0o755)
    calls = tmp / "calls"
    path = f"{tmp / 'bin'}:{os.environ['PATH']}"
    return {"PATH": path, "FAKE_DVC_MODE": mode, "FAKE_DVC_CALLS": str(calls)}, calls


def test_a_transient_stage_failure_is_retried(api: Api, tmp_path: Path, monkeypatch):
    env, calls = fake_dvc(tmp_path, "transient")
    monkeypatch.setenv("PATH", env["PATH"])  # the fake dvc, never the real one
    with api.settings():
        state = dvc_stage("no-such-stage", env, return_state=True)
    assert state.is_completed(), state.message
    assert calls.read_text().strip() == "2"


def test_a_rejected_stage_is_not_retried(api: Api, tmp_path: Path, monkeypatch):
    env, calls = fake_dvc(tmp_path, "rejected")
    monkeypatch.setenv("PATH", env["PATH"])
    with api.settings():
        state = dvc_stage("no-such-stage", env, return_state=True)
    assert state.is_failed()
    assert "StageRejected" in (state.message or "") and "should be str" in (state.message or "")
    assert calls.read_text().strip() == "1"


def mtimes(proj: Path) -> dict[str, int | None]:
    files = {
        "unet": "models/segmentation/unet/best.pt",
        "attention_unet": "models/segmentation/attention_unet/best.pt",
        "varnet": "models/reconstruction/varnet/best.pt",
        "attention_unet predictions": "data/predictions/segmentation/attention_unet/test.h5",
        "segmentation ensemble": "reports/segmentation/ensemble.json",
        "segmentation cost": "reports/segmentation/cost.json",
        "reconstruction ensemble": "reports/reconstruction/ensemble.json",
        "reconstruction cost": "reports/reconstruction/cost.json",
        "report": "reports/report.md",
    }
    return {k: (proj / f).stat().st_mtime_ns if (proj / f).exists() else None
            for k, f in files.items()}  # fmt: skip


def task_runs(served: Served, flow_run_id) -> set[str]:
    with served.api.client() as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            limit=100,
            sort="EXPECTED_START_TIME_ASC",
        )
    return {r.name for r in runs}


def test_deployment_ls_lists_both_deployments(served: Served):
    """The list endpoints answer (with fastapi 0.151-0.154 they gave 422: pyproject.toml)."""
    proc = subprocess.run(
        ["prefect", "deployment", "ls"], cwd=served.proj, env={**served.env, "COLUMNS": "200"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("mri-ensemble-pipeline/local", "mri-ensemble-train-model/local"):
        assert name in proc.stdout


def test_pipeline_deployment_runs_the_whole_dag(served: Served):
    """The served deployment ran the flow over every stage (DVC found each up to date)."""
    keys = yaml.safe_load((served.proj / "params.yaml").read_text())["train"]
    expected = {f"{s}@{k}" for k in keys for s in ("train", "evaluate")} | {
        f"{s}@{t}" for t in ("segmentation", "reconstruction") for s in ("ingest", "ensemble")
    } | {"report", "register segmentation", "register reconstruction"}  # fmt: skip
    assert expected <= task_runs(served, served.pipeline_run)
    for f in ("reports/segmentation/metrics.json", "reports/report.md"):
        assert (served.proj / f).is_file(), f


def test_train_model_deployment_retrains_that_model_only(served: Served):
    before = mtimes(served.proj)
    proc = subprocess.run(
        ["prefect", "deployment", "run", "mri-ensemble-train-model/local"]
        + ["--param", "model=unet", "--watch"],
        cwd=served.proj,
        env=served.env,
        capture_output=True,
        text=True,
        timeout=FLOW_RUN_TIMEOUT,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{out[-3000:]}\n{served.api.tail()}"
    assert "Completed" in out
    (flow_run_id,) = [ln.split("UUID:")[1].strip() for ln in out.splitlines() if "UUID:" in ln]
    with served.api.client() as client:
        run = client.read_flow_run(flow_run_id)
    assert run.state is not None and run.state.is_completed()
    assert run.parameters == {"model": "unet"}

    after = mtimes(served.proj)
    changed = {k for k in before if after[k] != before[k]}
    # the forced training rewrote the same bytes, so DVC reran nothing after it (that a
    # changed model reruns what depends on it: test_pipeline.py)
    assert changed == {"unet"}
    assert task_runs(served, run.id) == {
        "ingest+augment segmentation",
        "ingest@segmentation",
        "augment@segmentation",
        "train+evaluate segmentation-unet",
        "train@segmentation-unet",
        "evaluate@segmentation-unet",
        "tta@segmentation-unet",  # the U-Net's TTA candidate: its weights are the U-Net's
        "ensemble segmentation",
        "ensemble@segmentation",
        "distill@segmentation",
        "cost@segmentation",
        "report",
        "register segmentation",
    }


def test_unknown_model_fails_the_flow_run_listing_the_known(served: Served):
    run = served.api.run("mri-ensemble-train-model/local", {"model": "no_such_model"})
    assert run.state is not None and run.state.is_failed()
    message = run.state.message or ""
    assert "unknown model(s) ['no_such_model']" in message
    assert "'segmentation-unet'" in message and "'varnet'" in message


def test_failed_training_fails_the_run_and_keeps_the_others(served: Served):
    """unet's training is rejected while attention_unet trains beside it; varnet is left."""
    params_file = served.proj / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["train"]["segmentation-unet"]["arch"] = "no_such_net"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    before = mtimes(served.proj)
    try:
        run = served.api.run(
            "mri-ensemble-pipeline/local",
            {"models": ["unet", "segmentation-attention_unet"], "force": True},
        )
    finally:
        params_file.write_text(original)
    assert run.state is not None and run.state.is_failed()
    message = run.state.message or ""
    assert "failed for ['segmentation-unet']" in message
    assert "unknown segmentation model 'no_such_net'" in message

    after = mtimes(served.proj)
    changed = {k for k in after if after[k] != before[k]} - {"unet"}  # DVC removed its outs
    # attention_unet trained and was evaluated; no ensemble or report after a failure
    assert "attention_unet" in changed
    assert changed <= {"attention_unet", "attention_unet predictions"}
    status = subprocess.run(
        [
            "dvc",
            "status",
            "train@segmentation-attention_unet",
            "evaluate@segmentation-attention_unet",
        ],
        cwd=served.proj,
        env=served.env,
        capture_output=True,
        text=True,
    )
    assert "up to date" in status.stdout, status.stdout  # its results are in dvc.lock
    names = task_runs(served, run.id)
    assert {"train@segmentation-unet", "evaluate@segmentation-attention_unet"} <= names
    assert "evaluate@segmentation-unet" not in names and "report" not in names
