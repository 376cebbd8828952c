"""cost@<task>: what the ensemble costs by size: parameters and MACs per slice.

Reads ``reports/<task>/ensemble.json`` (the sizes 1..M in greedy order that the ensemble
stage searched, with their val and test scores), loads the members' checkpoints, counts
each member's multiply-accumulates per slice on a batch of test slices
(:mod:`mri_ensemble.cost`), and writes ``reports/<task>/cost.json`` with a one-line
recommendation. Everything in it is a property of the networks, so the file is the same on
every machine; latency and peak memory, which are not, are measured by
``bench/ensemble_cost.py`` (``make bench``) and printed, never written into an output.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mri_ensemble.cost import macs_per_slice, recommend
from mri_ensemble.ensemble import ensemble_members
from mri_ensemble.errors import ConfigError, DataError
from mri_ensemble.inference import load_members
from mri_ensemble.io import write_json
from mri_ensemble.nets import count_parameters
from mri_ensemble.project import STUDENT
from mri_ensemble.tasks import get_task
from mri_ensemble.tta import trained_models

from .common import cli, get, load_params, log


def read_sizes(ensemble: Path, task: str) -> list[dict]:
    """The ensemble sizes of ``reports/<task>/ensemble.json``."""
    if not ensemble.is_file():
        raise DataError(f"{ensemble}: missing; run ensemble@{task} first")
    sizes = json.loads(ensemble.read_text()).get("sizes")
    if not sizes:
        raise DataError(f"{ensemble}: no 'sizes' (written by an older ensemble stage?)")
    return sizes


def member_checkpoints(models: Path, task: str, names: list[str]) -> dict[str, Path]:
    checkpoints = {m: models / m / "best.pt" for m in names}
    for m, path in checkpoints.items():
        if not path.is_file():
            raise DataError(f"{path}: checkpoint missing; run train@{task}-{m} first")
    return checkpoints


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
    task = get_task(args.task)
    p = get(params, f"cost.{args.task}", kind=dict)
    unknown = sorted(set(p) - {"batch", "repeats"})
    if unknown:
        raise ConfigError(f"params.yaml: cost.{args.task}: unknown key(s) {unknown}")
    batch = p.get("batch", 8)
    if not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"params.yaml: cost.{args.task}.batch must be an int >= 1")
    sizes = read_sizes(args.ensemble, args.task)
    key = task.key_metric
    names = list(sizes[-1]["members"])
    if (args.models / STUDENT / "best.pt").is_file():  # distill@<task>'s student, beside them
        names.append(STUDENT)
    checkpoints = member_checkpoints(args.models, args.task, names)
    inputs = task.batch_inputs(args.data, batch)
    macs = macs_per_slice(checkpoints, inputs)
    n_params = {
        m: count_parameters(net)
        for m, net in zip(checkpoints, load_members(list(checkpoints.values())), strict=True)
    }
    rows = []
    for s in sizes:
        row = {k: s[k] for k in ("size", "added", "members", f"val_{key}", f"test_{key}")}
        runs = ensemble_members(s["weights"])  # what predict runs of this size
        # a TTA candidate runs its model's weights: each set of weights counted once
        row["params"] = int(sum(n_params[m] for m in trained_models(runs)))
        row["macs"] = float(sum(macs[m] for m in runs))
        rows.append(row)
        log.info("size %d (+%s): %.3f GMACs/slice", s["size"], s["added"], row["macs"] / 1e9)
    line = recommend(rows, key)
    log.info("%s", line)
    write_json(
        args.out,
        {
            "batch": len(inputs[0]),
            "member_macs": macs,
            "member_params": n_params,
            "sizes": rows,
            "recommendation": line,
        },
    )


if __name__ == "__main__":
    main()
