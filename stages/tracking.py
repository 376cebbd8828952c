"""MLflow runs of the stages: where they go, and logging that outlives a tracking outage.

Where: MLflow's own convention, ``MLFLOW_TRACKING_URI`` in the environment wins over
``params.yaml``'s ``mlflow.tracking_uri`` (default ``sqlite:///mlflow.db``, a file in the
project; a team points both at ``http://host:5000``, an ``mlflow server`` on PostgreSQL).

Outages: a stage starts its run with the MLflow client's own retries (about four minutes
of back-off by default, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``); a stage that still cannot
start one fails with one line and exit status 1, which the flow retries. Once the run
exists, every call goes through :class:`RunLogger`: a call that fails (server down,
sqlite locked) is kept, in order and with its original timestamp, and sent before the
next one; the log says so when it starts buffering and when the backlog is sent. At the
end of the stage the backlog gets ``MRI_ENSEMBLE_TRACKING_WAIT`` seconds (default 300) to
go out; what still cannot be sent is named in the log, and the stage's outputs (the DVC
outs, which are the pipeline's truth) stand: a training never fails because tracking did.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mri_ensemble.io import write_json

from .common import ServiceUnavailable, get

DEFAULT_URI = "sqlite:///mlflow.db"
PARENT_RUN_ENV = "MRI_ENSEMBLE_PARENT_RUN_ID"
WAIT_ENV = "MRI_ENSEMBLE_TRACKING_WAIT"  # seconds the backlog gets at the end of a stage
# set on cluster workers: a training logs its last.pt to its run (resume/) after each epoch,
# so that if the worker dies, the retry on another worker resumes from it
SHARE_ENV = "MRI_ENSEMBLE_SHARE_CHECKPOINTS"
# Which MLflow run trained which model: kept beside the outputs, not in them, so a model
# folder's bytes do not depend on the run id (evaluate continues the training's run).
RUNS_DIR = Path(".mlflow-runs")
log = logging.getLogger("stages.tracking")


class TrackingUnavailable(ServiceUnavailable):
    """The stage could not start its MLflow run (exit status 1: the flow retries it)."""


def tracking_uri(params: Mapping[str, Any]) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``mlflow.tracking_uri`` of params.yaml."""
    return os.environ.get("MLFLOW_TRACKING_URI") or str(
        get(params, "mlflow.tracking_uri", DEFAULT_URI)
    )


def experiment_name(params: Mapping[str, Any]) -> str:
    """``MLFLOW_EXPERIMENT_NAME`` if set, else ``mlflow.experiment`` of params.yaml."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or str(
        get(params, "mlflow.experiment", "mri-ensemble")
    )


def git_revision() -> str:
    """The commit the stage runs at: an MLflow tag, never part of a DVC output (outputs must
    not change bytes when only the commit does)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def where_tags() -> dict[str, str]:
    """Where the run started: host, process, checkout, and the flow's slot (GPU, threads)."""
    tags = {"host": socket.gethostname(), "pid": str(os.getpid()), "checkout": os.getcwd()}
    for env, tag in (("CUDA_VISIBLE_DEVICES", "cuda_visible_devices"),
                     ("MRI_ENSEMBLE_THREADS", "threads")):  # fmt: skip
        if os.environ.get(env) is not None:
            tags[tag] = os.environ[env]
    return tags


def _one_line(exc: BaseException) -> str:
    """The reason in a few words (MLflow's connection errors run to 600 characters)."""
    text = " ".join(str(exc).split())
    for short in ("Connection refused", "timed out", "database is locked", "not known"):
        if short in text:
            return f"{type(exc).__name__}: {short}"
    return f"{type(exc).__name__}: {text[:200]}"


@contextlib.contextmanager
def _no_http_retries() -> Iterator[None]:
    """While buffering, a call fails at once instead of blocking training for minutes in the
    client's back-off (the backlog is the retry)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                                             "MLFLOW_HTTP_REQUEST_TIMEOUT")}  # fmt: skip
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "15"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class RunLogger:
    """Logs to one MLflow run; calls that fail are kept in order and sent with the next one.

    The methods mirror MLflow's fluent API (``log_params``, ``log_metrics``,
    ``log_artifact``) with the run explicit, so nothing depends on a global active run.
    """

    def __init__(self, client: Any, run_id: str, uri: str, resumed: bool = False) -> None:
        self.client, self.run_id, self.uri = client, run_id, uri
        self.resumed = resumed  # continues an earlier run (its params are logged already)
        self.pending: list[tuple[str, Callable[[], None]]] = []
        self.down_since: float | None = None
        self.buffered_total = 0  # calls that had to wait for the backlog (for tests, logs)
        self.refused: list[str] = []  # calls the store refused as invalid (dropped)

    def _call(self, what: str, fn: Callable[[], None]) -> None:
        self.pending.append((what, fn))
        self.flush()

    def flush(self) -> bool:
        """Send the backlog in order; False (and kept) from the first call that fails."""
        while self.pending:
            what, fn = self.pending[0]
            try:
                with _no_http_retries():
                    fn()
            except Exception as exc:  # any store failure: HTTP, connection, sqlite lock
                if getattr(exc, "error_code", None) == "INVALID_PARAMETER_VALUE":
                    # the store answered and refused this call (a name it does not take):
                    # no retry can change that, so it is dropped and the others go on
                    log.error("MLflow tracking at %s refused %s: %s", self.uri, what,
                              _one_line(exc))  # fmt: skip
                    self.pending.pop(0)
                    self.refused.append(what)
                    continue
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    log.warning(
                        "MLflow tracking at %s failed on %s (%s): buffering, the run's calls "
                        "are sent when it answers again",
                        self.uri,
                        what,
                        _one_line(exc),
                    )
                self.buffered_total += 1
                return False
            self.pending.pop(0)
        if self.down_since is not None:
            log.warning(
                "MLflow tracking at %s answers again after %.0f s: the buffered calls are sent",
                self.uri,
                time.monotonic() - self.down_since,
            )
            self.down_since = None
        return True

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # the REST API takes 100 params per batch
            chunk = items[i : i + 100]
            self._call("params", lambda c=chunk: self.client.log_batch(self.run_id, params=c))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)  # the time of the call, not of a later flush
        items = [Metric(str(k), float(v), ms, step or 0) for k, v in metrics.items()]
        what = f"metrics (step {step})" if step is not None else "metrics"
        for i in range(0, len(items), 1000):
            chunk = items[i : i + 1000]
            self._call(what, lambda c=chunk: self.client.log_batch(self.run_id, metrics=c))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call(
            f"artifact {Path(path).name}",
            lambda: self.client.log_artifact(self.run_id, str(path), artifact_path),
        )

    def close(self, status: str, wait: float | None = None) -> None:
        """End the run (``FINISHED``/``FAILED``); the backlog gets ``wait`` seconds."""
        self._call("end of run", lambda: self.client.set_terminated(self.run_id, status))
        if wait is None:
            wait = float(os.environ.get(WAIT_ENV, "300"))
        deadline, delay = time.monotonic() + wait, 1.0
        while not self.flush() and time.monotonic() < deadline:
            log.info("MLflow: %d call(s) waiting for %s; next try in %.0f s",
                     len(self.pending), self.uri, delay)  # fmt: skip
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(2 * delay, 30.0)
        if self.pending:
            log.error(
                "MLflow: %d call(s) of run %s could not be sent to %s within %.0f s (%s); "
                "the stage's outputs are complete, its run there lacks them",
                len(self.pending),
                self.run_id,
                self.uri,
                wait,
                ", ".join(w for w, _ in self.pending[:5]),
            )


def _experiment_id(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    try:
        return str(client.create_experiment(name))
    except MlflowException:  # created by a stage beside this one in the meantime
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def _run_exists(client: Any, run_id: str) -> bool:
    """Whether the store holds ``run_id`` (a remembered run may come from another store)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


@contextlib.contextmanager
def mlflow_run(
    params: Mapping[str, Any],
    run_name: str,
    tags: Mapping[str, str],
    run_id: str | None = None,
) -> Iterator[RunLogger]:
    """Start (or continue, with ``run_id``) an MLflow run; yields its :class:`RunLogger`.

    Runs started inside a pipeline execution (the Prefect flow exports
    ``MRI_ENSEMBLE_PARENT_RUN_ID``) become children of its parent run. The run ends
    ``FINISHED``, or ``FAILED`` when the body raises.
    """
    from mlflow import MlflowClient
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    uri = tracking_uri(params)
    client = MlflowClient(tracking_uri=uri)
    try:
        if run_id and not _run_exists(client, run_id):
            log.info("MLflow run %s is not in %s: starting a new run", run_id, uri)
            run_id = None
        resumed = run_id is not None
        if run_id:  # continuing a run: its tags (stage, revision) stay those of its start
            client.update_run(run_id, status="RUNNING")
        else:
            all_tags = {
                "git_revision": git_revision(),
                "dvc_stage": os.environ.get("DVC_STAGE", "manual"),
                **where_tags(),
                **tags,
            }
            parent = os.environ.get(PARENT_RUN_ENV)
            if parent:
                all_tags[MLFLOW_PARENT_RUN_ID] = parent
            exp = _experiment_id(client, experiment_name(params))
            run_id = client.create_run(
                exp, tags=resolve_tags(all_tags), run_name=run_name
            ).info.run_id
    except Exception as exc:
        raise TrackingUnavailable(
            f"MLflow tracking at {uri}: cannot start run {run_name!r} ({_one_line(exc)}); "
            "is the server up? (MLFLOW_TRACKING_URI, or mlflow.tracking_uri in params.yaml)"
        ) from exc
    run = RunLogger(client, str(run_id), uri, resumed)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        run.close(status)


def shared_checkpoint(params: Mapping[str, Any], fingerprint: str, dst: Path) -> str | None:
    """Resume a training another machine began: the newest unfinished run tagged with this
    training ``fingerprint`` whose ``resume/last.pt`` was shared (``SHARE_ENV``) is fetched
    to ``dst/`` with its ``best.pt``; returns that run's id, or None (nothing shared, or no
    tracking)."""
    import tempfile

    from mlflow import MlflowClient

    uri = tracking_uri(params)
    try:
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment_name(params))
        if exp is None:
            return None
        runs = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.fingerprint = '{fingerprint}' and attributes.status != 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=5,
        )
        for r in runs:
            with tempfile.TemporaryDirectory(dir=dst.parent if dst.parent.exists() else None) as t:
                try:
                    got = Path(client.download_artifacts(r.info.run_id, "resume", t))
                except Exception:  # that run shared nothing (killed before its first epoch)
                    continue
                if not (got / "last.pt").is_file():
                    continue
                dst.mkdir(parents=True, exist_ok=True)
                for name in ("best.pt", "last.pt"):  # best.pt: the best epoch so far
                    if (got / name).is_file():
                        (got / name).replace(dst / name)
            return str(r.info.run_id)
    except Exception as exc:  # no tracking: a fresh start, not a failure
        log.warning("no shared checkpoint from %s (%s): starting afresh", uri, _one_line(exc))
    return None


def remember_run(name: str, run_id: str, cost: Mapping[str, float] | None = None) -> None:
    """Record that ``train@<name>`` logged to MLflow run ``run_id`` (for evaluate), and what
    the training measured it cost here (``cpu_seconds``, ``wall_seconds``: for the
    ensemble's MLflow run; machine timings stay out of the DVC outputs)."""
    write_json(RUNS_DIR / f"{name}.json", {"run_id": run_id, **(cost or {})})


def remembered_cost(name: str) -> dict[str, float]:
    """What :func:`remember_run` recorded that ``train@<name>`` cost ({} if unknown, e.g. a
    model restored from the DVC run-cache)."""
    try:
        saved = json.loads((RUNS_DIR / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(saved[k]) for k in ("cpu_seconds", "wall_seconds") if k in saved}


def remembered_run(name: str) -> str | None:
    """The run ``train@<name>`` logged to on this machine; None (a new run) if unknown, e.g.
    when the model was restored from the DVC run-cache instead of trained here."""
    path = RUNS_DIR / f"{name}.json"
    try:
        return str(json.loads(path.read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
