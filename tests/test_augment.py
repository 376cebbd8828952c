"""Tests of the deterministic training-set augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from mri_ensemble.data.augment import AugmentConfig, augment
from mri_ensemble.errors import ConfigError


def _squares(n: int = 6, size: int = 48) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Off-centre bright rectangles (so flips and rotations move them) with matching labels."""
    image = np.zeros((n, size, size), np.float32)
    label = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        top, left = 6 + i, 8 + 2 * i
        image[i, top : top + 14, left : left + 20] = 1.0
        label[i, top : top + 14, left : left + 20] = 1 + i % 3
    case = np.array([f"patient{i // 2:03d}_ED" for i in range(n)])
    return image, label, case


def test_count_and_originals_first() -> None:
    image, label, case = _squares()
    out_image, out_label, out_case = augment(image, label, case, AugmentConfig(copies=2), seed=0)
    assert out_image.shape == out_label.shape == (18, 48, 48)
    assert out_image.dtype == np.float32 and out_label.dtype == np.uint8
    np.testing.assert_array_equal(out_image[:6], image)
    np.testing.assert_array_equal(out_label[:6], label)
    assert out_case.tolist() == case.tolist() * 3
    assert not np.array_equal(out_image[6:12], out_image[12:18])


def test_deterministic() -> None:
    image, label, case = _squares()
    cfg = AugmentConfig(copies=2)
    a = augment(image, label, case, cfg, seed=7)
    b = augment(image, label, case, cfg, seed=7)
    c = augment(image, label, case, cfg, seed=8)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_zero_copies_returns_originals() -> None:
    image, label, case = _squares()
    out_image, out_label, out_case = augment(image, label, case, AugmentConfig(copies=0), seed=0)
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_label, label)
    assert out_case.tolist() == case.tolist()


def test_labels_stay_in_original_set() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((4, 32, 32), dtype=np.float32)
    label = rng.choice(np.array([0, 2, 3], np.uint8), size=(4, 32, 32))
    cfg = AugmentConfig(copies=5, rotate_deg=30.0)
    _, out_label, _ = augment(image, label, np.array(["a"] * 4), cfg, seed=1)
    assert set(np.unique(out_label)) <= {0, 2, 3}


@pytest.mark.parametrize(
    "cfg",
    [
        AugmentConfig(copies=4),
        AugmentConfig(copies=4, rotate_deg=45.0, noise_std=0.0),
        AugmentConfig(copies=4, flip=False, rot90=False, rotate_deg=180.0),
    ],
)
def test_image_and_label_stay_aligned(cfg: AugmentConfig) -> None:
    image, label, case = _squares()
    out_image, out_label, _ = augment(image, label, case, cfg, seed=3)
    n = len(image)
    moved = 0
    for k in range(n, len(out_image)):
        bright = out_image[k] > 0.5
        mask = out_label[k] > 0
        iou = np.count_nonzero(bright & mask) / np.count_nonzero(bright | mask)
        assert iou > 0.9, (k, iou)
        assert set(np.unique(out_label[k])) <= {0, int(label[k % n].max())}
        moved += not np.array_equal(mask, label[k % n] > 0)
    assert moved > 0  # the geometric transforms did something


def test_noise_on_image_only() -> None:
    image, label, case = _squares(n=2)
    cfg = AugmentConfig(copies=1, flip=False, rot90=False, rotate_deg=0.0, noise_std=0.1)
    out_image, out_label, _ = augment(image, label, case, cfg, seed=0)
    np.testing.assert_array_equal(out_label[2:], label)
    assert np.std(out_image[2:] - image) == pytest.approx(0.1, rel=0.1)


def test_rot90_skipped_for_non_square_slices() -> None:
    image = np.zeros((2, 8, 12), np.float32)
    label = np.zeros((2, 8, 12), np.uint8)
    out_image, _, _ = augment(image, label, np.array(["a", "b"]), AugmentConfig(copies=3), seed=0)
    assert out_image.shape == (8, 8, 12)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"copies": -1}, "copies"),
        ({"copies": 1.5}, "copies"),
        ({"rotate_deg": -1.0}, "rotate_deg"),
        ({"rotate_deg": 181.0}, "rotate_deg"),
        ({"noise_std": -0.1}, "noise_std"),
        ({"noise_std": float("nan")}, "noise_std"),
        ({"flip": "yes"}, "flip"),
    ],
)
def test_config_validation(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        AugmentConfig(**kwargs)  # type: ignore[arg-type]


def test_config_from_mapping() -> None:
    assert AugmentConfig.from_mapping({"copies": 2, "rotate_deg": 0}) == AugmentConfig(
        copies=2, rotate_deg=0
    )
    with pytest.raises(ConfigError, match="unknown keys.*'copy'"):
        AugmentConfig.from_mapping({"copy": 2})


def test_shape_mismatch_is_a_bug() -> None:
    image, label, case = _squares(n=2)
    with pytest.raises(ValueError, match="label"):
        augment(image, label[:, :-1], case, AugmentConfig(), seed=0)
