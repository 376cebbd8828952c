"""``mri-ensemble``: run the trained models on your own files, or start the browser UI.

    mri-ensemble predict --task segmentation --input scan.nii.gz --output labels.nii.gz
    mri-ensemble predict --task segmentation --input slice.png --output labels.png --model unet
    mri-ensemble predict --task reconstruction --input file.h5 --output recon.h5 [--ensemble]
    mri-ensemble predict --task segmentation --input scans/ --output labels/
    mri-ensemble predict --model-uri models:/mri-ensemble-segmentation@champion -i scans/ -o labels/
    mri-ensemble ui [--port 7860]

``--root`` is the project folder (params.yaml, models/, reports/; default: the current
folder); ``--model-uri`` takes the ensemble from the MLflow model registry instead (the
tracking server of ``MLFLOW_TRACKING_URI``). Without ``--model`` the ensemble runs.

One input file and an output file name: one result, as before. A folder (or several files):
``--output`` is a folder, every input gets one output there under its own name, the members
load once and one progress bar runs over the files; a bad file is named, gets nothing
written, and the batch goes on (exit status 2 at the end if any failed).

Errors a user can cause print one line ``error: ...`` on stderr and exit with status 2.
``--model-uri`` runs MLflow's own ``mlflow artifacts download``: the library imports no
MLflow.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError, PipelineError

log = logging.getLogger("mri_ensemble.cli")


def _parser() -> argparse.ArgumentParser:
    from .tasks import TASKS

    ap = argparse.ArgumentParser(
        prog="mri-ensemble",
        description="Run the trained MRI models (one, or the ensemble) on your own files.",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "predict",
        help="segment NIfTI volumes / PNG or JPEG slices, or reconstruct fastMRI HDF5 files",
        description="Segmentation: NIfTI in (2-D, 3-D, or 4-D: its first frame) -> NIfTI "
        "labels with the input's affine and shape (PNG/JPEG in -> PNG labels). "
        "Reconstruction: fastMRI HDF5 in -> HDF5 with dataset 'reconstruction' (fastMRI "
        "submission layout). Each input is checked before it is predicted: plausible voxel "
        "sizes and image size, not a label map, k-space with signal and enough coils; "
        "implausible input is refused with one line naming the file. A folder (or several "
        "files) is predicted into an output folder, one output per input, the members "
        "loaded once; a bad file is named and skipped, and the exit status is 2 at the end.",
    )
    p.add_argument(
        "--task", choices=list(TASKS), help="required, except with --model-uri (the bundle says)"
    )
    p.add_argument(
        "-i",
        "--input",
        required=True,
        type=Path,
        nargs="+",
        help="the file to predict on, or several files, or a folder of them",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        help="where to write the result (a folder for a folder or several inputs); missing "
        "parent folders are created; never the input itself; a run holds a lock on each "
        "output, so a second run on the same output fails",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="one trained model (default: the ensemble)")
    which.add_argument("--ensemble", action="store_true", help="the weighted ensemble (default)")
    which.add_argument(
        "--model-uri",
        help="the ensemble from the MLflow model registry, e.g. "
        "models:/mri-ensemble-segmentation@champion (MLFLOW_TRACKING_URI's server)",
    )
    p.add_argument("--root", type=Path, default=Path("."), help="project folder (default: .)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=None, help="slices per batch")
    p.add_argument(
        "--pixel-mm",
        type=float,
        default=None,
        help="PNG/JPEG only: pixel size in mm; resample and crop like a NIfTI slice "
        "instead of resizing the whole image to the network grid",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    u = sub.add_parser("ui", help="start the browser UI (Gradio) over the trained models")
    u.add_argument("--root", type=Path, default=Path("."), help="project folder (default: .)")
    u.add_argument("--host", default="127.0.0.1", help="address to listen on")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return ap


def registry_project(uri: str, dest: Path) -> tuple[Path, str, str | None]:
    """Download a registered ensemble or model (``models:/<name>@<alias>`` or
    ``/<version>``) into ``dest`` with MLflow's own command (``mlflow artifacts download``,
    against ``MLFLOW_TRACKING_URI``; the library imports no MLflow); (its project folder,
    its task, the one model it holds or None: the ensemble). ConfigError naming the URI
    when it fails."""
    import json
    import subprocess

    cmd = [sys.executable, "-m", "mlflow", "artifacts", "download", "-u", uri, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit status {proc.returncode}"
        raise ConfigError(f"--model-uri {uri}: could not fetch it from the registry ({why})")
    root = Path(proc.stdout.strip().splitlines()[-1]) / "artifacts" / "project"
    try:
        about = json.loads((root / "task.json").read_text())
        task, model = str(about["task"]), about.get("model")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"--model-uri {uri}: not an mri-ensemble bundle (no artifacts/project/task.json)"
        ) from exc
    return root, task, None if model is None else str(model)


def predict(args: argparse.Namespace) -> tuple[str, int]:
    """Run ``predict``; returns (the lines to print, exit status)."""
    import tempfile

    from . import predict as pr

    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size: expected a positive integer, found {args.batch_size}")
    with tempfile.TemporaryDirectory(prefix="mri-ensemble-registry-") as tmp:
        root, model = args.root, args.model
        if args.model_uri:
            root, task, model = registry_project(args.model_uri, Path(tmp))
            if args.task and args.task != task:
                raise ConfigError(
                    f"--task {args.task}: the registered model {args.model_uri} is a {task} one"
                )
            args.task = task
        if not args.task:
            raise ConfigError(
                "--task: required (segmentation or reconstruction) without --model-uri"
            )
        inputs = pr.find_inputs(args.input, args.task)
        single = len(args.input) == 1 and not args.input[0].is_dir()
        if single and pr.file_suffix(args.output) in pr.ALL_SUFFIXES:
            return _predict_file(args, pr, root, model, inputs[0]), 0
        return _predict_folder(args, pr, root, model, inputs)


def _predict_file(
    args: argparse.Namespace, pr: Any, root: Path, model: str | None, inp: Path
) -> str:
    from .inference import load_predictor
    from .tasks import get_task

    kind = pr.input_kind(inp, args.task)
    pr.check_output_name(args.task, inp, args.output, kind)
    if args.pixel_mm is not None and kind != "image":
        raise ConfigError("--pixel-mm applies to PNG/JPEG inputs only (NIfTI has voxel sizes)")
    pr.check_input(root, args.task, inp, args.pixel_mm)  # before any model loads
    task = get_task(args.task)
    with pr.output_lock(args.output):
        predictor = load_predictor(root, args.task, model, args.device)
        result = task.predict_file(
            predictor, inp, args.batch_size, not args.no_progress, args.pixel_mm
        )
        task.save_result(result, args.output)
    return f"wrote {args.output} ({predictor.describe()}; {task.describe_result(result)})"


def _predict_folder(
    args: argparse.Namespace, pr: Any, root: Path, model: str | None, inputs: list[Path]
) -> tuple[str, int]:
    from .inference import load_predictor
    from .tasks import get_task

    if args.output.exists() and not args.output.is_dir():
        raise ConfigError(
            f"--output {args.output}: expected a folder for {len(inputs)} inputs, found a file"
        )
    task = get_task(args.task)
    predictor = load_predictor(root, args.task, model, args.device)
    report = pr.predict_many(
        predictor, root, inputs, args.output, args.batch_size, not args.no_progress, args.pixel_mm
    )
    lines = [f"wrote {out} ({task.describe_result(res)})" for out, res in report.results.items()]
    lines.append(
        f"{len(report.written)} of {len(inputs)} written to {args.output} ({predictor.describe()})"
        + (f"; {len(report.failed)} failed:" if report.failed else "")
    )
    lines += [f"  {inp}: {why}" for inp, why in report.failed.items()]
    return "\n".join(lines), 2 if report.failed else 0


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("MRI_ENSEMBLE_LOG", "WARNING"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        if args.command == "predict":
            text, code = predict(args)
            print(text)
            if code:
                sys.exit(code)
        else:
            from .app import launch

            launch(args.root, args.port, host=args.host, device=args.device)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
