"""Browser UI (Gradio) over the trained models and the ensemble weights.

    mri-ensemble ui [--root .] [--port 7860]      # then open http://127.0.0.1:7860

Two tabs. *Segmentation*: upload a NIfTI volume or a PNG/JPEG slice, choose one model or
the ensemble, and see the class overlay (with a legend and a slice slider); download the
labels (NIfTI with the input's affine and shape, or PNG). *Reconstruction*: upload a
fastMRI HDF5 file and see the reconstruction beside the zero-filled input, the target and
an error map when the file is fully sampled; download the fastMRI submission HDF5.

What can be chosen is read from the project folder on every page load (what is trained,
whether ensemble weights exist). Wrong file types, corrupt files and a project with no
trained models yet give a one-line message in the page, never a traceback. Gradio's
analytics are off and the page loads nothing from the network.
"""

from __future__ import annotations

import html
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from . import inputs, project  # noqa: E402
from .errors import ConfigError, PipelineError  # noqa: E402
from .figures import _LABEL_COLOURS  # noqa: E402  (same colours as the report's overlays)
from .inference import Predictor, load_predictor  # noqa: E402
from .mri.quality import reconstruction_scores  # noqa: E402
from .tasks import TASKS  # noqa: E402
from .tasks.reconstruction import ReconstructionResult  # noqa: E402

log = logging.getLogger(__name__)

DISPLAY_PX = 384  # overlays and images are upscaled (nearest) to about this many pixels
ALPHA = 0.45  # label opacity over the image, as in the report's figures


def _rgb(colour: str) -> tuple[int, int, int]:
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(colour)
    return round(255 * r), round(255 * g), round(255 * b)


def class_colours(n_classes: int) -> list[tuple[int, int, int]]:
    """RGB of label 1..K-1 (index 0, the background, is never drawn)."""
    return [(0, 0, 0)] + [
        _rgb(_LABEL_COLOURS[(k - 1) % len(_LABEL_COLOURS)]) for k in range(1, n_classes)
    ]


def _upscale(image: np.ndarray) -> np.ndarray:
    factor = max(1, DISPLAY_PX // max(image.shape[:2]))
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def _grey(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(H, W) float -> (H, W, 3) uint8, [lo, hi] to [0, 255]."""
    scaled = np.clip((image - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    return np.repeat((255 * scaled).astype(np.uint8)[..., None], 3, axis=2)


def _side_by_side(grey: np.ndarray, blended: np.ndarray) -> np.ndarray:
    """The plain slice and the blended one, upscaled, with a white gap between them."""
    left, right = _upscale(grey), _upscale(blended.astype(np.uint8))
    gap = np.full((left.shape[0], 6, 3), 255, np.uint8)
    return np.concatenate([left, gap, right], axis=1)


def overlay(
    image: np.ndarray, labels: np.ndarray, n_classes: int, lo: float, hi: float
) -> np.ndarray:
    """The slice and the slice with its labels blended in, side by side (upscaled), uint8 RGB."""
    grey = _grey(image, lo, hi)
    blended = grey.astype(np.float32)
    for k, colour in enumerate(class_colours(n_classes)):
        if k == 0:
            continue
        hit = labels == k
        blended[hit] = (1 - ALPHA) * blended[hit] + ALPHA * np.array(colour, np.float32)
    return _side_by_side(grey, blended)


def uncertainty_overlay(
    image: np.ndarray, unsure: np.ndarray, top: float, lo: float, hi: float
) -> np.ndarray:
    """The slice and the slice with its uncertainty (0 .. ``top``) blended in as a heat map
    (magma; the more uncertain, the more opaque), side by side (upscaled), uint8 RGB."""
    from matplotlib import colormaps

    grey = _grey(image, lo, hi)
    level = np.clip(np.asarray(unsure, np.float32) / (top if top > 0 else 1.0), 0.0, 1.0)
    heat = colormaps["magma"](level)[..., :3].astype(np.float32) * 255
    a = (0.85 * level)[..., None]
    blended = (1 - a) * grey.astype(np.float32) + a * heat
    return _side_by_side(grey, blended)


def legend_html(
    class_names: list[str], labels: np.ndarray, slice_labels: np.ndarray, voxel_ml: float | None
) -> str:
    """A legend: colour swatch, class name, its size in the volume and in this slice."""
    rows = []
    for k, (name, colour) in enumerate(
        zip(class_names, class_colours(len(class_names)), strict=True)
    ):
        if k == 0:
            continue
        total = int((labels == k).sum())
        here = int((slice_labels == k).sum())
        size = f"{total * voxel_ml:.1f} mL" if voxel_ml is not None else f"{total} px"
        rows.append(
            '<li style="list-style:none;margin:2px 0">'
            f'<span style="display:inline-block;width:14px;height:14px;margin-right:6px;'
            f'vertical-align:middle;background:rgb{colour}"></span>'
            f'<span class="legend-name">{html.escape(name)}</span>: {size} ({here} px in this slice)</li>'
        )
    return f'<ul class="legend" style="padding:0">{"".join(rows)}</ul>'


def _escape(text: str) -> str:
    """``text`` shown literally by gr.Markdown (paths hold ``<model>``, ``_`` and ``*``)."""
    text = html.escape(text, quote=False)
    for char in "\\`*_[]":
        text = text.replace(char, "\\" + char)
    return text


def _message(exc: BaseException, upload: str | None) -> str:
    """One line for the page; the upload's temporary folder is left out of paths."""
    text = str(exc)
    if upload:
        text = text.replace(str(Path(upload).parent) + os.sep, "")
    text = _escape(text)
    if isinstance(exc, PipelineError):
        return f"**Error:** {text}"
    return f"**Unexpected error** ({type(exc).__name__}: {text}); the server log has the details."


class _Predictors:
    """Loaded predictors, reloaded when a checkpoint or the ensemble weights change."""

    def __init__(self, root: Path, device: str) -> None:
        self.root, self.device = root, device
        self._cache: dict[tuple[str, str], tuple[Any, Predictor]] = {}
        self._lock = threading.Lock()

    def _stamp(self, task: str) -> tuple:
        paths = [project.ensemble_path(self.root, task)] + [
            project.checkpoint_path(self.root, task, m)
            for m in project.trained_models(self.root, task)
        ]
        return tuple((str(p), p.stat().st_mtime_ns) for p in paths if p.is_file())

    def get(self, task: str, choice: str | None) -> Predictor:
        key = (task, choice or project.ENSEMBLE)
        with self._lock:
            stamp = self._stamp(task)
            hit = self._cache.get(key)
            if hit is None or hit[0] != stamp:
                self._cache[key] = (
                    stamp,
                    load_predictor(self.root, task, choice or None, self.device),
                )
            return self._cache[key][1]


def _status(root: Path, task: str) -> tuple[list[str], str]:
    """(dropdown choices, status line) for ``task``."""
    choices = project.model_choices(root, task)
    if not choices:
        return [], f"**No trained {task} models yet.** Train them with {project.TRAIN_COMMAND}."
    if choices[0] != project.ENSEMBLE:
        note = f" No ensemble weights yet ({project.TRAIN_COMMAND} searches them)."
    else:
        note = ""
    return (
        choices,
        f"Trained {task} models: {', '.join(c for c in choices if c != project.ENSEMBLE)}.{note}",
    )


def _output_dir(base: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=base))


def _stem(path: Path) -> str:
    """``scan`` of ``scan.nii.gz`` (the download is named after the upload)."""
    suffix = inputs.file_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


# ---------------------------------------------------------------------------- segmentation


def _seg_view(
    state: dict[str, Any], index: int, uncertainty: bool = False
) -> tuple[np.ndarray, str]:
    """The slice's overlay: its labels, or (``uncertainty``) its entropy map as a heat map."""
    slices, labels = state["slices"], state["slice_labels"]
    i = int(np.clip(index, 0, len(slices) - 1))
    legend = legend_html(state["class_names"], labels, labels[i], state["voxel_ml"])
    unsure = state.get("slice_uncertainty")
    if uncertainty and unsure is not None:
        top = float(np.log(max(2, len(state["class_names"]))))
        image = uncertainty_overlay(slices[i], unsure[i], top, state["lo"], state["hi"])
        here = float(unsure[i].mean())
        legend += (
            '<p class="uncertainty-note">Uncertainty: the predictive entropy of the fused '
            f"probabilities, dark 0 to bright log {len(state['class_names'])} = {top:.2f} nats; "
            f"this slice's mean {here:.3f}.</p>"
        )
        return image, legend
    image = overlay(slices[i], labels[i], len(state["class_names"]), state["lo"], state["hi"])
    return image, legend


def _segment(
    predictors: _Predictors, out_base: Path
) -> Callable[[str | None, str | None], tuple[Any, ...]]:
    def run(upload: str | None, choice: str | None, unsure: bool = False) -> tuple[Any, ...]:
        hidden = (None, "", gr.Slider(visible=False), gr.DownloadButton(visible=False), None)
        if not upload:
            return ("Upload a NIfTI volume or a PNG/JPEG slice first.", *hidden)
        try:
            path = Path(upload)
            inputs.input_kind(path, "segmentation")
            predictor = predictors.get("segmentation", choice)
            result = TASKS["segmentation"].predict_file(predictor, path, None, False)
            suffix = ".nii.gz" if result.scan is not None else ".png"
            out = _output_dir(out_base) / f"{_stem(path)}_labels{suffix}"
            TASKS["segmentation"].save_result(result, out)
        except Exception as exc:  # shown in the page; unexpected ones logged in full
            if not isinstance(exc, PipelineError):
                log.exception("segmentation of %s failed", upload)
            return (_message(exc, upload), *hidden)
        lo, hi = np.percentile(result.slices, [1, 99])
        voxel_ml = float(np.prod(result.spacing)) / 1000 if result.spacing is not None else None
        state = {
            "slices": result.slices,
            "slice_labels": result.slice_labels,
            "slice_uncertainty": result.slice_uncertainty,
            "class_names": result.class_names,
            "lo": float(lo),
            "hi": float(hi),
            "voxel_ml": voxel_ml if result.scan is not None else None,
        }
        n = len(result.slices)
        start = n // 2
        image, legend = _seg_view(state, start, bool(unsure))
        shape = "x".join(map(str, result.labels.shape))
        message = (
            f"Segmented **{_escape(path.name)}** ({shape}) with the "
            f"{_escape(predictor.describe())}. Left: the image; right: the labels."
        )
        slider = gr.Slider(minimum=0, maximum=max(1, n - 1), value=start, step=1, visible=n > 1)
        download = gr.DownloadButton(label=f"Download {out.name}", value=str(out), visible=True)
        return message, image, legend, slider, download, state

    return run


# ---------------------------------------------------------------------------- reconstruction


def _recon_view(state: dict[str, Any], index: int) -> tuple[Any, Any, Any, Any]:
    i = int(np.clip(index, 0, len(state["recon"]) - 1))
    vmax = state["vmax"]
    zero = _upscale(_grey(state["zero"][i], 0.0, vmax))
    recon = _upscale(_grey(state["recon"][i], 0.0, vmax))
    if state["target"] is None:
        return zero, recon, None, None
    from matplotlib import colormaps

    target = _upscale(_grey(state["target"][i], 0.0, vmax))
    err = np.abs(state["recon"][i] - state["target"][i]) / state["err_max"]
    error = _upscale((255 * colormaps["magma"](np.clip(err, 0, 1))[..., :3]).astype(np.uint8))
    return zero, recon, target, error


def _scores_table(result: ReconstructionResult) -> str:
    assert result.target is not None
    case = np.zeros(len(result.target), dtype=int)
    rows = ["| image | SSIM | PSNR (dB) | NMSE |", "|---|---:|---:|---:|"]
    for name, image in (
        ("reconstruction", result.reconstruction),
        ("zero-filled", result.zero_filled),
    ):
        s = reconstruction_scores(image, result.target, case)
        rows.append(f"| {name} | {s['ssim']:.4f} | {s['psnr']:.2f} | {s['nmse']:.4f} |")
    return "\n".join(rows)


def _reconstruct(
    predictors: _Predictors, out_base: Path
) -> Callable[[str | None, str | None], tuple[Any, ...]]:
    def run(upload: str | None, choice: str | None) -> tuple[Any, ...]:
        hidden = (
            None,
            None,
            gr.Image(value=None, visible=False),
            gr.Image(value=None, visible=False),
            gr.Slider(visible=False),
            gr.DownloadButton(visible=False),
            None,
        )
        if not upload:
            return ("Upload a fastMRI HDF5 file first.", *hidden)
        try:
            path = Path(upload)
            inputs.input_kind(path, "reconstruction")
            predictor = predictors.get("reconstruction", choice)
            result = TASKS["reconstruction"].predict_file(predictor, path, None, False)
            out = _output_dir(out_base) / f"{_stem(path)}_reconstruction.h5"
            TASKS["reconstruction"].save_result(result, out)
            table = _scores_table(result) if result.target is not None else ""
        except Exception as exc:  # shown in the page; unexpected ones logged in full
            if not isinstance(exc, PipelineError):
                log.exception("reconstruction of %s failed", upload)
            return (_message(exc, upload), *hidden)
        has_target = result.target is not None
        ref = result.reconstruction if result.target is None else result.target
        vmax = float(ref.max()) or 1.0
        err_max = 1.0
        if result.target is not None:
            err_max = float(np.abs(result.reconstruction - result.target).max()) or 1.0
        state = {
            "recon": result.reconstruction,
            "zero": result.zero_filled,
            "target": result.target,
            "vmax": vmax,
            "err_max": err_max,
        }
        n = len(result.reconstruction)
        start = n // 2
        zero, recon, target, error = _recon_view(state, start)
        source = "its own mask" if result.mask_source == "file" else "the task's mask (params.yaml)"
        message = (
            f"Reconstructed **{_escape(path.name)}** ({n} slices) with the "
            f"{_escape(predictor.describe())}: "
            f"{result.acceleration:.1f}x undersampled with {source}."
        )
        if has_target:
            message += (
                f" Error map: |reconstruction - target|, brightest = {err_max:.3g} "
                f"({100 * err_max / vmax:.0f} % of the target maximum).\n\n{table}"
            )
        else:
            message += " The file has no fully sampled target: no error map."
        slider = gr.Slider(minimum=0, maximum=max(1, n - 1), value=start, step=1, visible=n > 1)
        download = gr.DownloadButton(label=f"Download {out.name}", value=str(out), visible=True)
        return (
            message,
            zero,
            recon,
            gr.Image(value=target, visible=has_target),
            gr.Image(value=error, visible=has_target),
            slider,
            download,
            state,
        )

    return run


# ---------------------------------------------------------------------------- the page


def build_app(root: Path | str = ".", device: str = "auto") -> gr.Blocks:
    """The Gradio app over the project at ``root`` (params.yaml, models/, reports/)."""
    root = Path(root).resolve()
    predictors = _Predictors(root, device)
    out_dir = tempfile.TemporaryDirectory(prefix="mri-ensemble-ui-")
    out_base = Path(out_dir.name)

    with gr.Blocks(title="MRI ensemble", analytics_enabled=False) as demo:
        demo.mri_ensemble_outputs = out_dir  # type: ignore[attr-defined]  # lives with the app
        gr.Markdown(f"# MRI ensemble\nTrained models and ensemble weights of `{root}`.")
        with gr.Tabs():
            with gr.Tab("Segmentation", id="segmentation"):
                seg_status = gr.Markdown(elem_id="seg-status")
                with gr.Row():
                    seg_file = gr.File(
                        label="NIfTI volume (.nii, .nii.gz) or PNG/JPEG slice",
                        type="filepath",
                        elem_id="seg-input",
                    )
                    with gr.Column():
                        seg_model = gr.Dropdown(
                            label="model", choices=[], elem_id="seg-model", interactive=True
                        )
                        seg_run = gr.Button("Segment", variant="primary", elem_id="seg-run")
                        seg_unsure = gr.Checkbox(
                            label="show uncertainty instead of labels",
                            value=False,
                            elem_id="seg-uncertainty",
                        )
                seg_message = gr.Markdown(elem_id="seg-message")
                with gr.Row():
                    seg_image = gr.Image(
                        label="image | labels",
                        type="numpy",
                        format="png",
                        interactive=False,
                        elem_id="seg-overlay",
                        scale=3,
                    )
                    seg_legend = gr.HTML(elem_id="seg-legend")
                seg_slice = gr.Slider(label="slice", step=1, visible=False, elem_id="seg-slice")
                seg_download = gr.DownloadButton(visible=False, elem_id="seg-download")
                seg_state = gr.State(None)
            with gr.Tab("Reconstruction", id="reconstruction"):
                rec_status = gr.Markdown(elem_id="rec-status")
                with gr.Row():
                    rec_file = gr.File(
                        label="fastMRI HDF5 file (.h5)", type="filepath", elem_id="rec-input"
                    )
                    with gr.Column():
                        rec_model = gr.Dropdown(
                            label="model", choices=[], elem_id="rec-model", interactive=True
                        )
                        rec_run = gr.Button("Reconstruct", variant="primary", elem_id="rec-run")
                rec_message = gr.Markdown(elem_id="rec-message")
                with gr.Row():
                    image_kw: dict[str, Any] = {
                        "type": "numpy",
                        "format": "png",
                        "interactive": False,
                    }
                    rec_zero = gr.Image(label="zero-filled input", elem_id="rec-zero", **image_kw)
                    rec_image = gr.Image(label="reconstruction", elem_id="rec-recon", **image_kw)
                    rec_target = gr.Image(
                        label="target (fully sampled)",
                        elem_id="rec-target",
                        visible=False,
                        **image_kw,
                    )
                    rec_error = gr.Image(
                        label="error map", elem_id="rec-error", visible=False, **image_kw
                    )
                rec_slice = gr.Slider(label="slice", step=1, visible=False, elem_id="rec-slice")
                rec_download = gr.DownloadButton(visible=False, elem_id="rec-download")
                rec_state = gr.State(None)

        def refresh() -> tuple[Any, ...]:
            out: list[Any] = []
            for task in TASKS:
                try:
                    choices, status = _status(root, task)
                except PipelineError as exc:
                    choices, status = [], f"**Error:** {_escape(str(exc))}"
                out += [status, gr.Dropdown(choices=choices, value=choices[0] if choices else None)]
            return tuple(out)

        demo.load(refresh, None, [seg_status, seg_model, rec_status, rec_model])
        seg_run.click(
            _segment(predictors, out_base),
            [seg_file, seg_model, seg_unsure],
            [seg_message, seg_image, seg_legend, seg_slice, seg_download, seg_state],
        )
        # .input: the user's changes only; a run setting the slider must not re-render the
        # images it just sent (the same cache files rewritten while the browser reads them)
        for control in (seg_slice, seg_unsure):
            control.input(
                lambda state, i, u: _seg_view(state, i, u) if state else (None, ""),
                [seg_state, seg_slice, seg_unsure],
                [seg_image, seg_legend],
                show_progress="hidden",
            )
        rec_run.click(
            _reconstruct(predictors, out_base),
            [rec_file, rec_model],
            [
                rec_message,
                rec_zero,
                rec_image,
                rec_target,
                rec_error,
                rec_slice,
                rec_download,
                rec_state,
            ],
        )
        rec_slice.input(
            lambda state, i: _recon_view(state, i) if state else (None, None, None, None),
            [rec_state, rec_slice],
            [rec_zero, rec_image, rec_target, rec_error],
            show_progress="hidden",
        )
    return demo


def launch(
    root: Path | str = ".",
    port: int = 7860,
    host: str = "127.0.0.1",
    device: str = "auto",
    block: bool = True,
) -> gr.Blocks:
    """Serve :func:`build_app` on ``host:port``; ``block=False`` returns once it is up
    (stop it with ``.close()``)."""
    demo = build_app(root, device)
    out_base = demo.mri_ensemble_outputs.name  # type: ignore[attr-defined]
    demo.queue(default_concurrency_limit=1)  # one prediction at a time: CPU-sized models
    try:
        demo.launch(
            server_name=host,
            server_port=port,
            prevent_thread_lock=not block,
            quiet=not block,
            ssr_mode=False,
            mcp_server=False,
            allowed_paths=[out_base],
        )
    except OSError as exc:  # the port is taken or the address is not ours
        raise ConfigError(f"cannot serve on {host}:{port} ({exc}); choose another --port") from exc
    return demo
