"""Reconstruction: accelerated multi-coil k-space -> the RSS image.

Every reconstruction network takes ``(kspace, mask, grappa)`` — undersampled multi-coil
k-space (B, C, H, W) complex64 with exact zeros where not acquired, the mask (B, W) bool
and the GRAPPA image (B, H, W) — and returns the RSS image (B, H, W). Outputs are fused as
a weighted sum of images (one weight per member), scored by SSIM, PSNR and NMSE per volume
(fastMRI's evaluation), and the ensemble searches weights on val SSIM.

Scaling (:func:`network_inputs`, the one place it is written): each slice is divided by the
maximum of its zero-filled RSS image (known at inference time, unlike the target), so
networks see images of about [0, 1] whatever the scanner's units; outputs are multiplied
back. The SSIM data range is the volume's target maximum (fastMRI), scaled the same way
during training.

Masks: validation and test slices use the mask stored at ingest (fixed per volume,
seeded); training draws a fresh mask per slice and epoch from ``(seed, epoch, index)``,
so a resumed run sees the same masks. Networks with ``uses_grappa`` get a GRAPPA image
computed for that fresh mask (others get zeros and skip the cost).

A user's fastMRI HDF5 file is brought to the task's grid by
:func:`~mri_ensemble.data.fastmri.prepare_volume` (image-domain crop to ``size``, SVD coil
compression to ``coils``):

- a fully sampled file (no ``mask`` dataset, or an all-ones one) is undersampled with the
  mask ingest would give it (``ingest.reconstruction.mask`` and ``seed``, drawn per file
  name), so a file of the prepared val/test split gets exactly its evaluation mask; the
  fully sampled RSS image (or the file's own target) is returned as ``target``;
- an already undersampled file (fastMRI test/challenge files carry a ``mask``) is used
  with its own mask. Its width must equal the task's W: cropping along the phase-encode
  axis would mix acquired and missing lines. Its target is returned only if the file
  carries one on the task's grid (test files have none).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.prepared import scored_splits
from ..data.prepared_recon import ReconstructionSet, read_reconstruction_h5
from ..errors import ConfigError, DataError
from ..mri.fft import fft2c, ifft2c, rss
from ..mri.grappa import grappa_image
from ..mri.masks import MaskSpec, sample_mask, volume_mask
from ..mri.quality import reconstruction_scores
from .base import Task, Training

if TYPE_CHECKING:
    from ..data.fastmri import FastMRIFile
    from ..inference import Predictor

# What a stage runs decides its DVC deps (tests/test_dvc_deps.py): imports that only some
# stages need (training, the ensemble search, predict's file I/O) sit in the functions that
# need them, so that e.g. an ensemble change retrains nothing.

Sample = tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def uses_grappa(model: nn.Module) -> bool:
    return bool(getattr(model, "uses_grappa", False))


def input_scale(masked_kspace: np.ndarray) -> float:
    """Maximum of the zero-filled RSS image of one slice (C, H, W); 1 if all zero."""
    s = float(rss(ifft2c(masked_kspace)).max())
    return s if s > 0 else 1.0


def network_inputs(
    masked: np.ndarray, mask: np.ndarray, grappa: np.ndarray
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], float]:
    """One slice's network inputs (kspace (C, H, W), mask (W,), grappa (H, W)), each divided
    by the slice's :func:`input_scale`, and that scale (outputs are multiplied by it)."""
    s = input_scale(masked)
    return (
        torch.from_numpy((masked / s).astype(np.complex64)),
        torch.from_numpy(np.asarray(mask, dtype=bool)),
        torch.from_numpy((grappa / s).astype(np.float32)),
    ), s


class ReconDataset(Dataset[Sample]):
    """Slices as ``((kspace, mask, grappa), (target, data_range))``, scaled per slice.

    ``mask_spec=None`` uses the stored masks and GRAPPA images (val/test); a MaskSpec draws
    a fresh mask per slice and epoch (training). ``with_grappa`` computes GRAPPA for fresh
    masks (only for networks that use it).
    """

    def __init__(
        self,
        data: ReconstructionSet,
        mask_spec: MaskSpec | None = None,
        seed: int = 0,
        with_grappa: bool = False,
    ) -> None:
        self.data = data
        self.mask_spec = mask_spec
        self.seed = seed
        self.with_grappa = with_grappa
        self.grappa_cfg = dict(data.attrs.get("grappa") or {})  # as ingest computed it
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Sample:
        d = self.data
        kspace = d.kspace[i]  # (C, H, W)
        if self.mask_spec is None:
            mask, grappa = d.mask[i], d.grappa[i]
            masked = kspace * mask
        else:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            mask = sample_mask(self.mask_spec, kspace.shape[-1], rng)
            masked = kspace * mask
            grappa = (
                grappa_image(masked, mask, **self.grappa_cfg)
                if self.with_grappa
                else np.zeros(kspace.shape[1:], np.float32)
            )
        inputs, s = network_inputs(masked, mask, grappa)
        return (
            inputs,
            (
                torch.from_numpy((d.target[i] / s).astype(np.float32)),
                torch.tensor(float(d.max[i]) / s, dtype=torch.float32),
            ),
        )


def zero_filled(data: ReconstructionSet) -> np.ndarray:
    """Zero-filled RSS images (N, H, W) float32 of the stored masks (the classical baseline)."""
    return np.stack(
        [rss(ifft2c(k * m)) for k, m in zip(data.kspace, data.mask, strict=True)]
    ).astype(np.float32)


def slice_scales(data: ReconstructionSet) -> np.ndarray:
    """(N,) float32 per-slice input scale for the stored masks (see the module doc)."""
    return np.array(
        [input_scale(data.kspace[i] * data.mask[i]) for i in range(len(data))], np.float32
    )


@torch.no_grad()
def _outputs(
    model: nn.Module,
    data: ReconstructionSet,
    device: torch.device,
    batch_size: int,
    loss_fn: nn.Module | None,
    progress: bool,
    desc: str,
) -> tuple[np.ndarray, float]:
    """Outputs in the data's units (N, H, W) and the mean scaled loss (NaN without loss_fn)."""
    model.eval()
    loader = DataLoader(ReconDataset(data), batch_size=batch_size, shuffle=False)
    out, total = [], 0.0
    for (kspace, mask, grappa), (target, data_range) in tqdm(
        loader, desc=desc, leave=False, disable=None if progress else True
    ):
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            pred = model(kspace.to(device), mask.to(device), grappa.to(device))
        pred = pred.float()
        if loss_fn is not None:
            total += loss_fn(pred, target.to(device), data_range.to(device)).item() * len(target)
        out.append(pred.cpu().numpy())
    scaled = np.concatenate(out)
    loss = total / len(data) if loss_fn is not None else float("nan")
    return (scaled * slice_scales(data)[:, None, None]).astype(np.float32), loss


def predict_reconstructions(
    model: nn.Module,
    data: ReconstructionSet,
    device: torch.device,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "predict",
) -> np.ndarray:
    """Reconstructions (N, H, W) float32 in the data's units, with the stored masks."""
    return _outputs(model, data, device, batch_size, None, progress, desc)[0]


def make_validate(val: ReconstructionSet, loss_fn: nn.Module, batch_size: int = 8):
    """A ``validate(model, device)`` for the engine: val_loss, val_ssim, val_psnr, val_nmse.

    Scores follow fastMRI's evaluation (per volume, data range = volume max).
    """

    def validate(model: nn.Module, device: torch.device) -> dict[str, float]:
        recon, loss = _outputs(model, val, device, batch_size, loss_fn, False, "val")
        scores = reconstruction_scores(recon, val.target, val.case)
        return {
            "val_loss": loss,
            "val_ssim": scores["ssim"],
            "val_psnr": scores["psnr"],
            "val_nmse": scores["nmse"],
        }

    return validate


def augment_flip(data: ReconstructionSet, seed: int) -> ReconstructionSet:
    """``data`` plus a left-right mirrored copy of every slice (training augmentation).

    The mirror is taken in the image domain (coil images flipped along W, then back to
    k-space), so the copy is an exact, physically valid multi-coil acquisition of the
    mirrored head. Copies get case ``<case>~flip``, their own seeded mask and GRAPPA image
    (the mask spec and GRAPPA settings come from the file's attributes).
    """
    spec = MaskSpec.from_mapping(data.attrs.get("mask"))
    grappa_cfg = dict(data.attrs.get("grappa") or {})
    kspace = fft2c(ifft2c(data.kspace)[..., ::-1]).astype(np.complex64)  # (N, C, H, W)
    case = np.array([f"{c}~flip" for c in data.case])
    masks = {c: volume_mask(spec, kspace.shape[-1], seed, c) for c in dict.fromkeys(case)}
    mask = np.stack([masks[c] for c in case])  # (N, W)
    grappa = np.stack(
        [grappa_image(k * m, m, **grappa_cfg) for k, m in zip(kspace, mask, strict=True)]
    )
    return ReconstructionSet(
        kspace=np.concatenate([data.kspace, kspace]),
        mask=np.concatenate([data.mask, mask]),
        target=np.concatenate([data.target, data.target[..., ::-1]]),
        grappa=np.concatenate([data.grappa, grappa]),
        case=np.concatenate([data.case, case]),
        max=np.concatenate([data.max, data.max]),
        attrs={**data.attrs, "augmented": True},
    )


# ---------------------------------------------------------------------------- a user's files


@dataclass
class ReconstructionResult:
    """Images (S, H, W) float32 on the task's grid, in the file's units.

    ``target`` is None when the file holds no fully sampled data; ``mask`` (W,) bool the
    sampling mask used, ``mask_source`` ``"params"`` (drawn as ingest does) or ``"file"``;
    ``uncertainty`` the members' weighted variance (S, H, W), the file's units squared.
    """

    reconstruction: np.ndarray
    zero_filled: np.ndarray
    target: np.ndarray | None
    mask: np.ndarray
    mask_source: str
    model: str
    weights: dict[str, float]
    path: Path
    attrs: dict[str, Any] = field(default_factory=dict)
    uncertainty: np.ndarray | None = None

    @property
    def acceleration(self) -> float:
        return float(self.mask.size / max(1, int(self.mask.sum())))


def recon_settings(settings: Mapping[str, Any]) -> tuple[tuple[int, int], int, MaskSpec, dict]:
    """(size (H, W), coils, mask spec, GRAPPA settings) of ``ingest.reconstruction``."""
    try:
        size = tuple(int(v) for v in settings["size"])
        coils = int(settings["coils"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            "params.yaml: ingest.reconstruction needs size [H, W] and coils, found "
            f"{dict(settings)}"
        ) from exc
    if len(size) != 2:
        raise ConfigError(f"params.yaml: ingest.reconstruction.size should be [H, W], found {size}")
    spec = MaskSpec.from_mapping(settings.get("mask"))
    grappa_cfg = dict(settings.get("grappa") or {})
    return (size[0], size[1]), coils, spec, grappa_cfg


def prepare_input(
    f: FastMRIFile, settings: Mapping[str, Any], seed: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, str]:
    """(kspace (S, C, H, W) on the task grid, target or None, mask (W,), mask source).

    See the module doc for fully sampled versus already undersampled files."""
    from ..data.fastmri import prepare_volume

    size, coils, spec, _ = recon_settings(settings)
    undersampled = f.mask is not None and not bool(f.mask.all())
    if not undersampled:
        kspace, target = prepare_volume(f, size, coils)
        mask = volume_mask(spec, kspace.shape[-1], seed, f.path.stem)
        return kspace, target, mask, "params"
    assert f.mask is not None
    check_undersampled_width(f, size[1])
    kspace, _ = prepare_volume(replace(f, mask=None), size, coils)
    kspace = kspace * f.mask  # cropping along H and coil compression keep missing lines at 0
    keep = f.target is not None and f.target.shape == (f.n_slices, *size)
    return kspace.astype(np.complex64), f.target if keep else None, f.mask.copy(), "file"


def check_undersampled_width(f: FastMRIFile, width: int) -> None:
    """An already undersampled file must have the task's width and an autocalibration
    block (a sampled centre column: GRAPPA and the coil sensitivities need it)."""
    from ..mri.masks import acs_bounds

    if f.mask is None or f.mask.all():
        return
    if f.kspace.shape[-1] != width:
        raise DataError(
            f"{f.path}: already undersampled k-space {f.kspace.shape[-1]} columns wide; "
            f"the models need width {width} (ingest.reconstruction.size), and cropping the "
            "phase-encode axis would mix acquired and missing lines"
        )
    try:
        acs_bounds(f.mask)
    except DataError as exc:
        raise DataError(f"{f.path}: {exc}") from exc


@torch.no_grad()
def reconstruct_kspace(
    predictor: Predictor,
    masked_kspace: np.ndarray,
    mask: np.ndarray,
    grappa: np.ndarray | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The fused reconstruction (S, H, W) float32 of undersampled k-space (S, C, H, W) with
    mask (W,), and the members' weighted variance around it (S, H, W) float32, in the same
    units squared: the predictor's :class:`EnsembleNet` on slices scaled as in training
    (:func:`network_inputs`). ``grappa`` (S, H, W) is needed when a member uses it
    (computed here when None). The variance is that of the members' own images (before
    the fused image's data consistency step)."""
    if predictor.task != RECONSTRUCTION.name:
        raise ConfigError(
            f"reconstruct_kspace needs a reconstruction predictor, not {predictor.task}"
        )
    s_count = masked_kspace.shape[0]
    if grappa is None:
        grappa = np.zeros((s_count, *masked_kspace.shape[-2:]), np.float32)
        if any(uses_grappa(m.model) for m in predictor.members):
            _, _, _, cfg = recon_settings(predictor.settings)
            grappa = np.stack(
                [
                    grappa_image(k, mask, **cfg)
                    for k in tqdm(masked_kspace, desc="GRAPPA", disable=None if progress else True)
                ]
            )
    net, dev = predictor.net, predictor.device
    out, spread = [], []
    starts = range(0, s_count, batch_size)
    for i in tqdm(starts, desc="reconstruct", unit="batch", disable=None if progress else True):
        slices = [
            network_inputs(k, mask, g)
            for k, g in zip(
                masked_kspace[i : i + batch_size], grappa[i : i + batch_size], strict=True
            )
        ]
        k, m, g = (torch.stack([x[0][j] for x in slices]).to(dev) for j in range(3))
        scales = np.array([x[1] for x in slices], np.float64)[:, None, None]
        stack = net.member_outputs(k, m, g)  # (M, B, H, W)
        mean = net.fuse(stack)
        var = net.fuse((stack - mean) ** 2)
        out.append(mean.float().cpu().numpy().astype(np.float64) * scales)
        spread.append(var.float().cpu().numpy().astype(np.float64) * scales**2)
    fused = np.concatenate(out).astype(np.float32)
    variance = np.concatenate(spread).astype(np.float32)
    if predictor.data_consistency:  # the fused image gets the members' hard DC step
        from ..mri.consistency import consistent_image_np

        masks = np.repeat(np.asarray(mask, bool)[None], s_count, 0)
        fused = consistent_image_np(fused, masked_kspace.astype(np.complex64), masks)
    return fused, variance


def reconstruct_file(
    predictor: Predictor, path: Path, batch_size: int = 4, progress: bool = False
) -> ReconstructionResult:
    """Reconstruct a fastMRI HDF5 file (see the module doc for its mask).

    The k-space is divided by its peak magnitude in float64 first, and the images are
    multiplied back in float64, so a file scaled by 1e-30 or 1e30 neither underflows nor
    overflows float32 on the way; all-zero k-space and a non-finite or underflowing result
    are refused (DataError naming the file) rather than written."""
    from ..data.fastmri import check_signal, read_fastmri
    from ..inputs import input_kind

    input_kind(path, RECONSTRUCTION.name)
    f = read_fastmri(Path(path))
    peak = check_signal(f)
    f = replace(
        f,
        kspace=(f.kspace.astype(np.complex128) / peak).astype(np.complex64),
        target=None
        if f.target is None
        else (f.target.astype(np.float64) / peak).astype(np.float32),
    )
    kspace, target, mask, source = prepare_input(f, predictor.settings, predictor.seed)
    masked = (kspace * mask).astype(np.complex64)  # (S, C, H, W)
    recon, variance = reconstruct_kspace(predictor, masked, mask, None, batch_size, progress)
    recon = _rescale(path, recon, peak)
    variance = (np.asarray(variance, np.float64) * peak**2).astype(np.float32)
    zero = _rescale(path, rss(ifft2c(masked)), peak)  # (S, H, W)
    if target is not None:
        target = _rescale(path, target, peak)
    names = [m.name for m in predictor.members]
    return ReconstructionResult(
        reconstruction=recon,
        zero_filled=zero,
        target=None if target is None else np.asarray(target, np.float32),
        mask=np.asarray(mask, bool),
        mask_source=source,
        model=predictor.name,
        weights=dict(zip(names, map(float, predictor.weights), strict=True)),
        path=Path(path),
        attrs=dict(f.attrs),
        uncertainty=variance,
    )


def _rescale(path: Path, images: np.ndarray, peak: float) -> np.ndarray:
    """``images * peak`` computed in float64, as float32; DataError naming ``path`` when it is
    not finite or underflows (a non-zero image that float32 cannot hold)."""
    scaled = np.asarray(images, np.float64) * peak
    out = scaled.astype(np.float32)
    check_finite(path, out)
    if np.any(scaled != 0) and not np.any(out != 0):
        raise DataError(
            f"{path}: the reconstruction underflows float32 (k-space peak {peak:.3g}); "
            "rescale the file's k-space"
        )
    return out


def check_finite(path: Path, images: np.ndarray) -> None:
    """DataError naming ``path`` when ``images`` hold NaN or Inf: nothing is written."""
    bad = int(np.size(images) - np.isfinite(images).sum())
    if bad:
        raise DataError(
            f"{path}: the result has {bad} NaN/Inf values of {np.size(images)}; nothing written"
        )


def save_reconstruction(result: ReconstructionResult, out: Path) -> None:
    """Write the fastMRI submission layout: dataset ``reconstruction`` (S, H, W) float32,
    plus attributes (model, weights, input file, mask source, acceleration), and dataset
    ``uncertainty`` (the members' weighted variance, same shape), atomically."""
    import json

    import h5py

    from ..inputs import HDF5_SUFFIXES, file_suffix
    from ..io import atomic_path

    out = Path(out)
    if file_suffix(out) not in HDF5_SUFFIXES:
        raise ConfigError(f"{out}: a reconstruction output needs a .h5 name")
    check_finite(result.path, result.reconstruction)
    try:
        with atomic_path(out) as tmp, h5py.File(tmp, "w") as hf:
            hf.create_dataset("reconstruction", data=result.reconstruction.astype(np.float32))
            if result.uncertainty is not None:
                unsure = hf.create_dataset(
                    "uncertainty", data=result.uncertainty.astype(np.float32)
                )
                unsure.attrs["kind"] = "weighted variance of the members' images (units^2)"
            hf.attrs["model"] = result.model
            hf.attrs["weights"] = json.dumps(result.weights, sort_keys=True)
            hf.attrs["input"] = result.path.name
            hf.attrs["mask_source"] = result.mask_source
            hf.attrs["acceleration"] = result.acceleration
            hf.attrs["mask"] = result.mask.astype(np.uint8)
            for key in ("acquisition", "patient_id"):
                if isinstance(result.attrs.get(key), str):
                    hf.attrs[key] = result.attrs[key]
    except OSError as exc:
        raise DataError(f"{out}: could not write the reconstruction ({exc})") from exc


class Reconstruction(Task):
    name = "reconstruction"
    key_metric = "ssim"
    summary_metrics = ("ssim", "psnr", "nmse")
    ensemble_keys = frozenset(
        {
            "method",
            "compare",
            "n_random",
            "rounds",
            "penalty",
            "crossfit_folds",
            "robust",
            "guard",
            "data_consistency",
        }
    )
    guard = "zero_filled"
    input_kinds = ("hdf5",)
    flag_metric = "ssim"

    @property
    def nets(self) -> Mapping[str, Any]:
        from ..nets import RECONSTRUCTION as NETS

        return NETS

    @property
    def ensemble_methods(self) -> tuple[str, ...]:
        from ..ensemble import METHODS, SEGMENTATION_ONLY

        return tuple(m for m in METHODS if m not in SEGMENTATION_ONLY)

    expected_inputs = "a fastMRI HDF5 file (.h5)"
    report_columns = (
        ("val", "ssim", "val SSIM"),
        ("test", "ssim", "test SSIM"),
        ("test", "psnr", "test PSNR (dB)"),
        ("test", "nmse", "test NMSE"),
    )
    report_baselines = (("grappa", "GRAPPA baseline"), ("zero_filled", "zero-filled baseline"))
    report_gain_notes = (("psnr", "PSNR", "dB"),)

    # data
    def ingest(self, p: dict[str, Any], seed: int, out: Path) -> None:
        from ..data.ingest import ingest_reconstruction

        ingest_reconstruction(p, seed, out)

    def augment(self, p: dict[str, Any], seed: int, train: Path, out: Path) -> tuple[int, int]:
        from ..data.prepared_recon import write_reconstruction_h5

        unknown = sorted(set(p) - {"flip"})
        if unknown:
            raise ConfigError(f"params.yaml: augment.reconstruction: unknown key(s) {unknown}")
        recon = read_reconstruction_h5(train)
        augmented = augment_flip(recon, seed) if p.get("flip", True) else recon
        write_reconstruction_h5(out, augmented)
        return len(recon), len(augmented)

    def read(self, path: Path) -> ReconstructionSet:
        return read_reconstruction_h5(path)

    # training
    def training(self, entry: dict[str, Any], train: Path, val: Path, seed: int) -> Training:
        from ..mri.quality import build_recon_loss
        from ..train import ModelSpec

        spec = ModelSpec(entry["arch"], dict(entry.get("net") or {}), 2, 1)
        model = spec.build()
        loss_fn = build_recon_loss(entry.get("loss", "ssim"), entry.get("loss_config"))
        data = read_reconstruction_h5(train)
        val_set = read_reconstruction_h5(val)
        mask_spec = MaskSpec.from_mapping(data.attrs.get("mask"))
        train_set = ReconDataset(data, mask_spec, seed, with_grappa=uses_grappa(model))
        return spec, loss_fn, train_set, make_validate(val_set, loss_fn)

    # evaluation
    def predict(
        self,
        model: nn.Module,
        data: ReconstructionSet,
        device: torch.device,
        progress: bool,
        desc: str,
    ) -> np.ndarray:
        return predict_reconstructions(model, data, device, progress=progress, desc=desc)

    def truth(self, data: ReconstructionSet) -> np.ndarray:
        return data.target

    def class_names(self, data: ReconstructionSet) -> list[str]:
        return []

    def score(self, outputs: np.ndarray, truth: np.ndarray, case: np.ndarray, names: Any) -> dict:
        return reconstruction_scores(outputs, truth, case)

    def write_outputs(
        self, path: Path, outputs: np.ndarray, case: np.ndarray, attrs: Mapping[str, Any]
    ) -> None:
        from ..data.predictions import write_reconstructions

        write_reconstructions(path, outputs, case, attrs)

    def read_outputs(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        from ..data.predictions import read_reconstructions

        return read_reconstructions(path)

    # ensemble
    def ensemble_inputs(self, models: list[str], predictions: Path, data: Path) -> dict[str, Any]:
        """Val groups are contrasts (robust selection and the guard score per group); the
        baselines are zero-filled and GRAPPA; ``measured`` is what data consistency needs."""
        from ..data.predictions import load_stack
        from ..data.prepared_recon import contrast_groups
        from ..ensemble import ImageObjective

        rsets = {s: read_reconstruction_h5(data / f"{s}.h5") for s in scored_splits(data)}
        objs = {
            s: ImageObjective(
                load_stack(predictions, models, s, d.case, self.read_outputs),
                d.target,
                d.case,
                groups=contrast_groups(d.case),
            )
            for s, d in rsets.items()
        }
        zf = {s: zero_filled(d) for s, d in rsets.items()}
        baselines = {
            "zero_filled": {
                s: reconstruction_scores(zf[s], d.target, d.case) for s, d in rsets.items()
            },
            "grappa": {
                s: reconstruction_scores(d.grappa, d.target, d.case) for s, d in rsets.items()
            },
        }
        measured = {s: (d.kspace * d.mask[:, None, None, :], d.mask) for s, d in rsets.items()}
        return {
            "objs": objs,
            "names": [],
            "baselines": baselines,
            "measured": measured,
            "zero_filled": zf,
        }

    def fusable(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.float()

    def uncertainty_maps(self, outputs: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
        """The weighted variance of the members' images around the fused one."""
        from ..ensemble.uncertainty import image_variance

        return {"variance": image_variance(outputs, weights)}

    def error_map(self, fused: np.ndarray, truth: np.ndarray) -> np.ndarray:
        return np.abs(np.asarray(fused, np.float32) - np.asarray(truth, np.float32))

    def check_weights(self, weights: np.ndarray) -> None:
        if weights.ndim != 1:
            raise DataError("reconstruction ensembles take one weight per member")

    def check_ensemble(self, path: Path, method: str, weights: Mapping[str, Any]) -> None:
        if method == "vote" or any(isinstance(w, dict) for w in weights.values()):
            raise DataError(
                f"{path}: reconstruction ensembles are weighted sums "
                f"with one weight per model, found method {method!r} with weights {dict(weights)}"
            )

    # cost
    def batch_inputs(self, data: Path, batch: int) -> tuple[torch.Tensor, ...]:
        dataset = ReconDataset(read_reconstruction_h5(data))
        items = [dataset[i][0] for i in range(min(batch, len(dataset)))]
        return tuple(torch.stack([it[j] for it in items]) for j in range(3))

    # predict
    def predict_file(
        self,
        predictor: Predictor,
        path: Path,
        batch_size: int | None,
        progress: bool,
        pixel_mm: float | None = None,
    ) -> ReconstructionResult:
        return reconstruct_file(predictor, path, batch_size or 4, progress)

    def save_result(self, result: ReconstructionResult, out: Path) -> None:
        save_reconstruction(result, out)

    def describe_result(self, result: ReconstructionResult) -> str:
        s, h, w = result.reconstruction.shape
        return f"{s} slices {h}x{w}; {result.acceleration:.1f}x, mask from the {result.mask_source}"

    def output_suffixes(self, kind: str) -> Sequence[str]:
        from ..inputs import HDF5_SUFFIXES

        return HDF5_SUFFIXES

    def check_input(
        self, path: Path, kind: str, settings: Mapping[str, Any], pixel_mm: float | None
    ) -> None:
        from ..data.fastmri import check_coils, check_signal, read_fastmri

        f = read_fastmri(path)
        check_signal(f)
        size, coils, _, _ = recon_settings(settings)
        check_coils(f, coils)
        check_undersampled_width(f, size[1])

    def predict_array(self, predictor: Predictor, model_input: Any) -> np.ndarray:
        """A fastMRI HDF5 path (or a one-element list of it) -> images (S, H, W)."""
        path = model_input[0] if isinstance(model_input, list | tuple) else model_input
        return reconstruct_file(predictor, Path(str(path))).reconstruction


RECONSTRUCTION = Reconstruction()
