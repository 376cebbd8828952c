"""Reconstruction glue: prepared files, the training dataset, prediction, augmentation, search."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from mri_ensemble.data.predictions import read_reconstructions, write_reconstructions
from mri_ensemble.data.prepared_recon import (
    ReconstructionSet,
    read_reconstruction_h5,
    write_reconstruction_h5,
)
from mri_ensemble.ensemble import combine_images, search_image_weights
from mri_ensemble.errors import DataError
from mri_ensemble.mri.fft import fft2c, ifft2c, rss, tifft2c, trss
from mri_ensemble.mri.grappa import grappa_image
from mri_ensemble.mri.masks import MaskSpec, volume_mask
from mri_ensemble.mri.quality import SSIMLoss, reconstruction_scores
from mri_ensemble.tasks.reconstruction import (
    ReconDataset,
    augment_flip,
    input_scale,
    make_validate,
    predict_reconstructions,
    zero_filled,
)
from mri_ensemble.train import ModelSpec, TrainConfig, fit

SPEC = {"kind": "equispaced_fraction", "center_fractions": [0.25], "accelerations": [2]}


def make_set(n_cases: int = 2, slices: int = 3, coils: int = 3, h: int = 20, w: int = 24):
    """Smooth multi-coil images with a known RSS target, masks per volume, zero GRAPPA."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    kspace, target, case, vmax, masks = [], [], [], [], []
    spec = MaskSpec.from_mapping(SPEC)
    for c in range(n_cases):
        name = f"vol{c}"
        mask = volume_mask(spec, w, 0, name)
        vol = []
        for s in range(slices):
            img = np.exp(-((yy - 0.5) ** 2 + (xx - 0.45) ** 2) / (0.05 + 0.02 * s + 0.03 * c))
            sens = np.stack(
                [
                    np.exp(1j * (k + 1) * (xx + yy)) * (0.6 + 0.4 * np.cos(k + yy))
                    for k in range(coils)
                ]
            )
            coil_imgs = sens * img * (1 + 0.1 * rng.standard_normal((h, w)))
            vol.append(fft2c(coil_imgs).astype(np.complex64))
        vol_k = np.stack(vol)
        vol_t = rss(ifft2c(vol_k)).astype(np.float32)
        kspace.append(vol_k)
        target.append(vol_t)
        case += [name] * slices
        vmax += [vol_t.max()] * slices
        masks.append(np.repeat(mask[None], slices, 0))
    k = np.concatenate(kspace)
    return ReconstructionSet(
        kspace=k,
        mask=np.concatenate(masks),
        target=np.concatenate(target),
        grappa=np.zeros((len(k), h, w), np.float32),
        case=np.array(case),
        max=np.array(vmax, np.float32),
        attrs={"mask": SPEC, "grappa": {"kernel_size": [3, 3]}, "source": "test"},
    )


class ZeroFilled(nn.Module):
    """A 'network' that returns the zero-filled RSS image (plus one parameter to train)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, kspace, mask, grappa):
        return self.gain * trss(tifft2c(kspace))


def test_prepared_round_trip_and_errors(tmp_path: Path):
    data = make_set()
    path = tmp_path / "val.h5"
    write_reconstruction_h5(path, data)
    back = read_reconstruction_h5(path)
    for key in ("kspace", "mask", "target", "grappa", "max"):
        np.testing.assert_array_equal(getattr(back, key), getattr(data, key))
    assert list(back.case) == list(data.case)
    assert back.attrs["mask"] == SPEC
    with pytest.raises(DataError, match="not found"):
        read_reconstruction_h5(tmp_path / "missing.h5")
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["kspace"] = np.zeros((1, 1, 4, 4), np.complex64)
    with pytest.raises(DataError, match=r"bad.h5: not a prepared reconstruction file"):
        read_reconstruction_h5(tmp_path / "bad.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="junk.h5: not a readable HDF5"):
        read_reconstruction_h5(tmp_path / "junk.h5")


def test_dataset_scales_by_the_zero_filled_maximum_and_masks_the_kspace():
    data = make_set()
    (kspace, mask, grappa), (target, data_range) = ReconDataset(data)[4]
    s = input_scale(data.kspace[4] * data.mask[4])
    assert s > 0
    np.testing.assert_allclose(kspace.numpy() * s, data.kspace[4] * data.mask[4], rtol=1e-5)
    assert torch.all(kspace[..., ~mask] == 0)
    np.testing.assert_array_equal(mask.numpy(), data.mask[4])
    np.testing.assert_allclose(target.numpy() * s, data.target[4], rtol=1e-5)
    assert float(data_range) == pytest.approx(data.max[4] / s, rel=1e-5)
    zf = trss(tifft2c(kspace[None]))[0]
    assert float(zf.max()) == pytest.approx(1.0, rel=1e-5)


def test_training_masks_are_fresh_per_epoch_and_reproducible():
    data = make_set(w=40)
    spec = MaskSpec("random", (0.1,), (3,))  # many possible masks, unlike 2x equispaced
    ds = ReconDataset(data, spec, seed=3)
    ds.set_epoch(1)
    a = [ds[i][0][1].numpy() for i in range(len(ds))]
    a_again = [ds[i][0][1].numpy() for i in range(len(ds))]
    ds.set_epoch(2)
    b = [ds[i][0][1].numpy() for i in range(len(ds))]
    assert all(np.array_equal(x, y) for x, y in zip(a, a_again, strict=True))
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not any(np.array_equal(a[0], m) for m in a[1:3])  # differs across slices too


def test_training_grappa_is_computed_only_when_the_network_uses_it():
    data = make_set()
    with_g = ReconDataset(data, MaskSpec.from_mapping(SPEC), seed=0, with_grappa=True)
    without = ReconDataset(data, MaskSpec.from_mapping(SPEC), seed=0, with_grappa=False)
    (kspace, mask, g1), _ = with_g[0]
    assert float(without[0][0][2].abs().max()) == 0.0
    m = mask.numpy()
    masked = data.kspace[0] * m
    expected = grappa_image(masked, m, kernel_size=(3, 3)) / input_scale(masked)  # file's cfg
    np.testing.assert_allclose(g1.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_predict_returns_data_units_and_validate_scores_like_the_metrics():
    data = make_set()
    model = ZeroFilled()
    pred = predict_reconstructions(model, data, torch.device("cpu"), batch_size=4)
    np.testing.assert_allclose(pred, zero_filled(data), rtol=1e-4, atol=1e-6)
    scores = make_validate(data, SSIMLoss(), batch_size=2)(model, torch.device("cpu"))
    ref = reconstruction_scores(zero_filled(data), data.target, data.case)
    assert scores["val_ssim"] == pytest.approx(ref["ssim"], abs=1e-4)
    assert scores["val_psnr"] == pytest.approx(ref["psnr"], abs=1e-2)
    assert 0 < scores["val_loss"] < 1


def test_augment_flip_is_an_exact_mirrored_acquisition():
    data = make_set(n_cases=1)
    out = augment_flip(data, seed=0)
    n = len(data)
    assert len(out) == 2 * n
    np.testing.assert_array_equal(out.kspace[:n], data.kspace)
    mirrored = rss(ifft2c(out.kspace[n:]))
    np.testing.assert_allclose(mirrored, data.target[:, :, ::-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out.target[n:], data.target[:, :, ::-1])
    assert all(c.endswith("~flip") for c in out.case[n:])
    assert out.mask.shape == (2 * n, data.mask.shape[1]) and out.grappa.shape == out.target.shape


def test_image_ensemble_search_finds_the_perfect_model_and_never_loses_to_one():
    data = make_set()
    rng = np.random.default_rng(1)
    perfect = data.target
    noisy = data.target + rng.normal(0, 0.2, data.target.shape).astype(np.float32)
    blurred = zero_filled(data)
    res = search_image_weights(
        np.stack([noisy, perfect, blurred]),
        data.target,
        data.case,
        method="random+nelder_mead",
        n_random=20,
        seed=0,
    )
    np.testing.assert_allclose(res.weights, [0, 1, 0], atol=1e-5)
    assert res.score == pytest.approx(1.0)

    stack = np.stack([noisy, noisy[::-1].copy(), blurred])
    res = search_image_weights(stack, data.target, data.case, method="random", n_random=30, seed=0)
    singles = [reconstruction_scores(s, data.target, data.case)["ssim"] for s in stack]
    assert res.score >= max(singles) - 1e-12
    fused = combine_images(stack, res.weights)
    assert reconstruction_scores(fused, data.target, data.case)["ssim"] == pytest.approx(
        res.score, abs=1e-9
    )
    with pytest.raises(DataError, match="NaN"):
        search_image_weights(
            np.full_like(stack, np.nan), data.target, data.case, method="mean", n_random=0, seed=0
        )


def test_reconstruction_predictions_round_trip(tmp_path: Path):
    data = make_set()
    write_reconstructions(tmp_path / "p.h5", data.target, data.case, {"model": "x"})
    recon, case = read_reconstructions(tmp_path / "p.h5")
    np.testing.assert_array_equal(recon, data.target)
    assert list(case) == list(data.case)
    bad = data.target.copy()
    bad[0, 0, 0] = np.inf
    write_reconstructions(tmp_path / "bad.h5", bad, data.case, {})
    with pytest.raises(DataError, match="bad.h5: recon contains NaN or Inf"):
        read_reconstructions(tmp_path / "bad.h5")


def test_engine_trains_a_reconstruction_network_on_tuple_batches(tmp_path: Path):
    data = make_set()
    spec = ModelSpec(
        "varnet", {"cascades": 1, "chans": 4, "sens_chans": 2, "pools": 1, "sens_pools": 1}, 2, 1
    )
    cfg = TrainConfig(epochs=2, batch_size=3, lr=1e-3, device="cpu", seed=0)
    train = ReconDataset(data, MaskSpec.from_mapping(SPEC), seed=0)
    state = fit(
        spec,
        train,
        SSIMLoss(),
        make_validate(data, SSIMLoss()),
        cfg,
        tmp_path,
        {"t": 1},
        progress=False,
    )
    assert state["epoch"] == 2
    assert all(np.isfinite(r["train_loss"]) and 0 <= r["val_ssim"] <= 1 for r in state["history"])
    assert (tmp_path / "best.pt").is_file()
