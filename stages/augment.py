"""augment@<task>: write the augmented training set, deterministic for the seed.

Segmentation: flips, rotations, noise (``augment.segmentation``). Reconstruction: a
mirrored copy of every training slice (``augment.reconstruction.flip``); the main
augmentation there is the fresh undersampling mask drawn every epoch during training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mri_ensemble.data.augment import AugmentConfig, augment
from mri_ensemble.data.prepared import read_segmentation_h5, write_segmentation_arrays
from mri_ensemble.data.prepared_recon import read_reconstruction_h5, write_reconstruction_h5
from mri_ensemble.errors import ConfigError
from mri_ensemble.reconstruction import augment_flip

from .common import cli, get, load_params, log


@cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--task", required=True)
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    params = load_params()
    p = get(params, f"augment.{args.task}", kind=dict)
    seed = int(get(params, "seed"))
    if args.task == "reconstruction":
        unknown = sorted(set(p) - {"flip"})
        if unknown:
            raise ConfigError(f"params.yaml: augment.reconstruction: unknown key(s) {unknown}")
        recon = read_reconstruction_h5(args.train)
        out = augment_flip(recon, seed) if p.get("flip", True) else recon
        write_reconstruction_h5(args.out, out)
        log.info("augmented %d -> %d training slices", len(recon), len(out))
        return
    if args.task != "segmentation":
        raise ConfigError(
            f"augment: unknown task {args.task!r}; known: ['segmentation', 'reconstruction']"
        )
    cfg = AugmentConfig.from_mapping(p)
    data = read_segmentation_h5(args.train)
    image, label, case = augment(data.image, data.label, data.case, cfg, seed)
    write_segmentation_arrays(args.out, image, label, case, {**data.attrs, "augmented": True})
    log.info("augmented %d -> %d training slices", len(data.image), len(image))


if __name__ == "__main__":
    main()
