"""After quantization: formats, the quality and size guards and dithered metrics, through the command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from common_utils import cli, photo, read_report, small_folder
from PIL import Image


@pytest.mark.parametrize("fmt", ["gif", "webp", "npz"])
def test_formats(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo("coffee")[:50, :70]).save(src / "a.png")
    k = 300 if fmt == "npz" else 16
    assert cli(src, "-k", k, "--format", fmt, "--quiet").returncode == 0
    out = tmp_path / f"in_k{k}" / f"a.{fmt}"
    if fmt == "npz":
        arrays = np.load(out)
        assert arrays["indices"].dtype == np.uint16 and arrays["palette"].shape[1] == 3
    else:
        assert len(Image.open(out).convert("RGB").getcolors(1000)) <= 16


def test_quality_target_picks_the_smallest_k(tmp_path: Path) -> None:
    from gpu_kquant import quantize

    src = small_folder(tmp_path, ("coffee",))
    out = tmp_path / "out"
    result = cli(src, "-k", 64, "-o", out, "--quality", "20-30", "--quiet")
    assert result.returncode == 0, result.stderr
    row = read_report(out / "gpu_kquant_report.jsonl")["coffee.png"]
    k = row["colors"]
    assert row["psnr"] >= 30 and k < 64
    img = photo("coffee")[:120, :160]
    assert quantize(img, k).psnr >= 30 > quantize(img, k - 1).psnr
    # A target no k can meet: not written, status "quality", exit code 1.
    strict = cli(src, "-k", 4, "-o", tmp_path / "strict", "--quality", "45-50", "--quiet")
    assert strict.returncode == 1
    row = read_report(tmp_path / "strict" / "gpu_kquant_report.jsonl")["coffee.png"]
    assert row["status"] == "quality" and "below the minimum of 45 dB" in row["reason"] and row["psnr"] < 45
    assert not (tmp_path / "strict" / "coffee.png").exists()


def test_skip_if_larger(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(src / "flat.png", optimize=True)
    Image.fromarray(photo("coffee")[:64, :64]).save(src / "photo.bmp")
    result = cli(src, "-k", 8, "-o", tmp_path / "out", "--skip-if-larger", "--quiet")
    assert result.returncode == 0, result.stderr
    rows = read_report(tmp_path / "out" / "gpu_kquant_report.jsonl")
    assert rows["photo.bmp"]["status"] == "ok"
    flat = rows["flat.png"]
    if flat["status"] == "larger":
        assert not (tmp_path / "out" / "flat.png").exists()
        assert flat["output_bytes"] > flat["input_bytes"]
    else:  # never written larger than the input
        assert flat["output_bytes"] <= flat["input_bytes"]


@pytest.mark.parametrize("dither", ["fs", "ordered"])
def test_dithered_outputs_report_their_own_metrics(tmp_path: Path, dither: str) -> None:
    src = small_folder(tmp_path, ("chelsea",))
    out = tmp_path / "out"
    result = cli(src, "-k", 8, "-o", out, "--dither", dither, "--space", "oklab", "--ciede2000", "--quiet")
    assert result.returncode == 0, result.stderr
    row = read_report(out / "gpu_kquant_report.jsonl")["chelsea.png"]
    assert row["dither"] == dither and row["space"] == "oklab"
    assert row["psnr_blur"] > row["psnr"] and 0 < row["ciede2000"] < 20
    assert len(Image.open(out / "chelsea.png").getpalette()) // 3 <= 8
    assert "mean CIEDE2000" in result.stderr


def test_rows_carry_ssim_and_lab_runs_ciede2000(tmp_path: Path) -> None:
    from skimage.color import deltaE_ciede2000, rgb2lab
    from skimage.metrics import structural_similarity

    src = small_folder(tmp_path, ("coffee",))
    out = tmp_path / "out"
    result = cli(src, "-k", 8, "-o", out, "--space", "lab", "--quiet")  # no --ciede2000: lab runs report it
    assert result.returncode == 0, result.stderr
    row = read_report(out / "gpu_kquant_report.jsonl")["coffee.png"]
    img = np.asarray(Image.open(src / "coffee.png").convert("RGB"))
    got = np.asarray(Image.open(out / "coffee.png").convert("RGB"))
    kwargs = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False, "data_range": 255}
    assert row["ssim"] == pytest.approx(structural_similarity(img, got, channel_axis=2, **kwargs), abs=0.01)
    expected = deltaE_ciede2000(rgb2lab(img / 255.0), rgb2lab(got / 255.0)).mean()
    assert row["ciede2000"] == pytest.approx(expected, rel=0.01)
    assert f"mean SSIM: {row['ssim']:.4f}" in result.stderr and "mean CIEDE2000" in result.stderr
