"""Tests of the fastMRI HDF5 reader/writer and of prepare_volume."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from mri_ensemble.data.fastmri import (
    FastMRIFile,
    list_fastmri,
    prepare_volume,
    read_fastmri,
    write_fastmri,
)
from mri_ensemble.errors import DataError
from mri_ensemble.mri.fft import fft2c, ifft2c, rss


def _complex(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def _raw(path: Path, **datasets: np.ndarray) -> Path:
    """An HDF5 file holding exactly ``datasets`` (no validation on writing)."""
    with h5py.File(path, "w") as hf:
        for name, data in datasets.items():
            hf.create_dataset(name, data=data)
    return path


def test_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    kspace = _complex(rng, (3, 4, 16, 12))
    target = rss(ifft2c(kspace)).astype(np.float32)
    header = b'<?xml version="1.0"?><ismrmrdHeader/>'
    attrs = {"max": 2.5, "norm": 10.0, "acquisition": "AXT1", "patient_id": "p1", "z": [1.0, 2]}
    path = tmp_path / "vol.h5"
    write_fastmri(path, kspace, target, attrs=attrs, header=header)
    f = read_fastmri(path)
    assert f.path == path
    assert f.kspace.dtype == np.complex64 and f.kspace.shape == (3, 4, 16, 12)
    np.testing.assert_array_equal(f.kspace, kspace)
    assert f.target is not None and f.target.dtype == np.float32
    np.testing.assert_array_equal(f.target, target)
    assert f.header == header
    assert f.attrs["max"] == 2.5 and f.attrs["norm"] == 10.0
    assert f.attrs["acquisition"] == "AXT1" and f.attrs["patient_id"] == "p1"
    np.testing.assert_array_equal(f.attrs["z"], [1.0, 2.0])
    assert f.n_slices == 3 and f.n_coils == 4
    with h5py.File(path) as hf:  # the real layout's names and dtypes
        assert hf["kspace"].dtype == np.complex64
        assert hf["reconstruction_rss"].dtype == np.float32
        assert isinstance(hf["ismrmrd_header"][()], bytes)
    assert not list(tmp_path.glob(".*.tmp"))  # nothing left of the atomic write


def test_write_is_deterministic(tmp_path: Path) -> None:
    kspace = _complex(np.random.default_rng(1), (2, 2, 8, 8))
    for name in ("a.h5", "b.h5"):
        write_fastmri(tmp_path / name, kspace, np.abs(kspace[:, 0]), {"max": 1.0}, b"<x/>")
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()


def test_no_target_no_header(tmp_path: Path) -> None:
    path = _raw(tmp_path / "test.h5", kspace=_complex(np.random.default_rng(2), (2, 3, 8, 8)))
    f = read_fastmri(path)
    assert f.target is None and f.header is None and f.attrs == {}


def test_single_coil_becomes_one_coil(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    kspace = _complex(rng, (4, 10, 8))
    esc = np.abs(ifft2c(kspace)).astype(np.float32)
    path = _raw(tmp_path / "knee.h5", kspace=kspace, reconstruction_esc=esc)
    f = read_fastmri(path)
    assert f.kspace.shape == (4, 1, 10, 8)
    np.testing.assert_array_equal(f.kspace[:, 0], kspace)
    np.testing.assert_array_equal(f.target, esc)
    # and through the writer: 3-D kspace is stored with reconstruction_esc, as fastMRI does
    write_fastmri(tmp_path / "w.h5", kspace, esc)
    with h5py.File(tmp_path / "w.h5") as hf:
        assert "reconstruction_esc" in hf and hf["kspace"].ndim == 3
    np.testing.assert_array_equal(read_fastmri(tmp_path / "w.h5").target, esc)


def test_list_fastmri(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="expected an existing folder"):
        list_fastmri(tmp_path / "missing")
    with pytest.raises(DataError, match="found none"):
        list_fastmri(tmp_path)
    for name in ("b.h5", "a.h5"):
        _raw(tmp_path / name, kspace=np.ones((1, 2, 2), np.complex64))
    (tmp_path / "notes.txt").write_text("x")
    assert list_fastmri(tmp_path) == [tmp_path / "a.h5", tmp_path / "b.h5"]


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path of a bad file, regex its DataError must match)."""
    rng = np.random.default_rng(4)
    good = _complex(rng, (2, 2, 8, 8))
    nan = good.copy()
    nan[0, 1, 2, 3] = complex(np.nan, 0)
    inf = good.copy()
    inf[1, 0, 0, 0] = complex(0, np.inf)
    target_nan = np.ones((2, 8, 8), np.float32)
    target_nan[1, 1, 1] = np.nan
    whole = tmp_path / "whole.h5"
    write_fastmri(whole, good, np.ones((2, 8, 8)))
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    text = tmp_path / "text.h5"
    text.write_text("this is not HDF5\n")
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    return {
        "missing": (tmp_path / "missing.h5", "found nothing there"),
        "not HDF5": (text, "expected a readable HDF5 file"),
        "empty": (empty, "expected a readable HDF5 file"),
        "truncated": (truncated, "expected a readable HDF5 file"),
        "no kspace": (_raw(tmp_path / "nok.h5", image=np.ones((2, 8, 8))), "'kspace' dataset"),
        "2-D": (_raw(tmp_path / "2d.h5", kspace=good[0, 0]), r"found shape \(8, 8\)"),
        "5-D": (_raw(tmp_path / "5d.h5", kspace=good[None]), r"found shape \(1, 2, 2, 8, 8\)"),
        "real": (_raw(tmp_path / "real.h5", kspace=good.real), "complex kspace, found dtype"),
        "no slices": (_raw(tmp_path / "s0.h5", kspace=good[:0]), "at least one slice"),
        "NaN": (_raw(tmp_path / "nan.h5", kspace=nan), "finite kspace.*1 NaN and 0 Inf"),
        "Inf": (_raw(tmp_path / "inf.h5", kspace=inf), "finite kspace.*0 NaN and 1 Inf"),
        "target slices": (
            _raw(tmp_path / "ts.h5", kspace=good, reconstruction_rss=np.ones((3, 8, 8))),
            "with 2 slices like kspace, found 3",
        ),
        "target NaN": (
            _raw(tmp_path / "tn.h5", kspace=good, reconstruction_rss=target_nan),
            "finite 'reconstruction_rss'.*1 NaN",
        ),
        "target 2-D": (
            _raw(tmp_path / "t2.h5", kspace=good, reconstruction_rss=np.ones((2, 8))),
            r"shape \(S, h, w\)",
        ),
    }


def test_validation_errors_name_the_file(tmp_path: Path) -> None:
    for name, (path, pattern) in _bad_files(tmp_path).items():
        with pytest.raises(DataError, match=pattern) as info:
            read_fastmri(path)
        message = str(info.value)
        assert message.startswith(f"{path}: "), name
        assert "\n" not in message, name


def _file(kspace: np.ndarray, target: np.ndarray | None = None) -> FastMRIFile:
    return FastMRIFile(path=Path("/data/vol.h5"), kspace=kspace.astype(np.complex64), target=target)


@pytest.mark.parametrize("shape", [(20, 18), (21, 17)])  # even and odd crops
def test_prepare_volume_crops_in_image_domain(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(5)
    images = _complex(rng, (2, 3, *shape))  # (S, C, H, W)
    size = (12, 10)
    kspace, target = prepare_volume(_file(fft2c(images)), size, n_coils=3)
    top, left = (shape[0] - size[0]) // 2, (shape[1] - size[1]) // 2
    cropped = images[..., top : top + size[0], left : left + size[1]]
    assert kspace.shape == (2, 3, *size) and kspace.dtype == np.complex64
    np.testing.assert_allclose(kspace, fft2c(cropped), atol=1e-5)
    assert target.shape == (2, *size) and target.dtype == np.float32
    np.testing.assert_allclose(target, rss(cropped), rtol=1e-5)


def test_prepare_volume_keeps_a_matching_target() -> None:
    rng = np.random.default_rng(6)
    kspace = _complex(rng, (2, 2, 16, 16))
    own = rng.random((2, 8, 8)).astype(np.float32)
    _, target = prepare_volume(_file(kspace, own), (8, 8), 2)
    np.testing.assert_array_equal(target, own)
    _, target = prepare_volume(_file(kspace, own[:, :6]), (8, 8), 2)  # other shape: recomputed
    np.testing.assert_allclose(target, rss(ifft2c(kspace)[..., 4:12, 4:12]), rtol=1e-5)


def test_coil_compression_keeps_rss_energy_of_low_rank_coils() -> None:
    rng = np.random.default_rng(7)
    s, c, rank, h, w = 3, 12, 3, 16, 14
    sources = _complex(rng, (s, rank, h, w))
    mixing = _complex(rng, (c, rank))
    coils = np.einsum("cr,srhw->schw", mixing, sources)  # (S, 12, H, W), rank 3
    coils += 0.01 * _complex(rng, coils.shape)  # plus a little noise
    before = rss(coils)
    for n in (3, 4, 8):
        kspace, target = prepare_volume(_file(fft2c(coils)), (h, w), n)
        assert kspace.shape == (s, n, h, w)
        after = rss(ifft2c(kspace))
        ratio = np.sum(after**2) / np.sum(before**2)
        assert 0.99 <= ratio <= 1.0 + 1e-5, (n, ratio)
        np.testing.assert_allclose(after, before, rtol=0.05, atol=0.05 * before.max())
        np.testing.assert_allclose(target, before, rtol=1e-5)  # target before compression
    # deterministic, and the first virtual coil carries the most energy
    k1, _ = prepare_volume(_file(fft2c(coils)), (h, w), 4)
    k2, _ = prepare_volume(_file(fft2c(coils)), (h, w), 4)
    np.testing.assert_array_equal(k1, k2)
    energy = np.sum(np.abs(k1) ** 2, axis=(0, 2, 3))
    assert np.all(np.diff(energy) <= 0)


def test_prepare_volume_errors() -> None:
    f = _file(np.ones((1, 4, 10, 10)))
    with pytest.raises(
        DataError,
        match=r"^/data/vol.h5: has 4 coils; the models need multi-coil data with at least coils=8",
    ):
        prepare_volume(f, (8, 8), 8)
    with pytest.raises(DataError, match=r"^/data/vol.h5: expected images of at least 12 x 8"):
        prepare_volume(f, (12, 8), 4)


def test_mask_width_must_match_kspace_and_undersampled_files_are_refused(tmp_path: Path):
    import h5py

    from mri_ensemble.data.fastmri import prepare_volume, read_fastmri

    kspace = (np.ones((2, 3, 8, 6)) + 1j).astype(np.complex64)
    bad = tmp_path / "bad_mask.h5"
    with h5py.File(bad, "w") as f:
        f["kspace"] = kspace
        f["mask"] = np.ones(5, bool)
    with pytest.raises(DataError, match=r"bad_mask.h5: expected a mask of 6 columns .*found 5"):
        read_fastmri(bad)
    test_file = tmp_path / "test_file.h5"
    with h5py.File(test_file, "w") as f:
        f["kspace"] = kspace
        f["mask"] = np.array([0, 1, 1, 1, 0, 1], bool)
    vol = read_fastmri(test_file)
    assert vol.mask is not None and vol.mask.sum() == 4
    with pytest.raises(DataError, match=r"test_file.h5: k-space is already undersampled \(1.5x"):
        prepare_volume(vol, (8, 6), 3)
