"""Segmentation task glue between the data, the training engine and the metrics.

Everything task-specific that the generic stages need lives here: how to validate during
training, how to predict probabilities, how to score them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data.prepared import SegmentationSet, SliceDataset
from .metrics import CLASS_NAMES, segmentation_scores

N_CLASSES = len(CLASS_NAMES)


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    images: np.ndarray,
    device: torch.device,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "predict",
) -> np.ndarray:
    """Softmax probabilities of ``model`` (eval mode) for images (N, H, W) -> (N, K, H, W)."""
    model.eval()
    out = []
    starts = range(0, len(images), batch_size)
    for i in tqdm(starts, desc=desc, leave=False, disable=None if progress else True):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size, None])).to(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            logits = model(x)  # (B, K, H, W)
        out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def make_validate(val: SegmentationSet, loss_fn: nn.Module, batch_size: int = 32):
    """A ``validate(model, device)`` for the training engine: val_loss, val_iou, val_dice.

    IoU and Dice are per-case (3-D) foreground means, as in ``metrics.segmentation_scores``.
    """

    def validate(model: nn.Module, device: torch.device) -> dict[str, float]:
        total, count, preds = 0.0, 0, []
        loader = DataLoader(SliceDataset(val), batch_size=batch_size, shuffle=False)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            total += loss_fn(logits, y).item() * x.shape[0]
            count += x.shape[0]
            preds.append(logits.argmax(1).cpu().numpy().astype(np.uint8))
        scores = segmentation_scores(np.concatenate(preds), val.label, val.case)
        return {"val_loss": total / count, "val_iou": scores["iou"], "val_dice": scores["dice"]}

    return validate
