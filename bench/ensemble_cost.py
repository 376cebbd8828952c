"""Benchmark: what the shipped ensemble costs on this machine, by ensemble size.

    python bench/ensemble_cost.py                       # both tasks (make run first)
    python bench/ensemble_cost.py --task segmentation --repeats 5 --device cpu

Reads ``reports/<task>/cost.json`` (sizes in greedy order, written by ``cost@<task>``),
``reports/<task>/ensemble.json`` (their weights) and the members' checkpoints, and prints,
side by side in one run, for every size: the ensemble's latency per slice as one
``EnsembleNet`` over a batch of test slices, the sum of its members timed alone
(interleaved in the same repeats, so a busy machine slows both alike), their ratio
(target <= 1.1x: batching the members over one input costs nothing extra), and the peak
memory of a fresh process that loads the members and runs one batch. Timings belong to
the machine, so they are printed here and never written into a pipeline output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mri_ensemble.cost import latencies, peak_memory_mb  # noqa: E402
from mri_ensemble.tasks import TASKS  # noqa: E402
from mri_ensemble.train import resolve_device  # noqa: E402
from stages.common import weights_array  # noqa: E402


def bench(task: str, repeats: int, device: torch.device) -> None:
    cost = json.loads((ROOT / "reports" / task / "cost.json").read_text())
    details = json.loads((ROOT / "reports" / task / "ensemble.json").read_text())
    sizes = details["sizes"]
    names = sizes[-1]["members"]
    checkpoints = {m: ROOT / "models" / task / m / "best.pt" for m in names}
    inputs = TASKS[task].batch_inputs(ROOT / "data" / "prepared" / task / "test.h5", cost["batch"])
    plan = [(s["members"], weights_array(s["weights"], s["members"])) for s in sizes]
    timed = latencies(task, checkpoints, plan, inputs, device, repeats)
    print(
        f"\n{task}: batch {cost['batch']}, {repeats} repeats, {device}, "
        f"{torch.get_num_threads()} threads"
    )
    print("size | added | GMACs/slice | ms/slice | members alone ms | ratio | peak MiB")
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "inputs.pt"
        torch.save(inputs, saved)
        for s, row, (members, weights), (sec, summed) in zip(
            sizes, cost["sizes"], plan, timed, strict=True
        ):
            peak = peak_memory_mb(
                task, [checkpoints[m] for m in members], weights, saved, str(device)
            )
            print(
                f"{s['size']:>4} | {s['added']} | {row['macs'] / 1e9:.3f} | {1e3 * sec:.1f} | "
                f"{1e3 * summed:.1f} | {sec / summed:.2f} | {peak:.0f}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--task", choices=("segmentation", "reconstruction"), action="append")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default=None, help="default: params.yaml's device")
    args = ap.parse_args()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    device = resolve_device(args.device or params.get("device", "auto"))
    torch.set_num_threads(int(os.environ.get("MRI_ENSEMBLE_THREADS") or torch.get_num_threads()))
    for task in args.task or ["segmentation", "reconstruction"]:
        bench(task, args.repeats, device)


if __name__ == "__main__":
    main()
