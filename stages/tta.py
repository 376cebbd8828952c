"""tta@<task>-<model>: the model's test-time-augmentation candidate ``<model>-flip``.

Writes ``<out>/best.pt``, the trained checkpoint with a ``"tta"`` entry (its logits averaged
over the input mirrored along ``tta.<task>-<model>.axes`` and, with ``rot90: true``, turned
by quarter turns, :mod:`mri_ensemble.tta`) and the
training's ``summary.json``, then evaluates it exactly as evaluate@ evaluates a model
(``--predictions``: its outputs and metrics.json on every scored split, scores in its own
MLflow run). The weight search then sees it as one more candidate, with the training of the
model it averages and a multiple of that model's MACs.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from mri_ensemble.errors import ConfigError
from mri_ensemble.io import atomic_path
from mri_ensemble.train import load_checkpoint
from mri_ensemble.tta import candidate, check_axes, check_rot90, tta_checkpoint

from .common import cli, get, load_params, model_entry
from .evaluate import evaluate


def tta_entry(params: dict, name: str) -> dict:
    """The ``tta.<task>-<model>`` entry: a trained model's key, its flip axes and whether
    it averages the quarter turns too (``rot90``, default false), checked."""
    entry = get(params, f"tta.{name}", kind=dict)
    known = {"task", "model", "axes", "rot90"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ConfigError(
            f"params.yaml: tta.{name}: unknown key(s) {unknown}; known: {sorted(known)}"
        )
    trained = model_entry(params, name)  # a TTA candidate averages a trained model
    for key in ("task", "model"):  # dvc.yaml's paths come from these two
        if entry.get(key) != trained[key]:
            raise ConfigError(
                f"params.yaml: tta.{name}.{key} should be {trained[key]!r} (train.{name}), "
                f"found {entry.get(key)!r}"
            )
    if trained["task"] != "segmentation":
        raise ConfigError(
            f"params.yaml: tta.{name}: test-time flips are for segmentation only (a mirrored "
            "acquisition needs its k-space, mask and GRAPPA image mirrored with it)"
        )
    where = f"params.yaml: tta.{name}"
    rot90 = check_rot90(entry.get("rot90"), where)
    return {
        **trained,
        "axes": check_axes(entry.get("axes"), where, allow_empty=rot90),
        "rot90": rot90,
    }


@cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--name", required=True, help="<task>-<model>, a train entry")
    ap.add_argument("--checkpoint", type=Path, required=True, help="the model's best.pt")
    ap.add_argument("--data", type=Path, required=True, help="prepared folder with val/test.h5")
    ap.add_argument("--out", type=Path, required=True, help="models/<task>/<model>-flip")
    ap.add_argument("--predictions", type=Path, required=True)
    args = ap.parse_args()
    params = load_params()
    entry = tta_entry(params, args.name)
    name = candidate(entry["model"])
    state = tta_checkpoint(load_checkpoint(args.checkpoint), entry["axes"], name, entry["rot90"])
    with atomic_path(args.out) as tmp:
        tmp.mkdir()
        torch.save(state, tmp / "best.pt")
        summary = args.checkpoint.parent / "summary.json"
        if summary.is_file():  # the training it took: the model's own
            shutil.copyfile(summary, tmp / "summary.json")
    evaluate(params, entry["task"], name, args.out / "best.pt", args.data, args.predictions,
             None, {"tta": entry["model"]})  # fmt: skip


if __name__ == "__main__":
    main()
