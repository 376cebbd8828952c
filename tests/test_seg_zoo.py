"""The segmentation zoo: U-Net 3+, ResNet family, light U-Nets (small configs, CPU)."""

import pytest
import torch

from mri_ensemble.errors import ConfigError
from mri_ensemble.nets import light_unets, resnet_family, unet3plus
from mri_ensemble.nets.resnet_family import ResNetEncoder

BUILDERS = {
    "unet3plus": unet3plus.build_unet3plus,
    "resnet34_unet": resnet_family.build_resnet34_unet,
    "linknet": resnet_family.build_linknet,
    "fpn": resnet_family.build_fpn,
    "deeplabv3": resnet_family.build_deeplabv3,
    "residual_unet": light_unets.build_residual_unet,
    "mobile_unet": light_unets.build_mobile_unet,
    "efficient_unet": light_unets.build_efficient_unet,
}
SMALL: dict[str, dict[str, object]] = {
    "unet3plus": {"filters": (4, 8, 16, 32, 64), "cat_channels": 4},
    "resnet34_unet": {"encoder": "resnet10", "decoder_channels": (32, 16, 16, 8, 8)},
    "linknet": {"encoder": "resnet10"},
    "fpn": {"encoder": "resnet10", "pyramid_channels": 32, "segmentation_channels": 16},
    "deeplabv3": {"encoder": "resnet10", "aspp_channels": 32},
    "residual_unet": {"channels": (4, 8, 16, 32, 64)},
    "mobile_unet": {"width": 0.25, "decoder_channels": (16, 8, 8, 8, 8)},
    "efficient_unet": {"decoder_channels": (16, 8, 8, 8, 8)},
}
WITH_ENCODER = sorted(set(BUILDERS) - {"residual_unet"})  # MONAI UNet has no separate encoder


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_odd_shapes_gradients_and_eval_output(arch):
    torch.manual_seed(0)
    model = BUILDERS[arch](1, 4, **SMALL[arch]).train()
    x = torch.randn(2, 1, 37, 45)
    out = model(x)
    outs = out if isinstance(out, list) else [out]
    assert len(outs) == (5 if arch == "unet3plus" else 1)  # full-scale deep supervision
    assert all(o.shape == (2, 4, 37, 45) for o in outs)
    sum(o.square().mean() for o in outs).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    model.eval()
    with torch.no_grad():
        y = model(torch.randn(1, 1, 64, 64))
    assert isinstance(y, torch.Tensor) and y.shape == (1, 4, 64, 64)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_default_config_builds_and_runs(arch):
    model = BUILDERS[arch](1, 3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 37, 45)).shape == (1, 3, 37, 45)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_unknown_config_key_is_a_type_error(arch):
    with pytest.raises(TypeError, match="encoderz"):
        BUILDERS[arch](1, 4, encoderz="resnet18")


@pytest.mark.parametrize("arch", WITH_ENCODER)
def test_pretrained_loads_a_local_encoder_state_dict(arch, tmp_path):
    torch.manual_seed(0)
    source = BUILDERS[arch](1, 4, **SMALL[arch])
    path = tmp_path / "encoder.pt"
    torch.save(source.encoder.state_dict(), path)
    torch.manual_seed(1)
    model = BUILDERS[arch](1, 4, **SMALL[arch], pretrained=str(path))
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key
    with pytest.raises(ConfigError, match="missing.pt"):
        BUILDERS[arch](1, 4, **SMALL[arch], pretrained=str(tmp_path / "missing.pt"))


def test_imagenet_style_resnet_weights_fit_a_one_channel_encoder(tmp_path):
    rgb = ResNetEncoder(3, "resnet10")
    state = {**rgb.state_dict(), "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}
    path = tmp_path / "resnet10_rgb.pt"
    torch.save(state, path)
    model = resnet_family.build_linknet(1, 2, encoder="resnet10", pretrained=str(path))
    stem = model.encoder.conv1.weight  # (64, 1, 7, 7)
    assert torch.allclose(stem, rgb.conv1.weight.sum(1, keepdim=True))
    with pytest.raises(ConfigError, match="do not fit.*missing keys"):  # resnet10 into resnet18
        resnet_family.build_linknet(1, 2, encoder="resnet18", pretrained=str(path))
    bad = tmp_path / "checkpoint.pt"
    torch.save({"model": state, "epoch": 3}, bad)  # a whole checkpoint, not a state dict
    with pytest.raises(ConfigError, match="expected a state dict of tensors, found keys"):
        resnet_family.build_fpn(1, 2, encoder="resnet10", pretrained=str(bad))
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="checkpoint.pt' unreadable"):
        resnet_family.build_fpn(1, 2, encoder="resnet10", pretrained=str(bad))


def test_deeplab_output_stride_and_bad_names():
    x = torch.randn(1, 1, 64, 64)
    for stride in (8, 16):
        enc = ResNetEncoder(1, "resnet10", output_stride=stride).eval()
        with torch.no_grad():
            assert enc(x)[-1].shape == (1, 512, 64 // stride, 64 // stride)
    with pytest.raises(ConfigError, match="output_stride must be 8 or 16, found 32"):
        resnet_family.build_deeplabv3(1, 2, output_stride=32)
    with pytest.raises(ConfigError, match="unknown encoder 'resnet19'; known: resnet10"):
        resnet_family.build_fpn(1, 2, encoder="resnet19")
    with pytest.raises(ConfigError, match="efficientnet"):
        light_unets.build_efficient_unet(1, 2, backbone="resnet34")


@pytest.mark.parametrize("k", [1, 4])
def test_unet3plus_cgm_gates_foreground_logits_only(k):
    torch.manual_seed(0)
    model = unet3plus.build_unet3plus(1, k, **SMALL["unet3plus"]).eval()
    x = torch.randn(2, 1, 33, 31)
    cgm_conv = model.cgm[1]
    outs = {}
    with torch.no_grad():
        cgm_conv.weight.zero_()
        for bias in (-30.0, 30.0):  # CGM: "no foreground" vs "foreground"
            cgm_conv.bias.fill_(bias)
            outs[bias] = model(x)
    diff = outs[-30.0] - outs[30.0]
    fg = diff if k == 1 else diff[:, 1:]
    assert torch.allclose(fg, torch.full_like(fg, -30.0), atol=1e-4)  # log sigmoid(-30) - 0
    if k > 1:
        assert torch.equal(diff[:, 0], torch.zeros_like(diff[:, 0]))  # background untouched
        assert (outs[-30.0].argmax(1) == 0).all()  # an "empty" image predicts background


def test_unet3plus_without_deep_supervision_or_cgm():
    cfg = {**SMALL["unet3plus"], "deep_supervision": False, "cgm": False}
    model = unet3plus.build_unet3plus(1, 2, **cfg).train()
    out = model(torch.randn(1, 1, 20, 20))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2, 20, 20)
    assert len(model.heads) == 1 and model.cgm is None
