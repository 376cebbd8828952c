"""The generic image/mask folder source and binary segmentation mode, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mri_ensemble.data.folder import labels_from_mask, list_pairs, read_folder
from mri_ensemble.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def write_pet_like(root: Path, n: int = 8, size: int = 40, layout: str = "masks") -> Path:
    """RGB JPEG/PNG 'pets' (bright discs) with Oxford-IIIT Pet trimaps (1 fg, 2 bg, 3 edge)."""
    rng = np.random.default_rng(0)
    img_dir = root / "images"
    mask_dir = root / ("masks" if layout == "masks" else "annotations/trimaps")
    img_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx, r = rng.uniform(12, 28), rng.uniform(12, 28), rng.uniform(6, 10)
        d = np.hypot(yy - cy, xx - cx)
        trimap = np.where(d < r - 1, 1, np.where(d < r + 1, 3, 2)).astype(np.uint8)
        rgb = np.stack([(d < r) * 180 + 40, (d < r) * 90 + 60, np.full_like(d, 80)], -1)
        rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
        suffix = ".jpg" if i % 2 else ".png"
        Image.fromarray(rgb).save(img_dir / f"pet_{i:02d}{suffix}")
        Image.fromarray(trimap).save(mask_dir / f"pet_{i:02d}.png")
    return root


def test_trimap_and_binary_conventions():
    trimap = np.array([[1, 2], [3, 2]], np.uint8)
    np.testing.assert_array_equal(
        labels_from_mask(trimap, "trimap", Path("m"), 2), [[1, 0], [1, 0]]
    )
    np.testing.assert_array_equal(
        labels_from_mask(np.array([[0, 255]]), "binary", Path("m"), 2), [[0, 1]]
    )
    with pytest.raises(DataError, match=r"m: expected trimap values 1, 2, 3, found \[0\]"):
        labels_from_mask(np.array([[0, 1]]), "trimap", Path("m"), 2)
    with pytest.raises(DataError, match="expected labels 0..2, found max 5"):
        labels_from_mask(np.array([[0, 5]]), "labels", Path("m"), 3)


@pytest.mark.parametrize("layout", ["masks", "pet"])
def test_reads_both_layouts_aligned_and_normalised(tmp_path, layout):
    root = write_pet_like(tmp_path / "d", layout=layout)
    names = [name for name, _, _ in list_pairs(root)]
    assert names == [f"pet_{i:02d}" for i in range(8)]
    vols = read_folder(root, names, size=32, mask_mode="trimap")
    for v in vols:
        assert v.image.shape == v.label.shape == (1, 32, 32)
        assert 0 <= v.image.min() and v.image.max() <= 1
        assert set(np.unique(v.label)) <= {0, 1}
        # the bright disc is the foreground: aligned after resizing
        assert v.image[v.label == 1].mean() > v.image[v.label == 0].mean() + 0.3


def test_folder_errors_name_the_file(tmp_path):
    root = write_pet_like(tmp_path / "d", n=3)
    (root / "masks" / "pet_01.png").unlink()
    with pytest.raises(DataError, match=r"pet_01.jpg: no mask .*pet_01.png"):
        list_pairs(root)
    root = write_pet_like(tmp_path / "e", n=2)
    (root / "images" / "pet_00.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"pet_00.png: not a readable image"):
        read_folder(root, ["pet_00"], size=16, mask_mode="trimap")
    with pytest.raises(ConfigError, match="mask_mode 'x' unknown"):
        read_folder(root, ["pet_01"], size=16, mask_mode="x")
    with pytest.raises(DataError, match="expected images/ and masks/"):
        list_pairs(tmp_path)


def stage(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MRI_ENSEMBLE_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_binary_mode_runs_ingest_to_evaluate_on_a_pet_folder(tmp_path):
    """source: folder + loss bce: one output channel, sigmoid probabilities as 2 classes."""
    write_pet_like(tmp_path / "pets", n=10)
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["ingest"]["segmentation"] = {
        "source": "folder",
        "path": str(tmp_path / "pets"),
        "mask_mode": "trimap",
        "size": 32,
        "split": {"train": 0.6, "val": 0.2, "test": 0.2},
    }
    p["train"] = {
        "segmentation-unet": {
            "task": "segmentation",
            "model": "unet",
            "arch": "unet",
            "net": {"features": [4, 8, 16]},
            "loss": "bce",
            "optim": {"epochs": 2, "batch_size": 4},
        }
    }
    p["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    stage(tmp_path, "stages.ingest", "--task", "segmentation", "--out", "prep")
    split = json.loads((tmp_path / "prep" / "split.json").read_text())
    assert set(split["train_class_frequencies"]) == {"background", "foreground"}
    stage(tmp_path, "stages.augment", "--task", "segmentation",
          "--train", "prep/train.h5", "--out", "aug/train.h5")  # fmt: skip
    stage(tmp_path, "stages.train", "--name", "segmentation-unet", "--train", "aug/train.h5",
          "--val", "prep/val.h5", "--out", "models/unet", "--history", "hist.csv")  # fmt: skip
    from mri_ensemble.train import load_checkpoint

    assert load_checkpoint(tmp_path / "models/unet/best.pt")["spec"]["out_channels"] == 1
    stage(tmp_path, "stages.evaluate", "--name", "segmentation-unet",
          "--checkpoint", "models/unet/best.pt", "--data", "prep", "--out", "pred")  # fmt: skip
    metrics = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert set(metrics["test"]["per_class"]) == {"foreground"}
    from mri_ensemble.data.predictions import read_probabilities

    probs, _ = read_probabilities(tmp_path / "pred" / "test.h5")
    assert probs.shape[1] == 2
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-3)  # float16 storage
