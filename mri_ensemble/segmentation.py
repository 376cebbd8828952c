"""Segmentation task glue between the data, the training engine and the metrics.

Everything task-specific that the generic stages need lives here: how to validate during
training, how to predict probabilities, how to score them.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data.prepared import SegmentationSet, SliceDataset
from .metrics import CLASS_NAMES, segmentation_scores

N_CLASSES = len(CLASS_NAMES)


def class_names_of(data: SegmentationSet) -> list[str]:
    """The class names a prepared file declares (cardiac ACDC classes if it has none)."""
    names = data.attrs.get("class_names")
    if isinstance(names, str):
        names = json.loads(names)
    return [str(n) for n in names] if names else list(CLASS_NAMES)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities (N, K, H, W) from logits; one channel (binary mode, BCE) ->
    sigmoid p as the two classes [1 - p, p], so argmax, ensembles and metrics stay the same."""
    logits = logits.float()
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    images: np.ndarray,
    device: torch.device,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "predict",
) -> np.ndarray:
    """Class probabilities of ``model`` (eval mode) for images (N, H, W) -> (N, K, H, W)
    (softmax; sigmoid as two classes for a one-output binary network)."""
    model.eval()
    out = []
    starts = range(0, len(images), batch_size)
    for i in tqdm(starts, desc=desc, leave=False, disable=None if progress else True):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size, None])).to(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            logits = model(x)  # (B, K, H, W)
        out.append(probabilities(logits).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def make_validate(val: SegmentationSet, loss_fn: nn.Module, batch_size: int = 32):
    """A ``validate(model, device)`` for the training engine: val_loss, val_iou, val_dice.

    IoU and Dice are per-case (3-D) foreground means, as in ``metrics.segmentation_scores``.
    """

    names = class_names_of(val)

    def validate(model: nn.Module, device: torch.device) -> dict[str, float]:
        total, count, preds = 0.0, 0, []
        loader = DataLoader(SliceDataset(val), batch_size=batch_size, shuffle=False)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            total += loss_fn(logits, y).item() * x.shape[0]
            count += x.shape[0]
            preds.append(probabilities(logits).argmax(1).cpu().numpy().astype(np.uint8))
        scores = segmentation_scores(np.concatenate(preds), val.label, val.case, names)
        return {"val_loss": total / count, "val_iou": scores["iou"], "val_dice": scores["dice"]}

    return validate
