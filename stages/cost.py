"""cost@<task>: what the ensemble costs by size: parameters, latency per slice, peak memory.

Reads ``reports/<task>/ensemble.json`` (the sizes 1..M in greedy order that the ensemble
stage searched, with their val and test scores), loads the members' checkpoints, times
each member alone and each ensemble as one network over the same batch of test slices
(:mod:`mri_ensemble.cost`), probes peak memory in a fresh process per size, and writes
``reports/<task>/cost.json`` with a one-line recommendation. Timings depend on the
machine, so this file is a plain output, not a DVC metric.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from mri_ensemble.cost import batch_inputs, latencies, peak_memory_mb, recommend
from mri_ensemble.errors import ConfigError, DataError
from mri_ensemble.io import write_json
from mri_ensemble.train import resolve_device

from .common import KEY_METRIC, cli, get, load_params, log, weights_array


@cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--task", required=True)
    ap.add_argument("--models", type=Path, required=True, help="models/<task>")
    ap.add_argument("--ensemble", type=Path, required=True, help="reports/<task>/ensemble.json")
    ap.add_argument("--data", type=Path, required=True, help="prepared test.h5")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    params = load_params()
    if args.task not in KEY_METRIC:
        raise ConfigError(f"cost: unknown task {args.task!r}; known: {list(KEY_METRIC)}")
    p = get(params, f"cost.{args.task}", kind=dict)
    batch, repeats = int(p.get("batch", 8)), int(p.get("repeats", 5))
    if batch < 1 or repeats < 1:
        raise ConfigError(f"params.yaml: cost.{args.task}: batch and repeats must be >= 1")
    if not args.ensemble.is_file():
        raise DataError(f"{args.ensemble}: missing; run ensemble@{args.task} first")
    details = json.loads(args.ensemble.read_text())
    sizes = details.get("sizes")
    if not sizes:
        raise DataError(f"{args.ensemble}: no 'sizes' (written by an older ensemble stage?)")
    key = KEY_METRIC[args.task]
    names = sizes[-1]["members"]
    checkpoints = {m: args.models / m / "best.pt" for m in names}
    for m, path in checkpoints.items():
        if not path.is_file():
            raise DataError(f"{path}: checkpoint missing; run train@{args.task}-{m} first")

    threads = int(os.environ.get("MRI_ENSEMBLE_THREADS") or torch.get_num_threads())
    torch.set_num_threads(threads)
    device = resolve_device(get(params, "device"))
    inputs = batch_inputs(args.task, args.data, batch)
    plan = [(s["members"], weights_array(s["weights"], s["members"])) for s in sizes]
    log.info(
        "timing %d members and %d ensembles on %s (%d threads)",
        len(names),
        len(plan),
        device,
        threads,
    )
    timed = latencies(args.task, checkpoints, plan, inputs, device, repeats)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "inputs.pt"
        torch.save(inputs, saved)
        for s, (members, weights), (seconds, summed) in tqdm(
            list(zip(sizes, plan, timed, strict=True)), desc="peak memory", disable=None
        ):
            peak = peak_memory_mb(
                args.task, [checkpoints[m] for m in members], weights, saved, str(device)
            )
            rows.append(
                {
                    **{
                        k: s[k]
                        for k in ("size", "added", "members", "params", f"val_{key}", f"test_{key}")
                    },
                    "latency_s": seconds,
                    "members_latency_sum_s": summed,
                    "batching_ratio": seconds / summed,
                    "peak_memory_mb": peak,
                }
            )
            log.info(
                "size %d (+%s): %.1f ms/slice (its members alone %.1f ms, ratio %.2f), "
                "%.0f MiB peak",
                s["size"],
                s["added"],
                1e3 * seconds,
                1e3 * summed,
                seconds / summed,
                peak,
            )
    line = recommend(rows, key)
    log.info("%s", line)
    write_json(
        args.out,
        {
            "device": str(device),
            "threads": threads,
            "batch": len(inputs[0]),
            "repeats": repeats,
            "sizes": rows,
            "recommendation": line,
        },
    )


if __name__ == "__main__":
    main()
