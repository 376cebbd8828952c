"""Test-time augmentation (mri_ensemble.tta): known answers on toy networks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mri_ensemble.errors import ConfigError, DataError
from mri_ensemble.tta import FlipTTA, base_model, candidate, check_axes, wrap


def test_flip_tta_of_a_flip_equivariant_model_equals_the_model():
    net = nn.Conv2d(1, 4, 1)  # pointwise: commutes with every flip
    x = torch.randn(2, 1, 8, 6)
    with torch.no_grad():
        assert torch.allclose(FlipTTA(net, [-1, -2])(x), net(x), atol=1e-6)


def test_flip_tta_makes_any_model_equivariant_to_its_flips():
    torch.manual_seed(0)
    net = nn.Conv2d(1, 3, 3, padding=1)  # a random kernel: not flip-equivariant
    tta = FlipTTA(net, [-1, -2])
    x = torch.randn(1, 1, 7, 5)
    with torch.no_grad():
        assert not torch.allclose(net(torch.flip(x, [-1])), torch.flip(net(x), [-1]), atol=1e-4)
        for dims in ([-1], [-2], [-2, -1]):
            assert torch.allclose(tta(torch.flip(x, dims)), torch.flip(tta(x), dims), atol=1e-5)
    assert len(tta.flips) == 4


def test_names_and_bad_axes():
    assert candidate("unet") == "unet-flip" and base_model("unet-flip") == "unet"
    assert base_model("unet") == "unet"
    for bad in ([], [0], [-1, -1], "w", [True]):
        with pytest.raises(ConfigError, match="axes"):
            check_axes(bad, "params.yaml: tta.x")
    net = nn.Conv2d(1, 1, 1)
    assert wrap(net, {}, "f.pt") is net
    with pytest.raises(DataError, match="f.pt"):
        wrap(net, {"tta": {"axes": [3]}}, "f.pt")


def test_bad_tta_params_name_the_key():
    """A tta entry that names no train entry, another model, an unknown key or a
    reconstruction model: one line naming the key."""
    from stages.ensemble import ensemble_candidates
    from stages.tta import tta_entry

    unet = {"task": "segmentation", "model": "unet", "arch": "unet"}
    varnet = {"task": "reconstruction", "model": "varnet", "arch": "varnet"}
    train = {"segmentation-unet": unet, "reconstruction-varnet": varnet}
    ok = {"task": "segmentation", "model": "unet", "axes": [-1]}
    params = {"train": train, "tta": {"segmentation-unet": ok}}
    assert ensemble_candidates(params, "segmentation") == ["unet", "unet-flip"]
    assert ensemble_candidates(params, "reconstruction") == ["varnet"]
    assert tta_entry(params, "segmentation-unet")["axes"] == [-1]
    with pytest.raises(ConfigError, match=r"tta entries \['segmentation-nope'\] name no train"):
        ensemble_candidates({"train": train, "tta": {"segmentation-nope": ok}}, "segmentation")
    clash = {**train, "segmentation-unet-flip": {**unet, "model": "unet-flip"}}
    with pytest.raises(ConfigError, match=r"\['segmentation-unet-flip'\]: a model name ending"):
        ensemble_candidates({"train": clash, "tta": {}}, "segmentation")
    with pytest.raises(ConfigError, match="tta should be a mapping"):
        ensemble_candidates({"train": train, "tta": ["unet"]}, "segmentation")
    cases = [
        ("segmentation-unet", {**ok, "model": "other"}, r"tta.segmentation-unet.model should be 'unet'"),
        ("segmentation-unet", {**ok, "passes": 4}, r"unknown key\(s\) \['passes'\]"),
        ("segmentation-unet", {**ok, "axes": [2]}, "axes should be a non-empty list"),
        ("reconstruction-varnet", {"task": "reconstruction", "model": "varnet", "axes": [-1]},
         "segmentation only"),
    ]  # fmt: skip
    for key, entry, message in cases:
        with pytest.raises(ConfigError, match=message):
            tta_entry({"train": train, "tta": {key: entry}}, key)
