"""A generic image/mask folder source, so users outside MRI can run the same pipeline.

Layout: ``<root>/images/<name>.{png,jpg,jpeg}`` and ``<root>/masks/<name>.png`` with the
same stem (the Oxford-IIIT Pet download also works as is: ``<root>/images/*.jpg`` with
``<root>/annotations/trimaps/*.png``). Images are read as greyscale, resized to
``size`` x ``size`` (bilinear; masks nearest-neighbour, so no new label appears),
normalised like the MRI volumes (1st–99th percentile to [0, 1]); every image is its own
case. Mask conventions (``mask_mode``):

- ``trimap`` (Oxford-IIIT Pet, report R1): 1 foreground, 2 background, 3 boundary; the
  boundary counts as foreground -> labels {0 background, 1 foreground};
- ``binary``: any non-zero value is foreground -> {0, 1};
- ``labels``: the pixel values are the class indices 0..K-1 as they are.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from .acdc import Volume
from .grid import normalize_intensity

logger = logging.getLogger(__name__)

MASK_MODES = ("trimap", "binary", "labels")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BINARY_CLASSES = ["background", "foreground"]


def list_pairs(root: Path) -> list[tuple[str, Path, Path]]:
    """(name, image, mask) for every image with a mask, sorted by name.

    DataError when the folders are missing, or an image has no mask (naming it).
    """
    root = Path(root)
    images_dir = root / "images"
    mask_dirs = [root / "masks", root / "annotations" / "trimaps"]
    masks_dir = next((d for d in mask_dirs if d.is_dir()), None)
    if not images_dir.is_dir() or masks_dir is None:
        raise DataError(
            f"{root}: expected images/ and masks/ (or annotations/trimaps/) folders in it"
        )
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"{images_dir}: expected PNG or JPEG images, found none")
    pairs = []
    for img in images:
        mask = masks_dir / f"{img.stem}.png"
        if not mask.is_file():
            raise DataError(f"{img}: no mask {mask} for this image")
        pairs.append((img.stem, img, mask))
    return pairs


def _load(path: Path, mode: str, size: int, resample: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as raw:
            raw.load()
            if mode == "mask" and raw.mode not in ("L", "P", "I", "I;16", "1"):
                raise DataError(
                    f"{path}: expected a single-channel mask PNG, found mode {raw.mode}"
                )
            im = raw.convert("L") if mode == "image" else raw
            return np.asarray(im.resize((size, size), resample=resample))
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from exc


def labels_from_mask(mask: np.ndarray, mask_mode: str, path: Path, n_classes: int) -> np.ndarray:
    """Map a mask's pixel values to class labels (uint8) by ``mask_mode``."""
    if mask_mode == "trimap":
        bad = np.setdiff1d(np.unique(mask), [1, 2, 3])
        if bad.size:
            raise DataError(f"{path}: expected trimap values 1, 2, 3, found {bad[:5].tolist()}")
        return (mask != 2).astype(np.uint8)
    if mask_mode == "binary":
        return (mask > 0).astype(np.uint8)
    if mask.min() < 0 or mask.max() >= n_classes:
        raise DataError(f"{path}: expected labels 0..{n_classes - 1}, found max {mask.max()}")
    return mask.astype(np.uint8)


def read_folder(
    root: Path,
    names: list[str],
    *,
    size: int,
    mask_mode: str,
    n_classes: int = 2,
    progress: bool = False,
) -> list[Volume]:
    """The images ``names`` of ``root`` as one-slice volumes (image (1, size, size), label)."""
    from PIL import Image

    if mask_mode not in MASK_MODES:
        raise ConfigError(f"mask_mode {mask_mode!r} unknown; known: {', '.join(MASK_MODES)}")
    pairs = {name: (img, mask) for name, img, mask in list_pairs(root)}
    out = []
    problems: list[str] = []  # every bad file is reported at once, before anything is written
    for name in tqdm(names, desc="read images", leave=False, disable=None if progress else True):
        img_path, mask_path = pairs[name]
        try:
            image = _load(img_path, "image", size, Image.Resampling.BILINEAR).astype(np.float32)
            mask = _load(mask_path, "mask", size, Image.Resampling.NEAREST)
            label = labels_from_mask(mask, mask_mode, mask_path, n_classes)
        except DataError as exc:
            problems.append(str(exc))
            continue
        out.append(
            Volume(
                case=name,
                patient=name,
                phase="",
                image=normalize_intensity(image)[None],
                label=label[None],
                spacing=(1.0, 1.0, 1.0),
                group="",
            )
        )
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        raise DataError(f"{root}: {len(problems)} bad files: {' | '.join(problems)}")
    logger.info("read %d images from %s", len(out), root)
    return out
