"""Prefect flow that schedules the DVC stages of the pipeline.

ingest -> augment -> (train -> evaluate) per model, in parallel -> ensemble -> distill -> cost
-> report (the order is dvc.yaml's, read through DVC: flows/dag.py),
then the shipped ensemble of each task is registered in the MLflow model registry.
Every step is ``dvc --wait-for-lock repro -s <stage>``: DVC decides what is stale, so a
second run with nothing changed is a no-op, and ``models=[...]`` reruns only those
models (``force=True`` retrains them even when nothing changed) and what depends on them.
A stage that ``dvc status`` found up to date when the flow started, with nothing before
it in its chain run since, is not handed to DVC again (its task run says so): a no-op
rerun costs one status, not one DVC process per stage.

All MLflow runs of one execution are grouped under a parent run; its id reaches the stage
processes through ``MRI_ENSEMBLE_PARENT_RUN_ID``.

    python -m flows.pipeline                      # everything that is stale
    python -m flows.pipeline --models unet --force
    python -m flows.pipeline --cluster tcp://head:8786   # trainings on Dask workers

Trainings run on slots of this machine (flows/placement.py: one per GPU, or a share of
the cores), or with ``--cluster`` on Dask workers through Prefect's DaskTaskRunner, each
worker in its own checkout, the DVC remote in between (flows/cluster.py).

Two flows: ``pipeline`` (the whole DAG) and ``train_model`` (one model, retrained, then
its evaluate, its task's ensemble and cost, and the report); ``python -m flows.deploy``
serves both as Prefect deployments.

Retries: a stage that fails is rerun (DVC skips what already finished; a killed training
resumes from its last epoch) unless the stage itself rejected its params or data (exit
status 2), which a retry cannot fix. Waiting for DVC's repository lock is DVC's own
``--wait-for-lock``; the Prefect client retries its API calls itself
(``PREFECT_CLIENT_MAX_RETRIES``). A model whose branch fails marks its task failed; the
other branches run to the end and keep their outputs, and the flow run fails naming it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.states import State

from flows import cluster as dask_cluster
from flows.cluster import ClusterError
from flows.dag import Plan, read_plan, stale_stages
from flows.placement import plan_slots, visible_gpus
from stages.common import flatten
from stages.tracking import PARENT_RUN_ENV, SHARE_ENV, experiment_name, tracking_uri

ROOT = Path(__file__).resolve().parents[1]
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d \S+ (INFO|WARNING|ERROR) ")  # stages' log format


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero."""


class StageRejected(StageFailed):
    """The stage rejected its params or data (exit status 2): a retry cannot help."""


def _worth_retrying(task: object, task_run: object, state: State) -> bool:
    """Retry condition: anything but a rejected stage (lock, database or API hiccups)."""
    # the message names the exception: "... StageRejected: ..." or "StageRejected(...)"
    return StageRejected.__name__ not in (state.message or "")


@task(
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=_worth_retrying,
    task_run_name="{stage}",
)
def dvc_stage(
    stage: str,
    env: dict[str, str],
    force: bool = False,
    root: str | None = None,
    pull: bool = False,
    upstream: bool = False,
    clean: bool = False,
) -> bool:
    """Run one DVC stage (``upstream``: and the stale ones before it) in ``root`` (default:
    this checkout); ``pull``: outputs found in the remote's run-cache are restored instead
    of recomputed. Raises on a non-zero exit so Prefect marks it failed (and retries).

    ``clean``: the caller knows the stage is up to date (:func:`run_chain`): no DVC runs.
    Returns whether the workspace may have changed (False: DVC skipped it unchanged)."""
    logger = get_run_logger()
    if clean and not force:
        logger.info("%s up to date (dvc status when the flow started)", stage)
        return False
    cmd = ["dvc", "--wait-for-lock", "repro", *(["--pull"] if pull else []),
           *([] if upstream else ["-s"]), stage, *(["-f"] if force else [])]  # fmt: skip
    t0 = time.perf_counter()
    tail: collections.deque[str] = collections.deque(maxlen=15)
    skipped = unchanged = False
    # stream the stage's log lines (one per epoch while training) into the Prefect log
    with subprocess.Popen(
        cmd,
        cwd=root or ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            tail.append(line)
            unchanged |= "didn't change, skipping" in line
            skipped |= unchanged or "is cached - skipping" in line  # restored: changed
            if LOG_LINE.match(line) or line.startswith(("error:", "Running stage", "Stage '")):
                logger.info(line)
    if proc.returncode != 0:
        # DVC exits 255 whatever the stage did; its last line gives the stage's own status
        rejected = any(line.endswith("exited with 2") for line in tail)
        error = StageRejected if rejected else StageFailed
        raise error(f"{' '.join(cmd)} exited {proc.returncode}:\n" + "\n".join(tail))
    logger.info(
        "%s %s in %.1f s", stage, "up to date" if skipped else "ran", time.perf_counter() - t0
    )
    return not unchanged


def run_chain(
    stages: list[str],
    env: dict[str, str],
    stale: list[str] | None = None,
    upstream_ran: bool = False,
    force: bool = False,
) -> bool:
    """These stages in order, each a :func:`dvc_stage` task run (``force``: the first
    forced). ``stale``: the stages ``dvc status`` found stale when the flow started (None:
    unknown); one not among them is skipped without DVC while nothing before it has run,
    here or upstream (``upstream_ran``). Returns whether anything may have changed."""
    ran = upstream_ran
    for i, stage in enumerate(stages):
        clean = stale is not None and stage not in stale and not ran
        ran |= dvc_stage(stage, env, force and i == 0, clean=clean)
    return ran


@task(cache_policy=NO_CACHE, task_run_name="ingest+augment {name}")
def prepare(
    name: str, stages: list[str], env: dict[str, str], stale: list[str] | None = None
) -> bool:
    """One task's data stages (:class:`flows.dag.Plan` ``data``: ingest@, augment@), in
    order; the tasks prepare in parallel. Returns whether any may have changed."""
    return run_chain(stages, env, stale)


@task(cache_policy=NO_CACHE, task_run_name="train+evaluate {name}")
def train_and_evaluate(
    name: str,
    stages: list[str],
    env: dict[str, str],
    force: bool = False,
    stale: list[str] | None = None,
    upstream_ran: bool = False,
) -> bool:
    """One model's branch of the DAG (``Plan.branches``: train@, evaluate@) in one task;
    ``force`` retrains (the first stage).

    Each is a nested task run with dvc_stage's retries: a failed evaluate is retried
    alone, without retraining.
    """
    return run_chain(stages, env, stale, upstream_ran, force)


@task(cache_policy=NO_CACHE, task_run_name="ensemble {t}")
def finish_task(
    t: str,
    env: dict[str, str],
    stages: list[str],
    stale: list[str] | None = None,
    upstream_ran: bool = False,
) -> bool:
    """One task's stages after its models (``Plan.after``: ensemble@, distill@, cost@),
    in order. Returns whether any may have changed."""
    return run_chain(stages, env, stale, upstream_ran)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30], task_run_name="push {root}")
def dvc_push(stages: list[str], root: str | None = None) -> None:
    """``dvc push --run-cache`` of these stages' outputs (and every run-cache entry)."""
    cmd = ["dvc", "push", "--run-cache", *stages]
    proc = subprocess.run(cmd, cwd=root or ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise StageFailed(f"{' '.join(cmd)} in {root or ROOT} exited {proc.returncode}:\n"
                          + (proc.stdout + proc.stderr)[-2000:])  # fmt: skip
    plots = dask_cluster.push_uncached_outs(Path(root or ROOT), stages)
    get_run_logger().info(
        "%s: %s (and %d plot objects)", " ".join(cmd), proc.stdout.strip().splitlines()[-1:], plots
    )


@task(cache_policy=NO_CACHE, task_run_name="train+evaluate {name} on a worker")
def branch_on_worker(
    name: str,
    stages: list[str],
    data: list[str],
    env: dict[str, str],
    force: bool,
    head: dask_cluster.Head,
) -> dict:
    """One model's branch on a Dask worker, in the worker's own checkout of the head's
    commit (flows/cluster.py); in place when the worker shares the head's checkout."""
    root = dask_cluster.worker_checkout()
    where = {**dask_cluster.where(), "checkout": str(root)}
    if os.environ.get("MRI_ENSEMBLE_THREADS"):  # set where the worker was started
        env = {**env, "MRI_ENSEMBLE_THREADS": os.environ["MRI_ENSEMBLE_THREADS"]}
    if head.is_here(root):  # a LocalCluster: the head's workspace, as without a cluster
        train_and_evaluate(name, stages, env, force)
        return where
    dask_cluster.sync_checkout(root, head.commit)
    r = str(root)
    dvc_stage(data[-1], env, root=r, pull=True, upstream=True)  # the task's data, pulled
    training, *rest = stages  # the training shares its checkpoints (a dead worker's resume)
    dvc_stage(training, {**env, SHARE_ENV: "1"}, force, root=r, pull=True)
    for stage in rest:
        dvc_stage(stage, env, root=r, pull=True)
    dvc_push(stages, r)
    return where


def select_models(params: dict, models: list[str] | None) -> list[str]:
    """``train`` keys to run: all, or those whose key or model name is in ``models``."""
    entries = params["train"]
    if not models:
        return list(entries)
    chosen = [k for k, e in entries.items() if k in models or e.get("model") in models]
    known = sorted({*entries, *(e.get("model") for e in entries.values())})
    missing = [m for m in models if m not in known]
    if missing:
        raise ValueError(f"unknown model(s) {missing}; known: {known}")
    return chosen


def _parent_run(params: dict) -> tuple[object, str]:
    import mlflow

    # MLFLOW_TRACKING_URI wins over params.yaml; the stages get the same URI through it
    mlflow.set_tracking_uri(tracking_uri(params))
    mlflow.set_experiment(experiment_name(params))  # creates the store once, up front
    run = mlflow.start_run(run_name="pipeline", tags={"kind": "pipeline"})
    # the whole params.yaml, flattened (the `zoo` holds entries that do not run)
    mlflow.log_params(flatten({k: v for k, v in params.items() if k != "zoo"}))
    return mlflow, run.info.run_id


@flow(name="mri-ensemble-pipeline", log_prints=True)
def pipeline(
    models: list[str] | None = None,
    force: bool = False,
    parallel: int | None = None,
    cluster: str | None = None,
) -> dict:
    """The whole DAG; ``models`` restricts training to those models (key or model name).

    ``cluster``: a Dask scheduler address (or ``local``: a LocalCluster; None:
    ``MRI_ENSEMBLE_CLUSTER``, then ``scale.cluster``): the model branches run on its
    workers through Prefect's DaskTaskRunner (flows/cluster.py).

    Trainings run on slots (flows/placement.py): one per visible GPU and
    ``scale.trainings_per_device``, or on CPU ``parallel`` at once (None: params.yaml
    ``scale.parallel``; 0: all), each with ``scale.threads_per_training`` torch threads
    (bench/placement.py measures the policies).
    """
    return run_dag(models, force, parallel, cluster)


@flow(name="mri-ensemble-train-model", log_prints=True)
def train_model(model: str, force: bool = True, cluster: str | None = None) -> dict:
    """Retrain one model, then its evaluate, its task's ensemble and cost, and the report.

    ``model`` is a model name (every task's model of that name) or a ``<task>-<model>``
    key, as ``--models``; ``force=False`` retrains only if its params or data changed.
    """
    return run_dag([model], force, cluster=cluster)


def run_dag(
    models: list[str] | None,
    force: bool = False,
    parallel: int | None = None,
    cluster: str | None = None,
) -> dict:
    """What both flows run (inside a flow run): see ``pipeline``."""
    logger = get_run_logger()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    chosen = select_models(params, models)
    tasks = sorted({params["train"][k]["task"] for k in chosen})
    scale = params.get("scale") or {}
    slots = plan_slots(
        len(chosen),
        device=str(params.get("device", "auto")),
        gpus=visible_gpus(),
        trainings_per_device=int(scale.get("trainings_per_device", 1)),
        parallel=int(scale.get("parallel", 0) if parallel is None else parallel),
        threads_per_training=int(scale.get("threads_per_training", 0)),
    )
    cluster = dask_cluster.resolve_cluster(cluster, params)
    remote = cluster is not None and cluster != "local"
    if remote:
        dask_cluster.check_head(cluster, params)
    plan = read_plan(ROOT, params["train"])
    # what DVC would run now (what runs makes more stale); the workers' results: unknown
    stale = None if remote else stale_stages(ROOT)
    mlflow, parent = _parent_run(params)
    env = {PARENT_RUN_ENV: parent}
    t0 = time.perf_counter()
    status = "FAILED"
    stack = contextlib.ExitStack()  # the cluster's client (and a LocalCluster) for this run
    try:
        runner = (
            stack.enter_context(dask_cluster.task_runner(cluster, len(slots))) if cluster else None
        )
        # the training thread share is not the timing's: cost@<task> times as `dvc repro` does
        after = {PARENT_RUN_ENV: parent}
        post = {t: plan.after.get(t, []) for t in tasks}
        if remote:
            on_workers(params, plan, chosen, tasks, env, force, runner)
            for t in tasks:
                finish_task(t, after, post[t])
            ran = True  # the workers' outputs were restored here: let DVC look
        else:
            prepared = {t: prepare.submit(t, plan.data[t], env, stale) for t in tasks}
            _raise_failures("ingest/augment", prepared)
            ran_data = {t: bool(f.result()) for t, f in prepared.items()}
            # one branch per model; a branch takes a free slot (a GPU, or a share of the
            # cores) and the next waits until one is free
            futures, running, free = {}, {}, list(slots)
            for name in chosen:
                if not free:
                    done = next(as_completed(list(running)))
                    free.append(running.pop(done))
                slot = free.pop(0)
                logger.info("train@%s on %s", name, slot.name)
                t = params["train"][name]["task"]
                kwargs = {"name": name, "stages": plan.branches[name],
                          "env": {**env, **slot.env}, "force": force, "stale": stale,
                          "upstream_ran": ran_data[t]}  # fmt: skip
                futures[name] = (
                    runner.submit(train_and_evaluate, kwargs)  # a LocalCluster's worker
                    if runner is not None
                    else train_and_evaluate.submit(**kwargs)
                )
                running[futures[name]] = slot
            # a task's ensemble, student and cost start once its own models are done, while
            # the other task's trainings still run
            waiting = {t: {n for n in chosen if params["train"][n]["task"] == t} for t in tasks}
            names = {id(f): n for n, f in futures.items()}
            chains = {}
            for done in as_completed(list(futures.values())):
                t = params["train"][names[id(done)]]["task"]
                waiting[t].discard(names[id(done)])
                mine = [n for n in chosen if params["train"][n]["task"] == t]
                if not waiting[t] and all(_failure(futures[n]) is None for n in mine):
                    upstream = ran_data[t] or any(futures[n].result() for n in mine)
                    chains[t] = finish_task.submit(t, after, post[t], stale, upstream)
            failed = {t: _failure(c) for t, c in chains.items()}  # every chain ends first
            _raise_failures("train/evaluate", futures, "; the other models' results are kept")
            if any(failed.values()):
                _raise_failures("ensemble/distill/cost", chains)
            ran = any(ran_data.values()) or any(bool(c.result()) for c in chains.values())
        run_chain(plan.joins, after, stale, ran)
        mlflow.log_artifact(str(ROOT / "reports" / "report.md"))
        mlflow.log_artifacts(str(ROOT / "reports" / "figures"), artifact_path="figures")
        for t in tasks:
            register(t)
        status = "FINISHED"
    finally:
        mlflow.end_run(status=status)
        stack.close()
    seconds = time.perf_counter() - t0
    logger.info("pipeline finished in %.1f s (%s)", seconds, ", ".join(chosen))
    return {"models": chosen, "seconds": seconds, "mlflow_parent_run": parent}


def on_workers(
    params: dict,
    plan: Plan,
    chosen: list[str],
    tasks: list[str],
    env: dict,
    force: bool,
    runner: Any,
) -> None:
    """The model branches on the Dask workers, then restored here from the run-cache."""
    import dask

    logger = get_run_logger()
    head = dask_cluster.head(ROOT)
    for t in tasks:  # the data are prepared here, once, and reach the workers by the remote
        prepare(t, plan.data[t], env)
    dvc_push([s for t in tasks for s in plan.data[t]])
    uri = dask_cluster.shared_tracking_uri(tracking_uri(params), ROOT)
    worker_env = {**env, "MLFLOW_TRACKING_URI": uri}
    threads = int((params.get("scale") or {}).get("threads_per_training", 0))
    if threads:  # the same torch thread count as here, the same bytes (a worker's own wins)
        worker_env["MRI_ENSEMBLE_THREADS"] = str(threads)
    needs = dask_cluster.resources(params)
    futures = {}
    for name in chosen:
        with dask.annotate(resources=needs) if needs else contextlib.nullcontext():
            kwargs = {"name": name, "stages": plan.branches[name],
                      "data": plan.data[params["train"][name]["task"]], "env": worker_env,
                      "force": force, "head": head}  # fmt: skip
            futures[name] = runner.submit(branch_on_worker, kwargs)
    _raise_failures("train/evaluate", futures, "; the other models' results are kept")
    for name, future in futures.items():
        w = future.result()
        logger.info("train@%s ran on %s (pid %s) in %s", name, w["host"], w["pid"], w["checkout"])
        for stage in plan.branches[name]:  # the workers' outputs, here
            dvc_stage(stage, env, pull=True)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30], task_run_name="register {t}")
def register(t: str) -> int:
    """The task's shipped ensemble in the MLflow model registry (``mri-ensemble-<task>``,
    alias ``champion`` on the best val score), and its distilled student where distill@
    trained one (``mri-ensemble-<task>-student``); an unchanged one adds no version.
    Retried: the sqlite store can be briefly locked by a stage still closing its run."""
    from mri_ensemble.project import STUDENT
    from stages.registry import register_ensemble, registered_name

    student = (ROOT / "models" / t / STUDENT / "best.pt").is_file()
    versions = {}
    for model in (None, *([STUDENT] if student else [])):
        version, new = register_ensemble(ROOT, t, model)
        versions[model] = version
        get_run_logger().info(
            "registry: %s version %d%s", registered_name(t, model), version,
            "" if new else " (unchanged)",
        )  # fmt: skip
    return versions[None]


def _raise_failures(what: str, futures: dict[str, object], note: str = "") -> None:
    """Wait for every branch; StageFailed naming those that failed, each with its reason."""
    why = {n: _failure(f) for n, f in futures.items()}
    failed = {n: w for n, w in why.items() if w is not None}
    if failed:
        reasons = "; ".join(f"{n}: {w}" for n, w in failed.items())
        raise StageFailed(f"{what} failed for {list(failed)} ({reasons}){note}")


def _failure(future: object) -> str | None:
    """None if the branch succeeded, else its reason in one line (the stage's own error)."""
    try:
        future.result()  # type: ignore[attr-defined]
        return None
    except Exception as exc:  # the task's own failure, already logged by Prefect
        lines = str(exc).splitlines() or [repr(exc)]
        return next((line for line in lines if line.startswith("error:")), lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="*", help="model names or <task>-<model> keys (default: all)")
    ap.add_argument("--force", action="store_true", help="retrain the chosen models")
    ap.add_argument(
        "--parallel", type=int, default=None,
        help="CPU: models trained at once (0: all; default: params.yaml scale.parallel)",
    )  # fmt: skip
    ap.add_argument(
        "--cluster", default=None, metavar="ADDRESS",
        help="train on a Dask cluster: its scheduler (tcp://host:8786) or 'local' "
             "(default: MRI_ENSEMBLE_CLUSTER, then params.yaml scale.cluster)",
    )  # fmt: skip
    args = ap.parse_args()
    try:
        pipeline(models=args.models, force=args.force, parallel=args.parallel, cluster=args.cluster)
    except (StageFailed, ClusterError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
