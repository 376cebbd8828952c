"""``mri-ensemble``: run the trained models on your own files, or start the browser UI.

    mri-ensemble predict --task segmentation --input scan.nii.gz --output labels.nii.gz
    mri-ensemble predict --task segmentation --input slice.png --output labels.png --model unet
    mri-ensemble predict --task reconstruction --input file.h5 --output recon.h5 [--ensemble]
    mri-ensemble ui [--port 7860]

``--root`` is the project folder (params.yaml, models/, reports/; default: the current
folder). Without ``--model`` the ensemble runs. Errors a user can cause print one line
``error: ...`` on stderr and exit with status 2.
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
    ap = argparse.ArgumentParser(
        prog="mri-ensemble",
        description="Run the trained MRI models (one, or the ensemble) on your own files.",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "predict",
        help="segment a NIfTI volume / PNG or JPEG slice, or reconstruct a fastMRI HDF5 file",
        description="Segmentation: NIfTI in (2-D, 3-D, or 4-D: its first frame) -> NIfTI labels with the input's affine and shape "
        "(PNG/JPEG in -> PNG labels). Reconstruction: fastMRI HDF5 in -> HDF5 with dataset "
        "'reconstruction' (fastMRI submission layout). The input is checked before any model "
        "loads: plausible voxel sizes and image size, not a label map, k-space with signal "
        "and enough coils; implausible input is refused with one line naming the file.",
    )
    p.add_argument("--task", required=True, choices=["segmentation", "reconstruction"])
    p.add_argument("--input", required=True, type=Path, help="the file to predict on")
    p.add_argument(
        "--output",
        required=True,
        type=Path,
        help="where to write the result; missing parent folders are created; never the "
        "input itself; a run holds a lock on it, so a second run on the same output fails",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="one trained model (default: the ensemble)")
    which.add_argument("--ensemble", action="store_true", help="the weighted ensemble (default)")
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


def predict(args: argparse.Namespace) -> str:
    """Run ``predict``; returns the line to print."""
    from . import predict as pr

    kind = pr.input_kind(args.input, args.task)
    suffix = pr.file_suffix(args.output)
    if suffix not in pr.output_suffixes(kind):
        raise ConfigError(
            f"--output {args.output}: expected a name ending in "
            f"{' or '.join(pr.output_suffixes(kind))} for a {kind} input"
        )
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size: expected a positive integer, found {args.batch_size}")
    if args.pixel_mm is not None and kind != "image":
        raise ConfigError("--pixel-mm applies to PNG/JPEG inputs only (NIfTI has voxel sizes)")
    pr.check_output(args.input, args.output)
    pr.check_input(args.root, args.task, args.input, args.pixel_mm)  # before any model loads
    with pr.output_lock(args.output):
        return _run(args, pr)


def _run(args: argparse.Namespace, pr: Any) -> str:
    predictor = pr.load_predictor(args.root, args.task, args.model, args.device)
    progress = not args.no_progress
    if args.task == "segmentation":
        result = pr.segment_file(
            predictor, args.input, args.batch_size or 32, progress, pixel_mm=args.pixel_mm
        )
        pr.save_segmentation(result, args.output)
        counts = {
            name: int((result.labels == k).sum())
            for k, name in enumerate(result.class_names)
            if k > 0
        }
        found = ", ".join(f"{n} {c} px" for n, c in counts.items())
        return f"wrote {args.output} ({predictor.describe()}; shape {result.labels.shape}; {found})"
    recon = pr.reconstruct_file(predictor, args.input, args.batch_size or 4, progress)
    pr.save_reconstruction(recon, args.output)
    return (
        f"wrote {args.output} ({predictor.describe()}; {recon.reconstruction.shape[0]} slices "
        f"{recon.reconstruction.shape[1]}x{recon.reconstruction.shape[2]}; "
        f"{recon.acceleration:.1f}x, mask from the {recon.mask_source})"
    )


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("MRI_ENSEMBLE_LOG", "WARNING"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        if args.command == "predict":
            print(predict(args))
        else:
            from .app import launch

            launch(args.root, args.port, host=args.host, device=args.device)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
