"""Data consistency of magnitude images (mri/consistency.py) and of the recon networks."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from mri_ensemble.errors import ConfigError
from mri_ensemble.mri import consistency
from mri_ensemble.mri.consistency import (
    acs_mask,
    acs_sensitivities,
    acs_window,
    consistent_image_np,
    consistent_kspace,
    image_data_consistency,
)
from mri_ensemble.mri.fft import tfft2c, tifft2c, trss
from mri_ensemble.nets import varnet
from mri_ensemble.nets.dircn import DIRCN, DIRCNConfig, build_dircn
from mri_ensemble.nets.fc_attention_unet import (
    FCAttentionUNetConfig,
    ImageDomainRecon,
    build_recon_attention_unet,
)
from mri_ensemble.nets.varnet import VarNet, VarNetConfig, build_varnet

SMALL_ATT = FCAttentionUNetConfig(channels=(4, 8, 16), fc_hidden=32)
SMALL_VN = dict(chans=4, pools=2, fc_grid=(2, 2), fc_hidden=16, sens_chans=2, sens_pools=1)


def _mask(b: int, w: int, accel: int = 4, centre: int = 4) -> torch.Tensor:
    """Equispaced every ``accel``-th column + ``centre`` columns around W // 2, (B, W)."""
    mask = torch.zeros(b, w, dtype=torch.bool)
    for i in range(b):
        mask[i, i % accel :: accel] = True  # a different offset per batch element
    c = w // 2
    mask[:, c - centre // 2 : c - centre // 2 + centre] = True
    return mask


def _coil_images(b: int, coils: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A textured object with a smooth phase, seen by smooth coils: (B, C, H, W) complex64."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(-1, 1, h)[:, None]
    x = torch.linspace(-1, 1, w)[None, :]
    inside = ((x / 0.8) ** 2 + (y / 0.85) ** 2 < 1).float()  # (H, W)
    blob = ((x / 0.3 - 0.3) ** 2 + (y / 0.4) ** 2 < 1).float()
    texture = 1 + 0.1 * torch.randn(b, h, w, generator=g)  # (B, H, W)
    obj = (0.6 * inside + 0.4 * blob) * texture * torch.exp(1j * (0.8 * x + 0.5 * y**2))
    maps = []
    for c in range(coils):
        a = 2 * math.pi * c / coils
        cx, cy = 1.2 * math.cos(a), 1.2 * math.sin(a)
        mag = torch.exp(-((x - cx) ** 2 + (y - cy) ** 2))
        maps.append(mag * torch.exp(1j * (a + 0.5 * x * math.cos(a))))
    sens = torch.stack(maps)  # (C, H, W)
    return (sens[None] * obj[:, None]).to(torch.complex64)  # (B, C, H, W)


def _data(
    b: int = 2, coils: int = 4, h: int = 32, w: int = 28, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masked k-space (B, C, H, W), mask (B, W), true RSS image (B, H, W))."""
    coil = _coil_images(b, coils, h, w, seed)
    mask = _mask(b, w)
    kspace = tfft2c(coil) * mask[:, None, None, :]
    return kspace, mask, trss(coil, dim=1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# ----------------------------------------------------------------------------- functions


def test_varnet_uses_the_shared_acs_helper() -> None:
    assert varnet.acs_mask is consistency.acs_mask


def test_acs_sensitivities_have_unit_rss_where_there_is_signal() -> None:
    kspace, mask, _ = _data()
    for taper in (0.0, 0.25, 1.0):
        sens = acs_sensitivities(kspace, mask, taper=taper)
        assert sens.shape == kspace.shape and sens.dtype == torch.complex64
        r = trss(sens, dim=1)
        torch.testing.assert_close(r, torch.ones_like(r), rtol=0, atol=1e-5)
    zero = acs_sensitivities(torch.zeros_like(kspace), mask)  # no signal: zeros, not NaNs
    assert torch.equal(zero, torch.zeros_like(zero))


def test_acs_window_is_a_tukey_window_over_the_acs_block() -> None:
    mask = _mask(1, 20, accel=4, centre=6)  # ACS 7..12 (columns 0, 4, 8, 12, 16 also)
    acs = acs_mask(mask)
    assert acs[0].nonzero().flatten().tolist() == list(range(7, 13))
    t = (torch.arange(6) + 0.5) / 6
    hann = torch.sin(math.pi * t) ** 2
    for taper, inside in ((0.0, torch.ones(6)), (1.0, hann)):
        win = acs_window(acs, taper)[0]
        assert torch.equal(win[~acs[0]], torch.zeros(14))
        torch.testing.assert_close(win[7:13], inside)
    win = acs_window(acs, 0.5)[0, 7:13]  # edges r = 1/12 < 1/4 tapered, the middle not
    edge = torch.sin(math.pi * torch.tensor(1 / 12) / 0.5) ** 2
    torch.testing.assert_close(win, torch.stack([edge, *torch.ones(4), edge]))
    with pytest.raises(ValueError, match="taper"):
        acs_window(acs, 1.5)


def test_hard_dc_puts_the_measurement_back_and_keeps_the_estimate_elsewhere() -> None:
    kspace, mask, _ = _data()
    g = torch.Generator().manual_seed(1)
    estimate = torch.rand(2, 32, 28, generator=g)  # deliberately wrong
    sens = acs_sensitivities(kspace, mask)
    k = consistent_kspace(estimate, kspace, mask, sens=sens)
    own = tfft2c(sens * estimate[:, None])  # the estimate's coil k-space
    m = mask[:, None, None, :].expand_as(k)
    assert torch.equal(k[m], kspace[m])  # bit for bit on the acquired lines
    assert torch.equal(k[~m], own[~m])  # untouched elsewhere
    # and the returned image is the RSS of those coil images, whose k-space round-trips
    out = image_data_consistency(estimate, kspace, mask, sens=sens)
    torch.testing.assert_close(out, trss(tifft2c(k), dim=1))
    back = tfft2c(tifft2c(k))
    assert _rel(back[m], kspace[m]) < 1e-6
    # the default sensitivities are the ACS ones
    torch.testing.assert_close(consistent_kspace(estimate, kspace, mask), k)


def test_perfect_estimate_changes_very_little() -> None:
    coil = _coil_images(2, 8, 48, 40)  # 4x equispaced + 8 ACS lines
    mask = _mask(2, 40, centre=8)
    kspace = tfft2c(coil) * mask[:, None, None, :]
    target = trss(coil, dim=1)  # the perfect estimate
    out = image_data_consistency(target, kspace, mask)
    zero_filled = trss(tifft2c(kspace), dim=1)
    assert _rel(out, target) < 0.03  # about 0.02
    assert _rel(out, target) < 0.15 * _rel(zero_filled, target)


def test_soft_dc_lam_zero_is_no_dc_and_lam_one_is_hard() -> None:
    kspace, mask, target = _data()
    estimate = 0.8 * target
    sens = acs_sensitivities(kspace, mask)
    own = tfft2c(sens * estimate[:, None])
    hard = consistent_kspace(estimate, kspace, mask, sens=sens)
    assert torch.equal(consistent_kspace(estimate, kspace, mask, sens=sens, lam=0.0), own)
    assert torch.equal(consistent_kspace(estimate, kspace, mask, sens=sens, lam=1.0), hard)
    lam = torch.tensor([1.0])
    assert torch.equal(consistent_kspace(estimate, kspace, mask, sens=sens, lam=lam), hard)
    mid = consistent_kspace(estimate, kspace, mask, sens=sens, lam=0.25)
    m = mask[:, None, None, :].expand_as(own)
    torch.testing.assert_close(mid[m], 0.75 * own[m] + 0.25 * kspace[m])
    assert torch.equal(mid[~m], own[~m])


def test_dc_is_differentiable_in_image_and_lam() -> None:
    kspace, mask, target = _data()
    image = (0.9 * target).requires_grad_()
    lam = torch.full((1,), 0.5, requires_grad=True)
    image_data_consistency(image, kspace, mask, lam=lam).sum().backward()
    assert image.grad is not None and lam.grad is not None
    assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
    assert torch.isfinite(lam.grad).all() and lam.grad.abs().sum() > 0


def test_bad_shapes_raise() -> None:
    kspace, mask, target = _data()
    with pytest.raises(ValueError, match="mask"):
        image_data_consistency(target, kspace, mask[:, :-1])
    with pytest.raises(ValueError, match="image"):
        image_data_consistency(target[:, :-1], kspace, mask)
    with pytest.raises(ValueError, match="complex"):
        acs_sensitivities(kspace.real, mask)


def test_numpy_wrapper_equals_the_torch_path() -> None:
    kspace, mask, target = _data(b=3)
    estimate = 0.7 * target + 0.05
    expected = image_data_consistency(estimate, kspace, mask).numpy()
    for batch_size in (1, 2, 8):  # uneven last batch included
        out = consistent_image_np(
            estimate.numpy(), kspace.numpy(), mask.numpy(), batch_size=batch_size
        )
        assert out.dtype == np.float32 and out.shape == (3, 32, 28)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        consistent_image_np(estimate.numpy(), kspace.numpy(), mask.numpy(), batch_size=0)
    with pytest.raises(ValueError, match="expected image"):
        consistent_image_np(estimate.numpy()[0], kspace.numpy(), mask.numpy())


# ------------------------------------------------------------------------------ networks


@pytest.mark.parametrize("dc", ["hard", "soft", "none"])
def test_image_domain_recon_dc_modes_on_odd_shapes(dc: str) -> None:
    torch.manual_seed(0)
    kspace, mask, target = _data(b=2, coils=3, h=17, w=19)
    grappa = target + 0.05 * torch.rand(2, 17, 19)
    model = build_recon_attention_unet(
        2, 1, channels=[4, 8, 16], fc_hidden=32, data_consistency=dc
    ).train()
    assert isinstance(model, ImageDomainRecon) and model.data_consistency == dc
    out = model(kspace, mask, grappa)
    assert out.shape == (2, 17, 19) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert ("lam" in dict(model.named_parameters())) == (dc == "soft")
    if dc == "soft":
        assert model.lam is not None and float(model.lam.detach()) == 1.0


def test_image_domain_recon_hard_output_is_the_dc_of_grappa_plus_residual() -> None:
    torch.manual_seed(0)
    kspace, mask, target = _data(b=2, coils=3, h=17, w=19)
    grappa = target + 0.05 * torch.rand(2, 17, 19)
    hard = ImageDomainRecon(SMALL_ATT).eval()  # default: hard
    assert hard.data_consistency == "hard"
    none = ImageDomainRecon(SMALL_ATT, data_consistency="none").eval()
    none.load_state_dict(hard.state_dict())  # same parameters: old checkpoints load
    soft = ImageDomainRecon(SMALL_ATT, data_consistency="soft").eval()
    soft.load_state_dict({**hard.state_dict(), "lam": torch.ones(1)})
    with torch.no_grad():
        estimate = none(kspace, mask, grappa)
        expected = image_data_consistency(estimate, kspace, mask)
        torch.testing.assert_close(hard(kspace, mask, grappa), expected)
        torch.testing.assert_close(soft(kspace, mask, grappa), expected)  # lam = 1


def test_image_domain_recon_unknown_dc_raises() -> None:
    with pytest.raises(ConfigError, match="hard, soft, none"):
        build_recon_attention_unet(2, 1, channels=[4, 8], fc_hidden=8, data_consistency="bogus")
    with pytest.raises(ConfigError, match="bogus"):
        ImageDomainRecon(SMALL_ATT, data_consistency="bogus")
    with pytest.raises(ConfigError, match="data_consistency"):
        build_recon_attention_unet(2, 1, channels=[4, 8], fc_hidden=8, data_consistency=True)


KSPACE_NETS = [
    ("varnet", lambda final: VarNet(VarNetConfig(cascades=2, final_dc=final, **SMALL_VN))),
    ("dircn", lambda final: DIRCN(DIRCNConfig(cascades=2, final_dc=final, **SMALL_VN))),
    (
        "dircn_attention",
        lambda final: DIRCN(
            DIRCNConfig(
                cascades=2,
                inner="attention_unet",
                attention_channels=(4, 8, 16),
                final_dc=final,
                **SMALL_VN,
            )
        ),
    ),
]


@pytest.mark.parametrize("name,make", KSPACE_NETS, ids=[n for n, _ in KSPACE_NETS])
def test_final_dc_puts_the_measurement_back(name: str, make: Callable[[bool], nn.Module]) -> None:
    torch.manual_seed(0)
    kspace, mask, _ = _data(b=2, coils=3, h=17, w=19)
    on, off = make(True), make(False)
    off.load_state_dict(on.state_dict())  # final_dc adds no parameters
    on.eval(), off.eval()
    m = mask[:, None, None, :].expand_as(kspace)
    assert isinstance(on, VarNet | DIRCN) and isinstance(off, VarNet | DIRCN)
    with torch.no_grad():
        k_on, k_off = on.final_kspace(kspace, mask), off.final_kspace(kspace, mask)
        assert torch.equal(k_on[m], kspace[m])
        assert torch.equal(k_on[~m], k_off[~m])
        assert not torch.equal(k_off[m], kspace[m])  # the cascades did change them
        torch.testing.assert_close(on(kspace, mask, None), trss(tifft2c(k_on), dim=1))
        torch.testing.assert_close(off(kspace, mask, None), trss(tifft2c(k_off), dim=1))


def test_final_dc_defaults_on_and_is_validated() -> None:
    assert VarNetConfig().final_dc and DIRCNConfig().final_dc
    assert build_varnet(2, 1, cascades=1, **SMALL_VN).final_dc
    assert not build_dircn(2, 1, cascades=1, final_dc=False, **SMALL_VN).final_dc
    for cfg in (VarNetConfig, DIRCNConfig):
        with pytest.raises(ConfigError, match="final_dc"):
            cfg(final_dc="yes")  # type: ignore[arg-type]
