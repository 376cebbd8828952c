"""Report figures (PNG): loss curves, metric bars, overlays, reconstructions, gain vs cost.

Figures are built with ``matplotlib.figure.Figure`` (Agg canvas, no pyplot state, so nothing
global is left open) and written atomically: a temporary file renamed into place.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap, to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from mri_ensemble.errors import DataError
from mri_ensemble.io import atomic_path

logger = logging.getLogger(__name__)

_DPI = 100
_SECOND_PANEL = ("val_iou", "val_ssim", "val_dice", "val_psnr")  # first one present is drawn
# overlay colours of labels 1, 2, 3, ... (background is transparent): RV, myocardium, LV first
_LABEL_COLOURS = ("tab:blue", "tab:green", "tab:red", "tab:orange", "tab:purple", "tab:cyan")


def _save(fig: Figure, path: Path) -> None:
    """Write ``fig`` as PNG to ``path`` atomically (the temporary name has no .png suffix)."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            # no Software tag: the bytes do not depend on the matplotlib version
            fig.savefig(
                tmp, format="png", dpi=_DPI, bbox_inches="tight", metadata={"Software": None}
            )
    except OSError as exc:
        raise DataError(f"{path}: could not write the figure ({exc})") from exc
    finally:
        fig.clear()
    logger.info("wrote figure %s", path)


def _colour(i: int) -> tuple[float, float, float, float]:
    """The i-th colour of a cycle that stays distinct for up to 20 series."""
    r, g, b, a = colormaps["tab10"](i) if i < 10 else colormaps["tab20b"]((i - 10) % 20)
    return (r, g, b, a)


def plot_loss_curves(
    histories: Mapping[str, Sequence[Mapping[str, float]]], path: Path, title: str = ""
) -> None:
    """Per-epoch loss curves of several models, one colour per model.

    ``histories``: model name -> rows like ``{"epoch": 1, "train_loss": .., "val_loss": ..}``
    (a row without ``epoch`` is numbered by position). The left panel draws ``train_loss``
    solid and ``val_loss`` dashed; a right panel draws the first of ``val_iou``, ``val_ssim``,
    ``val_dice``, ``val_psnr`` found in any row. Raises ValueError when there is nothing to plot.
    """
    if not histories or not any(histories.values()):
        raise ValueError("plot_loss_curves: expected at least one model with epochs, found none")
    keys = {k for rows in histories.values() for row in rows for k in row}
    second = next((k for k in _SECOND_PANEL if k in keys), None)
    if not {"train_loss", "val_loss"} & keys and second is None:
        raise ValueError(
            "plot_loss_curves: expected rows with train_loss, val_loss or a validation metric, "
            f"found keys {sorted(keys)}"
        )
    fig = Figure(figsize=(11 if second else 6, 4.2))
    axes = fig.subplots(1, 2 if second else 1, squeeze=False)[0]
    for i, (name, rows) in enumerate(histories.items()):
        colour = _colour(i)
        epochs = [float(row.get("epoch", n + 1)) for n, row in enumerate(rows)]

        def series(key: str, rows: Sequence[Mapping[str, float]] = rows) -> np.ndarray:
            return np.array([float(row.get(key, math.nan)) for row in rows])

        label: str | None = name  # one legend entry per model, on its first curve
        for key, style in (("train_loss", "-"), ("val_loss", "--")):
            values = series(key)
            if np.isfinite(values).any():
                axes[0].plot(epochs, values, style, color=colour, label=label, marker=".")
                label = None
        if second:
            values = series(second)
            if np.isfinite(values).any():
                axes[1].plot(epochs, values, "--", color=colour, label=name, marker=".")
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss (solid train, dashed val)")
    if second:
        axes[1].set(xlabel="epoch", ylabel=second, title=second)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2 if len(histories) > 6 else 1)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def plot_metric_bars(
    scores: Mapping[str, Mapping[str, float]], path: Path, ylabel: str, title: str = ""
) -> None:
    """Grouped bar chart: one group per class or metric, one bar per model / ensemble / baseline.

    ``scores``: name -> {class or metric name -> value}; a missing value leaves a gap. Group
    order is first appearance; bars carry their value. Raises ValueError when ``scores`` is
    empty or holds no value.
    """
    groups = list(dict.fromkeys(k for per in scores.values() for k in per))
    if not scores or not groups:
        raise ValueError("plot_metric_bars: expected at least one name with one value, found none")
    names = list(scores)
    width = 0.8 / len(names)
    fig = Figure(figsize=(max(6.0, 0.35 * len(names) * len(groups) + 2.5), 4.5))
    ax = fig.subplots()
    centres = np.arange(len(groups), dtype=float)
    for i, name in enumerate(names):
        values = np.array([float(scores[name].get(g, math.nan)) for g in groups])
        xs = centres - 0.4 + width * (i + 0.5)
        bars = ax.bar(xs, np.nan_to_num(values), width, color=_colour(i), label=name)
        for bar, value in zip(bars, values, strict=True):
            if np.isfinite(value) and len(names) * len(groups) <= 40:
                ax.annotate(
                    f"{value:.3g}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=6,
                    rotation=90 if len(names) > 4 else 0,
                )
    ax.set_xticks(centres, groups)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.12)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if title:
        ax.set_title(title)
    _save(fig, path)


def plot_segmentation_overlays(
    images: np.ndarray,
    truth: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    path: Path,
    class_names: Sequence[str],
) -> None:
    """Grid of K example slices: image, ground truth, then one column per prediction.

    ``images`` float (K, H, W); ``truth`` and each prediction int labels (K, H, W), label c
    named ``class_names[c]`` (label 0, the background, is drawn transparent, others as
    semi-transparent colours over the image, with a legend). Raises ValueError when shapes
    differ or a label has no name.
    """
    images = np.asarray(images)
    truth = np.asarray(truth)
    if images.ndim != 3 or images.shape[0] == 0:
        raise ValueError(
            f"plot_segmentation_overlays: expected images (K, H, W) with K >= 1, found shape {images.shape}"
        )
    maps = {"truth": truth, **{name: np.asarray(p) for name, p in predictions.items()}}
    for name, labels in maps.items():
        if labels.shape != images.shape:
            raise ValueError(
                f"plot_segmentation_overlays: expected {name} labels of the images' shape "
                f"{images.shape}, found {labels.shape}"
            )
    n_classes = len(class_names)
    for name, labels in maps.items():
        bad = np.unique(labels[(labels < 0) | (labels >= n_classes)])
        if bad.size:
            raise ValueError(
                f"plot_segmentation_overlays: expected {name} labels in 0..{n_classes - 1} "
                f"({n_classes} class names), found {bad[:10].tolist()}"
            )
    colours = [(0.0, 0.0, 0.0, 0.0)] + [
        to_rgba(_LABEL_COLOURS[(c - 1) % len(_LABEL_COLOURS)], 0.45) for c in range(1, n_classes)
    ]
    cmap = ListedColormap(colours)
    k, cols = images.shape[0], 1 + len(maps)
    fig = Figure(figsize=(2.2 * cols, 2.2 * k + 0.6))
    axes = fig.subplots(k, cols, squeeze=False)
    titles = ["image", *maps]
    for row in range(k):
        image = images[row].astype(np.float32)
        lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
        for col, ax in enumerate(axes[row]):
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            if col > 0:
                labels = maps[titles[col]][row]
                ax.imshow(
                    labels, cmap=cmap, vmin=-0.5, vmax=n_classes - 0.5, interpolation="nearest"
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[col], fontsize=9)
    handles = [Patch(color=colours[c], label=class_names[c]) for c in range(1, n_classes)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.subplots_adjust(wspace=0.02, hspace=0.05, bottom=0.6 / (2.2 * k + 0.6))
    _save(fig, path)


def plot_gain_cost(
    points: Mapping[str, tuple[float, float]], path: Path, xlabel: str, ylabel: str
) -> None:
    """Labelled scatter of (cost, score) per name, e.g. what the ensemble costs over one model.

    ``points``: name -> (x = cost, y = score). Raises ValueError when ``points`` is empty.
    """
    if not points:
        raise ValueError("plot_gain_cost: expected at least one (cost, score) point, found none")
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    for i, (name, (x, y)) in enumerate(points.items()):
        ax.scatter([x], [y], color=_colour(i), s=40, zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    _save(fig, path)


def plot_reconstructions(
    target: np.ndarray,
    images: Mapping[str, np.ndarray],
    path: Path,
    error_gain: float = 5.0,
) -> None:
    """Grid of K example slices: the target, then each reconstruction with its error map.

    ``target`` float (K, H, W); ``images`` name -> float (K, H, W) (e.g. zero-filled,
    GRAPPA, each model, the ensemble). Two rows per slice: the images on one grey scale
    (0 to the slice's target maximum), and below each its absolute error |image - target|
    on the same scale multiplied by ``error_gain`` (so a 20 % error is white at gain 5).
    Each panel is titled with its NMSE on that slice. Raises
    ValueError when shapes differ or nothing is given.
    """
    target = np.asarray(target, dtype=np.float32)
    if target.ndim != 3 or target.shape[0] == 0 or not images:
        raise ValueError(
            f"plot_reconstructions: expected target (K, H, W) with K >= 1 and at least one "
            f"image set, found shape {target.shape} and {len(images)} sets"
        )
    for name, im in images.items():
        if np.shape(im) != target.shape:
            raise ValueError(
                f"plot_reconstructions: expected {name} of the target's shape {target.shape}, "
                f"found {np.shape(im)}"
            )
    k, cols = target.shape[0], 1 + len(images)
    fig = Figure(figsize=(2.0 * cols, 4.0 * k))
    axes = fig.subplots(2 * k, cols, squeeze=False)
    for row in range(k):
        ref = target[row]
        hi = float(ref.max()) or 1.0
        panels = {"target": ref, **{n: np.asarray(v[row], np.float32) for n, v in images.items()}}
        for col, (name, im) in enumerate(panels.items()):
            top, bottom = axes[2 * row, col], axes[2 * row + 1, col]
            top.imshow(im, cmap="gray", vmin=0, vmax=hi)
            if name == "target":
                bottom.axis("off")
                title = "target"
            else:
                bottom.imshow(np.abs(im - ref) * error_gain, cmap="magma", vmin=0, vmax=hi)
                nmse = float(np.sum((im - ref) ** 2) / max(float(np.sum(ref**2)), 1e-12))
                title = f"{name}\nNMSE {nmse:.4f}"
            top.set_title(title, fontsize=8)
            for ax in (top, bottom):
                ax.set_xticks([])
                ax.set_yticks([])
        axes[2 * row + 1, 0].text(
            0.5, 0.5, f"|error| x{error_gain:g}", ha="center", va="center", fontsize=8
        )
    fig.subplots_adjust(wspace=0.03, hspace=0.15)
    _save(fig, path)


def plot_pareto(
    points: Sequence[tuple[str, float, float]], path: Path, xlabel: str, ylabel: str
) -> None:
    """Score versus cost of ensembles of growing size, with their Pareto front.

    ``points``: (label, cost, score) in order of size. The front (no other point is both
    cheaper and better) is drawn as a step line. Raises ValueError when empty.
    """
    if not points:
        raise ValueError("plot_pareto: expected at least one (label, cost, score), found none")
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    xs = np.array([p[1] for p in points], dtype=float)
    ys = np.array([p[2] for p in points], dtype=float)
    front = [
        i
        for i in range(len(points))
        if not any(
            (xs[j] <= xs[i] and ys[j] > ys[i]) or (xs[j] < xs[i] and ys[j] >= ys[i])
            for j in range(len(points))
        )
    ]
    order = sorted(front, key=lambda i: xs[i])
    ax.step(xs[order], ys[order], where="post", color="0.5", lw=1, zorder=2, label="Pareto front")
    for i, (label, x, y) in enumerate(points):
        on = i in front
        ax.scatter([x], [y], s=45 if on else 25, color=_colour(0 if on else 1), zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    ax.legend(fontsize=8, loc="lower right", frameon=False)
    _save(fig, path)


def plot_uncertainty_maps(
    images: np.ndarray, error: np.ndarray, maps: Mapping[str, np.ndarray], path: Path
) -> None:
    """Per example slice (rows): the image, the ensemble's error map and each uncertainty map
    (``maps`` name -> (K, H, W)), each map on its own colour scale over all rows, so that a
    reader sees whether the uncertainty lights up where the error is."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3 or images.shape[0] == 0 or np.shape(error) != images.shape:
        raise ValueError(
            f"plot_uncertainty_maps: expected images and error (K, H, W), found "
            f"{images.shape} and {np.shape(error)}"
        )
    panels = {"error": np.asarray(error, np.float32), **{k: np.asarray(v) for k, v in maps.items()}}
    k, cols = images.shape[0], 1 + len(panels)
    fig = Figure(figsize=(2.2 * cols, 2.2 * k))
    axes = fig.subplots(k, cols, squeeze=False)
    tops = {name: float(np.max(v)) or 1.0 for name, v in panels.items()}
    for row in range(k):
        axes[row, 0].imshow(images[row], cmap="gray")
        for col, (name, v) in enumerate(panels.items(), start=1):
            axes[row, col].imshow(v[row], cmap="magma", vmin=0, vmax=tops[name])
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(["image", *panels][col].replace("_", " "), fontsize=8)
    fig.subplots_adjust(wspace=0.03, hspace=0.05)
    _save(fig, path)


def plot_reliability(curves: Mapping[str, Mapping[str, Sequence]], path: Path) -> None:
    """Reliability diagram: accuracy against mean confidence per confidence bin, one line
    per curve (``curves`` name -> :func:`~mri_ensemble.ensemble.calibration.reliability`'s
    dict, with its ECE in the name), the diagonal being perfect calibration."""
    if not curves:
        raise ValueError("plot_reliability: expected at least one curve, found none")
    fig = Figure(figsize=(5, 4.5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfectly calibrated")
    for i, (name, r) in enumerate(curves.items()):
        conf, acc = np.asarray(r["confidence"], float), np.asarray(r["accuracy"], float)
        keep = np.isfinite(conf) & np.isfinite(acc)
        ax.plot(conf[keep], acc[keep], marker="o", ms=3, color=_colour(i), label=name)
    ax.set(xlabel="confidence (top-label probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", frameon=False)
    _save(fig, path)
