import pytest
import torch
from torch import nn

from mri_ensemble.errors import ConfigError
from mri_ensemble.nets.fc_attention_unet import (
    FCAttentionUNet,
    FCAttentionUNetConfig,
    ImageDomainRecon,
    ResidualAttentionGate,
    build_fc_attention_unet,
    build_recon_attention_unet,
)

SMALL = FCAttentionUNetConfig(channels=(4, 8, 16), fc_hidden=32, fc_grid=(2, 2))


def _assert_all_grads(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("shape", "out_channels"), [((1, 2, 17, 19), 3), ((2, 1, 33, 40), 1), ((1, 1, 5, 3), 2)]
)
def test_odd_shapes(shape: tuple[int, int, int, int], out_channels: int) -> None:
    torch.manual_seed(0)
    model = FCAttentionUNet(shape[1], out_channels, SMALL)
    out = model(torch.randn(shape))
    assert out.shape == (shape[0], out_channels, *shape[2:])


@pytest.mark.parametrize(
    "cfg",
    [
        SMALL,
        FCAttentionUNetConfig(channels=(4, 8, 16), fc_layers=1, fc_grid=(2, 2)),
        FCAttentionUNetConfig(channels=(4, 8, 8, 16), fc_layers=3, fc_hidden=16),
        FCAttentionUNetConfig(channels=(4, 8, 16), fc_bottleneck=False),
    ],
    ids=["fc2", "fc1", "fc3_depth3", "no_fc"],
)
def test_gradients_reach_every_parameter(cfg: FCAttentionUNetConfig) -> None:
    torch.manual_seed(0)
    model = FCAttentionUNet(2, 2, cfg).train()
    out = model(torch.randn(2, 2, 17, 19))
    assert out.shape == (2, 2, 17, 19)
    out.square().mean().backward()
    _assert_all_grads(model)


def test_fc_layer_sizes() -> None:
    fc1 = FCAttentionUNet(1, 1, FCAttentionUNetConfig(channels=(4, 8), fc_layers=1))
    fc2 = FCAttentionUNet(1, 1, FCAttentionUNetConfig(channels=(4, 8), fc_hidden=7))
    lin1 = [m for m in fc1.modules() if isinstance(m, nn.Linear)]
    lin2 = [m for m in fc2.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin1] == [(128, 128)]  # 8 * 4 * 4
    assert [(m.in_features, m.out_features) for m in lin2] == [(128, 7), (7, 128)]
    plain = FCAttentionUNet(1, 1, FCAttentionUNetConfig(channels=(4, 8), fc_bottleneck=False))
    assert not any(isinstance(m, nn.Linear) for m in plain.modules())


def test_eval_is_deterministic_and_train_uses_dropout() -> None:
    torch.manual_seed(0)
    model = FCAttentionUNet(1, 1, SMALL)
    x = torch.randn(1, 1, 24, 20)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


def test_attention_gate_keeps_skip_shape_and_bounds() -> None:
    gate = ResidualAttentionGate(skip_channels=6, gate_channels=12)
    skip = torch.rand(2, 6, 14, 10) + 0.1
    out = gate(skip, torch.randn(2, 12, 7, 5))
    assert out.shape == skip.shape
    ratio = out / skip
    assert (ratio > 0).all() and (ratio < 2).all()  # re-weights only, factor in (0, 2)


def test_image_domain_recon_shapes_and_grappa_identity() -> None:
    torch.manual_seed(0)
    kspace = torch.randn(2, 4, 23, 18, dtype=torch.complex64)
    mask = torch.zeros(2, 18, dtype=torch.bool)
    mask[:, ::2] = True
    kspace = kspace * mask[:, None, None, :]
    grappa = torch.rand(2, 23, 18)
    model = ImageDomainRecon(SMALL)
    out = model(kspace, mask, grappa)
    assert out.shape == (2, 23, 18) and out.dtype == torch.float32
    out.mean().backward()
    _assert_all_grads(model)
    # the residual-on-GRAPPA identity holds before the data consistency (default "hard")
    model = ImageDomainRecon(SMALL, data_consistency="none")
    nn.init.zeros_(model.net.head.weight)
    assert model.net.head.bias is not None
    nn.init.zeros_(model.net.head.bias)
    with torch.no_grad():
        assert torch.equal(model(kspace, mask, grappa), grappa)


def test_builders_and_config_errors() -> None:
    net = build_fc_attention_unet(3, 2, channels=(4, 8), fc_hidden=8)
    assert net(torch.randn(1, 3, 9, 11)).shape == (1, 2, 9, 11)
    recon = build_recon_attention_unet(2, 1, channels=(4, 8), fc_hidden=8)
    assert isinstance(recon, ImageDomainRecon)
    with pytest.raises(ConfigError, match="in_channels=1, out_channels=1"):
        build_recon_attention_unet(1, 1)
    with pytest.raises(ConfigError, match="out_channels=4"):
        build_recon_attention_unet(2, 4)
    with pytest.raises(TypeError, match="featurez"):
        build_fc_attention_unet(1, 1, featurez=(4, 8))
    with pytest.raises(TypeError, match="featurez"):
        build_recon_attention_unet(2, 1, featurez=(4, 8))
    for bad in (
        {"channels": (4,)},
        {"fc_layers": 0},
        {"fc_grid": (0, 4)},
        {"fc_dropout": 1.0},
    ):
        with pytest.raises(ConfigError):
            FCAttentionUNetConfig(**bad)  # type: ignore[arg-type]
