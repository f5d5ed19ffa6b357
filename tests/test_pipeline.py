"""End-to-end tests of the directory pipeline, run as a user would: through a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from common_utils import ROOT, cli, linear_rgb_icc, photo
from PIL import Image

from gpu_kquant.pipeline import Config, plan_tasks, shard_of


def read_report(path: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {Path(r["input"]).name: r for r in rows}


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


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


def test_never_overwrites_an_input(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo("coffee")[:40, :40]).save(src / "a.png")
    before = (src / "a.png").read_bytes()
    result = cli(src, "-k", 4, "-o", src, "--quiet", "--overwrite")
    assert result.returncode == 2 and "the output folder is the input folder" in result.stderr
    # A file given directly, with its own folder as output and the same format.
    result = cli(src / "a.png", "-k", 4, "-o", src, "--quiet", "--overwrite")
    assert result.returncode == 1
    assert "output path is an input file" in (src / "gpu_kquant_report.jsonl").read_text()
    assert (src / "a.png").read_bytes() == before


def test_output_inside_input_tree_is_not_walked(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo("coffee")[:40, :40]).save(src / "a.png")
    for _ in range(2):
        result = cli(src, "-k", 4, "-o", src / "quantized", "--quiet")
        assert result.returncode == 0, result.stderr
    rows = [json.loads(x) for x in (src / "quantized" / "gpu_kquant_report.jsonl").read_text().splitlines()]
    # one row per run (the report is appended across runs): the outputs were never walked as inputs
    assert [(Path(r["input"]).name, r["status"]) for r in rows] == [("a.png", "ok"), ("a.png", "skipped")]


def test_name_collisions_keep_both_outputs(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo("coffee")[:40, :40]).save(src / "a.png")
    Image.fromarray(photo("chelsea")[:40, :40]).save(src / "a.jpg")
    assert cli(src, "-k", 4, "--quiet").returncode == 0
    assert sorted(p.name for p in (tmp_path / "in_k4").glob("*.png")) == ["a.jpg.png", "a.png.png"]


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


def test_shards_cover_every_input_exactly_once(tmp_path: Path) -> None:
    src = tmp_path / "in"
    (src / "s").mkdir(parents=True)
    for i in range(20):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(src / ("s" if i % 2 else ".") / f"{i}.png")
    everything = {t.src for t in plan_tasks(Config([src]))[0]}
    parts = [{t.src for t in plan_tasks(Config([src], shard=(i, 3)))[0]} for i in range(3)]
    assert sum(len(p) for p in parts) == len(everything) == 20
    assert set().union(*parts) == everything
    assert all(shard_of(f"in/{i}.png", 3) == shard_of(f"in/{i}.png", 3) for i in range(5))
    # Through the command line, each shard writes its own report.
    for i in range(3):
        assert cli(src, "-k", 2, "--shard", f"{i}/3", "--quiet").returncode == 0
    outputs = sorted((tmp_path / "in_k2").rglob("*.png"))
    assert len(outputs) == 20
    reports = sorted((tmp_path / "in_k2").glob("gpu_kquant_report.shard-*-of-3.jsonl"))
    assert len(reports) == 3


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
    rerun = cli(src, "-k", 16, "-o", out, "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done)} skipped" in rerun.stderr
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:02d}.png" for i in range(24)]
    assert not [p for p in out.iterdir() if p.name.startswith(".gpu_kquant-")]


def test_ctrl_c_stops_quickly_with_a_summary(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    big = photo("astronaut")
    for i in range(40):
        Image.fromarray(np.roll(big, i * 5, axis=0)).save(src / f"{i:02d}.png", compress_level=1)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "gpu_kquant", str(src), "-k", "16", "-o", str(out), "--quiet"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*.png")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    start = time.time()
    _, stderr = proc.communicate(timeout=60)
    assert time.time() - start < 5
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "ok" in stderr
    for path in out.glob("*.png"):
        with Image.open(path) as img:
            img.load()
    assert not [p for p in out.iterdir() if p.name.startswith(".gpu_kquant-")]


def test_memory_is_bounded(tmp_path: Path) -> None:
    base = np.tile(photo("astronaut"), (2, 3, 1))  # 1.5 megapixels, 4.7 MB decoded

    def peak_rss_kb(n: int) -> int:
        src = tmp_path / f"in{n}"
        src.mkdir()
        for i in range(n):
            Image.fromarray(np.roll(base, i, axis=1)).save(src / f"{i}.bmp")
        code = (
            "import resource, sys; from gpu_kquant.cli import main; rc = main(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
        )
        # Two malloc arenas: glibc's per-thread arenas add hundreds of MB of noise to the peak.
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_ARENA_MAX": "2"}
        cmd = [sys.executable, "-c", code, str(src), "-k", "4", "--quiet"]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr
        return int(result.stdout.split("PEAK")[1])

    # Both runs reach the steady state (every queue full); holding the extra 96 decoded
    # images would add 450 MB, while bounded queues keep the peak where it was.
    few, many = peak_rss_kb(48), peak_rss_kb(144)
    assert many < few + 200_000, (few, many)


def small_folder(tmp_path: Path, names: tuple[str, ...] = ("chelsea", "coffee", "astronaut")) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    for name in names:
        Image.fromarray(photo(name)[:120, :160]).save(src / f"{name}.png")
    return src


def plte(path: Path) -> bytes:
    data = path.read_bytes()
    at = data.index(b"PLTE")
    return data[at - 4 : at + 4 + int.from_bytes(data[at - 4 : at], "big")]


def test_shared_palette(tmp_path: Path) -> None:
    src = small_folder(tmp_path)
    out = tmp_path / "out"
    result = cli(src, "-k", 16, "-o", out, "--palette", "shared", "--quiet")
    assert result.returncode == 0, result.stderr
    outputs = sorted(out.glob("*.png"))
    assert len(outputs) == 3
    assert len({plte(p) for p in outputs}) == 1  # byte-identical palettes
    for name in ("palette.json", "palette.npy", "palette.gpl"):
        assert (out / name).exists()
    # A saved palette re-applied gives identical outputs.
    again = tmp_path / "again"
    assert cli(src, "-o", again, "--palette", out / "palette.json", "--quiet").returncode == 0
    for path in outputs:
        assert (again / path.name).read_bytes() == path.read_bytes()
    # A resumed run reuses the saved palette instead of fitting a new one.
    stamp = (out / "palette.json").stat().st_mtime_ns
    (outputs[0]).unlink()
    assert cli(src, "-k", 16, "-o", out, "--palette", "shared", "--quiet").returncode == 0
    assert (out / "palette.json").stat().st_mtime_ns == stamp
    assert outputs[0].read_bytes() == (again / outputs[0].name).read_bytes()


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


def test_every_gpu_gets_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from gpu_kquant import pipeline

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    devices = pipeline.devices_for(Config([Path(".")], device="cuda"))
    assert [str(d) for d in devices] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert [str(d) for d in pipeline.devices_for(Config([Path(".")], device="cuda:2"))] == ["cuda:2"]


def test_split_between_devices_is_the_shard_split(tmp_path: Path) -> None:
    from gpu_kquant import pipeline

    tasks = [pipeline.Task(Path(f"{i}.png"), Path(f"o{i}.png"), f"in/{i}.png") for i in range(40)]
    parts = pipeline.split_tasks(tasks, 3)
    assert sorted(t.key for p in parts for t in p) == sorted(t.key for t in tasks)
    assert all(shard_of(t.key, 3) == i for i, p in enumerate(parts) for t in p)
    # Inside one shard of two, a split in two still balances.
    mine = [t for t in tasks if shard_of(t.key, 2) == 0]
    assert all(pipeline.split_tasks(mine, 2, sharded=True))


def test_several_devices_share_one_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from gpu_kquant import pipeline

    src = tmp_path / "in"
    src.mkdir()
    for i in range(12):
        Image.fromarray(np.roll(photo("chelsea")[:60, :80], i, axis=1)).save(src / f"{i:02d}.png")
    (src / "bad.png").write_bytes(b"nope")
    monkeypatch.setattr(pipeline, "devices_for", lambda config: [torch.device("cpu"), torch.device("cpu")])
    summary = pipeline.run(Config([src], k=4, out=tmp_path / "out", workers=1))
    assert summary.counts["ok"] == 12 and summary.counts["failed"] == 1
    assert len(list((tmp_path / "out").glob("*.png"))) == 12
    rows = (tmp_path / "out" / "gpu_kquant_report.jsonl").read_text().splitlines()
    assert len(rows) == 13
