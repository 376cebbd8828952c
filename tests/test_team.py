"""A team's set-up, for real on 127.0.0.1: PostgreSQL, an MLflow tracking server on it
(artifacts through the server), a Prefect server, an S3 DVC remote (moto's S3 server), and
a Dask scheduler with two workers, each in its own git clone of the project.

The tiny-profile flow runs once, its trainings on the Dask workers and everything else in
the project (the head), against all of these servers; the worker training the U-Net is
killed mid-training. Then ``dvc push --run-cache`` and a commit of dvc.lock (what a
colleague clones). Checked: the other worker resumed the U-Net's MLflow run and the head
restored every branch from the run-cache; a local retraining of each branch writes the
workers' bytes; MLflow holds every run, per-epoch point and artifact; Prefect holds the flow
run and its task runs; two fresh clones get the outputs with ``dvc pull`` and ``dvc repro
--pull`` without training anything, predict and the UI work there, and the registry's
champion holds the DVC-tracked checkpoints. A training whose tracking server is killed and
restarted mid-run finishes and loses no point; one whose server is not there at all fails
at once with one line (exit status 1, which the flow retries).

Needs Debian's ``postgresql`` and the ``team`` extra (``pip install -e '.[team]'``); with
``CI`` set a missing piece fails instead of skipping. About 6 minutes on 2 cores (363 s alone).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import copy_project
from test_deploy import Api, deploy_params, free_port, prefect_server, start, stop, wait_until
from test_pipeline import ROOT, env_for

from flows.services import Postgres, ServiceError, mlflow_server_cmd, mlflow_server_env, pg_bin

EPOCHS = 2
BUCKET = "mri-ensemble"
AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _missing() -> str | None:
    try:
        pg_bin()
        import boto3  # noqa: F401
        import dvc_s3  # noqa: F401
        import moto  # noqa: F401
        import psycopg2  # noqa: F401
    except (ServiceError, ImportError) as exc:
        return f"team services unavailable ({exc}); apt-get install postgresql, pip install -e '.[team]'"
    return None


if (why := _missing()) is not None:
    if os.environ.get("CI"):
        raise RuntimeError(why)  # CI installs both (.ci/run): a missing one is a failure
    pytest.skip(why, allow_module_level=True)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@dataclass
class Team:
    tmp: Path
    pg: Postgres
    mlflow_url: str
    s3_url: str
    prefect: Api
    procs: dict  # name -> (Popen, log)
    mlflow_port: int

    def env(self, cwd: Path) -> dict[str, str]:
        return {
            **env_for(cwd),
            **AWS,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "PREFECT_API_URL": self.prefect.url,
            "PREFECT_HOME": str(self.tmp / "client-prefect-home"),  # outside the clones
        }

    def start_mlflow(self) -> None:
        artifacts = self.tmp / "mlartifacts"
        artifacts.mkdir(exist_ok=True)
        log = self.tmp / f"mlflow-{len(self.procs)}.log"
        cmd = mlflow_server_cmd(self.pg.uri, artifacts, port=self.mlflow_port, workers=2)
        self.procs["mlflow server"] = (start(cmd, self.tmp, mlflow_server_env(self.pg), log), log)
        wait_until(lambda: http_ok(f"{self.mlflow_url}/health"), "MLflow", 120, self.procs)

    def stop_mlflow(self) -> None:
        stop(self.procs.pop("mlflow server")[0])

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.mlflow_url)


@pytest.fixture(scope="module")
def team() -> Iterator[Team]:
    # PostgreSQL runs as the postgres user when this is root: a folder that user can reach
    tmp = Path(tempfile.mkdtemp(prefix="mri-ensemble-team-"))
    tmp.chmod(0o755)
    pg = Postgres(tmp / "pg" / "postgres", port=free_port())
    procs: dict = {}
    try:
        pg.start()
        s3_port = free_port()
        s3_log = tmp / "moto.log"
        moto = Path(sys.executable).with_name("moto_server")
        procs["moto"] = (start([str(moto), "-H", "127.0.0.1", "-p", str(s3_port)], tmp,
                               dict(os.environ), s3_log), s3_log)  # fmt: skip
        s3_url = f"http://127.0.0.1:{s3_port}"
        wait_until(lambda: http_ok(f"{s3_url}/moto-api/"), "moto S3", 60, procs)
        import boto3

        boto3.client("s3", endpoint_url=s3_url, **_boto_creds()).create_bucket(Bucket=BUCKET)
        with prefect_server(tmp) as prefect:
            port = free_port()
            t = Team(tmp, pg, f"http://127.0.0.1:{port}", s3_url, prefect, procs, port)
            t.start_mlflow()
            yield t
    finally:
        for proc, _ in procs.values():
            stop(proc)
        try:
            pg.stop()
        finally:
            if not os.environ.get("KEEP_TEAM_TMP"):
                shutil.rmtree(tmp, ignore_errors=True)


def _boto_creds() -> dict[str, str]:
    return {
        "aws_access_key_id": AWS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS["AWS_SECRET_ACCESS_KEY"],
        "region_name": AWS["AWS_DEFAULT_REGION"],
    }


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 900):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")  # fmt: skip
    return proc


def team_params() -> dict:
    p = deploy_params()  # two segmentation models and VarNet, tiny
    for entry in p["train"].values():
        entry["optim"]["epochs"] = EPOCHS
    # one torch thread per training everywhere: the Dask workers (one training each) then
    # write the bytes of the local three-at-once run
    p["scale"]["threads_per_training"] = 1
    # a U-Net whose epoch lasts a few seconds, so that the cluster test catches the first
    # checkpoint before the second (the tiny one's epoch takes a fraction of a second)
    p["train"]["segmentation-unet"]["net"]["features"] = [32, 64, 128]
    return p


GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]


@dataclass
class Origin:
    team: Team
    proj: Path  # the head: the project that ran the flow, pushed and committed
    env: dict[str, str]
    workers: dict[str, tuple[Path, Path]]  # Dask worker name -> (its clone, its log)
    flow_log: str
    dead: str  # the worker killed while it trained the U-Net


def new_project(team: Team) -> tuple[Path, dict[str, str]]:
    """A git project with the team's S3 DVC remote, committed, nothing run yet."""
    proj = team.tmp / "origin"
    proj.mkdir()
    for name in ("mri_ensemble", "stages", "flows"):
        shutil.copytree(ROOT / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore", "pyproject.toml"):
        shutil.copy(ROOT / name, proj)
    (proj / "params.yaml").write_text(yaml.safe_dump(team_params(), sort_keys=False))
    env = team.env(proj)
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        # the README's commands for an S3 remote (endpointurl: only for a non-AWS S3)
        ["dvc", "remote", "add", "-d", "team", f"s3://{BUCKET}/dvc"],
        ["dvc", "remote", "modify", "team", "endpointurl", team.s3_url],
        ["git", "add", "-A"],
        [*GIT, "commit", "-qm", "project"],
    ):
        run(cmd, proj, env)
    return proj, env


def start_worker(name: str, clone: Path, log: Path, scheduler: str) -> subprocess.Popen:
    """``dask worker`` in its own clone: one training at a time (``GPU=1``)."""
    env = {**env_for(clone), **AWS, "PYTHONPATH": str(clone),
           "PREFECT_HOME": str(clone.parent / f"{name}-prefect-home")}  # fmt: skip
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):  # the head hands both over
        env.pop(key, None)
    cmd = [str(Path(sys.executable).with_name("dask")), "worker", scheduler,
           "--nthreads", "1", "--resources", "GPU=1", "--name", name, "--no-dashboard"]  # fmt: skip
    return start(cmd, clone, env, log)


def victim(team: Team, workers: dict[str, tuple[Path, Path]]) -> str | None:
    """The worker training the U-Net, once its run holds a shared checkpoint."""
    client = team.client()
    exp = client.get_experiment_by_name("mri-ensemble")
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'unet' and "
                              "attributes.status = 'RUNNING'")  # fmt: skip
    if not any(client.list_artifacts(r.info.run_id, "resume") for r in runs):
        return None
    for name, (clone, _) in workers.items():
        if (clone / ".resume/segmentation/unet").is_dir():
            return name
    return None


@pytest.fixture(scope="module")
def origin(team: Team) -> Origin:
    """The project's one flow run: the trainings on a Dask scheduler's two workers (each in
    a git clone of the project), the rest here, all against the team's servers. The worker
    training the U-Net is killed (nanny, worker, its dvc and training: the machine is gone)
    once its run holds a shared checkpoint. Then ``dvc push --run-cache`` and a commit of
    dvc.lock (what a colleague clones)."""
    proj, env = new_project(team)
    tmp = team.tmp
    workers = {}
    for name in ("w1", "w2"):
        run([*GIT, "clone", "-q", str(proj), str(tmp / name)], tmp, env)
        workers[name] = (tmp / name, tmp / f"{name}.log")
    scheduler = f"tcp://127.0.0.1:{free_port()}"
    procs: dict = {}
    dask = str(Path(sys.executable).with_name("dask"))
    log = tmp / "scheduler.log"
    flow_log = tmp / "cluster-flow.log"
    flow = None
    killed: list[str] = []
    try:
        procs["scheduler"] = (start([dask, "scheduler", "--host", "127.0.0.1", "--port",
                                     scheduler.rsplit(":", 1)[1], "--no-dashboard"], tmp,
                                    env_for(tmp), log), log)  # fmt: skip
        for name, (clone, wlog) in workers.items():
            procs[name] = (start_worker(name, clone, wlog, scheduler), wlog)
        wait_until(lambda: all("Registered to" in lg.read_text() for _, lg in workers.values()),
                   "two Dask workers", 120, procs)  # fmt: skip
        flow = start([sys.executable, "-m", "flows.pipeline", "--cluster", scheduler],
                     proj, env, flow_log)  # fmt: skip
        deadline = time.monotonic() + 600
        while not killed:  # polled often: the kill must land before the training ends
            if flow.poll() is not None:
                pytest.fail("the flow ended first:\n" + flow_log.read_text()[-3000:])
            if time.monotonic() > deadline:
                pytest.fail("no checkpointed epoch in 600 s")
            name = victim(team, workers)
            if name is not None:  # at once: the second epoch takes a few seconds
                worker, _ = procs.pop(name)
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
                killed.append(name)
            time.sleep(0.05)
        if flow.wait(timeout=900) != 0:
            pytest.fail("the cluster flow failed:\n" + flow_log.read_text()[-4000:])
    finally:
        if flow is not None:
            stop(flow)
        for proc, _ in procs.values():
            stop(proc)
    run(["dvc", "push", "--run-cache"], proj, env)
    run(["git", "add", "-A"], proj, env)
    run([*GIT, "commit", "-qm", "trained"], proj, env)
    return Origin(team, proj, env, workers, flow_log.read_text(), killed[0])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_keys(proj: Path) -> dict[str, tuple[str, str]]:
    p = yaml.safe_load((proj / "params.yaml").read_text())
    return {k: (e["task"], e["model"]) for k, e in p["train"].items()}


def test_the_mlflow_server_runs_no_job_processes(team: Team):
    """Job execution off (flows.services.mlflow_server_env): the server's session holds its
    gunicorn workers and no Huey consumer or job runner."""
    proc, _ = team.procs["mlflow server"]
    ps = subprocess.run(["ps", "-o", "args=", "-s", str(proc.pid)], capture_output=True, text=True)
    procs = ps.stdout.splitlines()
    assert any("mlflow" in p for p in procs), procs
    assert not [p for p in procs if "huey" in p or "_job_runner" in p], procs


def test_mlflow_server_holds_every_run_point_and_artifact(origin: Origin):
    client = origin.team.client()
    exp = client.get_experiment_by_name("mri-ensemble")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_name: dict[str, list] = {}
    for r in runs:
        by_name.setdefault(r.info.run_name, []).append(r)
    (parent,) = by_name.pop("pipeline")
    assert parent.info.status == "FINISHED"
    assert all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
               for rs in by_name.values() for r in rs)  # fmt: skip
    # one run per model, each with every epoch's points, its checkpoint byte for byte
    points = 0
    for key, (task, model) in model_keys(origin.proj).items():
        (r,) = [r for r in by_name[model] if r.data.tags.get("task") == task]
        assert r.info.status == "FINISHED", key
        history = json.loads((origin.proj / f"models/{task}/{model}/history.json").read_text())
        assert len(history) == EPOCHS
        for metric in ("train_loss", "val_loss"):
            steps = [m.step for m in client.get_metric_history(r.info.run_id, metric)]
            assert sorted(steps) == list(range(1, EPOCHS + 1)), (key, metric, steps)
            points += len(steps)
        assert {"best_val_loss", "test_" + ("iou" if task == "segmentation" else "ssim")} <= set(
            r.data.metrics
        )
        got = Path(client.download_artifacts(r.info.run_id, "checkpoint/best.pt",
                                             str(origin.team.tmp / "dl" / key)))  # fmt: skip
        assert sha(got) == sha(origin.proj / f"models/{task}/{model}/best.pt"), key
    assert points == 2 * EPOCHS * len(model_keys(origin.proj))
    # one run per ensemble method and task; the report and figures on the parent run
    methods = [n for n in by_name if n.startswith("ensemble-")]
    assert methods and all(r.info.status == "FINISHED" for n in methods for r in by_name[n])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "figures"} <= artifacts
    figures = client.list_artifacts(parent.info.run_id, "figures")
    assert len(figures) >= 4 and all(f.path.endswith(".png") for f in figures)
    # the artifacts went through the server: nothing was written beside the project
    assert not (origin.proj / "mlruns").exists() and not (origin.proj / "mlartifacts").exists()
    assert any((origin.team.tmp / "mlartifacts").rglob("best.pt"))


def test_prefect_server_holds_the_flow_run_and_its_task_runs(origin: Origin):
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterId,
    )

    with origin.team.prefect.client() as client:
        (flow_run,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["mri-ensemble-pipeline"]))
        )
        assert flow_run.state is not None and flow_run.state.is_completed()
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])), limit=200
        )
    done = {t.name for t in runs if t.state is not None and t.state.is_completed()}
    expected = {f"train@{k}" for k in model_keys(origin.proj)} | {
        "ingest@segmentation", "ensemble@reconstruction", "report", "register segmentation"
    }  # fmt: skip
    assert expected <= done, expected - done
    # the one task run left unfinished: the U-Net's training on the worker that died
    unfinished = [(t.name, t.state_name) for t in runs
                  if t.state is None or not t.state.is_completed()]  # fmt: skip
    assert [n for n, _ in unfinished] in ([], ["train@segmentation-unet"]), unfinished


def clone(origin: Origin, name: str) -> tuple[Path, dict[str, str]]:
    dest = origin.team.tmp / name
    run(["git", "clone", "-q", str(origin.proj), str(dest)], origin.team.tmp, origin.env)
    return dest, origin.team.env(dest)


def test_a_fresh_clone_pulls_every_output_and_trains_nothing(origin: Origin, monkeypatch):
    proj, env = clone(origin, "colleague")
    assert not any(proj.rglob("best.pt"))  # git holds only dvc.lock and .gitignore files
    run(["dvc", "pull"], proj, env)
    status = run(["dvc", "status"], proj, env).stdout
    assert "Data and pipelines are up to date" in status, status
    repro = run(["dvc", "repro"], proj, env)
    assert "Running stage" not in repro.stdout + repro.stderr, repro.stdout
    for task, model in model_keys(proj).values():
        f = f"models/{task}/{model}/best.pt"
        assert sha(proj / f) == sha(origin.proj / f), f

    # predict with the pulled ensemble, on a scan it has never seen
    from mri_ensemble.data.phantom import write_acdc_phantom

    (patient,) = write_acdc_phantom(proj / "scans", 1, seed=99, first_id=950, write_4d=False)
    scan = sorted(patient.glob("patient950_frame*.nii.gz"))
    scan = [s for s in scan if not s.name.endswith("_gt.nii.gz")][0]
    out = proj / "pred" / "labels.nii.gz"
    run(["mri-ensemble", "predict", "--task", "segmentation", "--input", str(scan),
         "--output", str(out), "--device", "cpu", "--no-progress"], proj, env)  # fmt: skip
    import nibabel as nib

    assert nib.load(out).shape == nib.load(scan).shape
    # the UI builds over the pulled models and offers the ensemble
    ui = run([sys.executable, "-c",
              "from mri_ensemble.app import _status, build_app; build_app('.', 'cpu'); "
              "print(_status(__import__('pathlib').Path('.'), 'segmentation')[0])"],
             proj, env, timeout=300)  # fmt: skip
    assert "ensemble" in ui.stdout.splitlines()[-1].lower()

    # the registry's champion holds exactly the DVC-tracked checkpoints
    client = origin.team.client()
    for task in ("segmentation", "reconstruction"):
        mv = client.get_model_version_by_alias(f"mri-ensemble-{task}", "champion")
        dest = origin.team.tmp / "champion" / task
        dest.mkdir(parents=True)
        # models:/ resolves in the registry URI, which follows MLFLOW_TRACKING_URI (never the
        # sqlite:///mlflow.db of the folder the tests run in)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", origin.team.mlflow_url)
        import mlflow.artifacts

        bundle = Path(mlflow.artifacts.download_artifacts(
            f"models:/mri-ensemble-{task}/{mv.version}", dst_path=str(dest)))  # fmt: skip
        members = mv.tags["members"].split(",")
        assert set(members) <= {m for t, m in model_keys(proj).values() if t == task}
        for m in members:
            (ckpt,) = bundle.rglob(f"project/models/{task}/{m}/best.pt")
            assert sha(ckpt) == sha(proj / f"models/{task}/{m}/best.pt"), (task, m)


def test_repro_pull_restores_without_training(origin: Origin):
    proj, env = clone(origin, "repro-pull")
    repro = run(["dvc", "repro", "--pull"], proj, env)
    out = repro.stdout + repro.stderr
    assert "Running stage" not in out, out[-3000:]
    status = run(["dvc", "status"], proj, env).stdout
    assert "Data and pipelines are up to date" in status, status


def _training(proj: Path, name: str, epochs: int) -> tuple[list[str], str]:
    """A ``stages.train`` command for a copy of the tiny U-Net named ``name``."""
    params = yaml.safe_load((proj / "params.yaml").read_text())
    entry = json.loads(json.dumps(params["train"]["segmentation-unet"]))
    entry["model"] = name
    entry["net"]["features"] = [4, 8, 16]  # the tiny one (the team's U-Net is larger)
    entry["optim"].update(epochs=epochs, patience=100)
    params["train"][f"segmentation-{name}"] = entry
    original = (proj / "params.yaml").read_text()
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cmd = [sys.executable, "-m", "stages.train", "--name", f"segmentation-{name}",
           "--train", "data/augmented/segmentation/train.h5",
           "--val", "data/prepared/segmentation/val.h5",
           "--out", str(proj.parent / f"out-{name}"), "--history", str(proj.parent / f"{name}.csv")]  # fmt: skip
    return cmd, original


def test_a_training_outlives_its_tracking_server(origin: Origin):
    """Kill the MLflow server once the run exists, restart it when the training says it is
    buffering: the training ends well and the server has every epoch's points."""
    team, proj = origin.team, origin.proj
    epochs = 8
    cmd, original = _training(proj, "outage", epochs)
    log = team.tmp / "outage.log"
    client = team.client()
    exp = client.get_experiment_by_name("mri-ensemble")
    try:
        proc = start(cmd, proj, origin.env, log)
        procs = {"training": (proc, log)}

        def run_exists() -> bool:
            return bool(client.search_runs([exp.experiment_id], "attributes.run_name = 'outage'"))

        wait_until(run_exists, "the training's MLflow run", 300, procs)
        team.stop_mlflow()  # SIGTERM, then SIGKILL: the server is gone
        wait_until(lambda: "buffering" in log.read_text() or proc.poll() is not None,
                   "the training to notice", 300, {})  # fmt: skip
        team.start_mlflow()
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        (proj / "params.yaml").write_text(original)
    text = log.read_text()
    assert "failed on metrics (step" in text and "buffering" in text, text[-2000:]
    assert "answers again after" in text, text[-2000:]
    (r,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'outage'")
    assert r.info.status == "FINISHED"
    for metric in ("train_loss", "val_loss", "val_iou"):
        steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, metric))
        assert steps == list(range(1, epochs + 1)), (metric, steps)
    assert [a.path for a in client.list_artifacts(r.info.run_id, "checkpoint")] == [
        "checkpoint/best.pt"
    ]


def test_no_tracking_server_at_start_fails_at_once_with_one_line(origin: Origin):
    proj = origin.proj
    cmd, original = _training(proj, "notracking", 1)
    env = {**origin.env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True, timeout=300)
    finally:
        (proj / "params.yaml").write_text(original)
    assert proc.returncode == 1, proc.stderr[-2000:]  # retried by the flow, not "rejected"
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "MLflow tracking at http://127.0.0.1:" in errors[0]
    assert "cannot start run 'notracking' (MlflowException: Connection refused)" in errors[0]
    assert not (proj.parent / "out-notracking").exists()


# --- the trainings on the Dask workers (the origin fixture's flow run) ---


def flow_runs(team: Team) -> dict[str, list]:
    """The MLflow runs under the flow's parent run, by name."""
    client = team.client()
    exp = client.get_experiment_by_name("mri-ensemble")
    (parent,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'pipeline'")
    runs = client.search_runs([exp.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent.info.run_id}'")  # fmt: skip
    by_name: dict[str, list] = {}
    for r in runs:
        by_name.setdefault(r.info.run_name, []).append(r)
    return by_name


def test_the_flow_on_dask_workers_survives_a_dead_worker(origin: Origin):
    """Dask gave the dead worker's branch to the other worker, which fetched the dead one's
    last.pt from the MLflow run and continued that run; the head restored every branch from
    the run-cache the workers pushed, and trained nothing itself."""
    log, dead, workers = origin.flow_log, origin.dead, origin.workers
    (alive,) = [n for n in workers if n != dead]
    text = workers[alive][1].read_text()
    assert "resuming from the last.pt that MLflow run" in text, text[-3000:]
    assert "resuming .resume/segmentation/unet/last.pt from epoch" in text, text[-3000:]
    # each training ran in a worker's clone; the U-Net's one run began on the dead worker
    client = origin.team.client()
    by_name = flow_runs(origin.team)
    clones = {str(c) for c, _ in workers.values()}
    for key, (task, model) in model_keys(origin.proj).items():
        (r,) = [r for r in by_name[model] if r.data.tags.get("task") == task]
        assert r.data.tags["checkout"] in clones, (key, r.data.tags)
        assert r.info.status == "FINISHED"
        steps = {m.step for m in client.get_metric_history(r.info.run_id, "val_loss")}
        assert steps == set(range(1, EPOCHS + 1)), (key, steps)
        assert f"train@{key} ran on" in log
        # the head restored it from the run-cache the worker pushed: nothing retrained here
        assert f"Stage 'train@{key}' is cached - skipping run" in log, log[-3000:]
    (unet,) = [r for r in by_name["unet"] if r.data.tags.get("task") == "segmentation"]
    assert unet.data.tags["checkout"] == str(workers[dead][0])
    assert "Running stage 'train@" not in log
    # the workers reported to the team's Prefect server: none started a temporary one
    for name, (_, wlog) in workers.items():
        text = wlog.read_text()
        assert "temporary server" not in text.lower(), (name, text[-2000:])
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with origin.team.prefect.client() as pc:
        (flow_run,) = pc.read_flow_runs(limit=1, sort="START_TIME_DESC")
        assert flow_run.state is not None and flow_run.state.is_completed()
        tasks = pc.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])), limit=200
        )
    names = {t.name for t in tasks if t.state is not None and t.state.is_completed()}
    assert {f"train+evaluate {k} on a worker" for k in model_keys(origin.proj)} <= names, names


def test_a_local_rerun_of_each_branch_writes_the_workers_bytes(origin: Origin, tmp_path: Path):
    """Where a branch ran changes nothing: each training and evaluation forced again here,
    one torch thread as on a worker, leaves every dvc.lock entry of the branches as the
    workers wrote it (checkpoints, histories, predictions: byte for byte)."""
    proj = copy_project(origin.proj, tmp_path / "local")
    env = {**env_for(proj), "MRI_ENSEMBLE_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{proj}/local-mlflow.db"}  # fmt: skip
    branches = [f"{s}@{k}" for k in model_keys(proj) for s in ("train", "evaluate")]
    out = run(["dvc", "repro", "-f", "-s", *branches], proj, env)  # one DVC for all, in order
    log = out.stdout + out.stderr
    ran = [ln.split("'")[1] for ln in log.splitlines() if ln.startswith("Running stage '")]
    assert sorted(ran) == sorted(branches), log[-2000:]
    assert log.count("epoch 1/") == len(model_keys(proj)), log[-2000:]  # each trained anew
    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
    expected = yaml.safe_load((origin.proj / "dvc.lock").read_text())["stages"]
    differ = [s for s in branches if lock[s] != expected[s]]
    assert not differ, differ
