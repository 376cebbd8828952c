"""report: tables and figures for people, from the metrics the earlier stages wrote.

Writes ``reports/report.md`` and PNGs under ``reports/figures/``, one section per task
that has models in params.yaml: loss curves, gain versus cost, and for segmentation
per-class Dice bars and overlays (image / truth / each model / ensemble / baseline), for
reconstruction example slices (target / zero-filled / GRAPPA / each model / ensemble)
with error maps.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mri_ensemble.baselines import threshold_segmentation
from mri_ensemble.ensemble import combine, combine_images, ensemble_members
from mri_ensemble.errors import ConfigError, DataError
from mri_ensemble.figures import (
    plot_gain_cost,
    plot_loss_curves,
    plot_metric_bars,
    plot_pareto,
    plot_reconstructions,
    plot_reliability,
    plot_segmentation_overlays,
    plot_uncertainty_maps,
)
from mri_ensemble.io import atomic_path, write_json
from mri_ensemble.machine import fingerprint
from mri_ensemble.project import STUDENT
from mri_ensemble.tasks import TASKS
from mri_ensemble.tasks.reconstruction import zero_filled
from mri_ensemble.tasks.segmentation import class_names_of
from mri_ensemble.tta import base_model, best_single, is_candidate, trained_models

from .common import cli, get, load_params, log, task_models, weights_array

REPRODUCE = "make run   # or: dvc repro"
SUMMARY_TITLES = {
    "methods": "ensemble methods",
    "trust": "where to distrust the ensemble",
    "distill": "the ensemble distilled into one model",
    "tta": "test-time augmentation against a second model",
}


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


def signed(x: Any) -> str:
    """Like :func:`fmt`, with a sign."""
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:+.4f}"


def fmt_weights(weights: dict) -> str:
    return ", ".join(
        f"{m} " + ("/".join(f"{x:.2f}" for x in w.values()) if isinstance(w, dict) else f"{w:.2f}")
        for m, w in weights.items()
    )


def tta_answer(cost: dict, per_model: dict, key: str, label: str) -> list[str]:
    """Per TTA candidate: its test score against its own model's and against the best
    ensemble (by size, greedy order) that costs no more MACs per slice: does averaging one
    model's flips beat adding a second model at the same compute?"""
    macs = cost.get("member_macs", {})
    lines = []
    for name in per_model:
        if not is_candidate(name) or name not in macs or base_model(name) not in macs:
            continue
        model = base_model(name)
        ours, plain = per_model[name]["test"][key], per_model[model]["test"][key]
        within = [
            r for r in cost["sizes"] if r["size"] >= 2 and r["macs"] <= macs[name] * (1 + 1e-9)
        ]
        best = max(within, key=lambda r: r[f"test_{key}"]) if within else None
        text = (
            f"**Test-time augmentation:** {name} ({macs[name] / macs[model]:.0f}x {model}'s "
            f"MACs, {macs[name] / 1e9:.3f} GMACs/slice) scores test {label} {ours:.4f} against "
            f"{plain:.4f} for {model} alone ({ours - plain:+.4f})"
        )
        if best is not None:
            members = ", ".join(best["members"])
            verdict = "beat" if ours > best[f"test_{key}"] else "do not beat"
            text += (
                f"; within the same compute the best ensemble of two or more is size {best['size']} "
                f"({members}, {best['macs'] / 1e9:.3f} GMACs/slice) at {best[f'test_{key}']:.4f}: "
                f"the flips {verdict} a second model there"
            )
        elif pairs := [r for r in cost["sizes"] if r["size"] >= 2]:
            cheapest = min(pairs, key=lambda r: r["macs"])
            verdict = "beat" if ours > cheapest[f"test_{key}"] else "do not beat"
            text += (
                f"; no ensemble of two or more fits in that compute, the cheapest one (size "
                f"{cheapest['size']} in greedy order: {', '.join(cheapest['members'])}) costs "
                f"{cheapest['macs'] / macs[name]:.2f}x the flips' MACs and scores "
                f"{cheapest[f'test_{key}']:.4f}: the flips {verdict} it"
            )
        lines += ["", text + "."]
    return lines


def ensemble_science(task: str, key: str, rep: Path, figures: Path) -> list[str]:
    """Methods compared (in-sample, cross-fitted, test), gain versus size with measured cost
    and a recommendation, leave-one-out contributions, and the Pareto figure."""
    details = json.loads((rep / "ensemble.json").read_text())
    label = {"iou": "IoU", "ssim": "SSIM"}.get(key, key)
    lines = [
        "### Ensemble methods",
        "",
        f"Weights chosen on all of val (in-sample val {label}), cross-fitted on "
        f"{details['crossfit_folds']} val folds of whole cases (each fold scored with weights "
        f"searched on the others: the honest val estimate), then applied to test. Shipped: "
        f"**{details['method']}**.",
        "",
        f"| method | val {label} (in-sample) | val {label} (cross-fitted) | optimism | "
        f"test {label} | candidates | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, m in details["methods"].items():
        cf = m["crossfit"].get(key)
        opt = f"{m['val'][key] - cf:+.4f}" if cf is not None else "—"
        lines.append(
            f"| {name} | {fmt(m['val'][key])} | {fmt(cf)} | {opt} | "
            f"{fmt(m['test'][key])} | {m['candidates_evaluated']} | {m.get('note', '')} |"
        )
    cost_file = rep / "cost.json"
    cost = json.loads(cost_file.read_text()) if cost_file.is_file() else None
    lines += [
        "",
        "### Gain versus cost by ensemble size",
        "",
        f"Members added in greedy order (each step adds the model whose addition scores best on "
        f"val, weights re-searched with {details['method']}). Compute: multiply-accumulates "
        "per slice of every member's forward pass (convolutions and matrix products), the same "
        "on every machine; latency and peak memory on yours: `make bench`.",
        "",
        f"| size | added | params | GMACs / slice | val {label} | test {label} |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    if cost is None:
        lines.insert(-3, f"(no `{cost_file}`: run `dvc repro cost@{task}`)")
    macs = {r["size"]: r["macs"] for r in cost["sizes"]} if cost else {}
    for r in details["sizes"]:
        gmacs = f"{macs[r['size']] / 1e9:.3f}" if r["size"] in macs else "—"
        lines.append(
            f"| {r['size']} | {r['added']} | {r['params']:,} | {gmacs} | "
            f"{fmt(r[f'val_{key}'])} | {fmt(r[f'test_{key}'])} |"
        )
    metrics_file = rep / "metrics.json"
    trained = (
        json.loads(metrics_file.read_text()).get("training") if metrics_file.is_file() else None
    )
    if trained:
        per = ", ".join(f"{m} {n:,}" for m, n in trained["samples_seen"].items())
        lines += [
            "",
            f"Training cost in samples seen (every epoch's training slices, early stopping "
            f"included; the same on every machine): {per}; the shipped ensemble's members "
            f"{trained['ensemble_samples_seen']:,} of {trained['all_samples_seen']:,} for all "
            "trainings. Measured CPU core-seconds and wall seconds are in each training's "
            "MLflow run (`train_cpu_seconds`, `train_wall_seconds`) and the shipped ensemble's.",
        ]
    if cost is not None:
        lines += ["", f"**Recommendation:** {cost['recommendation']}"]
        per_model = json.loads(metrics_file.read_text())["models"] if metrics_file.is_file() else {}
        singles = {m: (cost["member_macs"][m] / 1e9, per_model[m]["test"][key])
                   for m in per_model if m in cost.get("member_macs", {})}  # fmt: skip
        lines += tta_answer(cost, per_model, key, label)
        plot_pareto(
            [(f"size {r['size']}", r["macs"] / 1e9, r[f"test_{key}"]) for r in cost["sizes"]]
            + [(m, x, y) for m, (x, y) in singles.items()],
            figures / f"{task}_pareto.png",
            "GMACs per slice",
            f"test {label}",
        )
        lines += [
            "",
            "Ensembles by size (greedy order) and every single candidate (each model, each "
            "test-time-augmented model `<model>-flip`):",
            "",
            f"![Pareto](figures/{task}_pareto.png)",
        ]
    lines += [
        "",
        "### Leave-one-out contribution",
        "",
        "The shipped search re-run without each member; contribution = full ensemble minus "
        "ensemble without it (negative: the search did better without it).",
        "",
        f"| member | val {label} without | test {label} without | val contribution | "
        "test contribution |",
        "|---|---:|---:|---:|---:|",
    ]
    for m, r in details["leave_one_out"].items():
        lines.append(
            f"| {m} | {fmt(r[f'val_{key}_without'])} | {fmt(r[f'test_{key}_without'])} | "
            f"{r['val_contribution']:+.4f} | {r['test_contribution']:+.4f} |"
        )
    return [*lines, "", *trust_lines(task, details, figures)]


def test_first(splits: Any) -> list[str]:
    """The in-distribution test set, then the shifted ones (by name)."""
    return sorted(splits, key=lambda s: (s != "test", s))


def trust_lines(task: str, details: dict, figures: Path) -> list[str]:
    """Uncertainty against error per test set, the most uncertain cases flagged, and (for
    probabilities) calibration before and after temperature scaling, with its figure."""
    unc = details.get("uncertainty") or {}
    lines: list[str] = []
    if unc:
        first = next(iter(unc.values()))
        metric = {"dice": "Dice", "ssim": "SSIM"}.get(first["metric"], first["metric"])
        what = {
            "entropy": "the predictive entropy of the fused probabilities (nats; the members' "
            "disagreement, their mutual information, is in `ensemble.json`)",
            "variance": "the weighted variance of the members' images around the fused one",
        }.get(first["map"], first["map"])
        lines += [
            "### Uncertainty: where to distrust the ensemble",
            "",
            f"Per pixel, {what}. Correlation: Pearson, over each case's pixels, of the "
            "uncertainty with the ensemble's error (segmentation: wrong label; reconstruction: "
            f"|fused - target|), averaged over cases. Cases ranked by mean uncertainty: the "
            f"most uncertain 20 % against the rest, per-case {metric}.",
            "",
            f"| test set | mean uncertainty | correlation with the error | flagged cases | "
            f"{metric} flagged | {metric} rest | loss |",
            "|---|---:|---:|---|---:|---:|---:|",
        ]
        for split in test_first(unc):
            u, f = unc[split], unc[split]["flag"]
            lines.append(
                f"| {split} | {u['mean_uncertainty']:.3g} | {fmt(u['correlation'])} | "
                f"{', '.join(f['flagged'])} | {fmt(f['flagged_score'])} | "
                f"{fmt(f['rest_score'])} | {fmt(f['loss'])} |"
            )
        lines.append("")
    cal = details.get("calibration")
    if cal:
        splits = test_first(s for s in cal["splits"] if s != "val")
        temps = ", ".join(f"{m} {t:.2f}" for m, t in cal["temperatures"].items())
        lines += [
            "### Calibration",
            "",
            "Top-label expected calibration error (ECE, 15 bins, every pixel) of each member "
            "and of the shipped ensemble, before and after temperature scaling: one "
            f"temperature per member fitted on val ({temps}), applied before fusion, with the "
            "shipped weights (also chosen on val). Temperature scaling keeps every member's "
            "labels; it changes only how sure they say they are.",
            "",
            "| model | " + " | ".join(f"{s} ECE | {s} ECE tempered" for s in splits) + " |",
            "|---|" + "---:|---:|" * len(splits),
        ]
        rows = {m: [cal["splits"][s]["members"][m] for s in splits] for m in cal["temperatures"]}
        rows["**ensemble**"] = [cal["splits"][s]["ensemble"] for s in splits]
        for name, cells in rows.items():
            lines.append(
                f"| {name} | "
                + " | ".join(f"{fmt(c['ece'])} | {fmt(c['ece_tempered'])}" for c in cells)
                + " |"
            )
        test = cal["splits"]["test"]["ensemble"]
        plot_reliability(
            {
                f"ensemble (ECE {test['ece']:.4f})": test["reliability"],
                f"ensemble, tempered (ECE {test['ece_tempered']:.4f})": test[
                    "reliability_tempered"
                ],
            },
            figures / f"{task}_reliability.png",
        )
        lines += ["", f"![Reliability](figures/{task}_reliability.png)", ""]
    return lines


# ----------------------------------------------------------------- README results blocks
# The README's results tables and the sentences that state gains are generated here from
# the committed ``reports/<task>/metrics.json`` and ``cost.json`` (both kept in git), held
# between ``<!-- results:begin <task> -->`` and ``<!-- results:end <task> -->``:
# ``python -m stages.report --readme README.md`` rewrites them, ``--check`` fails on a
# difference (a test does that, and CI does it on the reproduced run).
RESULTS_BEGIN, RESULTS_END = "<!-- results:begin {} -->", "<!-- results:end {} -->"


def _cell(scores: dict | None, key: str) -> str:
    """``scores``' metric ``key`` (a path ``a.b.c``: see :func:`_score`) for a table."""
    x = _score(scores, key)
    if x is None or not np.isfinite(x):
        return "—"
    return f"{x:.2f}" if key.rsplit(".", 1)[-1] == "psnr" else f"{x:.4f}"


def shifted_splits(metrics: dict) -> list[str]:
    """The shifted test sets scored in ``metrics`` (``shift_<name>``), in file order."""
    return [k for k in metrics["ensemble"] if k.startswith("shift_")]


def shifted_block(task: str, metrics: dict) -> list[str]:
    """Test and every shifted test set side by side, key metric, for every model, every
    ensemble method and every baseline; then what the guard dropped. Empty without shifts."""
    splits = shifted_splits(metrics)
    if not splits:
        return []
    key, label = TASKS[task].report_columns[0][1], TASKS[task].report_columns[0][2].split()[-1]
    titles = ["test (in distribution)", *(s[len("shift_") :] + " (shifted)" for s in splits)]
    lines = [
        f"{label} on the in-distribution test set and on each shifted test set (data no "
        "training and no weight search saw):",
        "",
        "| | " + " | ".join(titles) + " |",
        "|---|" + "---:|" * len(titles),
    ]

    def row(name: str, scores: dict) -> str:
        return (
            f"| {name} | " + " | ".join(_cell(scores.get(s), key) for s in ("test", *splits)) + " |"
        )

    for m, mm in metrics["models"].items():
        lines.append(row(m, mm))
    shipped = metrics["ensemble"]["method"]
    for name, scores in metrics["methods"].items():
        full = {s: scores.get(s) for s in ("test", *splits)}
        lines.append(row(f"**{name}** (shipped)" if name == shipped else f"ensemble: {name}", full))
    for name, title in TASKS[task].report_baselines:
        if name in metrics["baselines"]:
            lines.append(row(title, metrics["baselines"][name]))
    dropped = metrics.get("guard", {}).get("dropped", {})
    if metrics.get("guard", {}).get("all_below"):
        lines += [
            "",
            "**Guard: every member scores below zero-filled on some val group "
            f"({'; '.join(f'{m}: {chr(44).join(g)}' for m, g in dropped.items())}): no member "
            "passes, the guard could not apply, and this ensemble is not fit to deploy.**",
        ]
    elif dropped:
        lines += [
            "",
            "Guard: "
            + "; ".join(
                f"{m} scored below zero-filled on val group(s) {', '.join(g)} and was given "
                "weight 0"
                for m, g in dropped.items()
            )
            + ".",
        ]
    best = best_single(metrics["models"], key)
    worst_gap = min(
        metrics["ensemble"][s][key] - metrics["models"][best][s][key] for s in ("test", *splits)
    )
    lines += [
        "",
        f"Across these sets the shipped ensemble is at worst {worst_gap:+.4f} {label} from the "
        f"best single model on val ({best}).",
    ]
    return lines


def _score(scores: dict | None, path: str) -> Any:
    """``scores[a][b][c]`` for the metric path ``a.b.c`` (None where a key is missing)."""
    x: Any = scores or {}
    for part in path.split("."):
        x = x.get(part) if isinstance(x, dict) else None
    return x


# ----------------------------------------------------------------- one section per task
# What every task's section shares is written once (task_section); what differs is a
# Section of this module: its intro, its table's columns, the test slices it shows and the
# figures only it draws. They stay here, not on the Task (mri_ensemble/tasks is a dep of
# every training): a figure or a sentence changes no training stage.
@dataclass(frozen=True)
class Section:
    intro: Callable[[Any], list[str]]  # the test set -> heading and what the numbers are
    columns: Callable[[Any], list[tuple[str, str, str]]]  # (split, metric path, header)
    slices: Callable[[Any, int], np.ndarray]  # the test set, k -> the slices the figures show
    # (test set, slices, members' outputs of them (M, k, ...), weights, metrics, models,
    # figures folder) -> (stem, title) of each figure it drew, in section order
    figures: Callable[..., list[tuple[str, str]]]
    notes: Callable[[dict], list[str]] = lambda details: []  # ensemble.json -> more lines
    gain_cost_baselines: tuple[tuple[str, str], ...] = ()  # (baseline, label) at 0 params


def task_section(task: str, params: dict, args: argparse.Namespace, figures: Path) -> list[str]:
    """The report's section of ``task``: its table (every model, the shipped ensemble, the
    unweighted mean, the baselines), the gain over the best single model, the figures, the
    shifted test sets, and the ensemble's methods, cost, contributions and trust."""
    t, spec = TASKS[task], SECTIONS[task]
    rep = args.reports / task
    metrics = json.loads((rep / "metrics.json").read_text())
    details = json.loads((rep / "ensemble.json").read_text())
    models = task_models(params, task)
    ens, key = metrics["ensemble"], t.key_metric
    label = t.report_columns[0][2].split()[-1]
    test = t.read(args.prepared / task / "test.h5")
    columns = spec.columns(test)
    lines = [
        *spec.intro(test),
        "| model | params | " + " | ".join(h for _, _, h in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]

    def row(name: str, n: int, scores: dict) -> str:
        cells = (_cell(scores.get(s), m) for s, m, _ in columns)
        return f"| {name} | {n:,} | " + " | ".join(cells) + " |"

    candidates = list(metrics["models"])  # the models, then their TTA candidates
    params_of = {m: int(metrics["models"][m]["params"]) for m in candidates}
    members = ensemble_members(ens["weights"])  # what predict, the registry and cost run
    kept = sum(params_of[m] for m in trained_models(members))
    lines += [row(m, params_of[m], metrics["models"][m]) for m in candidates]
    w = fmt_weights(ens["weights"])
    lines.append(row(f"**ensemble** ({ens['method']}: {w})", kept, ens))
    lines.append(row("unweighted mean", sum(params_of[m] for m in trained_models(candidates)),
                     details["unweighted_mean"]))  # fmt: skip
    for name, title in t.report_baselines:
        if name in metrics["baselines"]:
            lines.append(row(title, 0, metrics["baselines"][name]))
    best = best_single(metrics["models"], key)
    b = metrics["models"][best]
    lines += [
        "",
        f"Best single model on val: **{best}**. The ensemble changes test {label} by "
        f"**{ens['test'][key] - b['test'][key]:+.4f}** ({ens['test'][key]:.4f} vs "
        f"{b['test'][key]:.4f}) at {kept / b['params']:.2f}x its parameters ({len(members)} "
        f"members). Search: {details['candidates_evaluated']} candidates.",
        "",
    ]
    histories = {m: read_history(rep / "history" / f"{m}.csv") for m in models}
    plot_loss_curves(histories, figures / f"{task}_loss_curves.png", title=task.capitalize())
    idx = spec.slices(test, int(get(params, "report.overlay_slices", 4)))
    outputs = np.stack(
        [t.read_outputs(args.predictions / task / m / "test.h5")[0][idx] for m in candidates]
    )  # (M, k, ...)
    weights = weights_array(ens["weights"], candidates)
    own = spec.figures(test, idx, outputs, weights, metrics, candidates, figures)
    points = {m: (params_of[m] / 1e6, metrics["models"][m]["test"][key]) for m in candidates}
    points["ensemble"] = (kept / 1e6, ens["test"][key])
    for name, point in spec.gain_cost_baselines:
        points[point] = (0.0, metrics["baselines"][name]["test"][key])
    plot_gain_cost(points, figures / f"{task}_gain_cost.png", "parameters (M)", f"test {label}")
    lines += [*shifted_block(task, metrics), "", *spec.notes(details)]
    lines += ensemble_science(task, key, rep, figures)
    for name, title in (("loss_curves", "Loss curves"), *own, ("gain_cost", "Gain versus cost")):
        lines += [f"### {title}", "", f"![{title}](figures/{task}_{name}.png)", ""]
    return lines


def segmentation_intro(test: Any) -> list[str]:
    fg = ", ".join(class_names_of(test)[1:])
    return [
        f"## Segmentation (classes {fg}; source: {test.attrs.get('source')})",
        "",
        "Mean foreground IoU and Dice per case (3-D, ACDC style); weights searched on val only.",
        "",
    ]


def segmentation_columns(test: Any) -> list[tuple[str, str, str]]:
    per_class = [
        ("test", f"per_class.{c}.dice", f"test Dice {c}") for c in class_names_of(test)[1:]
    ]
    return [("val", "iou", "val IoU"), ("val", "dice", "val Dice"), ("test", "iou", "test IoU"),
            ("test", "dice", "test Dice"), *per_class]  # fmt: skip


def segmentation_figures(
    test: Any, idx: np.ndarray, probs: np.ndarray, weights: np.ndarray, metrics: dict,
    models: list[str], figures: Path,
) -> list[tuple[str, str]]:  # fmt: skip
    """Per-class test Dice bars, overlays (truth, each model, ensemble, threshold baseline)
    and the uncertainty maps beside the error."""
    names = class_names_of(test)
    base = metrics["baselines"].get("threshold")
    bars = {m: {c: metrics["models"][m]["test"]["per_class"][c]["dice"] for c in names[1:]}
            for m in models}  # fmt: skip
    bars["ensemble"] = {c: metrics["ensemble"]["test"]["per_class"][c]["dice"] for c in names[1:]}
    if base is not None:
        bars["threshold"] = {c: base["test"]["per_class"][c]["dice"] for c in names[1:]}
    plot_metric_bars(bars, figures / "segmentation_per_class_dice.png", ylabel="test Dice")
    preds = {m: probs[i].argmax(1) for i, m in enumerate(models)}
    preds["ensemble"] = combine(probs, weights).argmax(1)
    if base is not None:
        preds["threshold"] = threshold_segmentation(test.image, test.case)[idx]
    plot_segmentation_overlays(
        test.image[idx], test.label[idx], preds, figures / "segmentation_overlays.png", names
    )
    error = TASKS["segmentation"].error_map(preds["ensemble"], test.label[idx])
    maps = TASKS["segmentation"].uncertainty_maps(probs, weights)
    plot_uncertainty_maps(test.image[idx], error, maps, figures / "segmentation_uncertainty.png")
    return [("per_class_dice", "Per-class test Dice"), ("overlays", "Test overlays"),
            ("uncertainty", "Uncertainty beside the error (test)")]  # fmt: skip


def reconstruction_intro(test: Any) -> list[str]:
    accel = test.mask.shape[1] / test.mask.sum(1).mean()
    return [
        "## Reconstruction (accelerated multi-coil MRI)",
        "",
        f"{test.kspace.shape[1]} coils, {test.kspace.shape[2]}x{test.kspace.shape[3]}, "
        f"{test.attrs.get('mask', {}).get('kind', '?')} masks at {accel:.1f}x acceleration "
        f"(source: {test.attrs.get('source')}). SSIM, PSNR and NMSE per volume with data range "
        "= the volume's target maximum (fastMRI evaluation), averaged over volumes; weights "
        "searched on val SSIM only.",
        "",
    ]


def reconstruction_slices(test: Any, k: int) -> np.ndarray:
    """``k`` test slices evenly spread over the set."""
    return np.linspace(0, len(test) - 1, min(k, len(test))).round().astype(int)


def reconstruction_figures(
    test: Any, idx: np.ndarray, recons: np.ndarray, weights: np.ndarray, metrics: dict,
    models: list[str], figures: Path,
) -> list[tuple[str, str]]:  # fmt: skip
    """Target, zero-filled, GRAPPA, each model and the ensemble with error maps, and the
    uncertainty maps beside the error."""
    images = {"zero-filled": zero_filled(test.subset(idx)), "GRAPPA": test.grappa[idx]}
    images.update({m: recons[i] for i, m in enumerate(models)})
    images["ensemble"] = combine_images(recons, weights)
    plot_reconstructions(test.target[idx], images, figures / "reconstruction_examples.png")
    error = TASKS["reconstruction"].error_map(images["ensemble"], test.target[idx])
    maps = TASKS["reconstruction"].uncertainty_maps(recons, weights)
    plot_uncertainty_maps(test.target[idx], error, maps, figures / "reconstruction_uncertainty.png")
    return [("examples", "Test reconstructions and error maps"),
            ("uncertainty", "Uncertainty beside the error (test)")]  # fmt: skip


def data_consistency_notes(details: dict) -> list[str]:
    """SSIM of the fused image with and without the acquired k-space lines put back."""
    dc = details.get("data_consistency")
    if not dc:
        return []
    splits = list(dc["scores"]["true"])
    return [
        "Data consistency on the fused image (the acquired k-space lines put back; "
        f"shipped: {'on' if dc['on'] else 'off'}), SSIM:",
        "",
        "| fused ensemble | " + " | ".join(splits) + " |",
        "|---|" + "---:|" * len(splits),
        *(
            f"| {'with' if flag == 'true' else 'without'} data consistency | "
            + " | ".join(fmt(dc["scores"][flag][s]["ssim"]) for s in splits)
            + " |"
            for flag in ("true", "false")
        ),
        "",
    ]


SECTIONS = {
    "segmentation": Section(
        segmentation_intro,
        segmentation_columns,
        lambda test, k: overlay_slices(test.label, k),
        segmentation_figures,
    ),
    "reconstruction": Section(
        reconstruction_intro,
        lambda test: list(TASKS["reconstruction"].report_columns),
        reconstruction_slices,
        reconstruction_figures,
        notes=data_consistency_notes,
        gain_cost_baselines=(("grappa", "GRAPPA"),),
    ),
}


def results_block(task: str, metrics: dict, cost: dict | None) -> str:
    """The README's results for ``task``: one table and the sentences stating the gains,
    every number computed from ``metrics`` (and ``cost``) unrounded, then formatted once."""
    cols = TASKS[task].report_columns
    key = cols[0][1]
    label = cols[0][2].split()[-1]
    models = list(metrics["models"])
    ens = metrics["ensemble"]
    mean = metrics["methods"].get("mean")
    members = ensemble_members(ens["weights"])
    params = {m: int(metrics["models"][m]["params"]) for m in models}
    lines = [
        "| model | params | " + " | ".join(c[2] for c in cols) + " |",
        "|---|---:|" + "---:|" * len(cols),
    ]

    def row(name: str, n: int, scores: dict) -> str:
        return (
            f"| {name} | {n:,} | " + " | ".join(_cell(scores.get(s), k) for s, k, _ in cols) + " |"
        )

    for m in models:
        lines.append(row(m, params[m], metrics["models"][m]))
    lines.append(
        row(f"**ensemble** ({ens['method']}: {fmt_weights(ens['weights'])})",
            sum(params[m] for m in trained_models(members)), ens)
    )  # fmt: skip
    if mean is not None:
        lines.append(row(f"unweighted mean of the {len(models)}",
                         sum(params[m] for m in trained_models(models)), mean))  # fmt: skip
    for name, title in TASKS[task].report_baselines:
        if name in metrics["baselines"]:
            lines.append(row(title, 0, metrics["baselines"][name]))
    best = best_single(metrics["models"], key)
    b = metrics["models"][best]
    gain = ens["test"][key] - b["test"][key]
    ratio = sum(params[m] for m in trained_models(members)) / params[best]
    sentence = (
        f"Best single model on val: {best}. The shipped ensemble ({len(members)} members) "
        f"changes test {label} by {gain:+.4f} ({ens['test'][key]:.4f} vs {b['test'][key]:.4f}) "
        f"for {ratio:.2f}x its parameters"
    )
    if cost is not None:
        full = cost["sizes"][-1]["macs"]
        sentence += f" and {full / cost['member_macs'][best]:.2f}x its MACs per slice"
    sentence += (
        f"; on val it scores {ens['val'][key]:.4f} against {b['val'][key]:.4f} "
        f"({ens['val'][key] - b['val'][key]:+.4f})."
    )
    for metric, name, unit in TASKS[task].report_gain_notes:
        sentence += (
            f" Test {name} changes by {ens['test'][metric] - b['test'][metric]:+.2f} {unit}."
        )
    if mean is not None:
        sentence += (
            f" The unweighted mean of all {len(models)} changes test {label} by "
            f"{mean['test'][key] - b['test'][key]:+.4f}."
        )
    lines += ["", sentence]
    if cost is not None:
        lines += ["", f"Recommendation (`cost@{task}`): {cost['recommendation']}"]
    shifted = shifted_block(task, metrics)
    if shifted:
        lines += ["", *shifted]
    return "\n".join(lines)


def methods_block(metrics: dict[str, dict]) -> str:
    """Every ensemble method of every task: val in-sample / cross-fitted / test."""
    tasks = list(metrics)
    keys = {t: TASKS[t].report_columns[0][1] for t in tasks}
    names = list(dict.fromkeys(n for t in tasks for n in metrics[t]["methods"]))
    lines = [
        "| method | "
        + " | ".join(
            f"{t}: val {TASKS[t].report_columns[0][2].split()[-1]} in-sample / cross-fitted / test"
            for t in tasks
        )
        + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for name in names:
        cells = []
        for t in tasks:
            m = metrics[t]["methods"].get(name)
            cells.append(
                " / ".join(_cell(m[split], keys[t]) for split in ("val", "crossfit", "test"))
                if m
                else "—"
            )
        shipped = [t for t in tasks if metrics[t]["ensemble"]["method"] == name]
        label = f"**{name}** (shipped)" if len(shipped) == len(tasks) else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_blocks(reports: Path) -> dict[str, str]:
    """Per task with a committed metrics.json its results block, and the methods table."""
    out, metrics = {}, {}
    for task in TASKS:
        metrics_file, cost_file = reports / task / "metrics.json", reports / task / "cost.json"
        if metrics_file.is_file():
            cost = json.loads(cost_file.read_text()) if cost_file.is_file() else None
            metrics[task] = json.loads(metrics_file.read_text())
            out[task] = results_block(task, metrics[task], cost)
    if metrics:
        out["methods"] = methods_block(metrics)
        out["trust"] = trust_block(metrics)
    answers = []  # per TTA candidate: does it beat a second model at its compute?
    for task in metrics:
        cost_file = reports / task / "cost.json"
        if cost_file.is_file():
            key = TASKS[task].key_metric
            label = {"iou": "IoU", "ssim": "SSIM"}.get(key, key)
            cost = json.loads(cost_file.read_text())
            answers += tta_answer(cost, metrics[task]["models"], key, label)
    if answers:
        out["tta"] = "\n".join(answers[1:])  # the lines come each after a blank one
    students = {t: reports / t / "student.json" for t in metrics}
    students = {t: json.loads(f.read_text()) for t, f in students.items() if f.is_file()}
    if students:
        out["distill"] = distill_block(metrics, students, reports)
    return out


def distill_block(metrics: dict[str, dict], students: dict[str, dict], reports: Path) -> str:
    """Per task with a distilled student (distill@<task>): the best single model, the
    shipped ensemble and the student on every scored test set, with parameters and MACs
    per slice, and the share of the ensemble's gain over the best single model kept."""
    lines = []
    for task, st in students.items():
        m, label = metrics[task], TASKS[task].report_columns[0][2].split()[-1]
        splits = ["val", *(s for s in test_first(st["compared"]["splits"]) if s != "val")]
        best = st["compared"]["best_single_model"]
        members = ensemble_members(m["ensemble"]["weights"])
        cost_file = reports / task / "cost.json"
        cost = json.loads(cost_file.read_text()) if cost_file.is_file() else {}
        macs = cost.get("member_macs", {})

        def gmacs(names: list[str], macs: dict = macs) -> str:
            return (
                f"{sum(macs[n] for n in names) / 1e9:.3f}" if all(n in macs for n in names) else "—"
            )

        how = "fine-tuned on it" if st["student"].get("init") == "trained" else "trained on it"
        rows = (
            (f"best single on val ({best})", m["models"][best]["params"], gmacs([best]),
             "best_single"),
            (f"**ensemble** ({len(members)} members)",
             sum(m["models"][n]["params"] for n in trained_models(members)), gmacs(members),
             "ensemble"),
            (f"student ({st['student']['trained_from']} {how}, alpha {st['student']['alpha']:g}, "
             f"{st['student']['training']['epochs_run']} epochs)", st["student"]["params"],
             gmacs([STUDENT]), "student"),
        )  # fmt: skip
        lines += [
            f"| {task} | params | GMACs/slice | "
            + " | ".join(f"{s} {label}" for s in splits)
            + " |",
            "|---|---:|---:|" + "---:|" * len(splits),
        ]
        for name, n, g, col in rows:
            cells = " | ".join(fmt(st["compared"]["splits"][s][col]) for s in splits)
            lines.append(f"| {name} | {int(n):,} | {g} | {cells} |")
        kept = [f"{s} {fmt(st['compared']['splits'][s]['gain_kept'])}" for s in splits]
        lines += [
            "",
            f"Share of the ensemble's {label} gain over the best single model that the "
            f"student keeps, at one model's cost: {', '.join(kept)} (1: all of it, 0: none, "
            "negative: below the best single model; — where the ensemble gains nothing).",
            "",
        ]
    return "\n".join(lines).rstrip()


def trust_block(metrics: dict[str, dict]) -> str:
    """Per task and scored test set: the uncertainty's correlation with the error, what the
    most uncertain 20 % of cases lose, and (segmentation) the ensemble's ECE before/after
    temperature scaling."""
    lines = [
        "| task | test set | uncertainty map | correlation with the error | most uncertain "
        "20 %: score / rest / loss | ensemble ECE / tempered |",
        "|---|---|---|---:|---|---|",
    ]
    for task, m in metrics.items():
        cal = m.get("calibration") or {}
        unc = m.get("uncertainty") or {}
        for split in test_first(unc):
            u, f = unc[split], unc[split]["flagged"]
            metric = TASKS[task].flag_metric
            ece = cal.get(split, {}).get("ensemble")
            ece_cell = f"{fmt(ece['ece'])} / {fmt(ece['ece_tempered'])}" if ece else "—"
            lines.append(
                f"| {task} | {split} | {u['map']} | {fmt(u['correlation'])} | {metric} "
                f"{fmt(f['flagged_score'])} / {fmt(f['rest_score'])} / {signed(f['loss'])} | "
                f"{ece_cell} |"
            )
    return "\n".join(lines)


def sync_readme(readme: Path, blocks: dict[str, str], check: bool) -> list[str]:
    """Put each block between its markers in ``readme`` (or, with ``check``, only compare).
    Returns the tasks whose block differed; DataError if a marker pair is missing."""
    text = readme.read_text()
    stale = []
    for task, body in blocks.items():
        begin, end = RESULTS_BEGIN.format(task), RESULTS_END.format(task)
        i, j = text.find(begin), text.find(end)
        if i < 0 or j < i:
            raise DataError(f"{readme}: no '{begin}' ... '{end}' block")
        new = f"{begin}\n{body}\n{end}"
        if text[i : j + len(end)] != new:
            stale.append(task)
            text = text[:i] + new + text[j + len(end) :]
    if stale and not check:
        with atomic_path(readme) as tmp:
            tmp.write_text(text)
    return stale


def val_guarantees(reports: Path) -> list[str]:
    """Each task's shipped ensemble scores at least its best single model on val."""
    bad = []
    for task in TASKS.values():
        path = reports / task.name / "metrics.json"
        if not path.is_file():
            continue
        metrics, key = json.loads(path.read_text()), task.key_metric
        best = max(m["val"][key] for m in metrics["models"].values())
        if metrics["ensemble"]["val"][key] < best - 1e-9:
            bad.append(f"{path}: ensemble val {key} {metrics['ensemble']['val'][key]} < {best}")
    return bad


@cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, help="the report (markdown)")
    ap.add_argument("--figures", type=Path, help="folder of the report's figures")
    ap.add_argument(
        "--platform", type=Path, help="write the CPU/torch fingerprint the bytes hold on here"
    )
    ap.add_argument(
        "--readme", type=Path, help="instead of the report: rewrite this README's results blocks"
    )
    ap.add_argument("--check", action="store_true", help="with --readme: only compare, exit 1")
    ap.add_argument(
        "--reports", type=Path, default=Path("reports"), help="holds <task>/metrics.json"
    )
    ap.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    ap.add_argument("--predictions", type=Path, default=Path("data/predictions"))
    args = ap.parse_args()
    if args.readme is not None:
        stale = sync_readme(args.readme, readme_blocks(args.reports), args.check)
        problems = [
            f"{args.readme}: results block of {t} differs from {args.reports}/{t}/"
            "metrics.json (python -m stages.report --readme README.md)"
            for t in stale
        ]
        problems += val_guarantees(args.reports)
        for line in problems if args.check else problems[len(stale) :]:
            print(line, file=sys.stderr)
        if args.check and problems:
            sys.exit(1)
        log.info("%s: results blocks %s", args.readme, "checked" if args.check else "written")
        return
    if args.out is None or args.figures is None:
        raise ConfigError("report: --out and --figures are needed (or --readme)")
    params = load_params()
    lines = [
        "# MRI ensemble report",
        "",
        f"Generated by the `report` stage from the pipeline's own outputs. Reproduce: `{REPRODUCE}`.",
        "",
    ]
    for task, body in readme_blocks(args.reports).items():
        lines += [f"## Summary: {SUMMARY_TITLES.get(task, task)}", "", body, ""]
    with atomic_path(args.figures) as tmp_fig:
        tmp_fig.mkdir()
        for task in SECTIONS:
            if task_models(params, task):
                lines += task_section(task, params, args, tmp_fig)
    with atomic_path(args.out) as tmp:
        tmp.write_text("\n".join(lines))
    if args.platform is not None:  # the bytes hold per CPU type (mri_ensemble/machine.py)
        write_json(args.platform, fingerprint())
    log.info("wrote %s and %s/", args.out, args.figures)


if __name__ == "__main__":
    main()
