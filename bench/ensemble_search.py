"""Benchmark: ensemble weight search speed, batched scorer versus a naive per-candidate loop.

    python bench/ensemble_search.py            # both tasks, 8 models x 1,000 candidates
    python bench/ensemble_search.py --task segmentation --candidates 1000 --naive 40

Reads the default pipeline's saved val outputs (``make run`` first). The default profile
trains 6 segmentation and 4 reconstruction models; the benchmark tops them up to
``--models`` members with extra ones built from the saved outputs (segmentation: the
normalised geometric mean of two members' probabilities; reconstruction: the GRAPPA and
zero-filled baseline images, then averages of two members), so the search sees real val
data at the requested size. It prints, side by side in one run:

- the batched scorer: its set-up time and the time to score every candidate;
- the naive loop: fuse the outputs with one weight vector, then score with the metric
  functions the stages use (``segmentation_scores`` / ``reconstruction_scores``), timed on
  ``--naive`` candidates and extrapolated per candidate (the full loop takes minutes);
- candidates per second of each and their ratio, and the largest score difference between
  the two on the shared candidates (they must agree).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mri_ensemble import ensemble  # noqa: E402
from mri_ensemble.data.predictions import read_probabilities, read_reconstructions  # noqa: E402
from mri_ensemble.data.prepared import read_segmentation_h5  # noqa: E402
from mri_ensemble.data.prepared_recon import read_reconstruction_h5  # noqa: E402
from mri_ensemble.metrics import segmentation_scores  # noqa: E402
from mri_ensemble.mri.quality import reconstruction_scores  # noqa: E402
from mri_ensemble.tasks.reconstruction import zero_filled  # noqa: E402


def _members(task: str) -> list[Path]:
    folder = ROOT / "data" / "predictions" / task
    found = sorted(p for p in folder.glob("*/val.h5"))
    if not found:
        sys.exit(f"error: no saved val outputs under {folder}; run `make run` first")
    return found


def segmentation(n_models: int) -> tuple[ensemble.Objective, str]:
    val = read_segmentation_h5(ROOT / "data/prepared/segmentation/val.h5")
    probs = [read_probabilities(p)[0] for p in _members("segmentation")]
    i = 0
    while len(probs) < n_models:  # geometric mean of two members, renormalised over classes
        a, b = probs[i % len(probs)], probs[(i + 1) % len(probs)]
        g = np.sqrt(a.astype(np.float32) * b.astype(np.float32)) + 1e-6
        probs.append((g / g.sum(axis=1, keepdims=True)).astype(np.float16))
        i += 1
    stack = np.stack(probs[:n_models])
    return ensemble.SegmentationObjective(stack, val.label, val.case), "IoU"


def reconstruction(n_models: int) -> tuple[ensemble.Objective, str]:
    val = read_reconstruction_h5(ROOT / "data/prepared/reconstruction/val.h5")
    recons = [read_reconstructions(p)[0] for p in _members("reconstruction")]
    extra = [val.grappa.astype(np.float32), zero_filled(val)]
    i = 0
    while len(recons) < n_models:
        if extra:
            recons.append(extra.pop(0))
        else:
            recons.append((recons[i] + recons[i + 1]) / 2)
            i += 1
    stack = np.stack(recons[:n_models])
    return ensemble.ImageObjective(stack, val.target, val.case), "SSIM"


def naive_score(obj: ensemble.Objective, w: np.ndarray) -> float:
    if isinstance(obj, ensemble.SegmentationObjective):
        pred = ensemble.combine(obj.outputs, w).argmax(axis=1).astype(np.uint8)
        return float(segmentation_scores(pred, obj.target, obj.case)["iou"])
    fused = ensemble.combine_images(obj.outputs, w)
    return float(reconstruction_scores(fused, obj.target, obj.case)["ssim"])


def run(task: str, n_models: int, n_candidates: int, n_naive: int, seed: int) -> None:
    obj, metric = (segmentation if task == "segmentation" else reconstruction)(n_models)
    m = obj.n_models
    weights = np.random.default_rng(seed).dirichlet(np.ones(m), n_candidates)
    t0 = time.perf_counter()
    scorer = obj.scorer()
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = scorer(weights)
    scoring = time.perf_counter() - t0
    total = setup + scoring
    t0 = time.perf_counter()
    naive = np.array([naive_score(obj, w) for w in weights[:n_naive]])
    per_naive = (time.perf_counter() - t0) / n_naive
    diff = float(np.max(np.abs(naive - batched[:n_naive])))
    shape = "x".join(map(str, obj.outputs.shape))
    print(f"\n== {task}: {m} models x {n_candidates:,} candidates on val ({shape}), {metric}")
    print(
        f"batched: set-up {setup:.2f} s + scoring {scoring:.2f} s = {total:.2f} s total, "
        f"{n_candidates / total:,.0f} candidates/s"
    )
    print(
        f"naive:   {per_naive * 1e3:.1f} ms per candidate (timed on {n_naive}), "
        f"{1 / per_naive:,.1f} candidates/s, {per_naive * n_candidates:.1f} s for all"
    )
    print(
        f"ratio:   batched is {per_naive * n_candidates / total:.0f}x faster than the naive "
        f"loop; max |score difference| on shared candidates {diff:.2e}"
    )
    target = "within" if total <= 5.0 else "OVER"
    print(f"target:  <= 5 s for {n_candidates:,} candidates: {total:.2f} s, {target}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--task", choices=["segmentation", "reconstruction", "both"], default="both")
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=1000)
    ap.add_argument("--naive", type=int, default=30, help="candidates timed in the naive loop")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"cores: {os.cpu_count()}, numpy {np.__version__}")
    tasks = ["segmentation", "reconstruction"] if args.task == "both" else [args.task]
    for task in tasks:
        run(task, args.models, args.candidates, min(args.naive, args.candidates), args.seed)


if __name__ == "__main__":
    main()
