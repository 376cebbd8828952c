"""A team's set-up, for real on 127.0.0.1: PostgreSQL, an MLflow tracking server on it
(artifacts through the server), a Prefect server, and an S3 DVC remote (moto's S3 server).

One tiny-profile flow runs against all of them from a git clone of the project; then:
MLflow holds every run, per-epoch point and artifact; Prefect holds the flow run and its
task runs; ``dvc push --run-cache`` stores the outputs, and two fresh clones get them with
``dvc pull`` and ``dvc repro --pull`` without training anything, predict and the UI work
there, and the registry's champion holds the DVC-tracked checkpoints. A training whose
tracking server is killed and restarted mid-run finishes and loses no point; one whose
server is not there at all fails at once with one line (exit status 1, which the flow
retries).

Needs Debian's ``postgresql`` and the ``team`` extra (``pip install -e '.[team]'``); with
``CI`` set a missing piece fails instead of skipping. About 4 minutes on 2 cores.
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


@dataclass
class Origin:
    team: Team
    proj: Path  # the clone that trained, pushed and committed
    env: dict[str, str]
    flow_seconds: float


@pytest.fixture(scope="module")
def origin(team: Team) -> Origin:
    """A git project with an S3 DVC remote; the flow run once against the team's servers,
    then ``dvc push --run-cache`` and a commit of dvc.lock (what a colleague clones)."""
    proj = team.tmp / "origin"
    proj.mkdir()
    for name in ("mri_ensemble", "stages", "flows"):
        shutil.copytree(ROOT / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore", "pyproject.toml"):
        shutil.copy(ROOT / name, proj)
    (proj / "params.yaml").write_text(yaml.safe_dump(team_params(), sort_keys=False))
    env = team.env(proj)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        # the README's commands for an S3 remote (endpointurl: only for a non-AWS S3)
        ["dvc", "remote", "add", "-d", "team", f"s3://{BUCKET}/dvc"],
        ["dvc", "remote", "modify", "team", "endpointurl", team.s3_url],
        ["git", "add", "-A"],
        [*git, "commit", "-qm", "project"],
    ):
        run(cmd, proj, env)
    t0 = time.monotonic()
    run([sys.executable, "-m", "flows.pipeline"], proj, env)
    seconds = time.monotonic() - t0
    run(["dvc", "push", "--run-cache"], proj, env)
    run(["git", "add", "-A"], proj, env)
    run([*git, "commit", "-qm", "trained"], proj, env)
    return Origin(team, proj, env, seconds)


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
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with origin.team.prefect.client() as client:
        (flow_run,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["mri-ensemble-pipeline"]))
        )
        assert flow_run.state is not None and flow_run.state.is_completed()
        tasks = {t.name: t for t in client.read_task_runs(limit=200)
                 if t.flow_run_id == flow_run.id}  # fmt: skip
    expected = {f"train@{k}" for k in model_keys(origin.proj)} | {
        "ingest@segmentation", "ensemble@reconstruction", "report", "register segmentation"
    }  # fmt: skip
    assert expected <= set(tasks)
    assert all(tasks[n].state is not None and tasks[n].state.is_completed() for n in expected)


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


# --- the trainings on a Dask cluster: a scheduler and two workers, each in its own clone ---


@dataclass
class Cluster:
    origin: Origin
    head: Path
    env: dict[str, str]
    scheduler: str
    workers: dict[str, tuple[Path, Path]]  # name -> (clone, log)
    procs: dict

    def start_worker(self, name: str) -> None:
        clone, log = self.workers[name]
        env = {**env_for(clone), "PYTHONPATH": str(clone),
               "PREFECT_HOME": str(clone.parent / f"{name}-prefect-home")}  # fmt: skip
        for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):  # the head hands both over
            env.pop(key, None)
        cmd = [str(Path(sys.executable).with_name("dask")), "worker", self.scheduler,
               "--nthreads", "1", "--resources", "GPU=1", "--name", name, "--no-dashboard"]  # fmt: skip
        self.procs[name] = (start(cmd, clone, env, log), log)

    def flow(self, *extra: str) -> tuple[subprocess.Popen, Path]:
        """The flow on the cluster, started in the head (its log in a file)."""
        cmd = [sys.executable, "-m", "flows.pipeline", "--cluster", self.scheduler, *extra]
        log = (
            self.head.parent
            / f"cluster-flow-{len(list(self.head.parent.glob('cluster-flow-*')))}.log"
        )
        return start(cmd, self.head, self.env, log), log


@pytest.fixture(scope="module")
def cluster(origin: Origin) -> Iterator[Cluster]:
    """A head clone at the commit before training, two worker clones of it, and a DVC
    remote of their own (a folder: the team's S3 already holds the origin's run-cache)."""
    tmp, git = origin.team.tmp, ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    head, env = clone(origin, "head")
    run(["git", "reset", "-q", "--hard", "HEAD~1"], head, env)  # no dvc.lock: all to run
    remote = tmp / "cluster-remote"
    workers = {}
    for name in ("w1", "w2"):
        dest = tmp / name
        run([*git, "clone", "-q", str(head), str(dest)], tmp, env)
        workers[name] = (dest, tmp / f"{name}.log")
    for proj in (head, *(c for c, _ in workers.values())):
        run(["dvc", "remote", "add", "--local", "-d", "cluster", str(remote)], proj, env)
    port = free_port()
    log = tmp / "scheduler.log"
    procs: dict = {}
    dask = str(Path(sys.executable).with_name("dask"))
    procs["scheduler"] = (start([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                 "--no-dashboard"], tmp, env_for(tmp), log), log)  # fmt: skip
    c = Cluster(origin, head, env, f"tcp://127.0.0.1:{port}", workers, procs)
    try:
        for name in workers:
            c.start_worker(name)
        wait_until(lambda: all("Registered to" in lg.read_text() for _, lg in workers.values()),
                   "two Dask workers", 120, procs)  # fmt: skip
        yield c
    finally:
        for proc, _ in procs.values():
            stop(proc)


def flow_runs(cluster: Cluster, parent: str) -> dict[str, list]:
    client = cluster.origin.team.client()
    exp = client.get_experiment_by_name("mri-ensemble")
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    by_name: dict[str, list] = {}
    for r in runs:
        by_name.setdefault(r.info.run_name, []).append(r)
    return by_name


def parent_of_last_flow(cluster: Cluster) -> str:
    client = cluster.origin.team.client()
    exp = client.get_experiment_by_name("mri-ensemble")
    (last,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'pipeline'",
                                 order_by=["attributes.start_time DESC"], max_results=1)  # fmt: skip
    return last.info.run_id


def without_dir_deps(entry: dict) -> dict:
    return {**entry, "deps": [d for d in entry.get("deps", []) if not d["md5"].endswith(".dir")
                              or not d["path"].startswith(("models/", "data/predictions/"))]}  # fmt: skip


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): sha(f) for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name != ".gitignore"}  # fmt: skip


def victim(cluster: Cluster) -> str | None:
    """The worker training the U-Net, once its run holds a shared checkpoint."""
    client = cluster.origin.team.client()
    exp = client.get_experiment_by_name("mri-ensemble")
    runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'unet' and "
                              "attributes.status = 'RUNNING'")  # fmt: skip
    if not any(client.list_artifacts(r.info.run_id, "resume") for r in runs):
        return None
    for name, (clone, _) in cluster.workers.items():
        if (clone / ".resume/segmentation/unet").is_dir():
            return name
    return None


def test_the_flow_on_dask_workers_survives_a_dead_worker_and_equals_the_local_run(
    cluster: Cluster,
):
    """The tiny flow on two workers; the one training the U-Net is killed (nanny, worker,
    its dvc and training: the machine is gone) once its run holds a shared checkpoint. Dask
    gives the branch to the other worker, which fetches the dead one's last.pt from the
    MLflow run and continues that run; the head restores every branch from the run-cache.
    The head's dvc.lock and metrics are still those of the local three-at-once run."""
    proc, flow_log = cluster.flow()
    killed: list[str] = []

    def kill_the_victim() -> bool:  # at once: the second epoch takes a few seconds
        name = victim(cluster)
        if name is not None:
            worker, _ = cluster.procs.pop(name)
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
            killed.append(name)
        return bool(killed)

    deadline = time.monotonic() + 600
    while not kill_the_victim():  # polled often: the kill must land before the training ends
        assert proc.poll() is None, "the flow ended first:\n" + flow_log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpointed epoch in 600 s"
        time.sleep(0.05)
    (dead,) = killed
    assert proc.wait(timeout=900) == 0, flow_log.read_text()[-4000:]
    log = flow_log.read_text()
    origin, head = cluster.origin.proj, cluster.head
    (alive,) = [n for n in cluster.workers if n != dead]
    text = cluster.workers[alive][1].read_text()
    assert "resuming from the last.pt that MLflow run" in text, text[-3000:]
    assert "resuming .resume/segmentation/unet/last.pt from epoch" in text, text[-3000:]
    # each training ran in a worker's clone; the U-Net's one run began on the dead worker
    client = cluster.origin.team.client()
    by_name = flow_runs(cluster, parent_of_last_flow(cluster))
    clones = {str(c) for c, _ in cluster.workers.values()}
    for key, (task, model) in model_keys(head).items():
        (r,) = [r for r in by_name[model] if r.data.tags.get("task") == task]
        assert r.data.tags["checkout"] in clones, (key, r.data.tags)
        assert r.info.status == "FINISHED"
        steps = {m.step for m in client.get_metric_history(r.info.run_id, "val_loss")}
        assert steps == set(range(1, EPOCHS + 1)), (key, steps)
        assert f"train@{key} ran on" in log
        # the head restored it from the run-cache the worker pushed: nothing retrained here
        assert f"Stage 'train@{key}' is cached - skipping run" in log, log[-3000:]
    (unet,) = [r for r in by_name["unet"] if r.data.tags.get("task") == "segmentation"]
    assert unet.data.tags["checkout"] == str(cluster.workers[dead][0])
    assert "Running stage 'train@" not in log
    # the head's dvc.lock and metrics are those of the local run (origin, 3 at once)
    lock = yaml.safe_load((head / "dvc.lock").read_text())["stages"]
    expected = yaml.safe_load((origin / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(expected)
    differ = [s for s in expected if without_dir_deps(lock[s]) != without_dir_deps(expected[s])]
    assert not differ, differ
    # folder deps (models/<task>, data/predictions/<task>) hold the .gitignore DVC writes,
    # its lines in the order the outputs arrived: every other file is the same
    for folder in {d["path"] for e in expected.values() for d in e.get("deps", [])
                   if d["md5"].endswith(".dir") and (origin / d["path"] / ".gitignore").is_file()}:  # fmt: skip
        assert file_hashes(head / folder) == file_hashes(origin / folder), folder
    for task in ("segmentation", "reconstruction"):
        f = f"reports/{task}/metrics.json"
        assert (head / f).read_bytes() == (origin / f).read_bytes(), f
    # the workers reported to the team's Prefect server: none started a temporary one
    for name, (_, wlog) in cluster.workers.items():
        text = wlog.read_text()
        assert "temporary server" not in text.lower(), (name, text[-2000:])
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with cluster.origin.team.prefect.client() as pc:
        (flow_run,) = pc.read_flow_runs(limit=1, sort="START_TIME_DESC")
        assert flow_run.state is not None and flow_run.state.is_completed()
        tasks = pc.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])), limit=200
        )
    names = {t.name for t in tasks if t.state is not None and t.state.is_completed()}
    assert {f"train+evaluate {k} on a worker" for k in model_keys(head)} <= names, names
    cluster.start_worker(dead)  # for any later test
