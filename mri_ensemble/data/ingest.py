"""Ingest: read a raw source, validate it, split by patient/volume, write prepared HDF5.

Segmentation: ``source: phantom`` writes the procedural phantom in the real ACDC layout
into a temporary folder (it is deterministic: ``python -m mri_ensemble.data.phantom``
writes the same one where you can look at it) and reads it back through the ACDC reader
that real data uses; ``source: acdc`` reads the ACDC folder at ``path``; ``source:
folder`` reads PNG/JPEG images with mask PNGs (e.g. Oxford-IIIT Pet trimaps, binary).

Reconstruction: ``source: simulated`` writes multi-coil k-space simulated from the MNI152
template in the fastMRI layout into a temporary folder (``python -m
mri_ensemble.data.simulate OUT`` writes the same files) and reads it back through the
fastMRI reader that real data uses; ``source: fastmri`` reads the ``*.h5`` files at
``path``. Volumes are split (never slices), brought to the common grid (image-domain crop
to ``size``, coil compression to ``coils``), given one seeded mask per volume and a GRAPPA
image per slice.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..io import atomic_path
from ..metrics import CLASS_NAMES
from ..mri.grappa import grappa_image
from ..mri.masks import MaskSpec, volume_mask
from ..params import get
from .acdc import split_patients, verify_acdc
from .fastmri import list_fastmri, prepare_volume, read_fastmri, verify_fastmri
from .folder import BINARY_CLASSES, list_pairs, read_folder
from .phantom import write_acdc_phantom
from .prepared import SHIFT_PREFIX, class_frequencies, write_segmentation_h5
from .prepared_recon import (
    ReconstructionSet,
    contrast_group,
    write_reconstruction_h5,
)
from .simulate import simulate_brain

log = logging.getLogger(__name__)

SOURCES = ("phantom", "acdc", "folder")
# shifted test sets of the phantom: name -> acquisition regime (mri_ensemble.data.phantom)
PHANTOM_SHIFTS = {"acquisition": "shifted"}
RECON_SOURCES = ("simulated", "fastmri")


def ingest_segmentation(p: dict, seed: int, out: Path) -> None:
    source = p.get("source", "phantom")
    if source not in SOURCES:
        raise ConfigError(
            f"params.yaml: ingest.segmentation.source {source!r} unknown; known: {SOURCES}"
        )
    size = int(get(p, "size", kind=int))
    fractions = get(p, "split", kind=dict)
    class_names = list(CLASS_NAMES)
    if source == "folder":
        mask_mode = p.get("mask_mode", "trimap")
        class_names = list(p.get("class_names") or BINARY_CLASSES)
        if mask_mode != "labels" and len(class_names) != 2:
            raise ConfigError(f"params.yaml: mask_mode {mask_mode!r} gives 2 classes")
    with tempfile.TemporaryDirectory() as raw:
        if source == "phantom":
            n = int(get(p, "n_patients", kind=int))
            root = Path(raw)
            log.info("writing a %d-patient cardiac phantom in the ACDC layout", n)
            write_acdc_phantom(root, n_patients=n, seed=seed)
        else:
            if not p.get("path"):
                raise ConfigError(
                    f"params.yaml: ingest.segmentation.path must name the {source} folder"
                )
            root = Path(p["path"])
        # the whole dataset is read and checked before anything is written (all problems
        # in one message), as nnU-Net's --verify_dataset_integrity does
        if source == "folder":
            cases = [name for name, _, _ in list_pairs(root)]
            by_case = {
                v.case: [v]
                for v in read_folder(
                    root,
                    cases,
                    size=size,
                    mask_mode=mask_mode,
                    n_classes=len(class_names),
                    progress=True,
                )
            }
            attrs: dict = {"source": source, "size": size, "seed": seed}
        else:
            spacing = float(get(p, "spacing_mm"))
            by_case = verify_acdc(root, size=size, spacing_mm=spacing, progress=True)
            cases = list(by_case)
            attrs = {"source": source, "size": size, "spacing_mm": spacing, "seed": seed}
        shifted = {}
        for name, value in dict(p.get("shifted") or {}).items():
            if isinstance(value, str) and source != "folder":  # a folder in the ACDC layout
                shifted[name] = verify_acdc(
                    Path(value), size=size, spacing_mm=spacing, progress=True
                )
                continue
            if source != "phantom":
                log.info(
                    "ingest.segmentation.shifted.%s: a phantom regime, skipped for %s", name, source
                )
                continue
            if name not in PHANTOM_SHIFTS or isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(
                    f"params.yaml: ingest.segmentation.shifted.{name}: expected a patient count "
                    f"of a phantom regime ({', '.join(PHANTOM_SHIFTS)}) or an ACDC folder, "
                    f"found {value!r}"
                )
            shift_root = Path(raw) / f"shift_{name}"
            log.info("writing %d phantom patients of the %r regime", value, name)
            write_acdc_phantom(
                shift_root, n_patients=value, seed=seed, first_id=901, regime=PHANTOM_SHIFTS[name]
            )
            shifted[name] = verify_acdc(shift_root, size=size, spacing_mm=spacing, progress=True)
    split = split_patients(cases, fractions, seed)
    summary: dict = {"source": source, "patients": split, "slices": {}}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for name, members in split.items():
            vols = [v for m in members for v in by_case[m]]
            labels = np.concatenate([v.label for v in vols])
            split_attrs = dict(
                attrs,
                split=name,
                class_names=json.dumps(class_names),
                # pixel counts per class (effective-number weights of the weighted_ce loss)
                class_counts=np.bincount(labels.ravel(), minlength=len(class_names)).tolist(),
            )
            write_segmentation_h5(tmp / f"{name}.h5", vols, split_attrs)
            summary["slices"][name] = int(labels.shape[0])
            if name == "train":
                freq = class_frequencies(labels, len(class_names))
                summary["train_class_frequencies"] = dict(
                    zip(class_names, map(float, freq), strict=True)
                )
        summary["shifted"] = {}
        for name, volumes in shifted.items():
            vols = [v for members in volumes.values() for v in members]
            write_segmentation_h5(
                tmp / f"{SHIFT_PREFIX}{name}.h5",
                vols,
                dict(attrs, split=SHIFT_PREFIX + name, class_names=json.dumps(class_names)),
            )
            summary["shifted"][SHIFT_PREFIX + name] = sorted(volumes)
            summary["slices"][SHIFT_PREFIX + name] = int(sum(len(v.label) for v in vols))
        (tmp / "split.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("prepared %s: %s slices", out, summary["slices"])


def stratified_split(
    names: list[str], fractions: dict, seed: int, group_of: Callable[[str], str]
) -> dict[str, list[str]]:
    """``split_patients`` within each group (e.g. contrast), merged: every split holds every
    group in about the fractions' proportions. One group: exactly ``split_patients``."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(group_of(n), []).append(n)
    if len(groups) == 1 or min(map(len, groups.values())) < len(fractions):
        return split_patients(names, fractions, seed)
    split: dict[str, list[str]] = {k: [] for k in fractions}
    for members in groups.values():
        for k, v in split_patients(members, fractions, seed).items():
            split[k] += v
    return {k: sorted(v) for k, v in split.items()}


def ingest_reconstruction(p: dict, seed: int, out: Path) -> None:
    source = p.get("source", "simulated")
    if source not in RECON_SOURCES:
        raise ConfigError(
            f"params.yaml: ingest.reconstruction.source {source!r} unknown; known: {RECON_SOURCES}"
        )
    size = tuple(int(v) for v in get(p, "size", kind=list))
    if len(size) != 2 or min(size) < 8:
        raise ConfigError(f"params.yaml: ingest.reconstruction.size should be [H, W], found {size}")
    coils = int(get(p, "coils", kind=int))
    spec = MaskSpec.from_mapping(get(p, "mask", kind=dict))
    grappa_cfg = dict(get(p, "grappa", {}, kind=dict))
    fractions = get(p, "split", kind=dict)
    folders = dict(p.get("shifted") or {})
    if not all(isinstance(v, str) and v for v in folders.values()):
        raise ConfigError(
            "params.yaml: ingest.reconstruction.shifted should map a name to a folder of "
            f"fastMRI files, found {folders!r}"
        )
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory() as raw:
        tmp.mkdir()
        if source == "simulated":
            log.info("simulating %d-coil k-space of virtual MNI152 subjects", coils)
            sets = simulate_brain(
                Path(raw),
                n_coils=coils,
                size=(size[0], size[1]),
                seed=seed,
                progress=True,
                **dict(get(p, "simulation", {}, kind=dict)),
            )
            files = sets.pop("support")
        else:
            if not p.get("path"):
                raise ConfigError("params.yaml: ingest.reconstruction.path must name a folder")
            files = list_fastmri(Path(p["path"]))
            sets = {}
        sets.update({name: list_fastmri(Path(folder)) for name, folder in folders.items()})
        # every file checked before any is prepared: all problems in one message
        verify_fastmri(
            [f for group in (files, *sets.values()) for f in group],
            (size[0], size[1]),
            coils,
            progress=True,
        )
        by_name = {f.stem: f for f in files}
        split = stratified_split(list(by_name), fractions, seed, contrast_group)
        summary: dict = {"source": source, "volumes": split, "slices": {}, "shifted": {}}
        attrs = {
            "source": source,
            "size": list(size),
            "coils": coils,
            "seed": seed,
            "mask": asdict(spec),
            "grappa": grappa_cfg,
        }
        parts = [(name, [by_name[m] for m in members]) for name, members in split.items()]
        parts += [(SHIFT_PREFIX + name, paths) for name, paths in sets.items()]
        for name, paths in parts:
            data = prepare_split(paths, size, coils, spec, grappa_cfg, seed, name)
            data.attrs = {**attrs, "split": name}
            write_reconstruction_h5(tmp / f"{name}.h5", data)
            summary["slices"][name] = len(data)
            if name.startswith(SHIFT_PREFIX):
                summary["shifted"][name] = [p.stem for p in paths]
            summary["acceleration"] = float(data.mask.shape[1] / data.mask.sum(1).mean())
        summary["groups"] = {
            name: sorted({contrast_group(m) for m in members}) for name, members in split.items()
        }
        (tmp / "split.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("prepared %s: %s slices", out, summary["slices"])


def prepare_split(
    files: list[Path],
    size: tuple[int, ...],
    coils: int,
    spec: MaskSpec,
    grappa_cfg: dict,
    seed: int,
    name: str,
) -> ReconstructionSet:
    """Read, regrid, mask and GRAPPA-reconstruct the volumes of one split."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("kspace", "mask", "target", "grappa")}
    case: list[str] = []
    vmax: list[np.ndarray] = []
    for path in tqdm(files, desc=f"prepare {name}", leave=False):
        kspace, target = prepare_volume(read_fastmri(path), (size[0], size[1]), coils)
        mask = volume_mask(spec, kspace.shape[-1], seed, path.stem)
        grappa = [grappa_image(k * mask, mask, **grappa_cfg) for k in kspace]
        parts["kspace"].append(kspace)
        parts["mask"].append(np.repeat(mask[None], len(kspace), axis=0))
        parts["target"].append(target)
        parts["grappa"].append(np.stack(grappa))
        case += [path.stem] * len(kspace)
        vmax.append(np.full(len(kspace), target.max(), np.float32))
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    return ReconstructionSet(case=np.array(case), max=np.concatenate(vmax), attrs={}, **arrays)
