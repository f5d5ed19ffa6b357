"""The output manifest: a user's file is never written over, and resume trusts only intact outputs of these options."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
from common_utils import cli, photo, read_report
from PIL import Image

from gpu_kquant.engine_local import run_local
from gpu_kquant.manifest import (
    ABSENT,
    CURRENT,
    FOREIGN,
    MANIFEST,
    STALE,
    Manifest,
    content_hash,
    fingerprint,
    fingerprint_id,
)
from gpu_kquant.options import EngineOptions, FitOptions, OutputOptions, ResizeOptions, RunOptions
from gpu_kquant.planning import plan_job
from gpu_kquant.report import Summary
from gpu_kquant.runsetup import RunSetup

REPORT = "gpu_kquant_report.jsonl"


def inputs(tmp_path: Path, n: int = 3) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    for i in range(n):
        Image.fromarray(photo("coffee")[i * 40 : i * 40 + 48, :64]).save(src / f"{i}.png")
    return src


def run(src: Path, out: Path, k: int = 4, overwrite: bool = False) -> Summary:
    options = RunOptions(
        (src,), FitOptions(k=k), OutputOptions(out=out, overwrite=overwrite), EngineOptions(device="cpu", workers=1)
    )
    return run_local(plan_job(options), options)


def last_rows(out: Path) -> dict[str, dict]:
    """The last report row of each input, by file name."""
    return read_report(out / REPORT)


def test_a_users_file_at_an_output_path_survives_overwrite(tmp_path: Path) -> None:
    src, out = inputs(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "1.png").write_bytes(b"the user's own file")
    result = cli(src, "-k", 4, "-o", out, "--overwrite", "--quiet")
    assert result.returncode == 1, result.stderr
    assert (out / "1.png").read_bytes() == b"the user's own file"
    rows = last_rows(out)
    assert rows["1.png"]["status"] == "failed"
    assert "exists and was not written by gpu_kquant; move it or choose another -o" in rows["1.png"]["reason"]
    assert rows["0.png"]["status"] == rows["2.png"]["status"] == "ok"
    # gpu_kquant's own outputs are redone with --overwrite; the user's file is still refused
    again = run(src, out, overwrite=True)
    assert again.counts == {"ok": 2, "failed": 1}
    assert (out / "1.png").read_bytes() == b"the user's own file"


def test_a_folder_at_an_output_path_is_refused(tmp_path: Path) -> None:
    src, out = inputs(tmp_path, 1), tmp_path / "out"
    (out / "0.png").mkdir(parents=True)
    assert run(src, out).counts == {"failed": 1}
    assert (out / "0.png").is_dir()


def test_a_listed_intact_output_is_skipped_even_in_a_copied_folder(tmp_path: Path) -> None:
    src, out = inputs(tmp_path), tmp_path / "out"
    assert run(src, out).counts == {"ok": 3}
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert run(src, out).counts == {"skipped": 3}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == stamp
    # Copied elsewhere (new modification times): paths are relative and the bytes still match.
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    assert run(src, moved).counts == {"skipped": 3}


def test_a_zero_byte_output_is_redone_on_resume(tmp_path: Path) -> None:
    src, out = inputs(tmp_path), tmp_path / "out"
    assert run(src, out).counts == {"ok": 3}
    (out / "1.png").write_bytes(b"")
    assert run(src, out).counts == {"ok": 1, "skipped": 2}
    assert last_rows(out)["1.png"]["status"] == "ok"
    with Image.open(out / "1.png") as img:
        assert img.mode == "P" and img.size == (64, 48)


def test_an_output_changed_in_place_is_redone(tmp_path: Path) -> None:
    src, out = inputs(tmp_path, 1), tmp_path / "out"
    run(src, out)
    good = (out / "0.png").read_bytes()
    damaged = bytearray(good)
    damaged[-20] ^= 0xFF  # same size, other bytes (a flipped bit on disk)
    (out / "0.png").write_bytes(bytes(damaged))
    assert run(src, out).counts == {"ok": 1}
    assert (out / "0.png").read_bytes() == good


def test_an_output_made_with_another_k_is_redone_on_resume(tmp_path: Path) -> None:
    src, out = inputs(tmp_path), tmp_path / "out"
    assert run(src, out, k=4).counts == {"ok": 3}
    assert run(src, out, k=8).counts == {"ok": 3}
    for p in out.glob("*.png"):
        with Image.open(p) as img:
            assert 4 < len(img.getcolors(256)) <= 8, p
    assert run(src, out, k=8).counts == {"skipped": 3}


def test_a_torn_last_manifest_line_is_tolerated(tmp_path: Path) -> None:
    src, out = inputs(tmp_path), tmp_path / "out"
    run(src, out)
    manifest = out / MANIFEST
    lines = manifest.read_text().splitlines()
    torn = lines[-1][: len(lines[-1]) // 2]  # a kill -9 in the middle of the last entry (2.png's)
    manifest.write_text("\n".join(lines[:-1]) + "\n" + torn)
    summary = run(src, out)
    # The entry that was cut short is gone, so that output is redone (its claim keeps it gpu_kquant's).
    assert summary.counts == {"skipped": 2, "ok": 1}
    for line in manifest.read_text().splitlines()[len(lines) :]:
        json.loads(line)  # every line after the torn one is whole
    assert run(src, out).counts == {"skipped": 3}


def test_outputs_without_a_manifest_are_not_trusted(tmp_path: Path) -> None:
    """Outputs of a version before the manifest (or anyone else's) are neither trusted nor overwritten."""
    src, out = inputs(tmp_path, 2), tmp_path / "out"
    run(src, out)
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    (out / MANIFEST).unlink()
    assert run(src, out).counts == {"failed": 2}
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == before


def setup(k: int = 4) -> RunSetup:
    return RunSetup(FitOptions(k=k), OutputOptions())


def test_verdicts(tmp_path: Path) -> None:
    manifest = Manifest([tmp_path], fingerprint(setup()), "run1")
    claimed, other = tmp_path / "a" / "claimed.png", tmp_path / "other.png"
    done = tmp_path / "a" / os.fsdecode(b"done-\xff.png")  # a name that is not UTF-8 (surrogate-escaped)
    assert manifest.verdict(done) == ABSENT
    manifest.claim([claimed, done])
    for path in (claimed, done, other):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"bytes")
    manifest.record(done, 5, content_hash(b"bytes"))
    manifest.close()
    fresh = Manifest([tmp_path], fingerprint(setup()), "run2")
    # renamed into place by a run killed before its entry: ours, so redone
    assert fresh.verdict(claimed) == STALE
    assert fresh.verdict(done) == CURRENT
    assert fresh.verdict(other) == FOREIGN
    assert Manifest([tmp_path], fingerprint(setup(k=5)), "run3").verdict(done) == STALE
    lines = [json.loads(x) for x in (tmp_path / MANIFEST).read_text().splitlines()]
    assert lines[0]["options"] == fingerprint_id(lines[0]["settings"]) == manifest.options
    assert lines[-1]["path"] == "a/done-\udcff.png" and lines[-1]["size"] == 5


def test_the_fingerprint_follows_what_makes_the_bytes() -> None:
    from gpu_kquant.palette import Palette

    base = fingerprint_id(fingerprint(setup()))
    changed = [
        RunSetup(FitOptions(k=4, seed=1), OutputOptions()),
        RunSetup(FitOptions(k=4, space="lab"), OutputOptions()),
        RunSetup(FitOptions(k=4), OutputOptions(format="webp")),
        RunSetup(FitOptions(k=4), OutputOptions(dither="fs")),
        RunSetup(FitOptions(k=4), OutputOptions(compress_level=9)),
        RunSetup(FitOptions(k=4), OutputOptions(quality=(20.0, 30.0))),
        RunSetup(FitOptions(k=4), OutputOptions(resize=ResizeOptions(32, 32, "fit"))),
        RunSetup(FitOptions(k=4), OutputOptions(), Palette(np.zeros((4, 3), np.uint8))),
        RunSetup(FitOptions(k=4, exact_finish=True), OutputOptions()),
        RunSetup(FitOptions(k=4, exact_finish=False), OutputOptions()),
    ]
    ids = {fingerprint_id(fingerprint(s)) for s in changed}
    assert len(ids) == len(changed) and base not in ids
    assert "exact_finish" not in fingerprint(setup())["fit"]  # the default: ids from before the option stand
    same_bytes = dataclasses.replace(setup(), output=OutputOptions(overwrite=True, skip_if_larger=True, preview=True))
    assert fingerprint_id(fingerprint(same_bytes)) == base
