"""Tests of the MNI152-based multi-coil brain simulation (fastMRI layout)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mri_ensemble.data.fastmri import FastMRIFile, list_fastmri, read_fastmri
from mri_ensemble.data.simulate import main, simulate_brain, slab_positions
from mri_ensemble.errors import ConfigError
from mri_ensemble.mri.fft import ifft2c, rss

SMALL: dict[str, Any] = {
    "n_coils": 4,
    "size": (56, 48),  # the default field of view (224 x 192 mm) at 4 mm
    "pixel_mm": 4.0,
    "slices_per_volume": 3,
    "slice_step_mm": 4.0,
    "gap_slices": 1,
    "seed": 3,
}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return simulate_brain(tmp_path_factory.mktemp("sim"), **SMALL)


@pytest.fixture(scope="module")
def files(small: list[Path]) -> list[FastMRIFile]:
    return [read_fastmri(p) for p in small]


def test_files_read_back_in_the_fastmri_layout(small: list[Path], files: list[FastMRIFile]) -> None:
    assert len(small) >= 4
    assert list_fastmri(small[0].parent) == small
    assert [p.name for p in small] == [f"file_brain_AXT1_sim_{i:03d}.h5" for i in range(len(small))]
    for i, f in enumerate(files):
        assert f.kspace.shape == (3, 4, 56, 48) and f.kspace.dtype == np.complex64
        assert f.target is not None and f.target.shape == (3, 56, 48)
        assert f.target.dtype == np.float32
        assert f.attrs["acquisition"] == "AXT1" and f.attrs["patient_id"] == f"sim{i:03d}"
        assert f.header is not None
        root = ET.fromstring(f.header)
        ns = {"m": "http://www.ismrm.org/ISMRMRD"}
        matrix = root.find("m:encoding/m:encodedSpace/m:matrixSize", ns)
        assert matrix is not None
        assert (matrix.findtext("m:x", namespaces=ns), matrix.findtext("m:y", namespaces=ns)) == (
            "56",
            "48",
        )
        channels = root.findtext("m:acquisitionSystemInformation/m:receiverChannels", None, ns)
        assert channels == "4"


def test_target_is_rss_of_the_stored_kspace(files: list[FastMRIFile]) -> None:
    for f in files:
        assert f.target is not None
        np.testing.assert_allclose(f.target, rss(ifft2c(f.kspace)), rtol=1e-5, atol=1e-6)
        assert f.attrs["max"] == pytest.approx(float(f.target.max()), rel=1e-6)
        assert f.attrs["norm"] == pytest.approx(float(np.linalg.norm(f.target)), rel=1e-5)


def test_slabs_never_touch(files: list[FastMRIFile]) -> None:
    step, gap = SMALL["slice_step_mm"], SMALL["gap_slices"]
    positions = [np.asarray(f.attrs["slice_positions_mm"]) for f in files]
    for z in positions:
        assert z.shape == (3,)
        np.testing.assert_allclose(np.diff(z), step)
    for i, zi in enumerate(positions):
        for zj in positions[i + 1 :]:
            closest = np.min(np.abs(zi[:, None] - zj[None, :]))
            assert closest >= (gap + 1) * step - 1e-6  # at least one unused position between
    assert np.all(np.diff([z[0] for z in positions]) > 0)  # inferior to superior


def test_sensitivities_differ_across_coils(files: list[FastMRIFile]) -> None:
    f = files[len(files) // 2]
    coils = ifft2c(f.kspace[1])  # (C, H, W)
    combined = rss(coils)
    brain = combined > 0.3 * combined.max()
    maps = np.abs(coils)[:, brain] / combined[brain]  # relative sensitivity per coil
    for a in range(maps.shape[0]):
        for b in range(a + 1, maps.shape[0]):
            assert np.max(np.abs(maps[a] - maps[b])) > 0.2
    assert np.all(maps.max(axis=1) / maps.min(axis=1) > 1.5)  # each coil has a falloff


def test_volumes_differ(files: list[FastMRIFile]) -> None:
    draws = {(f.attrs["rotation_deg"], f.attrs["scale"], f.attrs["gamma"]) for f in files}
    assert len(draws) == len(files)
    a, b = files[2], files[3]
    assert a.target is not None and b.target is not None
    assert not np.allclose(a.target, b.target, atol=0.05)


def test_anatomy_is_oriented_and_inside_the_field_of_view(files: list[FastMRIFile]) -> None:
    f = files[len(files) // 2]  # a mid-brain slab
    assert f.target is not None
    brain = f.target[1] > 0.2 * f.target[1].max()
    rows, cols = np.flatnonzero(brain.any(axis=1)), np.flatnonzero(brain.any(axis=0))
    assert rows.size > cols.size  # H is anterior-posterior, the longer axis of a brain
    assert rows[0] > 0 and rows[-1] < 55 and cols[0] > 0 and cols[-1] < 47  # not cut off


def test_deterministic_bytes(tmp_path: Path, small: list[Path]) -> None:
    again = simulate_brain(tmp_path, **SMALL)
    assert [p.name for p in again] == [p.name for p in small]
    for p, q in zip(small, again, strict=True):
        assert p.read_bytes() == q.read_bytes()
    other = simulate_brain(tmp_path / "other", **{**SMALL, "seed": 4})
    assert other[0].read_bytes() != small[0].read_bytes()


def test_noise_is_added_in_kspace_equally_per_coil(tmp_path: Path) -> None:
    quiet = read_fastmri(simulate_brain(tmp_path / "q", **{**SMALL, "noise": 0.0})[2])
    noisy = read_fastmri(simulate_brain(tmp_path / "n", **{**SMALL, "noise": 0.05})[2])
    diff = noisy.kspace - quiet.kspace  # same seed: same subject, only the noise differs
    per_coil = np.sqrt(np.mean(np.abs(diff) ** 2, axis=(0, 2, 3)))
    assert per_coil.min() > 0.9 * per_coil.max()
    assert quiet.target is not None
    image_mean = float(np.abs(ifft2c(quiet.kspace)).mean())
    assert 0.01 < per_coil.mean() / image_mean < 0.2  # ~ noise x the mean image magnitude


def test_slab_positions_on_a_toy_profile() -> None:
    signal = np.r_[np.zeros(10), np.ones(41), np.zeros(10)]  # signal at z = 10..50 mm
    slabs = slab_positions(
        signal, 1.0, 0.0, slices_per_volume=4, slice_step_mm=2.0, gap_slices=1
    )  # 21 positions 10, 12, ..., 50 -> 4 slabs of 4 (+3 gaps) = 19, one spare each side
    assert [list(s) for s in slabs] == [
        [12.0, 14.0, 16.0, 18.0],
        [22.0, 24.0, 26.0, 28.0],
        [32.0, 34.0, 36.0, 38.0],
        [42.0, 44.0, 46.0, 48.0],
    ]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("n_coils", 0),
        ("size", (40,)),
        ("pixel_mm", -1.0),
        ("slices_per_volume", 0),
        ("slice_step_mm", 0.0),
        ("gap_slices", -1),
        ("noise", float("nan")),
        ("seed", -1),
    ],
)
def test_bad_parameters(tmp_path: Path, key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"^{key}: expected"):
        simulate_brain(tmp_path, **{**SMALL, key: value})
    assert not list(tmp_path.iterdir())


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="seed: expected an integer >= 0"):
        main([str(tmp_path), "--seed", "-2"])
