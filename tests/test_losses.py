"""Losses against hand-computed small cases, MONAI/torch references and their edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss, DiceCELoss, DiceFocalLoss
from scipy import ndimage
from skimage.metrics import structural_similarity

from mri_ensemble.errors import ConfigError
from mri_ensemble.losses import LOSSES, build_loss, effective_number_weights, ms_ssim

SMOOTH = 1e-5  # MONAI smooth_nr = smooth_dr
MULTI_CLASS = ["ce", "weighted_ce", "focal", "dice", "dice_focal", "dice_ce", "unet3plus_hybrid"]
COUNTS = [900, 80, 20]

# 3 classes on a 3 x 3 image; class 2 is absent from the target.
LABELS = np.array([[0, 0, 1], [0, 1, 1], [0, 0, 1]])
LOGITS = np.array(
    [
        [[2.0, 1.0, -1.0], [1.5, -0.5, 0.0], [0.3, 2.5, -2.0]],  # class 0
        [[-1.0, 0.5, 2.0], [0.0, 1.0, 1.5], [-0.7, 0.1, 1.0]],  # class 1
        [[-3.0, -2.0, -1.5], [-2.5, -3.0, -1.0], [-2.0, -4.0, -0.5]],  # class 2 (absent)
    ]
)


def _case() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(LOGITS[None], dtype=torch.float32), torch.tensor(LABELS[None])


def _build(name: str, config: dict[str, object] | None = None) -> torch.nn.Module:
    return build_loss(name, config, class_counts=COUNTS if name == "weighted_ce" else None)


# Hand computations in float64 numpy ------------------------------------------------------------


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=0))
    return e / e.sum(axis=0)


def _onehot(labels: np.ndarray, k: int = 3) -> np.ndarray:
    return (labels[None] == np.arange(k)[:, None, None]).astype(np.float64)  # (K, H, W)


def _dice_loss(p: np.ndarray, t: np.ndarray, jaccard: bool = False) -> float:
    axes = (1, 2)
    inter, ps, ts = (p * t).sum(axes), p.sum(axes), t.sum(axes)
    if jaccard:
        score = (2 * inter + SMOOTH) / (2 * (ps + ts - inter) + SMOOTH)
    else:
        score = (2 * inter + SMOOTH) / (ps + ts + SMOOTH)
    return float(np.mean(1 - score))


def _ssim_3x3(x: np.ndarray, y: np.ndarray, sigma: float = 1.5) -> float:
    g = np.exp(-((np.arange(3) - 1.0) ** 2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * x * x).sum() - mx**2, (w * y * y).sum() - my**2
    cxy = (w * x * y).sum() - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def _expected(name: str) -> float:
    p, t = _softmax(LOGITS), _onehot(LABELS)
    ce_pix = -(t * np.log(p)).sum(axis=0)  # (H, W)
    focal_softmax = float(np.mean(-((1 - p) ** 2) * np.log(p) * t))
    sig = 1 / (1 + np.exp(-LOGITS))
    bce = -(t * np.log(sig) + (1 - t) * np.log(1 - sig))
    p_t = t * sig + (1 - t) * (1 - sig)
    focal_sigmoid = float(np.mean((1 - p_t) ** 2 * bce))
    if name == "ce":
        return float(ce_pix.mean())
    if name == "weighted_ce":
        beta, n = 0.9999, np.array(COUNTS, float)
        w = (1 - beta) / (1 - beta**n)
        w = w * 3 / w.sum()
        wy = w[LABELS]
        return float((wy * ce_pix).sum() / wy.sum())
    if name == "focal":
        return focal_softmax
    if name == "dice":
        return _dice_loss(p, t)
    if name == "dice_focal":
        return _dice_loss(p, t) + focal_sigmoid
    if name == "dice_ce":
        return _dice_loss(p, t) + float(ce_pix.mean())
    if name == "unet3plus_hybrid":
        ssim = np.mean([_ssim_3x3(p[c], t[c]) for c in range(3)])
        return focal_softmax + (1 - ssim) + _dice_loss(p, t, jaccard=True)
    raise AssertionError(name)


@pytest.mark.parametrize("name", MULTI_CLASS)
@pytest.mark.parametrize("label_shape", ["NHW", "N1HW"])
def test_hand_computed_case(name: str, label_shape: str) -> None:
    logits, labels = _case()
    target = labels if label_shape == "NHW" else labels[:, None]
    assert _build(name)(logits, target).item() == pytest.approx(_expected(name), rel=1e-5)


def test_bce_hand_computed() -> None:
    logits = torch.tensor(LOGITS[1][None, None], dtype=torch.float32)  # (1, 1, 3, 3)
    mask = torch.tensor(LABELS[None])  # (1, 3, 3) in {0, 1}
    sig = 1 / (1 + np.exp(-LOGITS[1]))
    expected = -np.mean(LABELS * np.log(sig) + (1 - LABELS) * np.log(1 - sig))
    assert build_loss("bce")(logits, mask).item() == pytest.approx(expected, rel=1e-5)
    weighted = build_loss("bce", {"pos_weight": 3.0})(logits, mask).item()
    expected_w = -np.mean(3 * LABELS * np.log(sig) + (1 - LABELS) * np.log(1 - sig))
    assert weighted == pytest.approx(expected_w, rel=1e-5)


def test_bce_is_binary() -> None:
    logits, labels = _case()
    with pytest.raises(ConfigError, match="1 output channel"):
        build_loss("bce")(logits, labels)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        build_loss("bce")(logits[:, :1], labels * 2)


# Absent-class policy ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "jaccard"), [("dice", False), ("unet3plus_hybrid", True)])
def test_absent_class_policy(name: str, jaccard: bool) -> None:
    """A class absent from target and prediction scores 1; predicted but absent costs ~1."""
    labels = torch.tensor(LABELS[None])
    config = {"lambda_focal": 0.0, "lambda_ms_ssim": 0.0} if name == "unet3plus_hybrid" else {}
    loss = build_loss(name, config)
    perfect = torch.tensor(_onehot(LABELS)[None] * 60.0 - 30.0, dtype=torch.float32)
    assert loss(perfect, labels).item() == pytest.approx(0.0, abs=1e-6)
    spurious = perfect.clone()
    spurious[0, 2, 0, 0] = 40.0  # class 2 predicted on one pixel, absent from the target
    p = torch.softmax(spurious[0], 0).double().numpy()
    got = loss(spurious, labels).item()
    assert got == pytest.approx(_dice_loss(p, _onehot(LABELS), jaccard), rel=1e-5)
    assert got > 1 / 3  # the spurious class alone costs about 1 in the mean over 3 classes


def test_ms_ssim_of_empty_class_is_one() -> None:
    zeros = torch.zeros(1, 1, 20, 20)
    assert ms_ssim(zeros, zeros).item() == pytest.approx(1.0)


# Protect the committed behaviour -------------------------------------------------------------


def test_old_losses_equal_monai_and_torch_direct() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 17, 19, generator=gen)
    y = torch.randint(0, 4, (3, 17, 19), generator=gen)
    direct = {
        "dice_focal": DiceFocalLoss(to_onehot_y=True, softmax=True)(x, y[:, None]),
        "dice_ce": DiceCELoss(to_onehot_y=True, softmax=True)(x, y[:, None]),
        "ce": F.cross_entropy(x, y),
    }
    for name, value in direct.items():
        assert torch.equal(build_loss(name)(x, y), value), name
        assert torch.equal(build_loss(name)(x, y[:, None]), value), name
    cfg = {"lambda_dice": 0.3, "gamma": 1.0}
    ref = DiceFocalLoss(to_onehot_y=True, softmax=True, **cfg)(x, y[:, None])  # type: ignore[arg-type]
    assert torch.equal(build_loss("dice_focal", cfg)(x, y), ref)
    outs = [x, x[:, :, ::2, ::2], x[:, :, ::4, ::4]]
    ds = DeepSupervisionLoss(
        DiceFocalLoss(to_onehot_y=True, softmax=True), weights=[4 / 7, 2 / 7, 1 / 7]
    )
    assert torch.equal(build_loss("dice_focal")(outs, y.float()), ds(outs, y[:, None].float()))


# Effective-number weights ----------------------------------------------------------------------


def test_effective_number_weights_formula() -> None:
    counts, beta = [5000, 300, 40, 2], 0.99
    raw = np.array([(1 - beta) / (1 - beta**n) for n in counts])
    np.testing.assert_allclose(
        effective_number_weights(counts, beta).numpy(), raw * 4 / raw.sum(), rtol=1e-6
    )
    assert effective_number_weights(counts, beta).sum().item() == pytest.approx(4.0)
    np.testing.assert_allclose(effective_number_weights(counts, 0.0).numpy(), np.ones(4))
    w = effective_number_weights([100, 0, 1], 0.9)  # count 0 weighted as one pixel
    assert w[1] == w[2] and torch.isfinite(w).all()
    weights = build_loss("weighted_ce", {"beta": beta}, class_counts=counts).loss.weight
    np.testing.assert_allclose(weights.numpy(), raw * 4 / raw.sum(), rtol=1e-6)


def test_weighted_ce_class_count_mismatch() -> None:
    logits, labels = _case()
    with pytest.raises(ConfigError, match="class_counts has 2 classes"):
        build_loss("weighted_ce", class_counts=[10, 2])(logits, labels)


# Deep supervision ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ce", "dice", "unet3plus_hybrid"])
def test_deep_supervision_weights(name: str) -> None:
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (2, 16, 16), generator=gen)
    outs = [torch.randn(2, 3, s, s, generator=gen) for s in (16, 8, 16)]
    loss = build_loss(name)
    single = []
    for out in outs:
        target = F.interpolate(y[:, None].float(), size=out.shape[2:], mode="nearest-exact")
        single.append(loss(out, target[:, 0]).item())
    expected = (single[0] + single[1] / 2 + single[2] / 4) / 1.75
    assert loss(outs, y.float()).item() == pytest.approx(expected, rel=1e-5)


# Soft targets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MULTI_CLASS)
def test_soft_target_equals_hard_on_one_hot(name: str) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 20, 20, generator=gen)
    y = torch.randint(0, 2, (2, 20, 20), generator=gen)  # class 2 absent
    soft = F.one_hot(y, 3).permute(0, 3, 1, 2).float()
    loss = _build(name)
    assert loss(x, soft).item() == pytest.approx(loss(x, y).item(), rel=1e-5, abs=1e-6)
    outs = [x, x[:, :, ::2, ::2]]
    assert loss(outs, soft).item() == pytest.approx(loss(outs, y.float()).item(), rel=1e-5)


@pytest.mark.parametrize("name", ["ce", "focal"])
def test_soft_target_is_mixture_for_linear_losses(name: str) -> None:
    """CE and focal are linear in the target: a lam-mixture gives the lam-mixture of losses."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    y1, y2 = (torch.randint(0, 3, (2, 8, 8), generator=gen) for _ in range(2))
    lam = 0.3
    soft = lam * F.one_hot(y1, 3) + (1 - lam) * F.one_hot(y2, 3)
    loss = build_loss(name)
    expected = lam * loss(x, y1) + (1 - lam) * loss(x, y2)
    assert loss(x, soft.permute(0, 3, 1, 2).float()).item() == pytest.approx(expected.item())


def test_soft_dice_is_zero_at_the_soft_target() -> None:
    """The soft-target Dice (MONAI soft_label) is minimal where the prediction equals the target."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 3, 8, 8, generator=gen)
    target = torch.softmax(logits, dim=1)
    assert build_loss("dice")(logits, target).item() == pytest.approx(0.0, abs=1e-5)


def test_bad_target_channels() -> None:
    logits, _ = _case()
    with pytest.raises(ValueError, match="target"):
        build_loss("ce")(logits, torch.zeros(1, 2, 3, 3))


# MS-SSIM ---------------------------------------------------------------------------------------


def _ms_ssim_reference(x: np.ndarray, y: np.ndarray, scales: int, window: int) -> float:
    g = np.exp(-((np.arange(window) - (window - 1) / 2) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    r = window // 2
    c1, c2 = 0.01**2, 0.03**2
    weights = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333][:scales])
    weights /= weights.sum()
    value = 1.0
    for j in range(scales):
        if j:
            x = x.reshape(x.shape[0] // 2, 2, x.shape[1] // 2, 2).mean(axis=(1, 3))
            y = y.reshape(y.shape[0] // 2, 2, y.shape[1] // 2, 2).mean(axis=(1, 3))

        def f(a: np.ndarray) -> np.ndarray:
            return ndimage.correlate(a, w)[r:-r, r:-r]

        mx, my = f(x), f(y)
        cs = (2 * (f(x * y) - mx * my) + c2) / (f(x * x) - mx**2 + f(y * y) - my**2 + c2)
        if j < scales - 1:
            value *= cs.mean() ** weights[j]
        else:
            lum = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
            value *= (lum * cs).mean() ** weights[j]
    return float(value)


def test_ms_ssim_against_references() -> None:
    rng = np.random.default_rng(0)
    x = ndimage.gaussian_filter(rng.random((40, 40)), 2)
    y = np.clip(x + 0.05 * rng.standard_normal((40, 40)), 0, 1)
    tx, ty = (torch.tensor(a[None, None]) for a in (x, y))
    got = ms_ssim(tx, ty, scales=3, window=7).item()
    assert got == pytest.approx(_ms_ssim_reference(x, y, 3, 7), rel=1e-6)
    single = structural_similarity(
        x, y, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )  # 11 x 11 window, 'valid' region
    assert ms_ssim(tx, ty, scales=1, window=11).item() == pytest.approx(single, rel=1e-6)
    assert ms_ssim(tx, tx).item() == pytest.approx(1.0)


def test_ms_ssim_scales_fit_the_image() -> None:
    rng = np.random.default_rng(1)
    x, y = (torch.tensor(rng.random((1, 2, 96, 96))) for _ in range(2))
    assert ms_ssim(x, y, scales=3).shape == (1, 2)  # 96, 48, 24 >= 7
    small_x, small_y = x[..., :12, :12], y[..., :12, :12]  # 12 // 2 < 7: one scale only
    torch.testing.assert_close(ms_ssim(small_x, small_y, scales=3), ms_ssim(small_x, small_y, 1))
    assert torch.isfinite(ms_ssim(x[..., :2, :2], y[..., :2, :2])).all()  # window shrinks


# Config errors and gradients ------------------------------------------------------------------


def test_unknown_loss() -> None:
    with pytest.raises(ConfigError, match=r"unknown loss 'x'; known: bce, ce, dice, dice_ce"):
        build_loss("x")


@pytest.mark.parametrize(
    ("name", "config", "match"),
    [
        ("ce", {"weight": 1}, "ce"),
        ("dice_focal", {"lambda_dice": -1.0}, "dice_focal"),
        ("dice_ce", {"not_a_key": 1}, "dice_ce"),
        ("focal", {"gamma": -1.0}, "gamma"),
        ("dice", {"reduction": "median"}, "dice"),
        ("unet3plus_hybrid", {"ms_ssim_window": 6}, "ms_ssim_window"),
        ("unet3plus_hybrid", {"ms_ssim_scales": 0}, "ms_ssim_scales"),
        ("unet3plus_hybrid", {"lambda_iou": -1}, "lambda_iou"),
        ("weighted_ce", {"beta": 1.0}, "beta"),
        ("bce", {"pos_weight": 0}, "pos_weight"),
    ],
)
def test_bad_config(name: str, config: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _build(name, config)


def test_weighted_ce_needs_class_counts() -> None:
    with pytest.raises(ConfigError, match="ingest"):
        build_loss("weighted_ce")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_finite(name: str) -> None:
    gen = torch.Generator().manual_seed(5)
    k = 1 if name == "bce" else 3
    y = torch.randint(0, 2, (2, 24, 24), generator=gen)  # class 2 absent
    x = (torch.randn(2, k, 24, 24, generator=gen) * 30).requires_grad_(True)  # saturated
    outs = [x, x[:, :, ::2, ::2]]
    loss = _build(name)
    for out in (x, outs):
        (grad,) = torch.autograd.grad(loss(out, y), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
