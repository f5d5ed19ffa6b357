"""``--output-format tokens``: one (N, H, W) index array, its palette and keys, for training loaders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common_utils import ROOT, cli, recorded_outputs
from dataset_utils import decode, read_tar, write_shard

from gpu_kquant.resize import resize


def test_tokens_layout(tmp_path: Path) -> None:
    src = tmp_path / "shards"
    keys = write_shard(src / "00000.tar", 0, 3, corrupt={1}) + write_shard(src / "00001.tar", 3, 2, size=(50, 20))
    out = tmp_path / "out"
    args = ("--output-format", "tokens", "--palette", "shared", "--resize", "16x12", "--resize-mode", "fill")
    result = cli(src, "-k", 12, "-o", out, "--quiet", *args)
    assert result.returncode == 1, result.stderr  # the corrupt sample
    indices = np.load(out / "indices.npy", mmap_mode="r")
    assert isinstance(indices, np.memmap) and indices.shape == (4, 12, 16) and indices.dtype == np.uint8
    good = [k for k in keys if k != "000000001"]
    assert (out / "keys.txt").read_text().splitlines() == good  # input order, failed sample left out
    palette = np.load(out / "palette.npy")
    saved = np.asarray(json.loads((out / "palette.json").read_text())["colors"], np.uint8)
    assert palette.dtype == np.uint8 and palette.shape == (12, 3) and np.array_equal(palette, saved)
    assert int(indices.max()) < len(palette)
    # Reference: every index is the nearest palette colour (float64 brute force) to the resized input.
    members = {**read_tar(src / "00000.tar"), **read_tar(src / "00001.tar")}
    for row, key in enumerate(good):
        pixels = resize(decode(members[f"{key}.jpg"]), (16, 12), "fill").reshape(-1, 1, 3).astype(np.float64)
        dist = ((pixels - palette[None].astype(np.float64)) ** 2).sum(-1)
        chosen = dist[np.arange(len(dist)), indices[row].reshape(-1)]
        assert np.allclose(chosen, dist.min(1), atol=1e-6)
    assert not (out / ".gpu_kquant-tokens").exists()  # parts removed once assembled


def test_tokens_need_a_fixed_palette(tmp_path: Path) -> None:
    write_shard(tmp_path / "a.tar", 0, 1)
    result = cli(tmp_path / "a.tar", "-o", tmp_path / "out", "--output-format", "tokens", "--quiet")
    assert result.returncode == 2 and "--palette" in result.stderr


def test_tokens_from_a_folder_of_images_with_sizes_that_differ(tmp_path: Path) -> None:
    from common_utils import photo
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(photo("astronaut")[:20, :30]).save(folder / "a.png")
    Image.fromarray(photo("astronaut")[:30, :20]).save(folder / "b.png")
    np.save(tmp_path / "pal.npy", np.array([[0, 0, 0], [255, 255, 255], [128, 64, 32]], np.uint8))
    result = cli(
        folder, "-o", tmp_path / "out", "--output-format", "tokens", "--palette", tmp_path / "pal.npy", "--quiet"
    )
    assert result.returncode == 1, result.stderr  # b.png has another size and is a failed row
    assert "differs" in (tmp_path / "out" / "gpu_kquant_report.jsonl").read_text()
    assert np.load(tmp_path / "out" / "indices.npy", mmap_mode="r").shape == (1, 20, 30)
    assert (tmp_path / "out" / "keys.txt").read_text() == "a\n"


def test_a_repaired_shard_joins_the_assembled_tokens(tmp_path: Path) -> None:
    """Rerun after replacing a truncated shard: old rows are kept, the new shard's rows are added in order."""
    from dataset_utils import truncate

    src = tmp_path / "shards"
    write_shard(src / "00000.tar", 0, 2)
    write_shard(src / "00001.tar", 2, 2)
    truncate(src / "00001.tar")
    out = tmp_path / "out"
    args = (src, "-k", 4, "-o", out, "--output-format", "tokens", "--palette", "shared", "--resize", "8x8", "--quiet")
    assert cli(*args, "--resize-mode", "fill").returncode == 1
    first = np.load(out / "indices.npy")
    assert first.shape == (2, 8, 8)
    write_shard(src / "00001.tar", 2, 2)  # repaired
    result = cli(*args, "--resize-mode", "fill")
    assert result.returncode == 0, result.stderr
    indices = np.load(out / "indices.npy", mmap_mode="r")
    assert indices.shape == (4, 8, 8) and np.array_equal(indices[:2], first)
    assert (out / "keys.txt").read_text().split() == [f"{i:09d}" for i in range(4)]


def recorded_parts(out: Path) -> set[str]:
    """The token parts (commit markers) the manifest of ``out`` records as written."""
    return {path for path in recorded_outputs(out) if path.startswith(".gpu_kquant-tokens/")}


def test_kill_9_then_resume_gives_identical_tokens(tmp_path: Path) -> None:
    """SIGKILL once the first shard's part is committed; the rerun's arrays equal an uninterrupted run's."""
    src = tmp_path / "shards"
    for s in range(6):
        write_shard(src / f"{s:05d}.tar", 4 * s, 4)
    args = ["-k", "8", "--output-format", "tokens", "--palette", "shared", "--resize", "8x8", "--resize-mode", "fill"]
    args += ["--quiet", "--batch-size", "1"]
    clean = tmp_path / "clean"
    assert cli(src, "-o", clean, *args).returncode == 0
    out = tmp_path / "out"
    command = [sys.executable, "-m", "gpu_kquant", str(src), "-o", str(out), *args]
    proc = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL)
    parts = out / ".gpu_kquant-tokens"
    deadline = time.time() + 120
    while time.time() < deadline and not recorded_parts(out):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # A part counts as committed once the manifest records it; one renamed into place but not
    # yet recorded when the kill came is redone (the manifest cannot vouch for it).
    done = recorded_parts(out)
    assert 1 <= len(done) < 6 and not (out / "indices.npy").exists(), "the run should have been killed midway"
    rerun = cli(src, "-o", out, *args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done)} skipped" in rerun.stderr  # committed parts are not redone
    for name in ("indices.npy", "palette.npy", "keys.txt"):
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    assert np.load(out / "indices.npy", mmap_mode="r").shape == (24, 8, 8)
    # Every part was assembled and removed (the killed run's temporary files go once stale, as everywhere).
    assert not list(parts.glob("*.json")) and not list(parts.glob("*.bin"))


def test_more_than_256_colours_give_uint16_tokens(tmp_path: Path) -> None:
    """A 300-colour palette file: indices.npy is uint16 and every index is the nearest colour (float64)."""
    from gpu_kquant.datasets import DatasetOptions, assemble_tokens, find_shards, process_shard
    from gpu_kquant.options import ResizeOptions

    write_shard(tmp_path / "a.tar", 0, 2)
    first = resize(decode(read_tar(tmp_path / "a.tar")["000000000.jpg"]), (16, 12), "fill")
    palette = np.unique(first.reshape(-1, 3), axis=0)[::-1]  # the image's own colours, reversed
    assert len(palette) >= 150
    palette = np.concatenate([palette, palette // 2 + 100])[:300].astype(np.uint8)
    (shard,), _ = find_shards([str(tmp_path / "a.tar")])
    options = DatasetOptions(
        out=tmp_path / "out", output_format="tokens", palette=palette, resize=ResizeOptions(16, 12, "fill")
    )
    assert [r.status for r in process_shard(shard, options)] == ["ok", "ok"]
    assert assemble_tokens(options.out, [shard.name], palette) == []
    indices = np.load(options.out / "indices.npy", mmap_mode="r")
    assert indices.dtype == np.uint16 and indices.shape == (2, 12, 16) and int(indices.max()) > 255
    pixels = first.reshape(-1, 1, 3).astype(np.float64)
    dist = ((pixels - palette[None].astype(np.float64)) ** 2).sum(-1)
    assert np.allclose(dist[np.arange(len(dist)), indices[0].reshape(-1)], dist.min(1), atol=1e-6)
    assert np.array_equal(np.load(options.out / "palette.npy"), palette)


def test_tokens_never_replace_a_users_files(tmp_path: Path) -> None:
    """indices.npy (and keys.txt, palette.npy, tokens.json) in OUT are replaced only when gpu_kquant wrote them."""
    write_shard(tmp_path / "a.tar", 0, 2)
    out = tmp_path / "out"
    out.mkdir()
    mine = np.arange(6, dtype=np.uint8)
    np.save(out / "indices.npy", mine)
    args = ("-o", out, "--output-format", "tokens", "--palette", "shared", "--quiet")
    result = cli(tmp_path / "a.tar", *args)
    assert result.returncode == 1, result.stderr
    report = [json.loads(line) for line in (out / "gpu_kquant_report.jsonl").read_text().splitlines()]
    assert {r["status"] for r in report} == {"failed"}
    assert all("indices.npy exists and was not written by gpu_kquant" in r["reason"] for r in report)
    assert np.array_equal(np.load(out / "indices.npy"), mine)
    # once moved away, the run writes the layout; a rerun skips the shard the manifest vouches for
    (out / "indices.npy").unlink()
    assert cli(tmp_path / "a.tar", *args).returncode == 0
    assert np.load(out / "indices.npy").shape[0] == 2
    rerun = cli(tmp_path / "a.tar", *args)
    assert rerun.returncode == 0 and "1 skipped" in rerun.stderr, rerun.stderr


def test_a_rerun_with_another_k_refits_the_shared_palette(tmp_path: Path) -> None:
    """-k 8 then -k 16 into one OUT: the second run fits 16 colours and redoes every part, not reuses 8."""
    src = tmp_path / "shards"
    for s in range(2):
        write_shard(src / f"{s:05d}.tar", 4 * s, 4)
    args = ["--palette", "shared", "--output-format", "tokens", "--resize", "8x8", "--resize-mode", "fill", "--quiet"]
    out = tmp_path / "out"
    assert cli(src, "-o", out, "-k", 8, *args).returncode == 0
    rerun = cli(src, "-o", out, "-k", 16, *args)
    assert rerun.returncode == 0, rerun.stderr
    assert np.load(out / "palette.npy").shape == (16, 3) and "8 ok" in rerun.stderr
    assert int(np.load(out / "indices.npy").max()) >= 8
