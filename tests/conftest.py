"""What the whole suite shares, built once per test session (per xdist worker with
``pytest -n``): the tiny profile's project after one Prefect flow run over the real DVC
stages (``tiny_run``; copy it before changing anything: :func:`copy_project`), and one
``prefect server start`` (``prefect_api``) for the modules that talk to a Prefect API.

The modules that use them carry ``pytest.mark.xdist_group``, so that ``--dist loadgroup``
runs them in one worker and the expensive run is made once.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest


def copy_project(src: Path, dst: Path) -> Path:
    """A copy of a trained project (its git and DVC folders, cache and MLflow store too)."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny profile (tests/test_pipeline.py) after one run of ``python -m flows.pipeline``:
    seven models trained in parallel, evaluated, ensembled, costed, reported, registered."""
    from test_pipeline import build_tiny_run

    return build_tiny_run(tmp_path_factory.mktemp("tiny_run"))


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
