"""Tests of the procedural ACDC-layout cardiac phantom."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mri_ensemble.data.acdc import verify_acdc
from mri_ensemble.data.phantom import (
    GROUPS,
    LV_MYO,
    REGIMES,
    draw_anatomy,
    main,
    write_acdc_phantom,
)
from mri_ensemble.errors import ConfigError, DataError

N_PATIENTS = 5  # one of each group
N_FRAMES = 8
INFO_KEYS = ["ED", "ES", "Group", "Height", "NbFrame", "Weight"]


def _info(folder: Path) -> dict[str, str]:
    lines = (folder / "Info.cfg").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines)


def _load(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    img = nib.load(path)
    return np.asarray(img.dataobj), tuple(float(z) for z in img.header.get_zooms())


def _frames(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """phase -> (image (x, y, S), labels (x, y, S))."""
    info = _info(folder)
    out = {}
    for phase in ("ED", "ES"):
        stem = folder / f"{folder.name}_frame{int(info[phase]):02d}"
        out[phase] = (_load(Path(f"{stem}.nii.gz"))[0], _load(Path(f"{stem}_gt.nii.gz"))[0])
    return out


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("acdc")
    return write_acdc_phantom(root, N_PATIENTS, seed=3, n_frames=N_FRAMES)


def test_layout_and_info(phantom: list[Path]) -> None:
    assert [f.name for f in phantom] == [f"patient{i:03d}" for i in range(1, N_PATIENTS + 1)]
    assert all(f.parent.name == "training" for f in phantom)
    groups = set()
    for folder in phantom:
        lines = (folder / "Info.cfg").read_text().splitlines()
        assert [line.split(": ")[0] for line in lines] == INFO_KEYS
        info = _info(folder)
        ed, es = int(info["ED"]), int(info["ES"])
        assert ed == 1
        assert 0.3 * N_FRAMES - 1 <= es <= 0.45 * N_FRAMES + 1 and es > ed
        assert int(info["NbFrame"]) == N_FRAMES
        assert info["Group"] in GROUPS
        groups.add(info["Group"])
        assert 140 <= float(info["Height"]) <= 200 and 40 <= float(info["Weight"]) <= 120
        assert info["Height"].endswith(".0") and info["Weight"].endswith(".0")
        name = folder.name
        expected = {
            "Info.cfg",
            f"{name}_4d.nii.gz",
            f"{name}_frame01.nii.gz",
            f"{name}_frame01_gt.nii.gz",
            f"{name}_frame{es:02d}.nii.gz",
            f"{name}_frame{es:02d}_gt.nii.gz",
        }
        assert {p.name for p in folder.iterdir()} == expected  # also: no temp files left
    assert groups == set(GROUPS)
    assert [p.name for p in phantom[0].parent.parent.iterdir()] == ["training"]


def test_nifti_geometry_and_dtypes(phantom: list[Path]) -> None:
    for folder in phantom:
        frames = _frames(folder)
        image, zooms = _load(folder / f"{folder.name}_frame01.nii.gz")
        nx, ny, n_slices = image.shape
        assert 112 <= nx <= 144 and 112 <= ny <= 144 and 7 <= n_slices <= 10
        assert 1.2 <= zooms[0] <= 1.6 and zooms[0] == zooms[1] and 8.0 <= zooms[2] <= 10.0
        assert image.dtype == np.int16 and image.min() >= 0 and 200 < image.max() < 3000
        for phase, (img, lab) in frames.items():
            assert img.shape == lab.shape == image.shape, phase
            assert lab.dtype == np.uint8
            assert set(np.unique(lab).tolist()) <= {0, 1, 2, 3}
        cine, cine_zooms = _load(folder / f"{folder.name}_4d.nii.gz")
        assert cine.shape == (nx, ny, n_slices, N_FRAMES)
        assert cine_zooms[:3] == zooms and cine_zooms[3] > 0


def test_label_content_and_volumes(phantom: list[Path]) -> None:
    present: set[int] = set()
    for folder in phantom:
        frames = _frames(folder)
        ed_lab, es_lab = frames["ED"][1], frames["ES"][1]
        present |= set(np.unique(ed_lab).tolist()) | set(np.unique(es_lab).tolist())
        slices_with_lv = int(((ed_lab == 3).sum(axis=(0, 1)) > 0).sum())
        assert slices_with_lv >= 0.6 * ed_lab.shape[2], folder.name
        ed_lv, es_lv = int((ed_lab == 3).sum()), int((es_lab == 3).sum())
        assert ed_lv > 1.2 * es_lv > 0, folder.name
        assert (ed_lab == 1).sum() > (es_lab == 1).sum() > 0, folder.name
    assert present == {0, 1, 2, 3}


def test_cine_frames_equal_frame_files(phantom: list[Path]) -> None:
    for folder in phantom:
        cine, _ = _load(folder / f"{folder.name}_4d.nii.gz")
        info = _info(folder)
        frames = _frames(folder)
        np.testing.assert_array_equal(cine[..., int(info["ED"]) - 1], frames["ED"][0])
        np.testing.assert_array_equal(cine[..., int(info["ES"]) - 1], frames["ES"][0])
        assert not np.array_equal(cine[..., 1], cine[..., 0])  # the heart moves


def _best_threshold_accuracy(bright: np.ndarray, dark: np.ndarray) -> float:
    """Best accuracy of classifying 'bright' vs 'dark' pixels with one threshold."""
    values = np.concatenate([bright, dark]).astype(float)
    is_bright = np.concatenate([np.ones(bright.size), np.zeros(dark.size)])[np.argsort(values)]
    dark_below = np.concatenate([[0], np.cumsum(1 - is_bright)])
    bright_above = is_bright.sum() - np.concatenate([[0], np.cumsum(is_bright)])
    return float(((dark_below + bright_above) / values.size).max())


def test_contrast_is_realistic_but_not_trivial(phantom: list[Path]) -> None:
    lv_all, myo_all = [], []
    for folder in phantom:
        for image, label in _frames(folder).values():
            lv, myo = image[label == 3], image[label == 2]
            assert lv.mean() > 1.4 * myo.mean(), folder.name
            assert _best_threshold_accuracy(lv, myo) < 0.99, folder.name
            lv_all.append(lv / np.median(lv))
            myo_all.append(myo / np.median(lv))
    assert _best_threshold_accuracy(np.concatenate(lv_all), np.concatenate(myo_all)) < 0.99


def test_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    a = write_acdc_phantom(tmp_path / "a", 2, seed=7, n_frames=4)
    b = write_acdc_phantom(tmp_path / "b", 2, seed=7, n_frames=4)
    c = write_acdc_phantom(tmp_path / "c", 2, seed=8, n_frames=4)
    for fa, fb, fc in zip(a, b, c, strict=True):
        for path in sorted(fa.iterdir()):
            assert path.read_bytes() == (fb / path.name).read_bytes(), path.name
        ea, eb = _frames(fa)["ED"][0], _frames(fc)["ED"][0]
        assert ea.shape != eb.shape or not np.array_equal(ea, eb)


def test_patient_depends_only_on_seed_and_id(tmp_path: Path) -> None:
    """Patient 2 is the same whether written alone, in a batch, or without the cine."""
    batch = write_acdc_phantom(tmp_path / "batch", 2, seed=1, n_frames=4)
    alone = write_acdc_phantom(
        tmp_path / "alone", 1, seed=1, first_id=2, n_frames=4, write_4d=False
    )
    assert alone[0].name == "patient002"
    names = {p.name for p in alone[0].iterdir()}
    assert names == {p.name for p in batch[1].iterdir()} - {"patient002_4d.nii.gz"}
    for name in names:
        assert (alone[0] / name).read_bytes() == (batch[1] / name).read_bytes(), name


def test_rewrite_replaces_folder(tmp_path: Path) -> None:
    (tmp_path / "training" / "patient001").mkdir(parents=True)
    (tmp_path / "training" / "patient001" / "stale.txt").write_text("old")
    (folder,) = write_acdc_phantom(tmp_path, 1, seed=0, n_frames=3, write_4d=False)
    assert "stale.txt" not in {p.name for p in folder.iterdir()}
    assert sorted(p.name for p in (tmp_path / "training").iterdir()) == ["patient001"]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"n_patients": -1}, "n_patients"),
        ({"seed": -3}, "seed"),
        ({"first_id": 0}, "first_id"),
        ({"n_frames": 1}, "n_frames"),
        ({"first_id": 999, "n_patients": 2}, "999"),
    ],
)
def test_bad_arguments_raise_config_error(tmp_path: Path, kwargs: dict, key: str) -> None:
    args = {"n_patients": 1, "seed": 0} | kwargs
    with pytest.raises(ConfigError, match=key):
        write_acdc_phantom(tmp_path, **args)


def test_unwritable_root_names_the_file(tmp_path: Path) -> None:
    blocker = tmp_path / "root"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(DataError, match="patient001"):
        write_acdc_phantom(blocker, 1, seed=0, n_frames=2, write_4d=False)


# sha256 of the decoded arrays, zooms and Info.cfg of patients 4-5 (seed 3, 4 frames), as the
# phantom wrote them before regimes existed: "default" must keep the training phantom
DEFAULT_DIGEST = "da5313c08b6eb55156ef51effa16a395b7d83bacb7de70960ab664cf789d38ba"


def _digest(folders: list[Path]) -> str:
    h = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.iterdir()):
            h.update(path.name.encode())
            if path.name.endswith(".nii.gz"):
                img = nib.load(path)
                h.update(np.ascontiguousarray(np.asarray(img.dataobj)).tobytes())
                h.update(str(img.header.get_zooms()).encode())
            else:
                h.update(path.read_bytes())
    return h.hexdigest()


def test_default_regime_is_unchanged(tmp_path: Path) -> None:
    plain = write_acdc_phantom(tmp_path / "plain", 2, seed=3, first_id=4, n_frames=4)
    named = write_acdc_phantom(
        tmp_path / "named", 2, seed=3, first_id=4, n_frames=4, regime="default"
    )
    for fp, fn in zip(plain, named, strict=True):
        for path in sorted(fp.iterdir()):
            assert path.read_bytes() == (fn / path.name).read_bytes(), path.name
    assert _digest(plain) == DEFAULT_DIGEST
    assert draw_anatomy(3, 4, 4) == draw_anatomy(3, 4, 4, "default")


def test_shifted_regime_changes_acquisition_only(tmp_path: Path) -> None:
    assert REGIMES == ("default", "shifted")
    n = len(GROUPS)
    default = write_acdc_phantom(tmp_path / "d", n, seed=5, first_id=900, n_frames=4)
    shifted = write_acdc_phantom(
        tmp_path / "s", n, seed=5, first_id=900, n_frames=4, regime="shifted"
    )
    for fd, fs in zip(default, shifted, strict=True):
        assert {p.name for p in fd.iterdir()} == {p.name for p in fs.iterdir()}
        assert (fd / "Info.cfg").read_bytes() == (fs / "Info.cfg").read_bytes()
        frames_d, frames_s = _frames(fd), _frames(fs)
        for phase in ("ED", "ES"):
            (img_d, lab_d), (img_s, lab_s) = frames_d[phase], frames_s[phase]
            np.testing.assert_array_equal(lab_d, lab_s)  # the same anatomy ...
            assert img_d.shape == img_s.shape and not np.array_equal(img_d, img_s)
            # ... with a blood / myocardium contrast lower than any default patient's
            ratio_d = np.median(img_d[lab_d == 2]) / np.median(img_d[lab_d == 3])
            ratio_s = np.median(img_s[lab_s == 2]) / np.median(img_s[lab_s == 3])
            assert ratio_s > ratio_d and ratio_s > 0.45, (fs.name, phase)
    vols = verify_acdc(tmp_path / "s", size=96, spacing_mm=1.6)  # the ACDC reader takes it
    assert sorted(vols) == [f.name for f in shifted]
    for pid in range(900, 900 + n):
        a, b = draw_anatomy(5, pid, 4), draw_anatomy(5, pid, 4, "shifted")
        changed = {"intensities", "noise", "blur", "bias", "bias_clip"}
        for field in a.__dataclass_fields__:
            if field not in changed:
                assert getattr(a, field) == getattr(b, field), field
        assert 0.03 <= a.noise <= 0.08 and 0.10 <= b.noise <= 0.15
        assert 0.5 <= a.blur <= 0.9 and 1.0 <= b.blur <= 1.4
        assert a.bias_clip == 0.4 and b.bias_clip == 0.8
        assert 0.22 <= a.intensities[LV_MYO] <= 0.45 <= b.intensities[LV_MYO] <= 0.6
        ia, ib = np.asarray(a.intensities), np.asarray(b.intensities)
        k = ib[LV_MYO] / ia[LV_MYO]
        np.testing.assert_allclose(ib[ib != ia], k * ia[ib != ia])  # myo tissues scale as one
        assert (ib != ia).sum() == 4  # muscle, LV myocardium, RV wall, papillary muscles


def test_shifted_regime_is_deterministic(tmp_path: Path) -> None:
    a = write_acdc_phantom(tmp_path / "a", 1, seed=2, n_frames=3, regime="shifted")
    b = write_acdc_phantom(tmp_path / "b", 1, seed=2, n_frames=3, write_4d=False, regime="shifted")
    for path in sorted(b[0].iterdir()):
        assert path.read_bytes() == (a[0] / path.name).read_bytes(), path.name


@pytest.mark.parametrize("regime", ["Shifted", "", None, 1])
def test_bad_regime_raises_config_error(tmp_path: Path, regime: object) -> None:
    with pytest.raises(ConfigError, match="regime: expected one of default, shifted"):
        write_acdc_phantom(tmp_path, 1, seed=0, regime=regime)  # type: ignore[arg-type]
    assert not (tmp_path / "training").exists()  # nothing written
    with pytest.raises(ConfigError, match="regime"):
        draw_anatomy(0, 1, 4, regime)  # type: ignore[arg-type]


def test_cli_writes_the_shifted_regime(tmp_path: Path) -> None:
    main([str(tmp_path / "cli"), "--patients", "1", "--seed", "4", "--regime", "shifted"])
    ref = write_acdc_phantom(tmp_path / "ref", 1, seed=4, regime="shifted")
    for path in sorted(ref[0].iterdir()):
        cli = tmp_path / "cli" / "training" / "patient001" / path.name
        assert cli.read_bytes() == path.read_bytes(), path.name
    with pytest.raises(SystemExit):
        main([str(tmp_path / "bad"), "--regime", "other"])
