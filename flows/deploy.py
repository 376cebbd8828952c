"""Serve the pipeline as Prefect deployments from this checkout.

Two deployments, served by one long-running process that runs each flow run in a
subprocess of its own, here, one run at a time (the runs share one DVC workspace):

    mri-ensemble-pipeline/local      the whole DAG (parameters models, force, parallel)
    mri-ensemble-train-model/local   one model retrained, then its evaluate, its task's
                                     ensemble and cost, and the report (parameters model,
                                     force)

    prefect server start                                           # API and UI, port 4200
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.deploy
    PREFECT_API_URL=http://127.0.0.1:4200/api \\
        prefect deployment run 'mri-ensemble-train-model/local' --param model=unet --watch
    python -m flows.deploy --cluster tcp://head:8786    # their trainings on Dask workers
"""

from __future__ import annotations

import argparse
import os
import sys

from prefect import serve
from prefect.client.orchestration import get_client
from prefect.deployments.runner import RunnerDeployment
from prefect.settings import get_current_settings

from flows.pipeline import ROOT, pipeline, train_model

NAME = "local"
TAGS = ["mri-ensemble"]


def deployments(cluster: str | None = None) -> list[RunnerDeployment]:
    """Both flows; with ``cluster`` (a Dask scheduler, or ``local``) they train there."""
    extra = {"parameters": {"cluster": cluster}} if cluster else {}
    return [
        pipeline.to_deployment(name=NAME, tags=TAGS, **extra),
        train_model.to_deployment(name=NAME, tags=TAGS, **extra),
    ]


def api_problem() -> str | None:
    """Why the deployments cannot be served (no API URL, API down), or None."""
    url = get_current_settings().api.url
    if not url:
        return (
            "PREFECT_API_URL is not set: start a server (prefect server start) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        return (
            f"cannot reach the Prefect API at {url} ({failure}); is `prefect server start` running?"
        )
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--limit", type=int, default=1, help="flow runs at once (default 1: one DVC workspace)"
    )
    ap.add_argument(
        "--cluster", default=None, metavar="ADDRESS",
        help="the flow runs train on this Dask scheduler (or 'local'); default: "
             "MRI_ENSEMBLE_CLUSTER, then params.yaml scale.cluster",
    )  # fmt: skip
    args = ap.parse_args()
    problem = api_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(1)
    os.chdir(ROOT)  # flow runs start here: entrypoints are relative paths, DVC needs the repo
    serve(*deployments(args.cluster), limit=args.limit)


if __name__ == "__main__":
    main()
