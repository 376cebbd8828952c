"""Test-time augmentation (mri_ensemble.tta): known answers on toy networks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mri_ensemble.errors import ConfigError, DataError
from mri_ensemble.tta import FlipTTA, base_model, candidate, check_axes, tta_checkpoint, wrap


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
    assert len(tta.transforms) == 4


@pytest.mark.parametrize("axes, passes", [([], 4), ([-1], 8), ([-1, -2], 8)])
def test_rot90_tta_of_an_equivariant_model_equals_the_model(axes, passes):
    """C4 (no axes) or D4 (any axis): a pointwise net commutes with every one of them."""
    net = nn.Conv2d(1, 4, 1)
    tta = FlipTTA(net, axes, rot90=True)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(tta(x), net(x), atol=1e-6)
    assert len(tta.transforms) == passes
    # each pass a different symmetry of the square: an asymmetric image lands 'passes' ways
    img = torch.arange(16.0).reshape(1, 1, 4, 4)
    seen = set()
    for k, dims in tta.transforms:
        t = torch.rot90(img, k, (-2, -1))
        seen.add(tuple((torch.flip(t, dims) if dims else t).flatten().tolist()))
    assert len(seen) == passes


def test_rot90_tta_makes_any_model_equivariant_to_quarter_turns():
    torch.manual_seed(0)
    net = nn.Conv2d(1, 3, 5, padding=2)  # random (5x5: its C4 average need not be mirrored)
    x = torch.randn(1, 1, 8, 8)
    c4, d4 = FlipTTA(net, [], rot90=True), FlipTTA(net, [-1, -2], rot90=True)
    with torch.no_grad():
        turned = torch.rot90(net(x), 1, (-2, -1))
        assert not torch.allclose(net(torch.rot90(x, 1, (-2, -1))), turned, atol=1e-4)
        for tta in (c4, d4):
            for k in (1, 2, 3):
                assert torch.allclose(
                    tta(torch.rot90(x, k, (-2, -1))), torch.rot90(tta(x), k, (-2, -1)), atol=1e-5
                )
        # C4 alone is no mirror average; D4 is
        assert not torch.allclose(c4(torch.flip(x, [-1])), torch.flip(c4(x), [-1]), atol=1e-4)
        assert torch.allclose(d4(torch.flip(x, [-1])), torch.flip(d4(x), [-1]), atol=1e-5)
    # the checkpoint entry rebuilds it; a flips-only entry holds no rot90 key (its old bytes)
    ckpt = tta_checkpoint({"meta": {"model": "unet"}}, [], "unet-flip", rot90=True)
    assert ckpt["tta"] == {"axes": [], "from": "unet", "rot90": True}
    assert "rot90" not in tta_checkpoint({"meta": {}}, [-1], "unet-flip")["tta"]
    rebuilt = wrap(net, ckpt, "f.pt")
    assert isinstance(rebuilt, FlipTTA) and len(rebuilt.transforms) == 4
    with pytest.raises(DataError, match="f.pt: tta: rot90 should be true or false"):
        wrap(net, {"tta": {"axes": [-1], "rot90": "yes"}}, "f.pt")
    with pytest.raises(DataError, match="f.pt: tta: axes should be a non-empty list"):
        wrap(net, {"tta": {"axes": []}}, "f.pt")


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
    assert tta_entry(params, "segmentation-unet")["rot90"] is False
    turns = {"train": train, "tta": {"segmentation-unet": {**ok, "axes": [], "rot90": True}}}
    assert tta_entry(turns, "segmentation-unet") == {**unet, "axes": [], "rot90": True}
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
        ("segmentation-unet", {**ok, "axes": []}, "axes should be a non-empty list"),
        ("segmentation-unet", {**ok, "rot90": 1}, "tta.segmentation-unet: rot90 should be true"),
        ("segmentation-unet", {**ok, "axes": [3], "rot90": True}, "axes should be a list of"),
        ("reconstruction-varnet", {"task": "reconstruction", "model": "varnet", "axes": [-1]},
         "segmentation only"),
    ]  # fmt: skip
    for key, entry, message in cases:
        with pytest.raises(ConfigError, match=message):
            tta_entry({"train": train, "tta": {key: entry}}, key)
