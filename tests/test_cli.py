"""Command-line usage errors (exit 2, one line, nothing written) and warnings, run as a user would."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from common_utils import cli, photo
from PIL import Image

from gpu_kquant import Palette


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    root.mkdir()
    Image.fromarray(photo("coffee")[:40, :50]).save(root / "a.png")
    return root


def assert_usage_error(result, text: str) -> None:
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("gpu-kquant: error:") and text in last, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("name", "content", "text"),
    [
        ("strings.json", '{"colors": [["a", "b", "c"]]}', "non-integer"),
        ("fraction.json", "[[0.9, 0, 0]]", "non-integer"),
        ("deep.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("bad.gpl", "GIMP Palette\n1 2 x\n", "line 2"),
    ],
    ids=["strings", "fraction", "deep", "gpl"],  # an id holding the deep JSON overflows the environment
)
def test_malformed_palette_files_are_usage_errors(
    src: Path, tmp_path: Path, name: str, content: str, text: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    assert_usage_error(cli(src, "--palette", path, "--quiet"), text)
    assert not (tmp_path / "in_k16").exists()


def test_structured_npy_palette_is_a_usage_error(src: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "p.npy", np.zeros(3, dtype=[("r", "u1"), ("g", "u1"), ("b", "u1")]))
    assert_usage_error(cli(src, "--palette", tmp_path / "p.npy", "--quiet"), "must be integers")


def test_fifo_palette_is_refused_not_read(src: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "palette.json"
    os.mkfifo(fifo)
    assert_usage_error(cli(src, "--palette", fifo, "--quiet", timeout=120), "not a regular file")


def test_rgb_palette_file_on_transparent_inputs(src: Path, tmp_path: Path) -> None:
    rgba = np.dstack([photo("coffee")[:40, :50], np.full((40, 50), 255, np.uint8)])
    rgba[:, :10, 3] = 0
    Image.fromarray(rgba).save(src / "clear.png")
    palette = Palette.fit([photo("coffee")[:40, :50]], 8).save(tmp_path / "p.gpl")
    result = cli(src, "--palette", palette, "-o", tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "2 ok" in result.stderr
    with Image.open(tmp_path / "out" / "clear.png") as img:
        np.testing.assert_array_equal(np.asarray(img.convert("RGBA"))[..., 3], rgba[..., 3])


def test_negative_shard_says_what_is_wrong(src: Path) -> None:
    assert_usage_error(cli(src, "--shard", "-1/2"), "shard index I must be in 0..1")
    assert_usage_error(cli(src, "--shard", "1/0"), "shard count N must be at least 1")


def test_conflicting_flags(src: Path, tmp_path: Path) -> None:
    palette = Palette(np.array([[0, 0, 0], [255, 255, 255]], np.uint8)).save(tmp_path / "p.json")
    assert_usage_error(cli(src, "--quality", "30-40", "--palette", palette), "--quality")
    assert_usage_error(cli(src, "--quality", "30-40", "--palette", "shared"), "--quality")
    assert_usage_error(cli(src, "--demo", cwd=tmp_path), "--demo")
    assert not (tmp_path / "gpu_kquant_demo").exists()
    result = cli(src, "-k", "8", "--palette", palette, "-o", tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "warning: -k 8 is ignored: palette" in result.stderr and "has 2 colours" in result.stderr
    result = cli(src, "--palette", palette, "-o", tmp_path / "out2", "--quiet")
    assert result.returncode == 0 and "warning" not in result.stderr


def test_report_naming_an_input_or_a_folder_is_refused(src: Path, tmp_path: Path) -> None:
    before = (src / "a.png").read_bytes()
    assert_usage_error(cli(src, "--report", src / "a.png", "-o", tmp_path / "out"), "a.png")
    assert (src / "a.png").read_bytes() == before
    (tmp_path / "folder").mkdir()
    assert_usage_error(cli(src, "--report", tmp_path / "folder", "-o", tmp_path / "out"), "is a folder")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    assert_usage_error(cli(src, "--report", notes, "-o", tmp_path / "out"), "not a gpu_kquant report")
    assert notes.read_text() == "my notes\n"


def test_concurrent_run_into_the_same_folder_is_a_usage_error_and_reruns_append(src: Path, tmp_path: Path) -> None:
    from test_report import hold_lock

    out = tmp_path / "out"
    holder = hold_lock(out / "gpu_kquant_report.jsonl")
    try:
        assert_usage_error(cli(src, "-o", out, "--quiet"), "another gpu_kquant run is writing")
    finally:
        holder.communicate("", timeout=60)
    for _ in range(2):
        assert cli(src, "-o", out, "--quiet").returncode == 0
    rows = [json.loads(line) for line in (out / "gpu_kquant_report.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "skipped"] and rows[0]["run"] != rows[1]["run"]
