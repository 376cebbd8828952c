import pytest
import torch

from mri_ensemble.errors import ConfigError
from mri_ensemble.nets import REGISTRY, build_model, count_parameters

SMALL = {
    "unet": {"features": [4, 8, 16]},
    "attention_unet": {"channels": [4, 8, 16]},
    "unetpp": {"features": [4, 4, 8, 8, 16, 4]},
}


@pytest.mark.parametrize("arch", sorted(REGISTRY))
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
    with pytest.raises(ValueError, match=r"unknown model 'resunet'; known: attention_unet, unet"):
        build_model("resunet", 1, 4)
    with pytest.raises(ConfigError, match="bad config for model 'unet'.*featurez"):
        build_model("unet", 1, 4, {"featurez": [4, 8]})
