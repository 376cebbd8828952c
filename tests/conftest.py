"""What the whole suite shares: the tiny profile's project after one Prefect flow run over
the real DVC stages (``tiny_run``; copy it before changing anything: :func:`copy_project`),
built once per test session even under ``pytest -n`` (the first worker that needs it builds
it under a file lock in the session's shared temporary folder, the others wait and reuse
it), and one ``prefect server start`` per worker (``prefect_api``) for the modules that
talk to a Prefect API.

``make test`` runs ``pytest -n 2 --dist loadfile --no-loadscope-reorder``: each module's
tests run in one worker, so a module's own expensive fixtures (the team's services, the
served deployments) are built once. (``--dist loadgroup`` does not group with pytest 9.2:
pytest-xdist issue 1386.) The longest modules come first (:data:`FIRST`), so that the two
workers start on the two longest (the team's services; the tiny run) and the short ones
fill in at the end, instead of one worker running a long module alone at the end.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

# two workers share two cores: one torch (OpenMP) thread per process, the tests' and the
# stages' they start (a flow's trainings get their share from the flow, as in a real run).
# Two threads per process on a core the other worker is using spin and wait: the in-process
# network tests took 21 s with one core busy elsewhere, 14 s on one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# by measured duration (make test's --durations), longest first; the rest keep their order
FIRST = ("test_team.py", "test_pipeline.py", "test_deploy.py", "test_stages.py", "test_ddp.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: in-module order


def copy_project(src: Path, dst: Path) -> Path:
    """A copy of a trained project (its git and DVC folders, cache and MLflow store too)."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture(scope="session")
def tiny_run(
    tmp_path_factory: pytest.TempPathFactory, worker_id: str, request: pytest.FixtureRequest
) -> Path:
    """The tiny profile (tests/test_pipeline.py) after one run of ``python -m flows.pipeline``
    against the building worker's ``prefect_api``: six models trained in parallel,
    evaluated, ensembled, costed, reported, registered. Read-only: built once for all
    workers."""
    from filelock import FileLock
    from test_pipeline import build_tiny_run

    def build(proj: Path) -> Path:
        return build_tiny_run(proj, request.getfixturevalue("prefect_api").url)

    if worker_id == "master":  # no xdist
        return build(tmp_path_factory.mktemp("tiny_run"))
    shared = tmp_path_factory.getbasetemp().parent  # every worker's basetemp is under it
    proj, built = shared / "tiny_run", shared / "tiny_run.built"
    with FileLock(str(shared / "tiny_run.lock")):
        if not built.is_file():
            shutil.rmtree(proj, ignore_errors=True)  # a failed attempt's leftovers
            proj.mkdir()
            build(proj)
            built.touch()
    return proj


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One Prefect server for the session's flow runs and deployments."""
    from prefect.events.worker import EventsWorker
    from test_deploy import prefect_server

    with prefect_server(tmp_path_factory.mktemp("prefect")) as api:
        yield api
        # send this process's queued events while the server is up (else later tests see
        # the worker's errors about a server that is gone)
        with api.settings():
            EventsWorker.drain_all(timeout=10)
