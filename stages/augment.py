"""augment@<task>: write the augmented training set, deterministic for the seed.

Segmentation: flips, rotations, noise (``augment.segmentation``). Reconstruction: a
mirrored copy of every training slice (``augment.reconstruction.flip``); the main
augmentation there is the fresh undersampling mask drawn every epoch during training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mri_ensemble.tasks import get_task

from .common import cli, get, load_params, log


@cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--task", required=True)
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    params = load_params()
    task = get_task(args.task)
    p = get(params, f"augment.{task.name}", kind=dict)
    n_in, n_out = task.augment(p, int(get(params, "seed")), args.train, args.out)
    log.info("augmented %d -> %d training slices", n_in, n_out)


if __name__ == "__main__":
    main()
