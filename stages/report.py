"""report: tables and figures for people, from the metrics the earlier stages wrote.

Writes ``reports/report.md`` and PNGs under ``reports/figures/``: loss curves, per-class
Dice bars, overlays (image / truth / each model / ensemble / baseline), gain versus cost.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from mri_ensemble.baselines import threshold_segmentation
from mri_ensemble.data.predictions import read_probabilities
from mri_ensemble.data.prepared import read_segmentation_h5
from mri_ensemble.ensemble import combine
from mri_ensemble.figures import (
    plot_gain_cost,
    plot_loss_curves,
    plot_metric_bars,
    plot_segmentation_overlays,
)
from mri_ensemble.io import atomic_path
from mri_ensemble.metrics import CLASS_NAMES

from .common import cli, get, load_params, log, task_models

FG = CLASS_NAMES[1:]
REPRODUCE = "make run   # or: dvc repro"


def read_history(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def fmt(x: Any) -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.4f}"


def overlay_slices(label: np.ndarray, k: int) -> np.ndarray:
    """``k`` test slices spread over those with the most foreground."""
    fg = (label > 0).reshape(len(label), -1).sum(1)
    ranked = np.argsort(-fg, kind="stable")[: max(k * 4, k)]
    return np.sort(ranked[np.linspace(0, len(ranked) - 1, k).astype(int)])


def segmentation_section(params: dict, args: argparse.Namespace, figures: Path) -> list[str]:
    task = "segmentation"
    rep = args.reports / task
    metrics = json.loads((rep / "metrics.json").read_text())
    ens_details = json.loads((rep / "ensemble.json").read_text())
    models = task_models(params, task)
    ens, base = metrics["ensemble"], metrics["baselines"]["threshold"]
    mean = ens_details["unweighted_mean"]

    lines = [f"## Segmentation (cardiac MRI, classes {', '.join(FG)})", ""]
    lines += [
        "Mean foreground IoU and Dice per case (3-D, ACDC style); weights searched on val only.",
        "",
        "| model | params | val IoU | val Dice | test IoU | test Dice | "
        + " | ".join(f"test Dice {c}" for c in FG)
        + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(FG),
    ]

    def row(name: str, n: Any, val: dict | None, test: dict) -> str:
        per = [fmt(test["per_class"][c]["dice"]) for c in FG]
        v = val or {}
        return (
            f"| {name} | {n} | {fmt(v.get('iou'))} | {fmt(v.get('dice'))} | "
            f"{fmt(test['iou'])} | {fmt(test['dice'])} | " + " | ".join(per) + " |"
        )

    for m in models:
        mm = metrics["models"][m]
        lines.append(row(m, f"{mm['params']:,}", mm["val"], mm["test"]))
    total = sum(metrics["models"][m]["params"] for m in models)
    # cost counts the members the search kept (weight >= 1 %): the others can be dropped
    members = [m for m in models if ens["weights"][m] >= 0.01]
    kept = sum(metrics["models"][m]["params"] for m in members)
    w = ", ".join(f"{k} {v:.2f}" for k, v in ens["weights"].items())
    lines.append(row(f"**ensemble** ({ens['method']}: {w})", f"{kept:,}", ens["val"], ens["test"]))
    lines.append(row("unweighted mean", f"{total:,}", mean["val"], mean["test"]))
    lines.append(row("threshold baseline (multi-Otsu)", "0", None, base["test"]))

    best = max(models, key=lambda m: metrics["models"][m]["val"]["iou"])
    b = metrics["models"][best]
    gain = ens["test"]["iou"] - b["test"]["iou"]
    lines += [
        "",
        f"Best single model on val: **{best}**. The ensemble changes test IoU by "
        f"**{gain:+.4f}** ({ens['test']['iou']:.4f} vs {b['test']['iou']:.4f}) at "
        f"{kept / b['params']:.1f}x its parameters ({len(members)} members with weight >= 0.01; "
        "inference cost grows about as much). "
        f"Search: {ens_details['candidates_evaluated']} candidates in "
        f"{ens_details['search_seconds']:.1f} s.",
        "",
    ]

    histories = {m: read_history(rep / "history" / f"{m}.csv") for m in models}
    plot_loss_curves(histories, figures / f"{task}_loss_curves.png", title="Segmentation")
    bars = {
        m: {c: metrics["models"][m]["test"]["per_class"][c]["dice"] for c in FG} for m in models
    }
    bars["ensemble"] = {c: ens["test"]["per_class"][c]["dice"] for c in FG}
    bars["threshold"] = {c: base["test"]["per_class"][c]["dice"] for c in FG}
    plot_metric_bars(bars, figures / f"{task}_per_class_dice.png", ylabel="test Dice")
    points = {
        m: (metrics["models"][m]["params"] / 1e6, metrics["models"][m]["test"]["iou"])
        for m in models
    }
    points["ensemble"] = (kept / 1e6, ens["test"]["iou"])
    plot_gain_cost(points, figures / f"{task}_gain_cost.png", "parameters (M)", "test IoU")

    test = read_segmentation_h5(args.prepared / task / "test.h5")
    idx = overlay_slices(test.label, int(get(params, "report.overlay_slices", 4)))
    probs = np.stack(
        [
            read_probabilities(Path("data/predictions") / task / m / "test.h5")[0][idx]
            for m in models
        ]
    )  # (M, K, C, H, W)
    preds = {m: probs[i].argmax(1) for i, m in enumerate(models)}
    weights = np.array([ens["weights"][m] for m in models])
    preds["ensemble"] = combine(probs, weights).argmax(1)
    preds["threshold"] = threshold_segmentation(test.image, test.case)[idx]
    plot_segmentation_overlays(
        test.image[idx], test.label[idx], preds, figures / f"{task}_overlays.png", CLASS_NAMES
    )
    for name, title in (
        ("loss_curves", "Loss curves"),
        ("per_class_dice", "Per-class test Dice"),
        ("overlays", "Test overlays"),
        ("gain_cost", "Gain versus cost"),
    ):
        lines += [f"### {title}", "", f"![{title}](figures/{task}_{name}.png)", ""]
    return lines


@cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--figures", type=Path, required=True)
    ap.add_argument(
        "--reports", type=Path, default=Path("reports"), help="holds <task>/metrics.json"
    )
    ap.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    ap.add_argument("--predictions", type=Path, default=Path("data/predictions"))
    args = ap.parse_args()
    params = load_params()
    lines = [
        "# MRI ensemble report",
        "",
        f"Generated by the `report` stage from the pipeline's own outputs. Reproduce: `{REPRODUCE}`.",
        "",
    ]
    with atomic_path(args.figures) as tmp_fig:
        tmp_fig.mkdir()
        lines += segmentation_section(params, args, tmp_fig)
    with atomic_path(args.out) as tmp:
        tmp.write_text("\n".join(lines))
    log.info("wrote %s and %s/", args.out, args.figures)


if __name__ == "__main__":
    main()
