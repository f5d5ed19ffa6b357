"""WebDataset/img2dataset shards end to end through the command line: shard in, shard out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from common_utils import ROOT, cli, recorded_outputs
from dataset_utils import caption, colours, decode, jpeg, meta, psnr, read_tar, truncate, write_shard


def _report(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "gpu_kquant_report.jsonl").read_text().splitlines()]


def test_shards_in_shards_out(tmp_path: Path) -> None:
    src = tmp_path / "shards"
    keys0 = write_shard(src / "00000.tar", 0, 4, corrupt={2})
    keys1 = write_shard(src / "00001.tar", 4, 3)
    write_shard(src / "00002.tar", 7, 3)
    truncate(src / "00002.tar")
    out = tmp_path / "out"
    result = cli(f"{src}/{{00000..00002}}.tar", "-k", 8, "-o", out, "--quiet", "--seed", 3)
    assert result.returncode == 1, result.stderr  # the corrupt sample and the truncated shard failed
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]  # nothing for the cut shard
    for name, keys in (("00000.tar", keys0), ("00001.tar", keys1)):
        members = read_tar(out / name)
        expected = [k for k in keys if k != "000000002"]
        assert [m[:-4] for m in members if m.endswith(".png")] == expected  # every good key, in input order
        for key in expected:
            i = int(key)
            assert members[f"{key}.txt"] == caption(i)  # pass-through byte for byte
            assert members[f"{key}.json"] == meta(i)
            assert colours(members[f"{key}.png"]) <= 8
            info = json.loads(members[f"{key}.kquant.json"])
            assert info["source"] == f"{key}.jpg" and (info["width"], info["height"]) == (40, 32)
            assert len(info["palette"]) <= 8
        assert "000000002.png" not in members and "000000002.txt" not in members
    rows = _report(out)
    failed = {
        r["input"].rsplit("#", 1)[-1] if "#" in r["input"] else r["input"]: r["reason"]
        for r in rows
        if r["status"] == "failed"
    }
    assert set(failed) == {"000000002", str(src / "00002.tar")}
    assert "truncated" in failed[str(src / "00002.tar")]
    assert sum(r["status"] == "ok" for r in rows) == 6


def test_reported_psnr_matches_an_independent_measure(tmp_path: Path) -> None:
    """The PSNR in <key>.kquant.json, recomputed in float64 from the input JPEG and the output PNG."""
    write_shard(tmp_path / "a.tar", 0, 3)
    result = cli(tmp_path / "a.tar", "-k", 16, "-o", tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    src, members = read_tar(tmp_path / "a.tar"), read_tar(tmp_path / "out" / "a.tar")
    for key in ("000000000", "000000001", "000000002"):
        reported = json.loads(members[f"{key}.kquant.json"])["psnr"]
        assert reported == pytest.approx(psnr(decode(src[f"{key}.jpg"]), decode(members[f"{key}.png"])), abs=0.01)


def test_parquet_output_from_shards_and_resize(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    write_shard(tmp_path / "a.tar", 0, 3, size=(60, 30))
    out = tmp_path / "out"
    args = ("--output-format", "parquet", "--resize", "20x20", "--resize-mode", "fit", "--quiet")
    result = cli(tmp_path / "a.tar", "-k", 4, "-o", out, *args)
    assert result.returncode == 0, result.stderr
    table = pq.read_table(out / "a.parquet").to_pylist()
    assert [r["key"] for r in table] == ["000000000", "000000001", "000000002"]
    for i, row in enumerate(table):
        assert (row["width"], row["height"]) == (20, 10)  # 60x30 fitted into 20x20
        assert row["txt"] == caption(i) and row["json"] == meta(i)
        assert colours(row["image"]) <= 4 and len(row["palette"]) == 3 * row["colors"]


def test_kill_9_then_resume_gives_identical_bytes(tmp_path: Path) -> None:
    """Tar shards and Parquet files (when pyarrow is there) in one run, killed midway and resumed."""
    src = tmp_path / "shards"
    for s in range(6):
        write_shard(src / f"{s:05d}.tar", 4 * s, 4)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        pa = None
    if pa is not None:
        for s in range(2):
            keys = [f"p{s}{i:07d}" for i in range(4)]
            images = pa.array([jpeg(30 + 4 * s + i) for i in range(4)], pa.binary())
            pq.write_table(pa.table({"key": keys, "jpg": images}), src / f"part{s}.parquet", row_group_size=2)
    clean = tmp_path / "clean"
    assert cli(src, "-k", 8, "-o", clean, "--quiet", "--batch-size", 1).returncode == 0
    out = tmp_path / "out"
    args = [sys.executable, "-m", "gpu_kquant", str(src), "-k", "8", "-o", str(out), "--quiet", "--batch-size", "1"]
    proc = subprocess.Popen(args, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*.tar")) + list(out.glob("*.parquet")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    total = 6 if pa is None else 8
    done = sorted(p.name for p in out.glob("*.tar")) + sorted(p.name for p in out.glob("*.parquet"))
    assert 1 <= len(done) < total, "the run should have been killed midway"
    listed = recorded_outputs(out) & set(done)
    rerun = cli(src, "-k", 8, "-o", out, "--quiet", "--batch-size", 1)
    assert rerun.returncode == 0, rerun.stderr
    # outputs the manifest records are skipped; one renamed into place just before the kill,
    # before its entry was written, is only claimed and is redone
    assert f"{len(listed)} skipped" in rerun.stderr, rerun.stderr
    names = sorted(p.name for p in clean.iterdir() if p.suffix in (".tar", ".parquet"))
    assert names == sorted(p.name for p in out.iterdir() if p.suffix in (".tar", ".parquet")) and len(names) == total
    for name in names:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name


def test_output_folder_must_not_overwrite_the_input(tmp_path: Path) -> None:
    write_shard(tmp_path / "a.tar", 0, 1)
    before = (tmp_path / "a.tar").read_bytes()
    result = cli(tmp_path / "a.tar", "-o", tmp_path, "--quiet")
    assert result.returncode == 2 and "overwrite" in result.stderr
    assert (tmp_path / "a.tar").read_bytes() == before


def test_files_output_from_a_shard_resumes_per_file(tmp_path: Path) -> None:
    from gpu_kquant.datasets import DatasetOptions, find_shards, process_shard
    from gpu_kquant.options import FitOptions

    write_shard(tmp_path / "a.tar", 0, 3, corrupt={0})
    (shard,), _ = find_shards([str(tmp_path / "a.tar")])
    options = DatasetOptions(out=tmp_path / "out", output_format="files", fit=FitOptions(k=5))
    rows = process_shard(shard, options)
    assert [r.status for r in rows] == ["failed", "ok", "ok"]
    files = sorted(p.name for p in (tmp_path / "out" / "a").iterdir())
    assert files == ["000000001.png", "000000002.png"]
    assert all(colours((tmp_path / "out" / "a" / f).read_bytes()) <= 5 for f in files)
    assert [r.status for r in process_shard(shard, options)] == ["failed", "skipped", "skipped"]


def test_quality_picks_k_per_sample_and_leaves_out_the_ones_below_the_minimum(tmp_path: Path) -> None:
    """--quality 30-32 -k 6 on a shard: each written image measured in float64 against its input JPEG."""
    from gpu_kquant.datasets import DatasetOptions, find_shards, process_shard
    from gpu_kquant.options import FitOptions

    write_shard(tmp_path / "a.tar", 0, 6, corrupt={4})
    (shard,), _ = find_shards([str(tmp_path / "a.tar")])
    options = DatasetOptions(out=tmp_path / "out", fit=FitOptions(k=6), quality=(30.0, 32.0))
    rows = {r.input.rsplit("#", 1)[-1]: r for r in process_shard(shard, options)}
    src, members = read_tar(tmp_path / "a.tar"), read_tar(tmp_path / "out" / "a.tar")
    written = sorted({m.split(".")[0] for m in members})
    assert written == sorted(k for k, r in rows.items() if r.status == "ok") and len(written) >= 2
    refused = [k for k, r in rows.items() if r.status == "quality"]
    assert refused, "the crops below 30 dB at 6 colours must be refused"
    for key in refused:
        assert rows[key].psnr < 30 and "below the minimum of 30 dB" in rows[key].reason
        assert not any(m.startswith(key) for m in members)  # left out whole, caption too
    fewer = 0
    for key in written:
        measured = psnr(decode(src[f"{key}.jpg"]), decode(members[f"{key}.png"]))
        n = colours(members[f"{key}.png"])
        assert n == rows[key].colors <= 6 and measured >= 30 - 0.01
        if n < 6:  # fewer colours only when they reach the 32 dB target
            fewer += 1
            assert measured >= 32 - 0.01
    assert fewer >= 1 and rows["000000004"].status == "failed"


def test_quality_with_tokens_is_a_usage_error(tmp_path: Path) -> None:
    write_shard(tmp_path / "a.tar", 0, 1)
    args = ("--output-format", "tokens", "--palette", "shared", "--quality", "30-40", "--quiet")
    result = cli(tmp_path / "a.tar", "-o", tmp_path / "out", *args)
    assert result.returncode == 2 and "--quality picks k per image" in result.stderr and "tokens" in result.stderr
    assert not (tmp_path / "out").exists()  # refused before any palette was fitted


def test_format_sets_the_image_member_of_output_shards(tmp_path: Path) -> None:
    """--format gif: <key>.gif in the output shard, at most k colours, captions still byte for byte."""
    from gpu_kquant.datasets import DatasetOptions, find_shards, process_shard
    from gpu_kquant.options import FitOptions

    write_shard(tmp_path / "a.tar", 0, 2)
    (shard,), _ = find_shards([str(tmp_path / "a.tar")])
    options = DatasetOptions(out=tmp_path / "out", image_format="gif", fit=FitOptions(k=5))
    assert [r.status for r in process_shard(shard, options)] == ["ok", "ok"]
    members = read_tar(tmp_path / "out" / "a.tar")
    assert sorted(members) == sorted(
        f"{k}.{e}" for k in ("000000000", "000000001") for e in ("gif", "kquant.json", "txt", "json")
    )
    for i, key in enumerate(("000000000", "000000001")):
        assert members[f"{key}.gif"][:6] == b"GIF89a" or members[f"{key}.gif"][:6] == b"GIF87a"
        assert colours(members[f"{key}.gif"]) <= 5 and members[f"{key}.txt"] == caption(i)


def test_quality_needs_a_palette_per_image() -> None:
    """A library caller gets the CLI's refusals: --quality with tokens or with a fixed palette."""
    import numpy as np

    from gpu_kquant.datasets import DatasetOptions

    palette = np.zeros((4, 3), np.uint8)
    with pytest.raises(ValueError, match="tokens"):
        DatasetOptions(out=Path("o"), output_format="tokens", palette=palette, quality=(30.0, 40.0))
    with pytest.raises(ValueError, match="--palette"):
        DatasetOptions(out=Path("o"), palette=palette, quality=(30.0, 40.0))


def test_shard_outputs_follow_the_manifest(tmp_path: Path) -> None:
    """A file gpu_kquant did not write is never replaced; its own intact outputs are skipped; others redone."""
    from gpu_kquant.datasets import DatasetOptions, find_shards, process_shard
    from gpu_kquant.options import FitOptions

    write_shard(tmp_path / "a.tar", 0, 2)
    write_shard(tmp_path / "b.tar", 2, 2)
    shards, _ = find_shards([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")])
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.tar").write_bytes(b"the user's own tar")
    for overwrite in (False, True):
        options = DatasetOptions(out=out, fit=FitOptions(k=5), overwrite=overwrite)
        (a_rows, b_rows) = (process_shard(s, options) for s in shards)
        assert [r.status for r in a_rows] == ["failed"] and "not written by gpu_kquant" in (a_rows[0].reason or "")
        assert (out / "a.tar").read_bytes() == b"the user's own tar"
    assert [r.status for r in b_rows] == ["ok", "ok"]
    options = DatasetOptions(out=out, fit=FitOptions(k=5))
    assert [r.status for r in process_shard(shards[1], options)] == ["skipped"]
    # made with another -k: redone; then changed on disk (a full disk, say): redone
    other = DatasetOptions(out=out, fit=FitOptions(k=4))
    assert [r.status for r in process_shard(shards[1], other)] == ["ok", "ok"]
    assert all(colours(v) <= 4 for k, v in read_tar(out / "b.tar").items() if k.endswith(".png"))
    (out / "b.tar").write_bytes(b"")
    assert [r.status for r in process_shard(shards[1], other)] == ["ok", "ok"]
    assert [r.status for r in process_shard(shards[1], other)] == ["skipped"]


def test_loose_files_from_a_shard_never_replace_a_users_file(tmp_path: Path) -> None:
    from gpu_kquant.datasets import DatasetOptions, find_shards, process_shard
    from gpu_kquant.options import FitOptions

    write_shard(tmp_path / "a.tar", 0, 2)
    (shard,), _ = find_shards([str(tmp_path / "a.tar")])
    (tmp_path / "out" / "a").mkdir(parents=True)
    (tmp_path / "out" / "a" / "000000000.png").write_bytes(b"mine")
    options = DatasetOptions(out=tmp_path / "out", output_format="files", fit=FitOptions(k=5), overwrite=True)
    rows = process_shard(shard, options)
    assert [r.status for r in rows] == ["failed", "ok"] and "not written by gpu_kquant" in (rows[0].reason or "")
    assert (tmp_path / "out" / "a" / "000000000.png").read_bytes() == b"mine"
    # the file gpu_kquant wrote is listed: with other options it is redone, with the same ones skipped
    again = DatasetOptions(out=tmp_path / "out", output_format="files", fit=FitOptions(k=4))
    assert [r.status for r in process_shard(shard, again)] == ["failed", "ok"]
    assert [r.status for r in process_shard(shard, again)] == ["failed", "skipped"]


def test_shared_palette_of_a_dataset_never_replaces_a_users_file(tmp_path: Path) -> None:
    write_shard(tmp_path / "a.tar", 0, 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "palette.gpl").write_text("my palette\n")
    result = cli(tmp_path / "a.tar", "-o", out, "--palette", "shared", "--overwrite", "--quiet")
    assert result.returncode == 2 and "palette.gpl exists and was not written by gpu_kquant" in result.stderr
    assert (out / "palette.gpl").read_text() == "my palette\n" and not (out / "a.tar").exists()


def test_a_second_run_into_the_same_output_is_refused_before_any_work(tmp_path: Path) -> None:
    """While another run holds OUT's lock: exit 2 with one line, no traceback, no shared palette fitted."""
    from gpu_kquant.report import RunLock

    write_shard(tmp_path / "a.tar", 0, 2)
    out = tmp_path / "out"
    out.mkdir()
    lock = RunLock(out / "gpu_kquant_report.jsonl").acquire()  # as the other run's process would hold it
    try:
        result = cli(tmp_path / "a.tar", "-o", out, "--palette", "shared", "--output-format", "tokens", "--quiet")
    finally:
        lock.release()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "another gpu_kquant run is writing" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == []
