"""ingest@<task>: read the raw source, validate it, split by patient, write prepared HDF5.

Segmentation: ``source: phantom`` writes the procedural phantom in the real ACDC layout
into a temporary folder (it is deterministic: ``python -m mri_ensemble.data.phantom``
writes the same one where you can look at it) and reads it back through the ACDC reader
that real data uses; ``source: acdc`` reads the ACDC folder at ``path``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from mri_ensemble.data.acdc import list_patients, read_acdc, split_patients
from mri_ensemble.data.phantom import write_acdc_phantom
from mri_ensemble.data.prepared import class_frequencies, write_segmentation_h5
from mri_ensemble.errors import ConfigError
from mri_ensemble.io import atomic_path
from mri_ensemble.metrics import CLASS_NAMES

from .common import cli, get, load_params, log

SOURCES = ("phantom", "acdc")


def ingest_segmentation(p: dict, seed: int, out: Path) -> None:
    source = p.get("source", "phantom")
    if source not in SOURCES:
        raise ConfigError(
            f"params.yaml: ingest.segmentation.source {source!r} unknown; known: {SOURCES}"
        )
    size = int(get(p, "size", kind=int))
    spacing = float(get(p, "spacing_mm"))
    fractions = get(p, "split", kind=dict)
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory() as raw:
        tmp.mkdir()
        if source == "phantom":
            n = int(get(p, "n_patients", kind=int))
            root = Path(raw)
            log.info("writing a %d-patient cardiac phantom in the ACDC layout", n)
            write_acdc_phantom(root, n_patients=n, seed=seed)
        else:
            if not p.get("path"):
                raise ConfigError("params.yaml: ingest.segmentation.path must name the ACDC folder")
            root = Path(p["path"])
        patients = [f.name for f in list_patients(root)]
        split = split_patients(patients, fractions, seed)
        summary: dict = {"source": source, "patients": split, "slices": {}}
        for name, members in split.items():
            vols = read_acdc(root, size=size, spacing_mm=spacing, patients=members, progress=True)
            attrs = {
                "source": source,
                "size": size,
                "spacing_mm": spacing,
                "seed": seed,
                "split": name,
                "class_names": json.dumps(CLASS_NAMES),
            }
            write_segmentation_h5(tmp / f"{name}.h5", vols, attrs)
            labels = np.concatenate([v.label for v in vols])
            summary["slices"][name] = int(labels.shape[0])
            if name == "train":
                freq = class_frequencies(labels, len(CLASS_NAMES))
                summary["train_class_frequencies"] = dict(
                    zip(CLASS_NAMES, map(float, freq), strict=True)
                )
        (tmp / "split.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("prepared %s: %s slices", out, summary["slices"])


@cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--task", required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    params = load_params()
    p = get(params, f"ingest.{args.task}", kind=dict)
    if args.task == "segmentation":
        ingest_segmentation(p, int(get(params, "seed")), args.out)
    else:
        raise ConfigError(f"ingest: unknown task {args.task!r}; known: ['segmentation']")


if __name__ == "__main__":
    main()
