"""E2E VarNet and DIRCN: shapes on odd sizes, gradients, data consistency, sensitivities."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from mri_ensemble.errors import ConfigError
from mri_ensemble.mri.fft import tfft2c, tifft2c, trss
from mri_ensemble.nets.dircn import DIRCN, DIRCNConfig, build_dircn
from mri_ensemble.nets.varnet import (
    SensitivityModel,
    SoftDataConsistency,
    VarNet,
    VarNetConfig,
    acs_mask,
    build_varnet,
)

SMALL = dict(chans=4, pools=2, fc_grid=(2, 2), fc_hidden=16, sens_chans=2, sens_pools=1)
SMALL_ATT = dict(attention_channels=(4, 8, 16))


def _mask(b: int, w: int, seed: int = 0) -> torch.Tensor:
    """fastMRI-like: a centred ACS block of 4 columns + random columns, (B, W) bool."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, w, generator=g) < 0.3
    c = w // 2
    mask[:, c - 2 : c + 2] = True
    return mask


def _data(b: int, coils: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Undersampled k-space of a smooth random image seen by random smooth coils."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 1, h, w, generator=g)  # (B, 1, H, W)
    maps = torch.randn(b, coils, h, w, 2, generator=g)  # (B, coils, H, W, 2)
    maps = torch.view_as_complex(maps)  # (B, coils, H, W)
    mask = _mask(b, w, seed)
    kspace = tfft2c(image * maps) * mask[:, None, None, :]  # (B, coils, H, W)
    return kspace.to(torch.complex64), mask


NETS = [
    ("varnet_fc", lambda: VarNet(VarNetConfig(cascades=2, **SMALL))),
    ("varnet_nofc", lambda: VarNet(VarNetConfig(cascades=2, fc_bottleneck=False, **SMALL))),
    ("dircn_unet_fc", lambda: DIRCN(DIRCNConfig(cascades=3, **SMALL))),
    (
        "dircn_attention",
        lambda: DIRCN(DIRCNConfig(cascades=3, inner="attention_unet", **SMALL, **SMALL_ATT)),
    ),
]


@pytest.mark.parametrize("name,make", NETS, ids=[n for n, _ in NETS])
@pytest.mark.parametrize("shape", [(2, 3, 17, 19), (1, 4, 24, 21)])
def test_shape_and_finite_on_odd_sizes(
    name: str, make: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    net = make()
    b, c, h, w = shape
    kspace, mask = _data(b, c, h, w)
    grappa = torch.zeros(b, h, w)
    for train in (True, False):
        net.train(train)
        with torch.no_grad():
            out = net(kspace, mask, grappa)
        assert out.shape == (b, h, w)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,make", NETS, ids=[n for n, _ in NETS])
def test_gradients_reach_every_parameter(name: str, make: Callable[[], nn.Module]) -> None:
    torch.manual_seed(0)
    net = make()
    kspace, mask = _data(1, 3, 17, 19, seed=1)
    net(kspace, mask, torch.zeros(1, 17, 19)).pow(2).mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    zero = [n for n, p in net.named_parameters() if not p.grad.abs().sum()]
    # cascade 0 starts at k = k0, so k - k0 = 0 on the acquired lines: d/d lam is exactly 0;
    # the final hard DC (final_dc, default on) replaces the acquired lines, the only ones
    # the last cascade's lam changes, so its gradient is exactly 0 too
    last = len(net.cascades) - 1
    assert zero == ["cascades.0.dc.lam", f"cascades.{last}.dc.lam"]
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_soft_dc_with_lam_one_is_exact() -> None:
    g = torch.Generator().manual_seed(0)
    k = torch.view_as_complex(1e4 * torch.randn(2, 3, 5, 7, 2, generator=g))
    k0 = torch.view_as_complex(torch.randn(2, 3, 5, 7, 2, generator=g))
    mask = _mask(2, 7)
    out = SoftDataConsistency()(k, k0, mask)
    m = mask[:, None, None, :].expand_as(k)
    assert torch.equal(out[m], k0[m])
    assert torch.equal(out[~m], k[~m])


def test_soft_dc_general_lam_matches_formula() -> None:
    g = torch.Generator().manual_seed(0)
    k = torch.view_as_complex(torch.randn(1, 2, 4, 6, 2, generator=g))
    k0 = torch.view_as_complex(torch.randn(1, 2, 4, 6, 2, generator=g))
    mask = _mask(1, 6)
    dc = SoftDataConsistency()
    with torch.no_grad():
        dc.lam.fill_(0.3)
    expected = k - 0.3 * mask[:, None, None, :] * (k - k0)
    torch.testing.assert_close(dc(k, k0, mask), expected)


def test_acs_detection_from_fastmri_like_mask() -> None:
    w = 21  # centre column 10
    mask = torch.zeros(3, w, dtype=torch.bool)
    mask[:, [0, 3, 6, 15, 18]] = True
    mask[0, 8:13] = True  # ACS 8..12, gaps at 7 and 13
    mask[1, 9:16] = True  # off-centre block 9..15, joins the random column 15
    mask[2, [4, 12]] = True  # centre not acquired: no ACS, all acquired lines used
    acs = acs_mask(mask)
    assert acs[0].nonzero().flatten().tolist() == [8, 9, 10, 11, 12]
    assert acs[1].nonzero().flatten().tolist() == list(range(9, 16))
    assert torch.equal(acs[2], mask[2])


def test_sensitivity_maps_have_unit_rss() -> None:
    torch.manual_seed(0)
    kspace, mask = _data(2, 4, 17, 19)
    maps = SensitivityModel(chans=2, pools=1)(kspace, mask)
    assert maps.shape == kspace.shape and maps.dtype == torch.complex64
    rss = trss(maps, dim=1)  # (B, H, W)
    torch.testing.assert_close(rss, torch.ones_like(rss), rtol=0, atol=1e-5)


class _Zero(nn.Module):
    """A regulariser whose refinement output is all zeros."""

    def forward(
        self, x: torch.Tensor, prev: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return torch.zeros_like(x), []


@pytest.mark.parametrize("name,make", NETS, ids=[n for n, _ in NETS])
def test_zero_refinement_returns_zero_filled_rss(name: str, make: Callable[[], nn.Module]) -> None:
    # NormUnet un-normalises (y * std + mean), so a zero last conv gives the input's mean,
    # not zero: replace the whole regulariser instead.
    net = make()
    for cascade in net.cascades:
        cascade.regulariser = _Zero()
    net.eval()
    kspace, mask = _data(2, 3, 17, 19)
    with torch.no_grad():
        out = net(kspace, mask, torch.zeros(2, 17, 19))
    assert torch.equal(out, trss(tifft2c(kspace), dim=1))


def test_builders_ignore_channels_and_validate_config() -> None:
    net = build_varnet(2, 1, cascades=1, **SMALL)
    assert isinstance(net, VarNet) and len(net.cascades) == 1
    assert isinstance(build_dircn(2, 1, cascades=2, **SMALL), DIRCN)
    with pytest.raises(ConfigError, match="unknown inner"):
        DIRCNConfig(inner="resxunet")
    with pytest.raises(ConfigError, match="fc_hidden"):
        VarNetConfig(fc_grid=(4, 4), fc_hidden=100)


def test_dircn_dense_compression_starts_at_current_image() -> None:
    net = DIRCN(DIRCNConfig(cascades=3, **SMALL))
    weight = net.cascades[2].compress.weight[:, :, 0, 0]  # (2, 6)
    assert torch.equal(weight, torch.cat([torch.zeros(2, 4), torch.eye(2)], dim=1))
    assert net.cascades[0].compress is None
