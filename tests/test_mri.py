"""k-space maths: centred FFTs, undersampling masks, GRAPPA and reconstruction quality."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mri_ensemble.errors import ConfigError, DataError
from mri_ensemble.mri import quality
from mri_ensemble.mri.fft import (
    channels_to_complex,
    complex_to_channels,
    fft2c,
    ifft2c,
    rss,
    tfft2c,
    tifft2c,
    trss,
)
from mri_ensemble.mri.grappa import grappa_image, grappa_kspace
from mri_ensemble.mri.masks import (
    MaskSpec,
    acceleration,
    acs_bounds,
    sample_mask,
    volume_mask,
)
from mri_ensemble.mri.quality import (
    SSIML1Loss,
    SSIMLoss,
    build_recon_loss,
    reconstruction_scores,
    ssim_slices,
)

AXES = (-2, -1)


def _complex(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


# ----------------------------------------------------------------------------- FFT


@pytest.mark.parametrize("shape", [(5, 7), (4, 6), (3, 9, 8), (2, 3, 8, 9)])
def test_fft2c_matches_numpy_reference(shape: tuple[int, ...]) -> None:
    x = _complex(np.random.default_rng(0), shape)
    ref = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, AXES), norm="ortho"), AXES)
    iref = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(x, AXES), norm="ortho"), AXES)
    np.testing.assert_allclose(fft2c(x), ref, atol=1e-12)
    np.testing.assert_allclose(ifft2c(x), iref, atol=1e-12)
    np.testing.assert_allclose(ifft2c(fft2c(x)), x, atol=1e-12)
    np.testing.assert_allclose(fft2c(ifft2c(x)), x, atol=1e-12)
    # Parseval: orthonormal scaling keeps the energy
    np.testing.assert_allclose(np.sum(np.abs(fft2c(x)) ** 2), np.sum(np.abs(x) ** 2), rtol=1e-12)


@pytest.mark.parametrize("shape", [(5, 7), (6, 8)])
def test_fft2c_dc_sits_at_the_centre(shape: tuple[int, ...]) -> None:
    k = fft2c(np.ones(shape))
    h, w = shape
    assert k[h // 2, w // 2] == pytest.approx(np.sqrt(h * w))
    k[h // 2, w // 2] = 0
    assert np.abs(k).max() < 1e-12


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 8, 6)])
def test_torch_fft_and_rss_equal_numpy(shape: tuple[int, ...]) -> None:
    x = _complex(np.random.default_rng(1), shape).astype(np.complex64)
    t = torch.from_numpy(x)
    np.testing.assert_allclose(tfft2c(t).numpy(), fft2c(x), atol=1e-5)
    np.testing.assert_allclose(tifft2c(t).numpy(), ifft2c(x), atol=1e-5)
    np.testing.assert_allclose(tifft2c(tfft2c(t)).numpy(), x, atol=1e-5)
    assert tfft2c(t).dtype == torch.complex64
    np.testing.assert_allclose(trss(t).numpy(), rss(x), rtol=1e-6)
    np.testing.assert_allclose(rss(x), np.sqrt(np.sum(np.abs(x) ** 2, axis=1)), rtol=1e-6)


def test_complex_to_channels_round_trip() -> None:
    x = torch.from_numpy(_complex(np.random.default_rng(2), (2, 3, 5, 4)).astype(np.complex64))
    ch = complex_to_channels(x)
    assert ch.shape == (2, 6, 5, 4)
    torch.testing.assert_close(ch[:, 0], x[:, 0].real)  # interleaved: re0, im0, re1, ...
    torch.testing.assert_close(ch[:, 1], x[:, 0].imag)
    torch.testing.assert_close(ch[:, 5], x[:, 2].imag)
    torch.testing.assert_close(channels_to_complex(ch), x)
    with pytest.raises(ValueError, match="even number of channels"):
        channels_to_complex(torch.zeros(1, 3, 4, 4))


# ----------------------------------------------------------------------------- masks


def test_maskspec_from_mapping() -> None:
    assert MaskSpec.from_mapping(None) == MaskSpec()
    spec = MaskSpec.from_mapping(
        {"kind": "random", "center_fractions": [0.08, 0.04], "accelerations": [4, 8]}
    )
    assert spec == MaskSpec("random", (0.08, 0.04), (4, 8))
    assert isinstance(spec.center_fractions, tuple) and isinstance(spec.accelerations, tuple)
    bad: list[tuple[dict[str, object], str]] = [
        ({"kinds": "random"}, "kinds"),
        ({"kind": "radial"}, "kind"),
        ({"center_fractions": [0.08, 0.04]}, "center_fractions"),
        ({"center_fractions": [0.0]}, "center_fractions"),
        ({"center_fractions": [1.2]}, "center_fractions"),
        ({"accelerations": [0]}, "accelerations"),
        ({"accelerations": [2.5]}, "accelerations"),
        ({"kind": "random", "center_fractions": [0.3], "accelerations": [4]}, "center_fractions"),
    ]
    for d, key in bad:
        with pytest.raises(ConfigError, match=key):
            MaskSpec.from_mapping(d)
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("kind", ["random", "equispaced", "equispaced_fraction"])
@pytest.mark.parametrize("width", [96, 97, 368])
def test_mask_centre_block_and_reproducibility(kind: str, width: int) -> None:
    spec = MaskSpec(kind, (0.08,), (4,))
    a = sample_mask(spec, width, np.random.default_rng(7))
    b = sample_mask(spec, width, np.random.default_rng(7))
    assert a.shape == (width,) and a.dtype == bool
    np.testing.assert_array_equal(a, b)
    others = [sample_mask(spec, width, np.random.default_rng(s)) for s in range(8)]
    assert any(not np.array_equal(a, o) for o in others)
    num_low = round(width * 0.08)
    pad = (width - num_low + 1) // 2
    assert a[pad : pad + num_low].all()
    start, stop = acs_bounds(a)
    assert start <= pad and stop >= pad + num_low and start <= width // 2 < stop


@pytest.mark.parametrize("width,acc", [(96, 4), (368, 4), (320, 8)])
def test_equispaced_mask_lines(width: int, acc: int) -> None:
    spec = MaskSpec("equispaced", (0.08,), (acc,))
    num_low = round(width * 0.08)
    pad = (width - num_low + 1) // 2
    centre = np.zeros(width, dtype=bool)
    centre[pad : pad + num_low] = True
    offsets = set()
    for seed in range(20):
        m = sample_mask(spec, width, np.random.default_rng(seed))
        cols = np.arange(width)
        matches = [o for o in range(acc) if np.array_equal(m, centre | (cols % acc == o))]
        assert len(matches) == 1  # centre plus every acc-th column from one offset
        offsets.add(matches[0])
        lines = len(range(matches[0], width, acc))
        extra = lines - int(np.sum(centre[matches[0] :: acc]))
        assert m.sum() == num_low + extra
        # fastMRI's equispaced mask over-samples: achieved acceleration is below acc
        assert acc * (1 - acc * 0.08) - 0.5 < acceleration(m) <= acc
    assert len(offsets) > 1


@pytest.mark.parametrize("width", [96, 97, 320, 368, 640])
@pytest.mark.parametrize("cf,acc", [(0.08, 4), (0.04, 8)])
def test_equispaced_fraction_reaches_requested_acceleration(
    width: int, cf: float, acc: int
) -> None:
    spec = MaskSpec("equispaced_fraction", (cf,), (acc,))
    for seed in range(10):
        m = sample_mask(spec, width, np.random.default_rng(seed))
        assert abs(m.sum() - width / acc) <= 2  # within a line or two
        assert acceleration(m) == pytest.approx(width / m.sum())


def test_random_mask_expected_acceleration() -> None:
    width, acc, cf = 368, 4, 0.08
    spec = MaskSpec("random", (cf,), (acc,))
    rng = np.random.default_rng(3)
    counts = np.array([sample_mask(spec, width, rng).sum() for _ in range(2000)])
    # expected count W / acc = 92; the std of the mean over 2000 draws is about 0.16
    assert abs(counts.mean() - width / acc) < 1.0
    assert counts.std() > 3  # the outer lines really are random


def test_mask_pairs_chosen_by_one_index() -> None:
    width = 320
    spec = MaskSpec("equispaced_fraction", (0.08, 0.04), (4, 8))
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        m = sample_mask(spec, width, rng)
        start, stop = acs_bounds(m)
        total = int(m.sum())
        # the centre size and the line count come from the same pair
        if abs(total - width / 4) <= 2:
            seen.add(4)
            assert stop - start >= round(width * 0.08)
        else:
            assert abs(total - width / 8) <= 2
            seen.add(8)
    assert seen == {4, 8}


def test_volume_mask_is_stable_and_case_dependent() -> None:
    spec = MaskSpec("random", (0.08,), (4,))
    a = volume_mask(spec, 96, 0, "case_001")
    np.testing.assert_array_equal(a, volume_mask(spec, 96, 0, "case_001"))
    cases = [volume_mask(spec, 96, 0, f"case_{i:03d}") for i in range(2, 8)]
    assert all(not np.array_equal(a, c) for c in cases)
    assert not np.array_equal(a, volume_mask(spec, 96, 1, "case_001"))
    # independent of Python's per-process string hashing
    code = (
        "import json; from mri_ensemble.mri.masks import MaskSpec, volume_mask;"
        "m = volume_mask(MaskSpec('random', (0.08,), (4,)), 96, 0, 'case_001');"
        "print(json.dumps(m.nonzero()[0].tolist()))"
    )
    for hash_seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(out.stdout) == np.flatnonzero(a).tolist()


def test_acs_bounds_and_acceleration_by_hand() -> None:
    m = np.array([1, 0, 1, 1, 1, 0, 1, 1], dtype=bool)  # W // 2 = 4
    assert acs_bounds(m) == (2, 5)
    assert acs_bounds(np.ones(7, dtype=bool)) == (0, 7)
    assert acceleration(m) == pytest.approx(8 / 6)
    with pytest.raises(DataError, match="centre column 4"):
        acs_bounds(np.array([1, 1, 1, 1, 0, 1, 1, 1], dtype=bool))
    with pytest.raises(DataError, match="1-D"):
        acs_bounds(np.ones((2, 8), dtype=bool))
    with pytest.raises(DataError, match="at least one sampled"):
        acceleration(np.zeros(8, dtype=bool))


# ----------------------------------------------------------------------------- GRAPPA


def _multicoil_kspace(coils: int, h: int, w: int) -> np.ndarray:
    """Fully sampled k-space (C, H, W) of a smooth phantom seen by smooth coil sensitivities."""
    y, x = np.mgrid[-1 : 1 : h * 1j, -1 : 1 : w * 1j]
    img = np.zeros((h, w))
    img[(x / 0.7) ** 2 + (y / 0.85) ** 2 < 1] = 1.0
    img[((x - 0.2) / 0.2) ** 2 + ((y + 0.1) / 0.3) ** 2 < 1] = 0.5
    img[((x + 0.25) / 0.15) ** 2 + ((y - 0.3) / 0.15) ** 2 < 1] = 1.5
    img = gaussian_filter(img, 1.0) * np.exp(1j * np.pi * 0.3 * (x + y))  # smooth phase
    ang = 2 * np.pi * np.arange(coils) / coils
    cx, cy = 1.2 * np.cos(ang)[:, None, None], 1.2 * np.sin(ang)[:, None, None]
    sens = np.exp(-((x - cx) ** 2 + (y - cy) ** 2)) * np.exp(1j * ang[:, None, None])
    return fft2c(sens * img).astype(np.complex64)  # (C, H, W)


def _nmse(ref: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((ref - x) ** 2) / np.sum(ref**2))


@pytest.fixture(scope="module")
def kspace() -> np.ndarray:
    return _multicoil_kspace(8, 80, 64)


@pytest.mark.parametrize("acc", [2, 4])
def test_grappa_beats_zero_filling(kspace: np.ndarray, acc: int) -> None:
    mask = sample_mask(MaskSpec("equispaced", (0.16,), (acc,)), 64, np.random.default_rng(0))
    ref = rss(ifft2c(kspace))
    masked = kspace * mask
    filled = grappa_kspace(masked, mask)
    assert filled.shape == kspace.shape and filled.dtype == np.complex64
    np.testing.assert_array_equal(filled[:, :, mask], kspace[:, :, mask])  # acquired kept
    assert np.count_nonzero(filled[:, :, ~mask]) > 0.9 * filled[:, :, ~mask].size
    img = grappa_image(masked, mask)
    assert img.shape == (80, 64) and img.dtype == np.float32
    np.testing.assert_allclose(img, rss(ifft2c(filled)), rtol=1e-5, atol=1e-6)
    zf, gr = _nmse(ref, rss(ifft2c(masked))), _nmse(ref, img)
    assert gr < zf / 5, (gr, zf)
    # entries in the missing columns are ignored: the mask is applied first
    noisy = kspace.copy()
    noisy[:, :, ~mask] = 1e3
    np.testing.assert_array_equal(grappa_kspace(noisy, mask), filled)


def test_grappa_rejects_bad_input(kspace: np.ndarray) -> None:
    mask = sample_mask(MaskSpec("equispaced", (0.16,), (2,)), 64, np.random.default_rng(0))
    with pytest.raises(DataError, match="complex array"):
        grappa_kspace(kspace[0], mask)
    with pytest.raises(DataError, match="complex array"):
        grappa_kspace(np.abs(kspace), mask)
    with pytest.raises(DataError, match=r"mask: expected shape \(64,\)"):
        grappa_kspace(kspace, mask[:-1])
    no_centre = mask.copy()
    no_centre[32] = False
    with pytest.raises(DataError, match="centre column"):
        grappa_kspace(kspace, no_centre)


# ----------------------------------------------------------------------------- quality


def _images(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    target = gaussian_filter(rng.random(shape), (0, 1.5, 1.5)) * 3
    pred = target + 0.1 * rng.standard_normal(shape)
    return pred, target


@pytest.mark.parametrize("hw", [(20, 17), (16, 24), (7, 9)])
def test_ssim_slices_equals_skimage(hw: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    pred, target = _images(rng, (3, *hw))
    cands = np.stack([pred, target + 0.3 * rng.standard_normal(target.shape), target])  # K=3
    dr = target.max(axis=(1, 2))
    for data_range in (dr, 2.5):
        drs = np.broadcast_to(data_range, (3,))
        got = ssim_slices(cands, target, data_range)
        assert got.shape == (3, 3)
        for k in range(3):
            for i in range(3):
                ref = structural_similarity(target[i], cands[k, i], data_range=drs[i])
                assert got[k, i] == pytest.approx(ref, abs=1e-6)
        np.testing.assert_allclose(got[2], 1.0, atol=1e-12)
        np.testing.assert_allclose(ssim_slices(pred, target, data_range), got[0], atol=1e-12)


def test_ssim_slices_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    _, target = _images(rng, (2, 12, 11))
    cands = target + 0.2 * rng.standard_normal((2, 5, 2, 12, 11))  # (2, 5) candidates
    full = ssim_slices(cands, target, 3.0)
    monkeypatch.setattr(quality, "_CHUNK_PIXELS", 1)  # one candidate per chunk
    np.testing.assert_allclose(ssim_slices(cands, target, 3.0), full, atol=1e-14)
    assert full.shape == (2, 5, 2)
    with pytest.raises(DataError, match="equal"):
        ssim_slices(cands[..., :-1], target, 3.0)


def test_reconstruction_scores_per_volume() -> None:
    rng = np.random.default_rng(2)
    _, vol_a = _images(rng, (2, 16, 15))
    _, vol_b = _images(rng, (3, 16, 15))
    vol_b = 10 * vol_b  # a volume with a very different maximum
    target = np.concatenate([vol_b[:1], vol_a, vol_b[1:]])
    case = np.array(["b", "a", "a", "b", "b"])
    pred = target + 0.2 * rng.standard_normal(target.shape)
    scores = reconstruction_scores(pred, target, case)
    assert list(scores["per_case"]) == ["b", "a"]  # order of first appearance
    for cid in ("a", "b"):
        idx = np.flatnonzero(case == cid)
        gt, pr = target[idx], pred[idx]
        ref_ssim = np.mean(
            [structural_similarity(g, p, data_range=gt.max()) for g, p in zip(gt, pr, strict=True)]
        )
        got = scores["per_case"][cid]
        assert got["ssim"] == pytest.approx(ref_ssim, abs=1e-6)
        assert got["psnr"] == pytest.approx(peak_signal_noise_ratio(gt, pr, data_range=gt.max()))
        assert got["nmse"] == pytest.approx(np.linalg.norm(gt - pr) ** 2 / np.linalg.norm(gt) ** 2)
        assert all(isinstance(v, float) for v in got.values())
    # the data range is the volume's own maximum, not the global one
    idx_a = np.flatnonzero(case == "a")
    global_ssim = ssim_slices(pred[idx_a], target[idx_a], target.max()).mean()
    assert abs(scores["per_case"]["a"]["ssim"] - global_ssim) > 1e-3
    for key in ("ssim", "psnr", "nmse"):
        assert scores[key] == pytest.approx(
            (scores["per_case"]["a"][key] + scores["per_case"]["b"][key]) / 2
        )


def test_reconstruction_scores_by_hand() -> None:
    target = np.ones((2, 9, 8))
    target[1] *= 4  # one volume, max 4
    case = np.array(["v", "v"])
    s = reconstruction_scores(0.9 * target, target, case)
    assert s["nmse"] == pytest.approx(0.01)
    s = reconstruction_scores(target + 0.04, target, case)
    assert s["psnr"] == pytest.approx(20 * np.log10(4 / 0.04))  # 40 dB
    s = reconstruction_scores(target, target, case)
    assert s["ssim"] == pytest.approx(1.0) and s["nmse"] == 0.0 and s["psnr"] == float("inf")


def test_reconstruction_scores_reject_bad_input() -> None:
    target = np.ones((2, 9, 8))
    case = np.array(["v", "v"])
    with pytest.raises(DataError, match="equal shape"):
        reconstruction_scores(target[:, :-1], target, case)
    bad = target.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(DataError, match="finite predictions"):
        reconstruction_scores(bad, target, case)
    with pytest.raises(DataError, match="one id per slice"):
        reconstruction_scores(target, target, np.array(["v"]))
    with pytest.raises(DataError, match="positive maximum"):
        reconstruction_scores(target, np.zeros_like(target), case)


def test_ssim_loss_equals_skimage() -> None:
    rng = np.random.default_rng(3)
    pred, target = _images(rng, (3, 23, 19))
    pred, target = pred.astype(np.float32), target.astype(np.float32)
    dr = target.max(axis=(1, 2))
    ref = 1 - np.mean(
        [structural_similarity(target[i], pred[i], data_range=float(dr[i])) for i in range(3)]
    )
    loss_fn = SSIMLoss()
    p = torch.from_numpy(pred).requires_grad_(True)
    loss = loss_fn(p, torch.from_numpy(target), torch.from_numpy(dr))
    assert loss.shape == () and loss.item() == pytest.approx(ref, abs=1e-4)
    loss4 = loss_fn(p[:, None], torch.from_numpy(target)[:, None], torch.from_numpy(dr))
    assert loss4.item() == pytest.approx(loss.item(), abs=1e-7)
    loss.backward()
    assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    t = torch.from_numpy(target)
    assert loss_fn(t, t, torch.from_numpy(dr)).item() == pytest.approx(0.0, abs=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = loss_fn(p, t, torch.from_numpy(dr))
    assert auto.dtype == torch.float32 and auto.item() == pytest.approx(loss.item(), abs=1e-6)


def test_ssim_l1_loss() -> None:
    rng = np.random.default_rng(4)
    pred, target = (torch.from_numpy(a.astype(np.float32)) for a in _images(rng, (2, 12, 13)))
    dr = torch.tensor([3.0, 1.5])
    ssim = SSIMLoss()(pred, target, dr)
    l1 = ((pred - target).abs().mean(dim=(1, 2)) / dr).mean()
    got = SSIML1Loss(alpha=0.5)(pred, target, dr)
    assert got.item() == pytest.approx((ssim + 0.5 * l1).item(), rel=1e-6)
    assert SSIML1Loss(alpha=0.0)(pred, target, dr).item() == pytest.approx(ssim.item())
    assert SSIML1Loss()(target, target, dr).item() == pytest.approx(0.0, abs=1e-6)


def test_build_recon_loss() -> None:
    assert isinstance(build_recon_loss("ssim"), SSIMLoss)
    loss = build_recon_loss("ssim_l1", {"alpha": 0.25})
    assert isinstance(loss, SSIML1Loss) and loss.alpha == 0.25
    assert isinstance(build_recon_loss("ssim_l1", None), SSIML1Loss)
    with pytest.raises(ConfigError, match=r"unknown loss 'x'; known: ssim, ssim_l1"):
        build_recon_loss("x")
    with pytest.raises(ConfigError, match="'alpha'"):
        build_recon_loss("ssim", {"alpha": 0.1})
    with pytest.raises(ConfigError, match="alpha"):
        build_recon_loss("ssim_l1", {"alpha": "big"})
    with pytest.raises(ConfigError, match="win_size"):
        build_recon_loss("ssim", {"win_size": 4})
