"""Tests of the prepared segmentation HDF5 contract."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mri_ensemble.data.acdc import Volume
from mri_ensemble.data.prepared import (
    SegmentationSet,
    SliceDataset,
    class_frequencies,
    read_segmentation_h5,
    write_segmentation_arrays,
    write_segmentation_h5,
)
from mri_ensemble.errors import DataError

ATTRS = {
    "source": "phantom",
    "size": 8,
    "spacing_mm": 1.5,
    "seed": 0,
    "flag": True,
    "class_names": ["background", "RV", "myocardium", "LV"],
    "fractions": {"train": 0.6, "val": 0.2, "test": 0.2},
}


def _volume(patient: str, phase: str, slices: int, seed: int) -> Volume:
    rng = np.random.default_rng(seed)
    return Volume(
        case=f"{patient}_{phase}",
        patient=patient,
        phase=phase,
        image=rng.random((slices, 8, 8), dtype=np.float32),
        label=rng.integers(0, 4, (slices, 8, 8), dtype=np.uint8),
        spacing=(10.0, 1.5, 1.5),
        group="DCM",
    )


def _write_arrays(path: Path, n: int = 4, **overrides: np.ndarray) -> None:
    """Write a raw HDF5 file (not through the module) for the validation tests."""
    arrays = {
        "image": np.zeros((n, 8, 8), np.float32),
        "label": np.zeros((n, 8, 8), np.uint8),
        "case": np.array([f"c{i}" for i in range(n)], dtype=object),
    }
    arrays.update(overrides)
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            if value is None:
                continue
            dtype = h5py.string_dtype() if value.dtype == object else None
            f.create_dataset(key, data=value, dtype=dtype)


def test_round_trip(tmp_path: Path) -> None:
    volumes = [_volume("patient001", "ED", 3, 0), _volume("patient002", "ES", 2, 1)]
    path = tmp_path / "prepared" / "train.h5"
    write_segmentation_h5(path, volumes, ATTRS)
    data = read_segmentation_h5(path)
    assert len(data) == 5
    assert data.image.dtype == np.float32 and data.image.shape == (5, 8, 8)
    assert data.label.dtype == np.uint8 and data.label.shape == (5, 8, 8)
    np.testing.assert_array_equal(data.image, np.concatenate([v.image for v in volumes]))
    np.testing.assert_array_equal(data.label, np.concatenate([v.label for v in volumes]))
    assert data.case.tolist() == ["patient001_ED"] * 3 + ["patient002_ES"] * 2
    assert data.slice_index is not None and data.slice_index.tolist() == [0, 1, 2, 0, 1]
    assert data.spacing is not None and data.spacing.shape == (5, 3)
    np.testing.assert_allclose(data.spacing[0], (10.0, 1.5, 1.5))
    assert data.attrs == ATTRS
    assert [p.name for p in path.parent.iterdir()] == ["train.h5"]  # no temporary left over
    with h5py.File(path) as f:
        assert f["image"].chunks == (1, 8, 8) and f["image"].compression == "gzip"


def test_arrays_round_trip_without_optional(tmp_path: Path) -> None:
    path = tmp_path / "aug.h5"
    image = np.ones((2, 4, 6), np.float32)
    label = np.full((2, 4, 6), 2, np.uint8)
    write_segmentation_arrays(path, image, label, np.array(["a", "ü"]), {"seed": 3})
    data = read_segmentation_h5(path)
    assert data.case.tolist() == ["a", "ü"] and data.attrs == {"seed": 3}
    assert data.slice_index is None and data.spacing is None


def test_writer_rejects_inconsistent_arrays(tmp_path: Path) -> None:
    image = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="label"):
        write_segmentation_arrays(
            tmp_path / "x.h5", image, np.zeros((2, 4, 5), np.uint8), ["a", "b"], {}
        )
    with pytest.raises(ValueError, match="case"):
        write_segmentation_arrays(
            tmp_path / "x.h5", image, np.zeros((2, 4, 4), np.uint8), ["a"], {}
        )
    assert not (tmp_path / "x.h5").exists()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.h5.*found nothing"):
        read_segmentation_h5(tmp_path / "nope.h5")


@pytest.mark.parametrize("content", [b"", b"garbage" * 100])
def test_not_hdf5(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.h5"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"bad\.h5.*expected an HDF5 file"):
        read_segmentation_h5(path)


def test_truncated_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "cut.h5"
    rng = np.random.default_rng(0)
    write_segmentation_arrays(
        path,
        rng.random((50, 32, 32), dtype=np.float32),
        np.zeros((50, 32, 32), np.uint8),
        ["a"] * 50,
        {},
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.h5"):
        read_segmentation_h5(path)


@pytest.mark.parametrize("key", ["image", "label", "case"])
def test_missing_dataset(tmp_path: Path, key: str) -> None:
    path = tmp_path / "part.h5"
    _write_arrays(path, **{key: None})
    with pytest.raises(DataError, match=rf"part\.h5.*dataset '{key}'"):
        read_segmentation_h5(path)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("label", np.zeros((4, 8, 7), np.uint8), "'label' of shape"),
        ("case", np.array(["a", "b"], dtype=object), "'case' of shape"),
        ("image", np.zeros((4, 8), np.float32), "'image' of shape"),
        ("spacing", np.zeros((4, 2), np.float32), "'spacing' of shape"),
        ("label", np.zeros((4, 8, 8), np.float32), "integer 'label'"),
    ],
)
def test_shape_and_dtype_checks(tmp_path: Path, key: str, value: np.ndarray, match: str) -> None:
    path = tmp_path / "bad.h5"
    _write_arrays(path, **{key: value})
    with pytest.raises(DataError, match=rf"bad\.h5.*{match}"):
        read_segmentation_h5(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_image(tmp_path: Path, bad: float) -> None:
    image = np.zeros((4, 8, 8), np.float32)
    image[2, 3, 3] = bad
    path = tmp_path / "nan.h5"
    _write_arrays(path, image=image)
    with pytest.raises(DataError, match=r"nan\.h5.*NaN or Inf"):
        read_segmentation_h5(path)


def test_slice_dataset(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    write_segmentation_h5(path, [_volume("patient001", "ED", 3, 0)], ATTRS)
    data = read_segmentation_h5(path)
    ds = SliceDataset(data)
    assert len(ds) == 3
    image, label = ds[1]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    assert label.shape == (8, 8) and label.dtype == torch.int64
    assert torch.equal(label, torch.from_numpy(data.label[1].astype(np.int64)))
    image.zero_()  # items are copies: the dataset is unchanged
    assert data.image[1].any()
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch[0].shape == (2, 1, 8, 8) and batch[1].shape == (2, 8, 8)


def test_class_frequencies() -> None:
    label = np.array([[0, 0, 1], [3, 3, 3]], np.uint8)
    np.testing.assert_allclose(class_frequencies(label, 4), [2 / 6, 1 / 6, 0.0, 3 / 6])
    with pytest.raises(DataError, match=r"values \[3\]"):
        class_frequencies(label, 3)


def test_segmentation_set_len() -> None:
    s = SegmentationSet(
        np.zeros((2, 3, 3), np.float32), np.zeros((2, 3, 3), np.uint8), np.array(["a", "b"]), {}
    )
    assert len(s) == 2
