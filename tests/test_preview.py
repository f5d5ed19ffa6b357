"""Tests of the preview gallery, including rendering it in a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from common_utils import cli, photo
from PIL import Image

from gpu_kquant.preview import PAGE_SIZE, Gallery

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def render_in_browser(page: Path, tmp_path: Path) -> str:
    """The page's DOM after Chromium (headless) loaded it and ran its scripts."""
    profile = tmp_path / "chrome-profile"
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--allow-file-access-from-files",
        "--virtual-time-budget=10000",
        "--dump-dom",
        page.as_uri(),
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture
def previewed(tmp_path: Path) -> Path:
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(photo("chelsea")).save(src / "cat.png")
    Image.fromarray(photo("coffee")).save(src / "sub" / "coffee.jpg")
    rgba = np.dstack([photo("astronaut")[:200, :200], np.tile(np.linspace(0, 255, 200, dtype=np.uint8), (200, 1))])
    Image.fromarray(rgba).save(src / "sub" / "alpha.png")
    out = tmp_path / "out"
    result = cli(src, "-k", 16, "-o", out, "--preview", "--quiet")
    assert result.returncode == 0, result.stderr
    return out / "preview"


def test_gallery_files(previewed: Path) -> None:
    page = (previewed / "index.html").read_text()
    thumbs = re.findall(r'<img src="([^"]+)"', page)
    assert len(thumbs) == 6  # original and quantized for each of the three images
    assert all((previewed / t).exists() for t in thumbs)
    assert page.count('class="swatches"') == 3 and "PSNR" in page and "KB" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_gallery_renders_in_a_browser(previewed: Path, tmp_path: Path) -> None:
    dom = render_in_browser(previewed / "index.html", tmp_path)
    states = re.findall(r"<img [^>]*data-loaded=\"(\w+)\"", dom)
    assert states == ["ok"] * 6, states


def test_resumed_run_keeps_every_entry(previewed: Path) -> None:
    out = previewed.parent
    src = out.parent / "in"
    result = cli(src, "-k", 16, "-o", out, "--preview", "--quiet")
    assert result.returncode == 0 and "3 skipped" in result.stderr
    assert (previewed / "index.html").read_text().count('class="card"') == 3


def test_pages_for_large_folders(tmp_path: Path) -> None:
    gallery = Gallery(tmp_path)
    for i in range(2 * PAGE_SIZE + 5):
        gallery.add({"input": f"{i:05d}.png", "original": "a.jpg", "quantized": "b.jpg", "palette": ["#000000"]})
    gallery.render()
    pages = sorted(p.name for p in tmp_path.glob("index*.html"))
    assert pages == ["index-2.html", "index-3.html", "index.html"]
    assert (tmp_path / "index-3.html").read_text().count('class="card"') == 5
    assert 'href="index-3.html"' in (tmp_path / "index.html").read_text()


def test_single_file_gets_a_side_by_side_png(tmp_path: Path) -> None:
    src = tmp_path / "cat.png"
    Image.fromarray(photo("chelsea")).save(src)
    result = cli(src, "-k", 8, "--preview", "--quiet")
    assert result.returncode == 0, result.stderr
    side = tmp_path / "cat_k8.preview.png"
    img = Image.open(side)
    assert img.size == (2 * 451 + 8, 300)


def test_inputs_with_one_name_get_their_own_thumbnails(tmp_path: Path) -> None:
    # d1/img.png and d2/img.png share a task key; their thumbnails must not share a file (issue 12).
    for folder, name in (("d1", "chelsea"), ("d2", "coffee")):
        (tmp_path / folder).mkdir()
        Image.fromarray(photo(name)).save(tmp_path / folder / "img.png")
    out = tmp_path / "out"
    result = cli(tmp_path / "d1" / "img.png", tmp_path / "d2" / "img.png", "-k", 8, "-o", out, "--preview", "--quiet")
    assert result.returncode == 0, result.stderr
    page = (out / "preview" / "index.html").read_text()
    originals = [t for t in re.findall(r'<img src="([^"]+)"', page) if ".orig." in t]
    assert len(originals) == 2 and len(set(originals)) == 2, originals
    # each thumbnail shows its own image: its mean colour is nearest its source's
    means = {name: photo(name).reshape(-1, 3).mean(0) for name in ("chelsea", "coffee")}
    seen = set()
    for thumb in originals:
        mean = np.asarray(Image.open(out / "preview" / thumb).convert("RGB")).reshape(-1, 3).mean(0)
        seen.add(min(means, key=lambda n: float(np.abs(means[n] - mean).sum())))
    assert seen == {"chelsea", "coffee"}


def test_a_users_files_where_previews_go_are_never_replaced(tmp_path: Path) -> None:
    """A side-by-side PNG or gallery folder gpu_kquant did not write: exit 2, one line, the file kept."""
    src = tmp_path / "cat.png"
    Image.fromarray(photo("chelsea")[:64, :80]).save(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "cat.preview.png").write_bytes(b"mine")
    (out / "index.html").write_bytes(b"mine too")
    refused = cli(src, "-k", 8, "-o", out, "--preview", "--quiet", "--overwrite")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "cat.preview.png exists and was not written by gpu_kquant" in refused.stderr
    assert (out / "cat.preview.png").read_bytes() == b"mine"
    (out / "cat.preview.png").unlink()
    for _ in range(2):  # the second run replaces its own side-by-side PNG
        result = cli(src, "-k", 8, "-o", out, "--preview", "--quiet", "--overwrite")
        assert result.returncode == 0, result.stderr
        assert Image.open(out / "cat.preview.png").size == (2 * 80 + 8, 64)
    assert (out / "index.html").read_bytes() == b"mine too"  # one input file: no gallery beside it

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(src, folder / "cat.png")
    (out / "preview").mkdir()
    (out / "preview" / "index.html").write_bytes(b"mine")
    refused = cli(folder, "-k", 8, "-o", out, "--preview", "--quiet")
    assert refused.returncode == 2 and "is not a gpu_kquant gallery" in refused.stderr
    assert (out / "preview" / "index.html").read_bytes() == b"mine"


def test_a_rerun_renders_its_own_gallery_again(previewed: Path) -> None:
    """The gallery folder a run made is claimed in the manifest: the next run may write it."""
    out = previewed.parent
    before = (previewed / "index.html").read_text()
    result = cli(out.parent / "in", "-k", 16, "-o", out, "--preview", "--quiet", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert (previewed / "index.html").read_text().count("<img") == before.count("<img") > 0
