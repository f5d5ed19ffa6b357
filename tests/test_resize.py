"""``--resize WxH --resize-mode fit|fill|stretch`` on loose image files: the worker's decode step and the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from common_utils import cli
from dataset_utils import psnr, read_tar, write_shard
from PIL import Image

from gpu_kquant.options import ResizeOptions
from gpu_kquant.planning import Task
from gpu_kquant.worker import read_task

SAMPLES = Path(__file__).resolve().parents[1] / "gpu_kquant" / "samples"


def _blocks(img: np.ndarray, by: int, bx: int) -> np.ndarray:
    """Float64 mean over (by, bx) blocks: the area-average reference a good downscale approaches."""
    h, w, c = img.shape
    return img.astype(np.float64).reshape(h // by, by, w // bx, bx, c).mean(axis=(1, 3))


@pytest.fixture
def wide(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """The bundled astronaut photo cut to 512x256 (wide), so the three modes differ."""
    pixels = np.asarray(Image.open(SAMPLES / "astronaut.png").convert("RGB"))[128:384]
    path = tmp_path / "wide.png"
    Image.fromarray(pixels).save(path)
    return path, pixels


@pytest.mark.parametrize(
    ("mode", "shape", "reference"),
    [
        ("fit", (16, 32), lambda p: _blocks(p, 16, 16)),  # the whole image, aspect kept
        ("fill", (32, 32), lambda p: _blocks(p[:, 128:384], 8, 8)),  # covers 32x32, the centre cropped
        ("stretch", (32, 32), lambda p: _blocks(p, 8, 16)),  # squeezed 2:1
    ],
)
def test_each_mode_in_the_decode_step(wide: tuple[Path, np.ndarray], mode: str, shape: tuple, reference) -> None:
    path, pixels = wide
    item = read_task(Task(path, path.with_name("out.png"), "wide"), None, ResizeOptions(32, 32, mode))
    out = item.decoded.pixels
    assert out.shape == (*shape, 3) and out.dtype == np.uint8
    assert psnr(out, reference(pixels)) > 28  # a wrong crop or scale scores about 15 dB
    assert f"resized from 512x256 to {shape[1]}x{shape[0]} ({mode})" in item.decoded.notes
    assert item.pixels == shape[0] * shape[1]


def test_alpha_is_kept_and_does_not_bleed(tmp_path: Path) -> None:
    rgb = np.asarray(Image.open(SAMPLES / "chelsea.png").convert("RGB"))[:256, :256]
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:, :128, 3] = 0  # the left half fully transparent
    rgba[:, :128, :3] = (255, 0, 255)  # in a colour that must not bleed into the opaque half
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba).save(path)
    for mode in ("fit", "fill", "stretch"):
        out = read_task(Task(path, tmp_path / "o.png", "a"), None, ResizeOptions(32, 32, mode)).decoded.pixels
        assert out.shape == (32, 32, 4)
        # Lanczos rings for 3 output pixels each side of the edge (16 | 16)
        assert (out[:, :12, 3] == 0).all() and (out[:, 20:, 3] == 255).all()
        assert psnr(out[:, 17:, :3], _blocks(rgb[:, 136:], 8, 8)) > 28  # no magenta fringe


def test_loose_files_and_a_shard_through_the_cli(tmp_path: Path, wide: tuple[Path, np.ndarray]) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    wide[0].rename(folder / "wide.png")
    rgba = np.asarray(Image.open(SAMPLES / "coffee.png").convert("RGBA")).copy()
    rgba[:, : rgba.shape[1] // 2, 3] = 0
    Image.fromarray(rgba).save(folder / "alpha.png")
    write_shard(tmp_path / "a.tar", 0, 2, size=(60, 30))  # a shard in the same command: one flag for both
    out = tmp_path / "out"
    args = ("-k", 8, "-o", out, "--resize", "48x40", "--resize-mode", "fill", "--quiet")
    result = cli(folder, tmp_path / "a.tar", *args)
    assert result.returncode == 0, result.stderr
    members = read_tar(out / "a.tar")
    for key in ("000000000", "000000001"):
        assert Image.open(io.BytesIO(members[f"{key}.png"])).size == (48, 40)
    for name in ("wide.png", "alpha.png"):
        with Image.open(out / name) as img:
            assert img.size == (48, 40) and img.mode == "P"
            pixels = np.asarray(img.convert("RGBA"))
        assert len(np.unique(pixels.reshape(-1, 4), axis=0)) <= 8
    assert (pixels[:, :20, 3] == 0).all() and (pixels[:, 28:, 3] == 255).all()  # alpha.png kept its alpha
    rows = [json.loads(line) for line in (out / "gpu_kquant_report.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "status" in r and r.get("input")]
    assert {(r["width"], r["height"]) for r in rows} == {(48, 40)}
    assert any("resized from 600x400 to 48x40 (fill)" in r["notes"] for r in rows)


def test_tokens_from_loose_files_of_three_sizes_get_one_shape(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("astronaut", "chelsea", "coffee"):  # 512x512, 451x300, 600x400
        Image.open(SAMPLES / f"{name}.png").save(folder / f"{name}.png")
    out = tmp_path / "out"
    args = ("--output-format", "tokens", "--palette", "shared", "--resize", "20x12", "--resize-mode", "fill")
    result = cli(folder, "-k", 8, "-o", out, "--quiet", *args)
    assert result.returncode == 0, result.stderr
    indices = np.load(out / "indices.npy", mmap_mode="r")
    assert indices.shape == (3, 12, 20) and indices.dtype == np.uint8
    assert (out / "keys.txt").read_text().split() == ["astronaut", "chelsea", "coffee"]
    assert int(indices.max()) < len(np.load(out / "palette.npy")) <= 8
