"""Tests of the deterministic training-set augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from mri_ensemble.data.augment import AugmentConfig, augment, mixup_batch, sample_mixup_lambda
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


# Legacy reference: the transforms as they were before the optional ones were added -------------


def _legacy_augment_slice(
    image: np.ndarray, label: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    if cfg.flip:
        if rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        if rng.random() < 0.5:
            image, label = image[::-1, :], label[::-1, :]
    if cfg.rot90 and image.shape[0] == image.shape[1]:
        k = int(rng.choice([0, 1, 3]))
        image, label = np.rot90(image, k), np.rot90(label, k)
    if cfg.rotate_deg > 0 and rng.random() < 0.5:
        angle = float(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg))
        fill = float(image.min())
        image = ndimage.rotate(image, angle, reshape=False, order=1, mode="constant", cval=fill)
        label = ndimage.rotate(label, angle, reshape=False, order=0, mode="constant", cval=0)
    if cfg.noise_std > 0:
        image = image + rng.normal(0.0, cfg.noise_std, size=image.shape).astype(np.float32)
    return image, label


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"copies": 3, "rotate_deg": 45.0},
        {"copies": 2, "flip": False, "noise_std": 0.0},
        # disabled new options: their other settings must not matter
        {"copies": 2, "elastic_p": 0.0, "elastic_alpha": 5.0, "bias_field_order": 1},
    ],
)
def test_defaults_reproduce_the_legacy_stream_bitwise(kwargs: dict[str, object]) -> None:
    image, label, case = _squares()
    cfg = AugmentConfig(**kwargs)  # type: ignore[arg-type]
    out_image, out_label, _ = augment(image, label, case, cfg, seed=11)
    rng = np.random.default_rng(11)
    n = len(image)
    for c in range(1, cfg.copies + 1):
        for i in range(n):
            ref_image, ref_label = _legacy_augment_slice(image[i], label[i], cfg, rng)
            np.testing.assert_array_equal(out_image[c * n + i], ref_image)
            np.testing.assert_array_equal(out_label[c * n + i], ref_label)


# Elastic deformation, bias field, gamma ------------------------------------------------------

_ONLY = {"flip": False, "rot90": False, "rotate_deg": 0.0, "noise_std": 0.0}


def _label_coded(n: int = 4, size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blobs of labels 1-3 on 0; image = 10 * label + a smooth term in [0.1, 0.9]."""
    yy, xx = np.mgrid[:size, :size]
    label = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        label[i][(yy - 20 - 2 * i) ** 2 + (xx - 24) ** 2 < 14**2] = 1
        label[i][(yy - 20 - 2 * i) ** 2 + (xx - 24) ** 2 < 7**2] = 2
        label[i][(yy - 46) ** 2 + (xx - 44 + i) ** 2 < 9**2] = 3
    smooth = 0.5 + 0.4 * np.sin(yy / 9.0) * np.cos(xx / 7.0)
    image = (10.0 * label + smooth).astype(np.float32)
    return image, label, np.array([f"c{i}" for i in range(n)])


def _assert_aligned(out_image: np.ndarray, out_label: np.ndarray) -> None:
    """Image -> label mapping holds except near label boundaries (linear interpolation).

    Where it fails, the decoded class lies between the labels found around the pixel.
    """
    decoded = np.floor(out_image / 10.0)
    mismatch = decoded != out_label
    edges = ndimage.morphological_gradient(out_label, size=3) > 0
    assert not (mismatch & ~ndimage.binary_dilation(edges, iterations=2)).any()
    low = ndimage.minimum_filter(out_label, size=5)
    high = ndimage.maximum_filter(out_label, size=5)
    assert np.all((decoded >= low) & (decoded <= high))
    assert mismatch.mean() < 0.08  # the boundary band: about 190 of 4096 pixels here


def test_elastic_keeps_image_and_label_aligned() -> None:
    image, label, case = _label_coded()
    cfg = AugmentConfig(copies=3, elastic_p=1.0, elastic_alpha=150.0, elastic_sigma=8.0, **_ONLY)
    out_image, out_label, _ = augment(image, label, case, cfg, seed=0)
    n = len(image)
    for k in range(n, len(out_image)):
        assert set(np.unique(out_label[k])) == set(np.unique(label[k % n]))
        assert not np.array_equal(out_label[k], label[k % n])  # it moved
        _assert_aligned(out_image[k], out_label[k])


def test_all_geometric_transforms_keep_alignment() -> None:
    image, label, case = _label_coded()
    cfg = AugmentConfig(copies=4, rotate_deg=30.0, noise_std=0.0, elastic_p=1.0)
    out_image, out_label, _ = augment(image, label, case, cfg, seed=4)
    for k in range(len(image), len(out_image)):
        _assert_aligned(out_image[k], out_label[k])


def test_elastic_probability() -> None:
    image, label, case = _label_coded(n=8)
    cfg = AugmentConfig(copies=2, elastic_p=0.5, **_ONLY)
    out_image, _, _ = augment(image, label, case, cfg, seed=1)
    same = [np.array_equal(out_image[k], image[k % 8]) for k in range(8, 24)]
    assert 0 < sum(same) < 16


def test_intensity_transforms_leave_labels_and_order() -> None:
    image, label, case = _label_coded()
    for extra in ({"gamma_range": (0.7, 1.5)}, {"bias_field_coeff": 0.3}):
        cfg = AugmentConfig(copies=2, **_ONLY, **extra)  # type: ignore[arg-type]
        out_image, out_label, _ = augment(image, label, case, cfg, seed=2)
        np.testing.assert_array_equal(out_label[4:], np.tile(label, (2, 1, 1)))
        for k in range(4, 12):
            src, out = image[k % 4], out_image[k]
            assert not np.array_equal(out, src)
            assert out.min() == pytest.approx(src.min(), abs=1e-5)  # background stays put
            if "gamma_range" in extra:  # monotonic: the intensity order is kept
                order = np.argsort(src, axis=None, kind="stable")
                assert np.all(np.diff(out.ravel()[order]) >= -1e-5)
                assert out.max() == pytest.approx(src.max(), rel=1e-5)
            else:  # smooth positive multiplicative field above the minimum
                above = src > src.min() + 1e-3
                field = (out - src.min())[above] / (src - src.min())[above]
                assert field.min() > 0 and np.exp(-3.0) < field.min() <= field.max() < np.exp(3.0)


def test_gamma_on_constant_slice_is_identity() -> None:
    image = np.full((1, 8, 8), 0.3, np.float32)
    label = np.zeros((1, 8, 8), np.uint8)
    cfg = AugmentConfig(copies=1, gamma_range=(0.5, 2.0), **_ONLY)
    out_image, _, _ = augment(image, label, np.array(["a"]), cfg, seed=0)
    np.testing.assert_array_equal(out_image[1], image[0])


def test_new_options_reproducible_and_labels_in_set() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((3, 40, 40), dtype=np.float32)
    label = rng.choice(np.array([0, 2, 3], np.uint8), size=(3, 40, 40))
    cfg = AugmentConfig(
        copies=3, elastic_p=1.0, gamma_range=(0.7, 1.5), bias_field_coeff=0.5, rotate_deg=30.0
    )
    a = augment(image, label, np.array(["a"] * 3), cfg, seed=5)
    b = augment(image, label, np.array(["a"] * 3), cfg, seed=5)
    c = augment(image, label, np.array(["a"] * 3), cfg, seed=6)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    assert set(np.unique(a[1])) <= {0, 2, 3} and a[1].dtype == np.uint8
    assert a[0].dtype == np.float32 and np.isfinite(a[0]).all()


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"elastic_p": 1.5}, "elastic_p"),
        ({"elastic_alpha": 0.0}, "elastic_alpha"),
        ({"elastic_sigma": -1.0}, "elastic_sigma"),
        ({"gamma_range": (1.5, 0.7)}, "gamma_range"),
        ({"gamma_range": (0.0, 1.0)}, "gamma_range"),
        ({"gamma_range": 1.2}, "gamma_range"),
        ({"bias_field_coeff": -0.1}, "bias_field_coeff"),
        ({"bias_field_order": 2.5}, "bias_field_order"),
    ],
)
def test_new_config_validation(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        AugmentConfig(**kwargs)  # type: ignore[arg-type]


def test_gamma_range_from_yaml_list() -> None:
    cfg = AugmentConfig.from_mapping({"gamma_range": [0.7, 1.5]})
    assert cfg.gamma_range == (0.7, 1.5) and cfg == AugmentConfig(gamma_range=(0.7, 1.5))


# Mixup ---------------------------------------------------------------------------------------


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 2, 8, 8, generator=gen), torch.randint(0, 4, (n, 8, 8), generator=gen)


def test_mixup_soft_labels_and_lambda() -> None:
    x, y = _batch()
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    x_mixed, y_soft = mixup_batch(x, y, 4, 0.4, gen)
    assert x_mixed.shape == x.shape and y_soft.shape == (6, 4, 8, 8)
    assert y_soft.dtype == x.dtype
    torch.testing.assert_close(y_soft.sum(dim=1), torch.ones(6, 8, 8))
    gen.set_state(state)  # replay the documented draws: lam, then the permutation
    lam = sample_mixup_lambda(0.4, gen)
    perm = torch.randperm(6, generator=gen)
    assert 0.0 <= lam <= 1.0
    torch.testing.assert_close(x_mixed, lam * x + (1 - lam) * x[perm])
    onehot = torch.nn.functional.one_hot(y, 4).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(y_soft, lam * onehot + (1 - lam) * onehot[perm])


def test_mixup_reproducible_and_pure() -> None:
    x, y = _batch()
    x0, y0 = x.clone(), y.clone()
    a = mixup_batch(x, y, 4, 0.4, torch.Generator().manual_seed(9))
    b = mixup_batch(x, y, 4, 0.4, torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(x, x0) and torch.equal(y, y0)


def test_mixup_lambda_is_beta_distributed() -> None:
    gen = torch.Generator().manual_seed(0)
    lam = np.array([sample_mixup_lambda(0.4, gen) for _ in range(4000)])
    assert lam.min() >= 0 and lam.max() <= 1
    assert lam.mean() == pytest.approx(0.5, abs=0.02)
    assert lam.var() == pytest.approx(1 / (4 * (2 * 0.4 + 1)), rel=0.08)  # Beta(a, a) variance


def test_mixup_bad_input() -> None:
    x, y = _batch()
    with pytest.raises(ConfigError, match="alpha"):
        mixup_batch(x, y, 4, 0.0, torch.Generator())
    with pytest.raises(ValueError, match="labels"):
        mixup_batch(x, y, 3, 0.4, torch.Generator())
    with pytest.raises(ValueError, match="expected x"):
        mixup_batch(x, y[:, :4], 4, 0.4, torch.Generator())
