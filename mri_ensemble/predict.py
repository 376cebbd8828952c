"""Run the trained networks (one of them, or the weighted ensemble) on a user's own files.

This module only moves files: it finds the inputs (files, or the files of a folder), checks
each before any model loads, asks the task to predict (:mod:`mri_ensemble.tasks`: how a
NIfTI volume, a PNG/JPEG slice or a fastMRI HDF5 file is brought to the network grid and
back) and writes one output per input, atomically and under a lock on the output.
The predict CLI (:mod:`mri_ensemble.cli`) and the browser UI (:mod:`mri_ensemble.app`) both
go through it; the network is :class:`~mri_ensemble.inference.EnsembleNet`, loaded from a
project folder by :func:`~mri_ensemble.inference.load_predictor`.

Members whose weight share is below ``ensemble.MIN_WEIGHT`` are not run (the one membership
rule, :func:`mri_ensemble.ensemble.ensemble_members`): their share is below float32
resolution.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .errors import ConfigError, DataError, OutputError, PipelineError
from .inference import Predictor
from .inputs import (
    HDF5_SUFFIXES,
    IMAGE_SUFFIXES,
    NIFTI_SUFFIXES,
    check_output,
    file_suffix,
    input_kind,
    output_lock,
)
from .project import ingest_settings, load_project_params
from .tasks import get_task

log = logging.getLogger(__name__)

ALL_SUFFIXES = (*NIFTI_SUFFIXES, *IMAGE_SUFFIXES, *HDF5_SUFFIXES)


def output_suffixes(task: str, kind: str) -> Sequence[str]:
    """The output names that fit an input of ``kind``."""
    return get_task(task).output_suffixes(kind)


def check_input(root: Path, task: str, path: Path, pixel_mm: float | None = None) -> str:
    """Read and check ``path`` before any model is loaded or anything computed: readable,
    of the task's kind, physically plausible (voxel sizes, in-plane size, resampled size,
    not a label map), with signal and enough coils (reconstruction). DataError or
    ConfigError naming the file (or the option) and the value. Returns the input's kind."""
    kind = input_kind(path, task)
    settings = ingest_settings(load_project_params(root), task)
    get_task(task).check_input(Path(path), kind, settings, pixel_mm)
    return kind


def check_output_name(task: str, inp: Path, out: Path, kind: str) -> None:
    """ConfigError unless ``out``'s suffix fits an input of ``kind``; OutputError when it is
    the input itself."""
    suffixes = output_suffixes(task, kind)
    if file_suffix(out) not in suffixes:
        raise ConfigError(
            f"--output {out}: expected a name ending in {' or '.join(suffixes)} for a {kind} input"
        )
    check_output(inp, out)


def find_inputs(inputs: Sequence[Path], task: str) -> list[Path]:
    """The files to predict on: files as given, and the files of each folder (not recursive,
    sorted) whose suffix the task reads. ConfigError when a folder holds none, DataError when
    a path does not exist."""
    kinds = get_task(task).input_kinds
    out: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            found = [
                f
                for f in sorted(p.iterdir())
                if f.is_file() and not f.name.startswith(".") and _suffix_kind(f) in kinds
            ]
            if not found:
                raise ConfigError(
                    f"--input {p}: no {task} inputs in this folder (expected "
                    f"{get_task(task).expected_inputs})"
                )
            out += found
        elif p.exists():
            out.append(p)
        else:
            raise DataError(f"{p}: input file not found")
    return list(dict.fromkeys(out))


def _suffix_kind(path: Path) -> str | None:
    suffix = file_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in HDF5_SUFFIXES:
        return "hdf5"
    return None


def output_in(folder: Path, inp: Path, task: str) -> Path:
    """Where an input's result goes in an output folder: the input's name, with the output
    suffix of its kind (NIfTI keeps its own, a JPEG slice's labels become .png)."""
    kind = _suffix_kind(inp) or input_kind(inp, task)
    suffixes = output_suffixes(task, kind)
    suffix = file_suffix(inp)
    stem = inp.name[: len(inp.name) - len(suffix)] if suffix else inp.name
    return Path(folder) / f"{stem}{suffix if suffix in suffixes else suffixes[0]}"


def predict_one(
    predictor: Predictor,
    root: Path,
    inp: Path,
    out: Path,
    batch_size: int | None = None,
    progress: bool = False,
    pixel_mm: float | None = None,
) -> Any:
    """Check ``inp``, predict it, write ``out`` (atomically, under its lock); the result."""
    task = get_task(predictor.task)
    kind = check_input(root, predictor.task, inp, pixel_mm)
    check_output_name(predictor.task, inp, out, kind)
    if pixel_mm is not None and kind != "image":
        raise ConfigError("--pixel-mm applies to PNG/JPEG inputs only (NIfTI has voxel sizes)")
    with output_lock(out):
        result = task.predict_file(predictor, inp, batch_size, progress, pixel_mm)
        task.save_result(result, out)
    return result


@dataclass
class BatchReport:
    """What a batch wrote (input -> output) and what it refused (input -> one-line reason)."""

    written: dict[Path, Path] = field(default_factory=dict)
    failed: dict[Path, str] = field(default_factory=dict)
    results: dict[Path, Any] = field(default_factory=dict)  # output -> the task's result


def predict_many(
    predictor: Predictor,
    root: Path,
    inputs: Sequence[Path],
    out_dir: Path,
    batch_size: int | None = None,
    progress: bool = True,
    pixel_mm: float | None = None,
) -> BatchReport:
    """Predict every input into ``out_dir`` with the members loaded once, one progress bar
    over the files. A bad file gets nothing written, is named in the report (and logged)
    and the batch goes on."""
    report = BatchReport()
    for inp in tqdm(inputs, desc=f"predict ({predictor.task})", unit="file", disable=not progress):
        out = output_in(out_dir, inp, predictor.task)
        try:
            result = predict_one(predictor, root, inp, out, batch_size, False, pixel_mm)
        except (PipelineError, OutputError) as exc:
            report.failed[inp] = str(exc)
            log.warning("%s: skipped (%s)", inp, exc)
            continue
        report.written[inp] = out
        report.results[out] = result
    return report
