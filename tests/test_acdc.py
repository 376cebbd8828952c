"""Tests of the ACDC reader on tiny layouts written here with nibabel."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mri_ensemble.data import acdc
from mri_ensemble.data.acdc import (
    list_patients,
    read_acdc,
    read_info_cfg,
    read_patient,
    split_patients,
)
from mri_ensemble.data.grid import normalize_intensity
from mri_ensemble.errors import ConfigError, DataError

ZOOMS = (1.5, 1.5, 10.0)
SHAPE = (24, 20, 3)  # NIfTI (x, y, z)


def _save(path: Path, data: np.ndarray, zooms: tuple[float, ...] = ZOOMS) -> None:
    img = nib.Nifti1Image(data, np.diag([*zooms[:3], 1.0]))
    img.header.set_zooms(zooms[: data.ndim])
    nib.save(img, path)


def _phantom(
    shape: tuple[int, int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Image (x, y, z) float32 and label (x, y, z) uint8 with classes 0-3 (rings about the centre)."""
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    r = np.hypot(x - shape[0] / 2, y - shape[1] / 2)
    label2d = np.select([r < 3, r < 5, r < 7], [3, 2, 1], 0).astype(np.uint8)
    label = np.repeat(label2d[:, :, None], shape[2], axis=2)
    image = 100.0 * label + rng.normal(0, 5, shape)
    return image.astype(np.float32), label


def write_patient(
    parent: Path,
    number: int,
    *,
    shape: tuple[int, int, int] = SHAPE,
    zooms: tuple[float, float, float] = ZOOMS,
    frames: tuple[int, int] = (1, 12),
    group: str = "DCM",
) -> Path:
    """Write patientNNN/ with Info.cfg, a corrupt cine 4D file and ED/ES frames with _gt."""
    name = f"patient{number:03d}"
    folder = parent / name
    folder.mkdir(parents=True)
    (folder / "Info.cfg").write_text(
        f"ED: {frames[0]}\nES: {frames[1]}\nGroup: {group}\nHeight: 184.0\nNbFrame: 30\nWeight: 95.0\n"
    )
    (folder / f"{name}_4d.nii.gz").write_bytes(b"not a nifti: must never be opened")
    rng = np.random.default_rng(number)
    for frame in frames:
        image, label = _phantom(shape, rng)
        _save(folder / f"{name}_frame{frame:02d}.nii.gz", image, zooms)
        _save(folder / f"{name}_frame{frame:02d}_gt.nii.gz", label, zooms)
    return folder


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    root = tmp_path / "acdc"
    for n in (1, 2):
        write_patient(root / "training", n)
    write_patient(root / "testing", 101, frames=(3, 7), group="NOR")
    return root


def test_reads_layout(layout: Path) -> None:
    volumes = read_acdc(layout, size=16, spacing_mm=1.5, progress=True)
    assert [v.case for v in volumes] == [
        "patient001_ED",
        "patient001_ES",
        "patient002_ED",
        "patient002_ES",
        "patient101_ED",
        "patient101_ES",
    ]
    for v in volumes:
        assert v.image.shape == v.label.shape == (3, 16, 16)
        assert v.image.dtype == np.float32 and v.label.dtype == np.uint8
        assert v.spacing == (10.0, 1.5, 1.5)
        assert 0.0 <= v.image.min() and v.image.max() <= 1.0
        assert set(np.unique(v.label)) == {0, 1, 2, 3}
    assert volumes[-1].group == "NOR" and volumes[-1].phase == "ES"
    subset = read_acdc(layout, size=16, spacing_mm=1.5, patients=["patient002"])
    assert [v.case for v in subset] == ["patient002_ED", "patient002_ES"]


def test_patient_folders_directly_under_root(tmp_path: Path) -> None:
    write_patient(tmp_path, 7)
    assert [p.name for p in list_patients(tmp_path)] == ["patient007"]


def test_cine_4d_file_never_opened(layout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_load = nib.load

    def spy(path: Path, **kwargs: object) -> object:
        opened.append(str(path))
        return real_load(path, **kwargs)

    monkeypatch.setattr(acdc.nib, "load", spy)
    read_acdc(layout, size=16, spacing_mm=1.5)
    assert len(opened) == 12 and not any("_4d" in Path(p).name for p in opened)


def test_axes_transposed_and_padded(tmp_path: Path) -> None:
    """NIfTI voxel (x, y, z) lands at (S=z, H=y + pad_h, W=x + pad_w), no resampling at 1.5 mm."""
    folder = write_patient(tmp_path, 1, shape=(10, 6, 2))
    label = np.zeros((10, 6, 2), np.uint8)
    label[2, 5, 1] = 3
    _save(folder / "patient001_frame01_gt.nii.gz", label)
    vol = read_patient(folder, size=12, spacing_mm=1.5)[0]
    assert vol.image.shape == vol.label.shape == (2, 12, 12)
    assert np.argwhere(vol.label).tolist() == [[1, 5 + 3, 2 + 1]]


def test_resampling_keeps_physical_area(tmp_path: Path) -> None:
    radius_mm, src, dst = 20.0, 1.25, 1.5
    n = 64  # 80 mm field of view
    c = (np.arange(n) + 0.5) * src - n * src / 2
    x, y = np.meshgrid(c, c, indexing="ij")
    disk = (np.hypot(x, y) < radius_mm).astype(np.uint8)
    folder = write_patient(tmp_path, 1, shape=(n, n, 1), zooms=(src, src, 8.0))
    _save(folder / "patient001_frame01_gt.nii.gz", disk[:, :, None] * 3, (src, src, 8.0))
    _save(folder / "patient001_frame01.nii.gz", disk[:, :, None] * 50.0 + 1.0, (src, src, 8.0))
    vol = read_patient(folder, size=64, spacing_mm=dst)[0]
    area = np.count_nonzero(vol.label == 3) * dst * dst
    assert area == pytest.approx(np.pi * radius_mm**2, rel=0.05)
    assert set(np.unique(vol.label)) <= {0, 3}
    bright = vol.image > 0.5
    assert (
        np.count_nonzero(bright & (vol.label == 3)) / np.count_nonzero(bright | (vol.label == 3))
        > 0.9
    )


def test_normalize_intensity() -> None:
    x = np.arange(1000, dtype=np.float64).reshape(10, 10, 10)
    y = normalize_intensity(x)
    assert y.dtype == np.float32 and y.min() == 0.0 and y.max() == 1.0
    assert np.count_nonzero(y == 0.0) == 10  # the lowest 1 %
    assert not normalize_intensity(np.full((2, 3, 3), 7.0)).any()


def test_read_info_cfg(tmp_path: Path) -> None:
    path = tmp_path / "Info.cfg"
    path.write_text("ED: 1\nES: 12\nGroup: DCM\n\nHeight: 184.0\n")
    assert read_info_cfg(path) == {"ED": "1", "ES": "12", "Group": "DCM", "Height": "184.0"}


# ---------------------------------------------------------------- errors


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope.*expected an existing folder"):
        read_acdc(tmp_path / "nope", size=16, spacing_mm=1.5)


def test_empty_root(tmp_path: Path) -> None:
    (tmp_path / "training").mkdir()
    with pytest.raises(DataError, match="expected patient folders"):
        read_acdc(tmp_path, size=16, spacing_mm=1.5)


def test_unknown_patient(layout: Path) -> None:
    with pytest.raises(DataError, match="patient999"):
        read_acdc(layout, size=16, spacing_mm=1.5, patients=["patient999"])


def test_bad_geometry_params(layout: Path) -> None:
    with pytest.raises(ConfigError, match="size"):
        read_acdc(layout, size=0, spacing_mm=1.5)
    with pytest.raises(ConfigError, match="spacing_mm"):
        read_acdc(layout, size=16, spacing_mm=-1.0)


def test_missing_info_cfg(tmp_path: Path) -> None:
    folder = write_patient(tmp_path, 1)
    (folder / "Info.cfg").unlink()
    with pytest.raises(DataError, match=r"patient001/Info\.cfg"):
        read_patient(folder, size=16, spacing_mm=1.5)


@pytest.mark.parametrize("key", ["ED", "ES"])
def test_missing_phase_key(tmp_path: Path, key: str) -> None:
    folder = write_patient(tmp_path, 1)
    lines = [ln for ln in (folder / "Info.cfg").read_text().splitlines() if not ln.startswith(key)]
    (folder / "Info.cfg").write_text("\n".join(lines))
    with pytest.raises(DataError, match=rf"Info\.cfg.*'{key}:'"):
        read_patient(folder, size=16, spacing_mm=1.5)


def test_bad_frame_number(tmp_path: Path) -> None:
    folder = write_patient(tmp_path, 1)
    (folder / "Info.cfg").write_text("ED: one\nES: 12\n")
    with pytest.raises(DataError, match=r"Info\.cfg.*integer frame number for ED.*'one'"):
        read_patient(folder, size=16, spacing_mm=1.5)


def test_missing_frame(tmp_path: Path) -> None:
    folder = write_patient(tmp_path, 1)
    (folder / "patient001_frame12.nii.gz").unlink()
    with pytest.raises(DataError, match=r"patient001_frame12\.nii\.gz.*ES frame image"):
        read_patient(folder, size=16, spacing_mm=1.5)


def test_missing_gt(tmp_path: Path) -> None:
    folder = write_patient(tmp_path, 1)
    (folder / "patient001_frame01_gt.nii.gz").unlink()
    with pytest.raises(DataError, match=r"patient001_frame01_gt\.nii\.gz.*_gt"):
        read_patient(folder, size=16, spacing_mm=1.5)


def test_truncated_nifti(tmp_path: Path) -> None:
    folder = write_patient(tmp_path, 1, shape=(64, 64, 4))
    path = folder / "patient001_frame01.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"patient001_frame01\.nii\.gz.*corrupt"):
        read_patient(folder, size=16, spacing_mm=1.5)


def test_truncated_uncompressed_nifti(tmp_path: Path) -> None:
    folder = write_patient(tmp_path, 1)
    gz = folder / "patient001_frame01_gt.nii.gz"
    raw = gzip.decompress(gz.read_bytes())
    gz.unlink()
    (folder / "patient001_frame01_gt.nii").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(DataError, match=r"patient001_frame01_gt\.nii.*corrupt"):
        read_patient(folder, size=16, spacing_mm=1.5)


@pytest.mark.parametrize("gzipped", [True, False])
def test_random_bytes_nifti(tmp_path: Path, gzipped: bool) -> None:
    folder = write_patient(tmp_path, 1)
    junk = np.random.default_rng(0).bytes(2000)
    path = folder / "patient001_frame12_gt.nii.gz"
    path.write_bytes(gzip.compress(junk) if gzipped else junk)
    with pytest.raises(DataError, match=r"patient001_frame12_gt\.nii\.gz.*corrupt"):
        read_patient(folder, size=16, spacing_mm=1.5)


def test_shape_mismatch(tmp_path: Path) -> None:
    folder = write_patient(tmp_path, 1)
    _save(folder / "patient001_frame01_gt.nii.gz", np.zeros((24, 20, 2), np.uint8))
    with pytest.raises(
        DataError, match=r"frame01_gt\.nii\.gz.*shape.*\(24, 20, 3\).*\(24, 20, 2\)"
    ):
        read_patient(folder, size=16, spacing_mm=1.5)


def test_zoom_mismatch(tmp_path: Path) -> None:
    folder = write_patient(tmp_path, 1)
    _save(folder / "patient001_frame01_gt.nii.gz", np.zeros(SHAPE, np.uint8), (1.0, 1.0, 10.0))
    with pytest.raises(DataError, match=r"frame01_gt\.nii\.gz.*voxel sizes"):
        read_patient(folder, size=16, spacing_mm=1.5)


def test_label_values_out_of_range(tmp_path: Path) -> None:
    folder = write_patient(tmp_path, 1)
    label = np.zeros(SHAPE, np.uint8)
    label[0, 0, 0], label[1, 1, 1] = 5, 7
    _save(folder / "patient001_frame12_gt.nii.gz", label)
    with pytest.raises(DataError, match=r"frame12_gt\.nii\.gz.*0-3.*values 5, 7"):
        read_patient(folder, size=16, spacing_mm=1.5)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_image(tmp_path: Path, bad: float) -> None:
    folder = write_patient(tmp_path, 1)
    image = np.ones(SHAPE, np.float32)
    image[3, 4, 1] = bad
    _save(folder / "patient001_frame01.nii.gz", image)
    with pytest.raises(DataError, match=r"frame01\.nii\.gz.*NaN or Inf"):
        read_patient(folder, size=16, spacing_mm=1.5)


def test_non_3d_image(tmp_path: Path) -> None:
    folder = write_patient(tmp_path, 1)
    _save(folder / "patient001_frame01.nii.gz", np.ones((24, 20), np.float32))
    with pytest.raises(DataError, match=r"frame01\.nii\.gz.*3D.*\(24, 20\)"):
        read_patient(folder, size=16, spacing_mm=1.5)


# ---------------------------------------------------------------- split


FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


def test_split_by_patient() -> None:
    ids = [f"patient{i:03d}" for i in range(1, 11)]
    split = split_patients(ids, FRACTIONS, seed=3)
    assert list(split) == ["train", "val", "test"]
    assert [len(v) for v in split.values()] == [6, 2, 2]
    assert sorted(sum(split.values(), [])) == ids  # disjoint and covering
    assert all(v == sorted(v) for v in split.values())
    assert split_patients(list(reversed(ids)), FRACTIONS, seed=3) == split
    assert split_patients(ids, FRACTIONS, seed=4) != split


def test_split_small_sets_non_empty() -> None:
    for n in (3, 4, 5):
        split = split_patients([f"p{i}" for i in range(n)], FRACTIONS, seed=0)
        assert all(split.values()) and sum(len(v) for v in split.values()) == n
    with pytest.raises(DataError, match="at least 3 patients"):
        split_patients(["p0", "p1"], FRACTIONS, seed=0)


@pytest.mark.parametrize("fractions", [{"train": 0.7, "val": 0.2}, {"train": 1.2, "val": -0.2}, {}])
def test_split_bad_fractions(fractions: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="fractions"):
        split_patients(["a", "b", "c"], fractions, seed=0)


def test_split_duplicate_ids() -> None:
    with pytest.raises(DataError, match="duplicates"):
        split_patients(["a", "a", "b", "c"], FRACTIONS, seed=0)
