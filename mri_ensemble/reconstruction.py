"""Reconstruction task glue between the prepared data, the training engine and the metrics.

Every reconstruction network takes ``(kspace, mask, grappa)`` — undersampled multi-coil
k-space (B, C, H, W) complex64 with exact zeros where not acquired, the mask (B, W) bool
and the GRAPPA image (B, H, W) — and returns the RSS image (B, H, W).

Scaling: each slice is divided by the maximum of its zero-filled RSS image (known at
inference time, unlike the target), so networks see images of about [0, 1] whatever the
scanner's units; outputs are multiplied back. The SSIM data range is the volume's target
maximum (fastMRI), scaled the same way during training.

Masks: validation and test slices use the mask stored at ingest (fixed per volume,
seeded); training draws a fresh mask per slice and epoch from ``(seed, epoch, index)``,
so a resumed run sees the same masks. Networks with ``uses_grappa`` get a GRAPPA image
computed for that fresh mask (others get zeros and skip the cost).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .data.prepared_recon import ReconstructionSet
from .mri.fft import fft2c, ifft2c, rss
from .mri.grappa import grappa_image
from .mri.masks import MaskSpec, sample_mask, volume_mask
from .mri.quality import reconstruction_scores

Sample = tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def uses_grappa(model: nn.Module) -> bool:
    return bool(getattr(model, "uses_grappa", False))


def input_scale(masked_kspace: np.ndarray) -> float:
    """Maximum of the zero-filled RSS image of one slice (C, H, W); 1 if all zero."""
    s = float(rss(ifft2c(masked_kspace)).max())
    return s if s > 0 else 1.0


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
        s = input_scale(masked)
        return (
            (
                torch.from_numpy((masked / s).astype(np.complex64)),
                torch.from_numpy(np.asarray(mask, dtype=bool)),
                torch.from_numpy((grappa / s).astype(np.float32)),
            ),
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
