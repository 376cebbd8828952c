import subprocess
import sys

import pytest
import torch

from mri_ensemble.errors import ConfigError
from mri_ensemble.nets import RECONSTRUCTION, REGISTRY, SEGMENTATION, build_model, count_parameters

SMALL = {
    "unet": {"features": [4, 8, 16]},
    "attention_unet": {"channels": [4, 8, 16]},
    "unetpp": {"features": [4, 4, 8, 8, 16, 4]},
    "fc_attention_unet": {"channels": [4, 8, 16], "fc_hidden": 32},
    "unet3plus": {"filters": [4, 8, 16, 32, 64], "cat_channels": 4},
    "resnet34_unet": {"encoder": "resnet10", "decoder_channels": [32, 16, 16, 8, 8]},
    "linknet": {"encoder": "resnet10"},
    "fpn": {"encoder": "resnet10", "pyramid_channels": 32, "segmentation_channels": 16},
    "deeplabv3": {"encoder": "resnet10", "aspp_channels": 32},
    "residual_unet": {"channels": [4, 8, 16, 32, 64]},
    "mobile_unet": {"width": 0.25, "decoder_channels": [16, 8, 8, 8, 8]},
    "efficient_unet": {"decoder_channels": [16, 8, 8, 8, 8]},
}
SMALL_RECON = {
    "recon_attention_unet": {"channels": [4, 8, 16], "fc_hidden": 32},
    "varnet": {"cascades": 2, "chans": 4, "sens_chans": 2, "pools": 2, "sens_pools": 2},
    "dircn": {"cascades": 2, "chans": 4, "sens_chans": 2, "pools": 2, "sens_pools": 2},
}


def test_registry_is_the_union_of_the_task_tables():
    assert set(REGISTRY) == set(SEGMENTATION) | set(RECONSTRUCTION)
    assert not set(SEGMENTATION) & set(RECONSTRUCTION)


def test_every_entry_names_a_builder_of_its_module():
    for name, entry in REGISTRY.items():
        assert callable(entry.resolve()), name
        assert entry.resolve().__module__ == f"mri_ensemble.nets.{entry.module}", name


def test_a_network_without_monai_does_not_import_monai():
    """A stage builds one network: the U-Net's or the VarNet's process does not pay the
    seconds MONAI's import takes; an attention U-Net's does."""
    code = (
        "import sys\n"
        "from mri_ensemble.nets import build_model\n"
        "build_model('unet', 1, 4, {'features': [4, 8]})\n"
        "build_model('varnet', 2, 1, {'cascades': 1, 'chans': 4})\n"
        "print('monai' in sys.modules)\n"
        "build_model('attention_unet', 1, 4, {'channels': [4, 8]})\n"
        "print('monai' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"], out.stderr


@pytest.mark.parametrize("arch", sorted(RECONSTRUCTION))
def test_every_reconstruction_network_odd_shape_and_gradients(arch):
    torch.manual_seed(0)
    model = build_model(arch, 2, 1, SMALL_RECON[arch]).train()
    kspace = torch.randn(2, 3, 17, 19, dtype=torch.complex64)
    mask = torch.zeros(2, 19, dtype=torch.bool)
    mask[:, 7:12] = True
    mask[:, ::3] = True
    grappa = torch.rand(2, 17, 19)
    out = model(kspace * mask[:, None, None, :], mask, grappa)
    assert out.shape == (2, 17, 19) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("arch", sorted(SEGMENTATION))
def test_every_network_odd_shape_and_gradients(arch):
    torch.manual_seed(0)
    model = build_model(arch, 1, 4, SMALL[arch])
    x = torch.randn(2, 1, 17, 19)
    model.train()
    out = model(x)
    outs = out if isinstance(out, list) else [out]
    for o in outs:
        assert o.shape == (2, 4, 17, 19)
    sum(o.square().mean() for o in outs).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 4, 17, 19)  # one tensor in eval mode
    assert count_parameters(model) > 0


def test_unetpp_deep_supervision_outputs():
    model = build_model("unetpp", 1, 4, SMALL["unetpp"]).train()
    out = model(torch.randn(1, 1, 32, 32))
    assert isinstance(out, list) and len(out) == 4


def test_unknown_model_and_bad_key_name_what_is_known():
    with pytest.raises(
        ValueError, match=r"unknown model .resunet.; known: attention_unet, deeplabv3, dircn, "
    ):
        build_model("resunet", 1, 4)
    with pytest.raises(ConfigError, match="bad config for model 'unet'.*featurez"):
        build_model("unet", 1, 4, {"featurez": [4, 8]})


def test_cli_lists_every_network_with_its_size():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "mri_ensemble.nets"], capture_output=True, text=True, check=True
    ).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert set(rows) == set(REGISTRY)
    assert rows["unet"][1] == "segmentation" and rows["varnet"][1] == "reconstruction"
    assert int(rows["unet"][2].replace(",", "")) == count_parameters(build_model("unet", 1, 4))
