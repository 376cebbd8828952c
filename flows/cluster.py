"""Trainings on a Dask cluster: Prefect's ``DaskTaskRunner`` runs the flow's model branches
on Dask workers, each worker in its own git checkout, the DVC remote in between.

    dask scheduler                                                  # on the head, port 8786
    cd ~/clone && PYTHONPATH=. dask worker tcp://HEAD:8786 --resources GPU=1   # per GPU
    python -m flows.pipeline --cluster tcp://HEAD:8786              # on the head

What a branch does on a worker (``flows.pipeline.branch_on_worker``): check out the
head's commit, ``dvc repro --pull augment@<task>`` (the prepared data come back from the
remote's run-cache), train and evaluate with ``dvc repro --pull`` (a retry after success
restores instead of retraining), then ``dvc push --run-cache``. The head then restores
each branch with ``dvc repro --pull -s`` (the run-cache again: nothing retrains there), so
its ``dvc.lock`` is complete, and runs the ensemble, cost and report stages itself.

Shared by every machine: the git commit (workers fetch it), the DVC remote, the MLflow
tracking server (``MLFLOW_TRACKING_URI``) and the Prefect server (``PREFECT_API_URL``;
workers get it from the task's context and report their task runs there).

``--cluster local`` starts a ``distributed.LocalCluster`` instead: its workers share the
head's checkout, so the branches run in place as without a cluster.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLUSTER_ENV = "MRI_ENSEMBLE_CLUSTER"  # a scheduler address, or "local"
CHECKOUT_ENV = "MRI_ENSEMBLE_CHECKOUT"  # a worker's checkout (default: its current folder)


class ClusterError(RuntimeError):
    """The head or a worker cannot take part as asked (one line, names what to do)."""


def resolve_cluster(arg: str | None, params: Mapping[str, Any]) -> str | None:
    """``--cluster`` wins over ``MRI_ENSEMBLE_CLUSTER``, which wins over ``scale.cluster``."""
    for value in (arg, os.environ.get(CLUSTER_ENV), (params.get("scale") or {}).get("cluster")):
        if value:
            return str(value)
    return None


def resources(params: Mapping[str, Any]) -> dict[str, float]:
    """Dask resources one training holds on a worker (``scale.worker_resources``)."""
    res = (params.get("scale") or {}).get("worker_resources", {"GPU": 1})
    if not isinstance(res, Mapping) or not all(
        isinstance(v, (int, float)) and v > 0 for v in res.values()
    ):
        raise ClusterError(
            f"params.yaml: scale.worker_resources should map names to positive numbers, got {res!r}"
        )
    return {str(k): float(v) for k, v in res.items()}


def task_runner(cluster: str, slots: int) -> Any:
    """Prefect's DaskTaskRunner on the scheduler ``cluster``, or on a LocalCluster of
    ``slots`` one-thread worker processes for ``"local"``."""
    from prefect_dask import DaskTaskRunner

    if cluster == "local":
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={"n_workers": max(1, slots), "threads_per_worker": 1},
        )
    return DaskTaskRunner(address=cluster)


def check_scheduler(address: str, needs: Mapping[str, float], timeout: float = 20) -> str:
    """One-line ClusterError if the scheduler does not answer; a warning (returned, '' if
    none) when no worker offers ``needs`` yet: the branches wait for one to join."""
    from distributed import Client

    try:
        with Client(address, timeout=timeout) as client:
            workers = client.scheduler_info(n_workers=-1)["workers"].values()
    except Exception as exc:
        raise ClusterError(
            f"cannot reach the Dask scheduler at {address} ({type(exc).__name__}: {exc}); "
            "is `dask scheduler` running there?"
        ) from exc
    fit = [
        w for w in workers if all(w.get("resources", {}).get(k, 0) >= v for k, v in needs.items())
    ]
    if fit:
        return ""
    offer = "--resources " + ",".join(f"{k}={v:g}" for k, v in needs.items()) if needs else ""
    return (
        f"none of the {len(workers)} Dask worker(s) at {address} offers {dict(needs)}: the "
        f"trainings wait until one joins (dask worker {address} {offer}), or set "
        "scale.worker_resources: {} in params.yaml"
    )


def check_head(cluster: str, params: Mapping[str, Any]) -> None:
    """Before a run on a remote cluster: a Prefect server the workers can report to, and
    a scheduler that answers (a warning if no worker offers the resources yet)."""
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url or "ephemeral" in str(get_current_settings().api.url):
        raise ClusterError(
            "a Dask cluster's workers report to a Prefect server: start one "
            "(prefect server start) and set PREFECT_API_URL=http://HEAD:4200/api"
        )
    warning = check_scheduler(cluster, resources(params))
    if warning:
        print(f"warning: {warning}", file=sys.stderr)


def _git(root: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    if proc.returncode:
        raise ClusterError(f"{root}: git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def _dirty(root: Path) -> list[str]:
    """Tracked files changed in ``root``, except dvc.lock (which DVC rewrites as it runs)."""
    lines = _git(root, "status", "--porcelain", "--untracked-files=no").splitlines()
    return [p for p in (line[3:] for line in lines) if p != "dvc.lock"]


@dataclass(frozen=True)
class Head:
    """What a worker needs to know of the head: where it is and the commit to check out."""

    host: str
    root: str
    commit: str

    def is_here(self, root: Path) -> bool:
        """Whether ``root`` is the head's own checkout (a LocalCluster's worker)."""
        return self.host == socket.gethostname() and Path(self.root).resolve() == root.resolve()


def head(root: Path) -> Head:
    """The head's checkout for a cluster run: committed, with a DVC remote."""
    dirty = _dirty(root)
    if dirty:
        raise ClusterError(
            f"{root}: uncommitted changes to {', '.join(dirty)}: the workers check out the "
            "commit, so commit them first"
        )
    remote = subprocess.run(["dvc", "remote", "default"], cwd=root, capture_output=True, text=True)
    if remote.returncode or not remote.stdout.strip():
        raise ClusterError(
            f"{root}: no default DVC remote: the workers get the data through one "
            "(dvc remote add -d team s3://bucket/path, or a folder every machine sees)"
        )
    return Head(socket.gethostname(), str(root), _git(root, "rev-parse", "HEAD"))


def shared_tracking_uri(uri: str, root: Path) -> str:
    """The head's MLflow URI as a worker must use it: a relative sqlite file made absolute
    (usable by workers on this machine or a shared file system only)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str((root / uri[len(prefix) :]).resolve())
    return uri


def worker_checkout() -> Path:
    """This worker's checkout: ``MRI_ENSEMBLE_CHECKOUT``, else the folder it was started in."""
    root = Path(os.environ.get(CHECKOUT_ENV) or os.getcwd()).resolve()
    if not (root / "dvc.yaml").is_file():
        raise ClusterError(
            f"worker {socket.gethostname()}: {root} is no checkout of the project (no "
            f"dvc.yaml): start the worker in its clone, or set {CHECKOUT_ENV}"
        )
    return root


def sync_checkout(root: Path, commit: str) -> None:
    """Put the worker's checkout at ``commit`` (fetching it if needed)."""
    if _git(root, "rev-parse", "HEAD") == commit:
        return
    dirty = _dirty(root)
    if dirty:
        raise ClusterError(
            f"worker {socket.gethostname()}: {root} has uncommitted changes to "
            f"{', '.join(dirty)}; a worker's checkout must be a clean clone"
        )
    has = subprocess.run(["git", "-C", str(root), "cat-file", "-e", f"{commit}^{{commit}}"],
                         capture_output=True)  # fmt: skip
    if has.returncode:
        _git(root, "fetch", "--quiet", "--all")
    # --force: the dvc.lock that this worker's own runs rewrote goes (the run-cache keeps them)
    _git(root, "checkout", "--quiet", "--force", "--detach", commit)


def push_uncached_outs(root: Path, stages: list[str]) -> int:
    """Push the objects of these stages' ``cache: false`` outs (the training history plots).

    ``dvc push --run-cache`` pushes the run-cache entries and the cached outs, but not the
    objects that the run-cache keeps for uncached outs, so the head's ``dvc repro --pull``
    would find the entry, miss the plot, and train again. DVC's own transfer
    (``DataCloud.push``, what its run-cache restore pulls with) sends them.
    """
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        objs = [out.hash_info for name in stages for stage in repo.stage.collect(name)
                for out in stage.outs if not out.use_cache and out.hash_info]  # fmt: skip
        result = repo.cloud.push(objs)
    if result.failed:
        raise ClusterError(f"{root}: could not push {len(result.failed)} plot object(s)")
    return len(objs)


def where() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "python": sys.executable}
