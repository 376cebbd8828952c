"""Tests of the MNI152-based multi-coil brain simulation (fastMRI layout)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mri_ensemble.data.fastmri import FastMRIFile, list_fastmri, read_fastmri
from mri_ensemble.data.simulate import (
    CONTRASTS,
    SHIFTS,
    SUPPORT,
    Template,
    elastic_field,
    load_template,
    main,
    simulate_brain,
    slab_positions,
)
from mri_ensemble.errors import ConfigError
from mri_ensemble.mri.fft import ifft2c, rss

SMALL: dict[str, Any] = {
    "n_coils": 4,
    "size": (56, 48),  # the default field of view (224 x 192 mm) at 4 mm
    "pixel_mm": 4.0,
    "volumes": 6,
    "slices_per_volume": 3,
    "slice_step_mm": 4.0,
    "gap_slices": 1,
    "noise": 0.02,
    "seed": 3,
}
SHIFTED = {"contrast": 1, "orientation": 2, "coils": 1}


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    return simulate_brain(tmp_path_factory.mktemp("sim"), **SMALL, shifted=SHIFTED)


@pytest.fixture(scope="module")
def small(sets: dict[str, list[Path]]) -> list[Path]:
    return sets["support"]


@pytest.fixture(scope="module")
def files(small: list[Path]) -> list[FastMRIFile]:
    return [read_fastmri(p) for p in small]


def test_files_read_back_in_the_fastmri_layout(small: list[Path], files: list[FastMRIFile]) -> None:
    assert len(small) == 6
    assert list_fastmri(small[0].parent) == sorted(small)
    for i, (path, f) in enumerate(zip(small, files, strict=True)):
        acq = f.attrs["acquisition"]
        assert path.name == f"file_brain_{acq}_sim_{i:03d}.h5"
        assert f.kspace.ndim == 4 and f.kspace.shape[0] == 3 and f.kspace.shape[2:] == (56, 48)
        assert f.kspace.dtype == np.complex64 and f.kspace.shape[1] >= 4  # >= n_coils
        assert f.target is not None and f.target.shape == (3, 56, 48)
        assert f.target.dtype == np.float32
        assert f.attrs["patient_id"] == f"sim{i:03d}" and f.attrs["set"] == "support"
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
        assert channels == str(f.kspace.shape[1])


def test_virtual_subjects_cover_the_support_and_shifts_hold_one_axis_out(
    sets: dict[str, list[Path]],
) -> None:
    attrs = {k: [read_fastmri(p).attrs for p in v] for k, v in sets.items()}
    assert {k: len(v) for k, v in attrs.items()} == {"support": 6, **SHIFTED}
    support = attrs["support"]
    # contrasts cycle with the index, orientations every len(contrasts) volumes
    assert [a["contrast"] for a in support] == ["T1", "T2", "PD"] * 2
    assert [a["orientation"] for a in support] == ["AX"] * 3 + ["CO"] * 3
    assert {a["coil_array"] for a in support} == set(SUPPORT.arrays)
    for name, regime in SHIFTS.items():
        for a in attrs[name]:
            assert a["set"] == name
            assert a["contrast"] in regime.contrasts
            assert a["orientation"] in regime.orientations
            assert a["coil_array"] in regime.arrays
    assert {a["contrast"] for a in attrs["contrast"]}.isdisjoint(SUPPORT.contrasts)
    assert {a["orientation"] for a in attrs["orientation"]}.isdisjoint(SUPPORT.orientations)
    assert {a["coil_array"] for a in attrs["coils"]}.isdisjoint(SUPPORT.arrays)
    for name in SHIFTED:  # shifted sets live in their own folders, names unique overall
        assert all(p.parent.name == f"shift_{name}" for p in sets[name])
    names = [p.name for v in sets.values() for p in v]
    assert len(set(names)) == len(names)


def test_no_two_volumes_share_a_slab_or_a_deformation(sets: dict[str, list[Path]]) -> None:
    attrs = [read_fastmri(p).attrs for v in sets.values() for p in v]
    slabs = [(a["orientation"], tuple(np.round(a["slice_positions_mm"], 3))) for a in attrs]
    assert len(set(slabs)) == len(slabs)
    draws = [(a["rotation_deg"], *a["scale"], *a["shift_px"]) for a in attrs]
    assert len(set(draws)) == len(draws)
    for o in {a["orientation"] for a in attrs}:  # slabs of one orientation never touch
        z = [a["slice_positions_mm"] for a in attrs if a["orientation"] == o]
        for i, zi in enumerate(z):
            for zj in z[i + 1 :]:
                gap = SMALL["gap_slices"] + 1
                assert (
                    np.min(np.abs(zi[:, None] - zj[None, :])) >= gap * SMALL["slice_step_mm"] - 1e-6
                )


def test_contrast_follows_the_tissue_maps() -> None:
    """White matter is brighter than CSF in T1, darker in T2: the contrast table and the
    tissue maps give every contrast its ordering of the three tissues."""
    t: Template = load_template()
    assert t.csf.shape == t.gm.shape == t.wm.shape
    assert float((t.csf + t.gm + t.wm).max()) <= 1.0 + 1e-5
    deep_wm = t.wm > 0.9
    ventricles = t.csf > 0.9
    assert deep_wm.sum() > 1000 and ventricles.sum() > 1000
    for name, (c, g, w) in CONTRASTS.items():
        wm_value = c * t.csf[deep_wm].mean() + g * t.gm[deep_wm].mean() + w * t.wm[deep_wm].mean()
        csf_value = c * t.csf[ventricles].mean() + g * t.gm[ventricles].mean()
        csf_value += w * t.wm[ventricles].mean()
        assert (wm_value > csf_value) == (name in ("T1", "FLAIR")), name


def test_elastic_field_is_smooth_bounded_and_seeded() -> None:
    a, b = elastic_field(5, (56, 48)), elastic_field(5, (56, 48))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, elastic_field(6, (56, 48)))
    assert a.shape == (2, 56, 48)
    assert np.abs(a).max() == pytest.approx(0.035 * 48)
    assert np.abs(np.diff(a, axis=-1)).max() < 0.2 * np.abs(a).max()  # smooth


def test_target_is_rss_of_the_stored_kspace(files: list[FastMRIFile]) -> None:
    for f in files:
        assert f.target is not None
        np.testing.assert_allclose(f.target, rss(ifft2c(f.kspace)), rtol=1e-5, atol=1e-6)
        assert f.attrs["max"] == pytest.approx(float(f.target.max()), rel=1e-6)
        assert f.attrs["norm"] == pytest.approx(float(np.linalg.norm(f.target)), rel=1e-5)


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
    a, b = files[0], files[3]
    assert a.target is not None and b.target is not None
    assert not np.allclose(a.target / a.target.max(), b.target / b.target.max(), atol=0.05)


def test_anatomy_is_oriented_and_inside_the_field_of_view(files: list[FastMRIFile]) -> None:
    f = files[0]  # axial
    assert f.attrs["orientation"] == "AX" and f.target is not None
    brain = f.target[1] > 0.2 * f.target[1].max()
    rows, cols = np.flatnonzero(brain.any(axis=1)), np.flatnonzero(brain.any(axis=0))
    assert rows.size > cols.size  # H is anterior-posterior, the longer axis of a brain
    assert rows[0] > 0 and rows[-1] < 55 and cols[0] > 0 and cols[-1] < 47  # not cut off


def test_deterministic_bytes(tmp_path: Path, sets: dict[str, list[Path]]) -> None:
    again = simulate_brain(tmp_path, **SMALL, shifted=SHIFTED)
    assert {k: [p.name for p in v] for k, v in again.items()} == {
        k: [p.name for p in v] for k, v in sets.items()
    }
    for k in sets:
        for p, q in zip(sets[k], again[k], strict=True):
            assert p.read_bytes() == q.read_bytes()
    other = simulate_brain(tmp_path / "other", **{**SMALL, "seed": 4})["support"]
    assert other[0].read_bytes() != sets["support"][0].read_bytes()


def test_noise_is_added_in_kspace_equally_per_coil(tmp_path: Path) -> None:
    quiet = read_fastmri(simulate_brain(tmp_path / "q", **{**SMALL, "noise": 0.0})["support"][2])
    noisy = read_fastmri(simulate_brain(tmp_path / "n", **{**SMALL, "noise": 0.05})["support"][2])
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
        ("noise", [0.04, 0.01]),
        ("volumes", 0),
        ("shifted", {"bogus": 1}),
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


def test_tissue_maps_share_one_deformation() -> None:
    """The contrast image is rendered through one deformation for every tissue: rendering
    each tissue alone and summing gives the image of all three (labels stay aligned)."""
    import dataclasses

    from mri_ensemble.data.simulate import draw_subject, render_slices

    t = load_template()
    rng = np.random.default_rng(0)
    subject = draw_subject(rng, SUPPORT, 4, 4, (0.0, 0.0))  # coronal, elastic and affine drawn
    z = np.array([0.0, 4.0])
    kw = {"size": (56, 48), "pixel_mm": 4.0, "thickness_mm": 4.0}
    parts = [
        render_slices(t, z, dataclasses.replace(subject, tissue=tuple(np.eye(3)[i])), **kw)
        for i in range(3)
    ]
    whole = render_slices(t, z, dataclasses.replace(subject, tissue=(1.0, 1.0, 1.0)), **kw)
    # clipping at 0 (cubic overshoot) is the only non-linearity: compare where nothing clips
    inside = np.all([p > 1e-3 for p in parts], axis=0)
    assert inside.sum() > 200
    np.testing.assert_allclose(sum(parts)[inside], whole[inside], rtol=1e-4, atol=1e-5)
    again = render_slices(t, z, subject, **kw)
    np.testing.assert_array_equal(again, render_slices(t, z, subject, **kw))  # reproducible
