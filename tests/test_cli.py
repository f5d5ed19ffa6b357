"""The command line end to end, run as a user would (through a subprocess): whole runs, resume,
interrupts, and usage errors (exit 2, one line, nothing written) and warnings."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from common_utils import ROOT, cli, digest, linear_rgb_icc, photo, read_report, recorded_outputs
from PIL import Image

from gpu_kquant import Palette


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A folder holding every kind of input the pipeline must handle."""
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    base = Image.fromarray(photo("chelsea")[:96, :128])
    base.save(root / "rgb.png")
    base.save(root / "sub" / "photo.jpg", quality=90)
    base.convert("L").save(root / "gray.png")
    la = base.convert("LA")
    la.putalpha(Image.linear_gradient("L").resize(base.size))
    la.save(root / "gray_alpha.png")
    base.quantize(12).save(root / "palette.png")
    base.quantize(12).save(root / "palette_transparent.png", transparency=0)
    rgba = base.convert("RGBA")
    alpha = np.full((96, 128), 255, np.uint8)
    alpha[:, :32] = 0
    alpha[:, 32:48] = 120
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(root / "sub" / "rgba.png")
    base.convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray((np.arange(96 * 128, dtype=np.uint32).reshape(96, 128) * 5).astype(np.uint16)).save(
        root / "deep16.png"
    )
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(root / "rotated.jpg", exif=exif)
    base.save(root / "icc.png", icc_profile=linear_rgb_icc())
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "green", "blue")]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    data = (root / "rgb.png").read_bytes()
    (root / "sub" / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage " * 50)
    (root / "empty.jpg").write_bytes(b"")
    (root / "broken_link.png").symlink_to(root / "does_not_exist.png")
    base.save(root / "sub" / "deeper" / "png_named.jpg", "PNG")
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "deeper" / "loop").symlink_to(root, target_is_directory=True)
    return root


EXPECTED_FAILED = {
    "truncated.png": "truncated or corrupt",
    "corrupt.jpg": "corrupt or damaged JPEG file",  # a JPEG signature, then garbage
    "empty.jpg": "empty file",
    "broken_link.png": "cannot read file",
}


def test_every_kind_of_input(tree: Path, tmp_path: Path) -> None:
    before = digest(tree)
    out = tmp_path / "out"
    result = cli(tree, "-k", 8, "-o", out, "--quiet", "--workers", 2)
    assert result.returncode == 1, result.stderr  # some inputs failed
    assert digest(tree) == before  # inputs untouched
    rows = read_report(out / "gpu_kquant_report.jsonl")
    assert len(rows) == 17  # every image once; the symlink loop is not followed
    for name, reason in EXPECTED_FAILED.items():
        assert rows[name]["status"] == "failed" and reason in rows[name]["reason"], rows[name]
        assert "\n" not in rows[name]["reason"]
    ok = {name: row for name, row in rows.items() if row["status"] == "ok"}
    assert len(ok) == 13
    for row in ok.values():
        out_path = Path(row["output"])
        assert out_path.suffix == ".png" and out_path.is_relative_to(out)
        img = Image.open(out_path)
        assert img.mode == "P"
        assert row["colors"] <= 8 and len(img.getpalette()) // 3 == row["colors"]
        assert row["width"] == img.width and row["height"] == img.height
        assert row["output_bytes"] == out_path.stat().st_size and row["psnr"] is not None
    # Mirrored tree.
    assert (out / "sub" / "photo.png").exists() and (out / "sub" / "deeper" / "png_named.png").exists()
    # Transparency is kept.
    for name in ("rgba.png", "gray_alpha.png", "palette_transparent.png"):
        assert "transparency" in Image.open(ok[name]["output"]).info, name
    rgba_out = np.asarray(Image.open(ok["rgba.png"]["output"]).convert("RGBA"))
    assert (rgba_out[:, :32, 3] == 0).all() and (rgba_out[:, 48:, 3] == 255).all()
    # Orientation, 16 bits, animation, ICC and wrong extensions are handled and noted.
    assert (ok["rotated.jpg"]["width"], ok["rotated.jpg"]["height"]) == (96, 128)
    assert "16-bit reduced to 8-bit" in ok["deep16.png"]["notes"]
    assert "first frame only (of 3)" in ok["anim.gif"]["notes"]
    assert "ICC profile converted to sRGB" in ok["icc.png"]["notes"]
    assert any("content is PNG" in n for n in ok["png_named.jpg"]["notes"])
    assert "1 non-image files ignored" in result.stderr
    assert "4 failed" in result.stderr and "13 ok" in result.stderr


def test_rerun_skips_and_overwrite_redoes(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.fromarray(photo("coffee")[i * 50 : i * 50 + 60, :90]).save(src / f"{i}.png")
    first = cli(src, "-k", 4, "--quiet")
    assert first.returncode == 0, first.stderr
    out = tmp_path / "in_k4"  # default: sibling folder
    assert sorted(p.name for p in out.glob("*.png")) == ["0.png", "1.png", "2.png"]
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
    second = cli(src, "-k", 4, "--quiet")
    assert second.returncode == 0 and "3 skipped" in second.stderr
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.png")} == stamp
    third = cli(src, "-k", 4, "--quiet", "--overwrite")
    assert third.returncode == 0 and "3 ok" in third.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    for args in (
        [tmp_path / "missing"],
        [tmp_path, "-k", "1"],
        [tmp_path, "-k", "300"],
        [tmp_path, "--shard", "3/3"],
        [tmp_path, "--shard", "x"],
        [],
    ):
        result = cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.strip().splitlines()[-1].startswith("gpu-kquant: error:")


def test_help_and_version() -> None:
    help_text = cli("--help").stdout
    for flag in ("-k", "-o", "--format", "--device", "--batch-size", "--workers", "--overwrite", "--report", "--shard"):
        assert flag in help_text
    assert "default" in help_text
    assert cli("--version").stdout.startswith("gpu-kquant ")


def test_demo_runs_out_of_the_box(tmp_path: Path) -> None:
    result = cli("--demo", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    outputs = sorted(p.name for p in (tmp_path / "gpu_kquant_demo").glob("*.png"))
    assert outputs == ["astronaut.png", "chelsea.png", "coffee.png"]
    assert "gpu_kquant_demo" in result.stderr


def test_killed_run_leaves_no_truncated_output_and_resumes(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    big = photo("astronaut")
    for i in range(24):
        Image.fromarray(np.roll(big, i * 7, axis=1)).save(src / f"{i:02d}.png", compress_level=1)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "gpu_kquant", str(src), "-k", "16", "-o", str(out), "--quiet", "--batch-size", "2"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.png"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done = sorted(out.glob("*.png"))
    assert 3 <= len(done) < 24, "the run should have been killed midway"
    for path in done:
        with Image.open(path) as img:
            img.load()  # raises on a truncated file
    # An output renamed into place just before the kill, whose manifest entry was not yet
    # written, is redone; every output the manifest lists is skipped.
    listed = recorded_outputs(out) & {p.name for p in done}
    assert len(listed) >= 1
    rerun = cli(src, "-k", 16, "-o", out, "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(listed)} skipped" in rerun.stderr
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:02d}.png" for i in range(24)]
    assert not [p for p in out.iterdir() if p.name.startswith(".gpu_kquant-")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_quickly_with_a_summary(tmp_path: Path, sig: signal.Signals) -> None:
    """At k = 256 a k-means batch runs for seconds; the process still ends within 2 s (issue 12, item 17)."""
    src = tmp_path / "in"
    src.mkdir()
    big = np.tile(photo("astronaut"), (2, 2, 1))  # 1 MP: 48 of them take far longer than the test waits
    for i in range(48):
        Image.fromarray(np.roll(big, i * 5, axis=0)).save(src / f"{i:02d}.png", compress_level=1)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "gpu_kquant", str(src), "-k", "256", "-o", str(out), "--quiet", "--batch-size", "1"]
    # a shell starts background jobs with SIGINT ignored, and the child would inherit that: give it the
    # default disposition a terminal's Ctrl-C meets
    restore = functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL)
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=restore
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*.png")):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted: give it more work"
    proc.send_signal(sig)
    start = time.time()
    _, stderr = proc.communicate(timeout=60)
    assert time.time() - start < 2
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "ok" in stderr
    for path in out.glob("*.png"):
        with Image.open(path) as img:
            img.load()
    assert not [p for p in out.iterdir() if p.name.startswith(".gpu_kquant-")]


# -- usage errors and warnings (issue 12) -----------------------------------------------------------------------------


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


def test_a_bare_dither_flag_is_adaptive(src: Path, tmp_path: Path) -> None:
    """``--dither`` without a kind dithers adaptively (it measured best against pngquant, issue 15)."""
    from gpu_kquant.argtypes import bare_flag_value

    kinds = ("none", "fs", "adaptive")
    assert bare_flag_value(["--dither", "in"], "--dither", kinds, "adaptive") == ["--dither", "adaptive", "in"]
    assert bare_flag_value(["in", "--dither"], "--dither", kinds, "adaptive") == ["in", "--dither", "adaptive"]
    assert bare_flag_value(["--dither", "fs", "in"], "--dither", kinds, "adaptive") == ["--dither", "fs", "in"]
    for i, args in enumerate((["--dither", src], [src, "--dither"])):
        out = tmp_path / f"out{i}"
        result = cli(*args, "-k", "4", "-o", out, "--quiet")
        assert result.returncode == 0, result.stderr
        rows = read_report(out / "gpu_kquant_report.jsonl")
        assert [r["dither"] for r in rows.values()] == ["adaptive"]
    typo = cli("--dither", "adaptve", src, "-o", tmp_path / "typo")
    assert typo.returncode == 2 and "adaptve" in typo.stderr.strip().splitlines()[-1]


def test_exact_fit_reaches_the_fit(tmp_path: Path) -> None:
    """``--exact-fit`` sets FitOptions.exact_finish for files and datasets alike; without it the default stands."""
    from gpu_kquant import quantize
    from gpu_kquant.argtypes import fit_options
    from gpu_kquant.cli import build_parser
    from gpu_kquant.options import FitOptions

    parser = build_parser()
    assert fit_options(parser.parse_args(["in", "-k", "8", "--exact-fit"])).exact_finish is True
    assert fit_options(parser.parse_args(["in", "-k", "8"])).exact_finish is None
    img = photo("hubble_deep_field")  # 61594 colours: more than the fit budget at k=8 (32768)
    Image.fromarray(img).save(tmp_path / "sky.png")
    palettes = {}
    for flag in ((), ("--exact-fit",)):
        out = tmp_path / f"out{len(flag)}"
        result = cli(tmp_path / "sky.png", "-k", "8", "-o", out, "--quiet", "--device", "cpu", *flag)
        assert result.returncode == 0, result.stderr
        with Image.open(out / "sky.png") as written:
            palettes[bool(flag)] = np.asarray(written.convert("RGB"))
    want = quantize(img, 8, options=FitOptions(k=8, exact_finish=True), device="cpu").to_rgb()
    np.testing.assert_array_equal(palettes[True], want)
    assert not np.array_equal(palettes[False], palettes[True])
