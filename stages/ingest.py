"""ingest@<task>: read the raw source, validate it, split by patient, write prepared HDF5.

What each task reads and writes: :mod:`mri_ensemble.data.ingest` (the task's ``ingest``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mri_ensemble.tasks import get_task

from .common import cli, get, load_params


@cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--task", required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    params = load_params()
    task = get_task(args.task)
    task.ingest(get(params, f"ingest.{task.name}", kind=dict), int(get(params, "seed")), args.out)


if __name__ == "__main__":
    main()
