"""The browser UI in a real browser: Debian's headless Chromium driven by Playwright.

The app runs on a free port in a background thread over a tiny project folder (untrained
checkpoints, see tiny_project.py). No browser is downloaded: Playwright starts the system
``chromium`` (``apt-get install chromium``); without it the tests fail under CI and skip
elsewhere. Every request to anything but the app is blocked and recorded: the page must
need no network.
"""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np
import pytest
from tiny_project import fastmri_file, make_project, phantom_nifti

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
# gradio reads its upload/cache folder both at import and at call time: set it once
_GRADIO_TMP = tempfile.TemporaryDirectory(prefix="mri-ensemble-test-gradio-")
os.environ.setdefault("GRADIO_TEMP_DIR", _GRADIO_TMP.name)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MISSING = "headless Chromium is missing: install Debian's package with `apt-get install chromium`"
TIMEOUT_MS = 60_000
pytestmark = [  # gradio 6.31's queue still uses pandas options that pandas 3 deprecates
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


def _require_browser() -> None:
    problem = None
    if CHROMIUM is None:
        problem = MISSING
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "playwright is not installed (pip install playwright==1.65.2)"
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        yield b
        b.close()


def _serve(root: Path) -> Any:
    from mri_ensemble.app import launch

    return launch(root, _free_port(), block=False)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_project(tmp_path_factory.mktemp("project"))
    phantom_nifti(root)
    fastmri_file(root)
    return root


@pytest.fixture(scope="module")
def app(project: Path, browser: Any) -> Iterator[Any]:
    demo = _serve(project)
    yield demo
    demo.close()


def _open(browser: Any, url: str) -> tuple[Any, list[str]]:
    """A fresh page at ``url`` that may only talk to the app; returns (page, blocked urls)."""
    page = browser.new_page(accept_downloads=True)
    page.set_default_timeout(TIMEOUT_MS)
    blocked: list[str] = []

    def route(r: Any) -> None:
        if r.request.url.startswith(url):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.goto(url, wait_until="load")
    return page, blocked


def _upload(page: Any, prefix: str, path: Path) -> None:
    page.locator(f"#{prefix}-input input[type=file]").set_input_files(str(path))
    page.locator(f"#{prefix}-input").get_by_text(path.name).wait_for()  # upload finished


def test_segment_a_phantom_volume_and_download_the_labels(app: Any, browser: Any, project: Path):
    page, blocked = _open(browser, app.local_url)
    page.locator("#seg-status").get_by_text("Trained segmentation models: small, unet").wait_for()
    scan = project / "scan.nii.gz"
    _upload(page, "seg", scan)
    page.locator("#seg-run").click()
    page.locator("#seg-legend li").first.wait_for()
    legend = page.locator("#seg-legend").inner_text()
    for name in ("RV", "myocardium", "LV"):
        assert name in legend
    assert "mL" in legend  # class volumes from the voxel size
    overlay = page.locator("#seg-overlay img")
    overlay.wait_for()
    assert overlay.evaluate("img => img.complete && img.naturalWidth > 0")
    message = page.locator("#seg-message").inner_text()
    assert "ensemble" in message and "Traceback" not in page.content()
    assert page.locator("#seg-slice").is_visible()
    first = overlay.get_attribute("src")
    page.locator("#seg-slice input[type=range]").fill("0")  # the slider shows another slice
    page.wait_for_function(
        "src => document.querySelector('#seg-overlay img').getAttribute('src') !== src", arg=first
    )
    labels_view = overlay.get_attribute("src")
    page.locator("#seg-uncertainty input[type=checkbox]").check()  # the uncertainty overlay
    page.locator("#seg-legend .uncertainty-note").wait_for()
    assert "predictive entropy" in page.locator("#seg-legend").inner_text()
    page.wait_for_function(
        "src => document.querySelector('#seg-overlay img').getAttribute('src') !== src",
        arg=labels_view,
    )

    with page.expect_download() as info:
        page.locator("#seg-download").click()
    download = info.value
    assert download.suggested_filename == "scan_labels.nii.gz"
    out = Path(download.path())
    labels = nib.Nifti1Image.from_bytes(gzip.decompress(out.read_bytes()))
    src = nib.load(scan)
    assert labels.shape == src.shape
    assert np.array_equal(labels.affine, src.affine)
    values = np.unique(np.asarray(labels.dataobj))
    assert set(values.tolist()) <= {0, 1, 2, 3}
    assert blocked == []
    page.close()


def test_wrong_file_type_and_corrupt_file_messages(
    app: Any, browser: Any, tmp_path: Path, project: Path
):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    corrupt = tmp_path / "broken.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00garbage")
    expected = {
        ("seg", notes): "notes.txt: wrong file type (.txt); expected a NIfTI volume",
        ("seg", corrupt): "broken.nii.gz: expected a readable NIfTI file, found a corrupt one",
        ("rec", project / "scan.nii.gz"): "scan.nii.gz: wrong file type for reconstruction",
    }
    for (prefix, path), text in expected.items():
        page, _ = _open(browser, app.local_url)
        if prefix == "rec":
            page.get_by_role("tab", name="Reconstruction").click()
        _upload(page, prefix, path)
        page.locator(f"#{prefix}-run").click()
        page.locator(f"#{prefix}-message").get_by_text("Error:").wait_for()
        message = page.locator(f"#{prefix}-message").inner_text()
        assert text in message and "Traceback" not in message
        assert str(tmp_path) not in message  # the upload's folder is left out
        assert not page.locator(f"#{prefix}-download").is_visible()
        page.close()


def test_reconstruct_a_fastmri_file(app: Any, browser: Any, project: Path):
    page, blocked = _open(browser, app.local_url)
    page.get_by_role("tab", name="Reconstruction").click()
    _upload(page, "rec", project / "file_brain_AXT1_tiny.h5")
    page.locator("#rec-run").click()
    page.locator("#rec-message").get_by_text("Reconstructed").wait_for()
    for elem in ("rec-zero", "rec-recon", "rec-target", "rec-error"):
        img = page.locator(f"#{elem} img")
        img.wait_for()
        assert img.evaluate("img => img.complete && img.naturalWidth > 0")
    assert "SSIM" in page.locator("#rec-message").inner_text()
    with page.expect_download() as info:
        page.locator("#rec-download").click()
    with h5py.File(info.value.path(), "r") as hf:
        assert hf["reconstruction"].shape == (2, 32, 24)
        assert hf.attrs["model"] == "ensemble"
    assert blocked == []
    page.close()


def test_no_trained_models_yet(browser: Any, tmp_path: Path):
    root = make_project(tmp_path / "empty", trained=False)
    phantom = phantom_nifti(tmp_path)
    demo = _serve(root)
    try:
        page, _ = _open(browser, demo.local_url)
        status = page.locator("#seg-status")
        status.get_by_text("No trained segmentation models yet").wait_for()
        assert "make run" in status.inner_text()
        _upload(page, "seg", phantom)
        page.locator("#seg-run").click()
        page.locator("#seg-message").get_by_text("Error:").wait_for()
        message = page.locator("#seg-message").inner_text()
        assert "no trained segmentation models yet" in message and "make run" in message
        page.close()
    finally:
        demo.close()
