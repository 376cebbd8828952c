"""Shifted test sets: naming, contrast groups, the stratified split and the report's table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mri_ensemble.data.acdc import split_patients
from mri_ensemble.data.ingest import stratified_split
from mri_ensemble.data.prepared import scored_splits, shifted_names
from mri_ensemble.data.prepared_recon import contrast_group, contrast_groups
from stages.report import shifted_block


@pytest.mark.parametrize(
    ("case", "group"),
    [
        ("file_brain_AXT2_200_6002217", "T2"),  # a real fastMRI brain file
        ("file_brain_AXT1POST_201_6002725", "T1POST"),
        ("file_brain_COFLAIR_sim_004", "FLAIR"),
        ("file_brain_SAPD_sim_040", "PD"),
        ("file_brain_AXT1_sim_003~flip", "T1"),  # augmented copies keep their group
        ("file1000001", "all"),  # knee: no contrast in the name
        ("patient007", "all"),
    ],
)
def test_contrast_group_of_fastmri_names(case: str, group: str) -> None:
    assert contrast_group(case) == group


def test_contrast_groups_per_slice() -> None:
    case = np.array(["file_brain_AXT1_sim_000"] * 2 + ["file_brain_COT2_sim_001"])
    assert contrast_groups(case).tolist() == ["T1", "T1", "T2"]


def test_stratified_split_puts_every_group_in_every_split() -> None:
    names = [f"file_brain_AX{('T1', 'T2', 'PD')[i % 3]}_sim_{i:03d}" for i in range(30)]
    fractions = {"train": 0.5, "val": 0.3, "test": 0.2}
    split = stratified_split(names, fractions, 42, contrast_group)
    assert sorted(n for v in split.values() for n in v) == sorted(names)  # a partition
    for members in split.values():
        groups = [contrast_group(n) for n in members]
        assert sorted(set(groups)) == ["PD", "T1", "T2"]
    counts = {
        k: {g: sum(contrast_group(n) == g for n in v) for g in ("T1", "T2", "PD")}
        for k, v in split.items()
    }
    assert counts == {
        k: dict.fromkeys(("T1", "T2", "PD"), n) for k, n in (("train", 5), ("val", 3), ("test", 2))
    }
    assert split == stratified_split(names, fractions, 42, contrast_group)  # seeded


def test_stratified_split_with_one_group_is_the_plain_split() -> None:
    names = [f"case{i}" for i in range(10)]
    fractions = {"train": 0.6, "val": 0.2, "test": 0.2}
    assert stratified_split(names, fractions, 1, contrast_group) == split_patients(
        names, fractions, 1
    )


def test_scored_splits_find_the_shifted_sets(tmp_path: Path) -> None:
    for name in ("train", "val", "test", "shift_coils", "shift_contrast"):
        (tmp_path / f"{name}.h5").write_bytes(b"")
    assert shifted_names(tmp_path) == ["coils", "contrast"]
    assert scored_splits(tmp_path) == ["val", "test", "shift_coils", "shift_contrast"]
    assert scored_splits(tmp_path / "missing") == ["val", "test"]


def _metrics(all_below: bool = False) -> dict:
    def s(x: float) -> dict:
        return {"ssim": x}

    return {
        "models": {
            "a": {"val": s(0.9), "test": s(0.88), "shift_coils": s(0.70)},
            "b": {"val": s(0.8), "test": s(0.80), "shift_coils": s(0.75)},
        },
        "ensemble": {
            "method": "m/worst_group",
            "val": s(0.9),
            "test": s(0.87),
            "shift_coils": s(0.74),
        },
        "methods": {
            "m/worst_group": {"val": s(0.9), "test": s(0.87), "shift_coils": s(0.74)},
            "mean": {"val": s(0.85), "test": s(0.84), "shift_coils": s(0.73)},
        },
        "baselines": {"zero_filled": {"val": s(0.6), "test": s(0.61), "shift_coils": s(0.55)}},
        "guard": {"baseline": "zero_filled", "dropped": {"b": ["T1"]}, "all_below": all_below},
    }


def test_shifted_block_lists_every_row_beside_test() -> None:
    text = "\n".join(shifted_block("reconstruction", _metrics()))
    assert "| | test (in distribution) | coils (shifted) |" in text
    assert "| a | 0.8800 | 0.7000 |" in text and "| b | 0.8000 | 0.7500 |" in text
    assert "| **m/worst_group** (shipped) | 0.8700 | 0.7400 |" in text
    assert "| ensemble: mean | 0.8400 | 0.7300 |" in text
    assert "| zero-filled baseline | 0.6100 | 0.5500 |" in text
    assert "b scored below zero-filled on val group(s) T1 and was given weight 0" in text
    # best single on val is a: the ensemble is -0.01 on test and +0.04 on coils
    assert "at worst -0.0100 SSIM from the best single model on val (a)" in text


def test_shifted_block_says_when_no_member_passes_the_guard() -> None:
    text = "\n".join(shifted_block("reconstruction", _metrics(all_below=True)))
    assert "not fit to deploy" in text


def test_no_shifted_sets_no_block() -> None:
    m = _metrics()
    for d in (m["ensemble"], *m["models"].values(), *m["methods"].values()):
        d.pop("shift_coils")
    assert shifted_block("reconstruction", m) == []
