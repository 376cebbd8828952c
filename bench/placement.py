"""Benchmark: the flow's CPU placement policies, side by side in one run.

    python bench/placement.py                        # after make run (uses its data/)
    python bench/placement.py --epochs 1 --policies 0 2 1 2x1

A policy is ``P`` or ``PxT``: ``scale.parallel`` P (0: every training at once, what the flow
did before it placed trainings, ten at once on this profile; N: at most N at once) and
``scale.threads_per_training`` T (default 0: the cores split between the slots), the slots
as ``flows/placement.py`` plans them. For each policy, in a temporary git + DVC copy of this checkout (code, params,
dvc.lock and the prepared data; the default profile cut to ``--epochs``), every model is
trained and evaluated with ``dvc repro -f -s``, on the flow's slots, exactly as the flow
runs them. Printed: wall time per policy, its ratio to the first policy, and whether the
trained checkpoints (their DVC hashes) are those of the first policy. Timings belong to the
machine, so they are printed and never written into a pipeline output.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.placement import Slot, plan_slots  # noqa: E402

PATH = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"  # dvc beside python


def copy_project(dest: Path, epochs: int) -> list[str]:
    """This checkout's code, dvc.lock and prepared data in ``dest``; returns the train keys."""
    for name in ("mri_ensemble", "stages", "flows"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "dvc.lock", ".dvcignore"):
        shutil.copy(ROOT / name, dest / name)
    for name in ("data/prepared", "data/augmented"):
        shutil.copytree(ROOT / name, dest / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for entry in params["train"].values():
        entry["optim"]["epochs"] = epochs
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": PATH}
    # the MLflow store once, up front, as the flow does (ten stages creating it race)
    store = "import mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db'); mlflow.set_experiment('bench')"
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], [sys.executable, "-c", store]):
        subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)
    return list(params["train"])


def train_all(proj: Path, keys: list[str], slots: list[Slot]) -> float:
    """Every model's train + evaluate on ``slots`` (a branch waits for a free one)."""
    free: Queue[Slot] = Queue()
    for s in slots:
        free.put(s)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "MPLBACKEND": "Agg", "PATH": PATH,
           "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db", "MLFLOW_EXPERIMENT_NAME": "bench"}  # fmt: skip

    def branch(key: str) -> None:
        slot = free.get()
        try:
            for stage in (f"train@{key}", f"evaluate@{key}"):
                cmd = ["dvc", "--wait-for-lock", "repro", "-f", "-s", stage]
                proc = subprocess.run(cmd, cwd=proj, env={**env, **slot.env},
                                      capture_output=True, text=True)  # fmt: skip
                if proc.returncode:
                    raise RuntimeError(f"{stage} failed:\n{proc.stderr[-2000:]}")
        finally:
            free.put(slot)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(keys)) as pool:  # threads wait; the slots bound the work
        for f in [pool.submit(branch, k) for k in keys]:
            f.result()
    return time.perf_counter() - t0


def checkpoint_hashes(proj: Path, keys: list[str]) -> dict[str, str]:
    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
    return {k: lock[f"train@{k}"]["outs"][0]["md5"] for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1, help="epochs per model (default 1)")
    ap.add_argument("--policies", nargs="+", default=["0", "2", "1"],
                    help="PxT: parallel P, threads_per_training T (default 0: split); the "
                         "first is the reference (default: 0 2 1)")  # fmt: skip
    args = ap.parse_args()
    if not (ROOT / "data" / "augmented").is_dir():
        sys.exit("error: data/augmented is missing: run `make run` (or dvc pull) first")
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-placement-") as tmp:
        for policy in args.policies:
            parallel, _, threads_arg = policy.partition("x")
            proj = Path(tmp) / f"parallel-{policy}"
            keys = copy_project(proj, args.epochs)
            slots = plan_slots(len(keys), device="cpu", gpus=[], parallel=int(parallel),
                               threads_per_training=int(threads_arg or 0), cpu_count=cores)  # fmt: skip
            threads = slots[0].env["MRI_ENSEMBLE_THREADS"]
            print(f"parallel {policy}: {len(slots)} at once, {threads} thread(s) each ...",
                  flush=True)  # fmt: skip
            seconds = train_all(proj, keys, slots)
            rows.append((policy, len(slots), threads, seconds, checkpoint_hashes(proj, keys)))
    ref = rows[0]
    print(f"\n{len(ref[4])} models x {args.epochs} epoch(s), {cores} cores (train + evaluate)")
    print("policy | at once | threads | wall s | ratio to first | checkpoints as first")
    for policy, n, threads, seconds, hashes in rows:
        same = sum(hashes[k] == ref[4][k] for k in hashes)
        print(f"{policy:>6} | {n:>7} | {threads:>7} | {seconds:6.1f} | {seconds / ref[3]:14.2f} | "
              f"{same}/{len(hashes)}")  # fmt: skip


if __name__ == "__main__":
    main()
