"""The report: rows as JSON lines, the summary's counts and the exit-code rule; appended across runs
with a run id per row, the final state per input, the run lock, safe paths."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from common_utils import ROOT

from gpu_kquant.report import ReportError, ReportWriter, Row, RunLock, Summary, check_report_path, summarize_report


def write_run(path: Path, *rows: Row) -> str:
    writer = ReportWriter(path, Summary())
    for row in rows:
        writer.write(row)
    writer.close()
    return writer.run_id


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_report_is_appended_across_runs_with_run_ids(tmp_path: Path) -> None:
    path = tmp_path / "out" / "report.jsonl"
    first = write_run(path, Row("a.png", "out/a.png", "ok"), Row("b.png", None, "failed", reason="x"))
    second = write_run(path, Row("a.png", "out/a.png", "skipped", reason="output exists"))
    assert first != second
    rows = lines(path)
    assert [(r["input"], r["status"], r["run"]) for r in rows] == [
        ("a.png", "ok", first),
        ("b.png", "failed", first),
        ("a.png", "skipped", second),
    ]


def test_a_line_cut_short_by_a_kill_does_not_swallow_the_next_row(tmp_path: Path) -> None:
    path = tmp_path / "report.jsonl"
    write_run(path, Row("a.png", "a.out", "ok"))
    with open(path, "a") as f:
        f.write('{"input": "b.png", "outp')  # killed mid-write
    write_run(path, Row("b.png", "b.out", "ok"))
    text = path.read_text().splitlines()
    assert len(text) == 3 and json.loads(text[0])["input"] == "a.png" and json.loads(text[2])["input"] == "b.png"
    assert summarize_report(path).counts == {"ok": 2}


def test_summary_counts_the_final_state_of_every_input(tmp_path: Path) -> None:
    path = tmp_path / "report.jsonl"
    write_run(
        path,
        Row("a.png", "a.out", "ok", input_bytes=100, output_bytes=40),
        Row("b.png", "b.out", "failed", reason="quantization failed"),
        Row("c.png", "c.out", "ok", input_bytes=10, output_bytes=5),
    )
    # a resumed run: a is done (skipped), b is redone and now succeeds, d is new and fails
    write_run(
        path,
        Row("a.png", "a.out", "skipped", reason="output exists"),
        Row("b.png", "b.out", "ok", input_bytes=50, output_bytes=20),
        Row("c.png", "c.out", "failed", reason="cannot decode"),
        Row("d.png", "d.out", "failed", reason="cannot decode"),
        Row("e.png", "e.out", "skipped", reason="output exists"),
    )
    summary = summarize_report(path)
    assert summary.counts == {"ok": 2, "failed": 2, "skipped": 1}
    assert (summary.bytes_in, summary.bytes_out) == (150, 60)


HOLD = """
import sys
from pathlib import Path
from gpu_kquant.report import RunLock
lock = RunLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def hold_lock(report: Path) -> subprocess.Popen:
    """Another process holding the run lock of ``report`` until its stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(report)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_concurrent_run_is_refused(tmp_path: Path) -> None:
    report = tmp_path / "out" / "gpu_kquant_report.jsonl"
    holder = hold_lock(report)
    try:
        with pytest.raises(ReportError, match="another gpu_kquant run is writing"):
            ReportWriter(report, Summary())
        with pytest.raises(ReportError, match="another gpu_kquant run"):
            RunLock(report).acquire()
    finally:
        holder.communicate("", timeout=60)
    # free again once the other run has ended; re-entrant within one process
    with RunLock(report):
        writer = ReportWriter(report, Summary())
        writer.write(Row("a.png", None, "ok"))
        writer.close()
    assert lines(report)[0]["input"] == "a.png"
    ReportWriter(report, Summary()).close()  # the writer released the lock it took
    assert not RunLock(report).path.exists()  # and the last holder removed the lock file


def test_report_path_that_would_destroy_something_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"my": "data"}\n')
    (tmp_path / "folder").mkdir()
    for path, reason in (
        (image, "not a gpu_kquant report"),
        (notes, "not a gpu_kquant report"),
        (tmp_path / "folder", "is a folder"),
    ):
        before = path.read_bytes() if path.is_file() else None
        with pytest.raises(ReportError, match=reason):
            ReportWriter(path, Summary())
        if before is not None:
            assert path.read_bytes() == before
    with pytest.raises(ReportError, match="is an input file"):
        check_report_path(tmp_path / "x.jsonl", [tmp_path / "x.jsonl"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    check_report_path(empty)  # an empty file or an earlier report is fine
    write_run(empty, Row("a.png", None, "ok"))
    check_report_path(empty)
    check_report_path(tmp_path / "new.jsonl")


def test_an_unusable_output_location_is_a_report_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ReportError, match="cannot write in"):
        RunLock(tmp_path / "file" / "report.jsonl").acquire()
    with pytest.raises(ReportError, match="cannot use the report"):
        ReportWriter(tmp_path / "file" / "report.jsonl", Summary())


def test_a_read_only_output_folder_is_a_report_error(tmp_path: Path) -> None:
    import os

    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(ReportError, match="cannot write in"):
            ReportWriter(out / "report.jsonl", Summary())
    finally:
        out.chmod(0o755)


def test_row_json_has_no_infinity_and_no_preview() -> None:
    row = Row("a.png", "out/a.png", "ok", psnr=math.inf, preview={"input": "a.png"})
    data = json.loads(row.to_json())
    assert data["psnr"] == "inf" and "preview" not in data
    assert data["input"] == "a.png" and data["status"] == "ok"


def test_writer_appends_one_line_per_row_and_sums(tmp_path: Path) -> None:
    summary = Summary()
    writer = ReportWriter(tmp_path / "sub" / "report.jsonl", summary)
    writer.write(Row("a", "x", "ok", width=4, height=5, input_bytes=100, output_bytes=25, psnr=30.0, ssim=0.8))
    writer.write(Row("b", "y", "ok", width=2, height=2, input_bytes=100, output_bytes=75, psnr=40.0, ssim=0.9))
    writer.write(Row("c", "z", "failed", reason="bad"))
    writer.write(Row("d", "w", "quality", reason="too low"))
    writer.close()
    lines = (tmp_path / "sub" / "report.jsonl").read_text().splitlines()
    assert [json.loads(line)["input"] for line in lines] == ["a", "b", "c", "d"]
    assert summary.counts == {"ok": 2, "failed": 1, "quality": 1}
    assert summary.failed == 2  # "quality" fails the run, like "failed"
    assert (summary.pixels, summary.bytes_in, summary.bytes_out) == (24, 200, 100)
    text = "\n".join(summary.lines())
    assert "2 ok, 0 skipped, 1 failed, 1 quality" in text
    assert "50.0% saved" in text and "mean PSNR: 35.00 dB" in text and "mean SSIM: 0.8500" in text
    assert json.loads(lines[0])["ssim"] == 0.8


def test_summary_says_how_to_resume_when_interrupted() -> None:
    summary = Summary(interrupted=True)
    summary.add_stage("decode", 1.5)
    summary.add_stage("decode", 0.5)
    text = "\n".join(summary.lines())
    assert "decode 2.0 s" in text and "rerun the same command to resume" in text


def test_lock_files_are_skipped_like_temporary_files(tmp_path: Path) -> None:
    """The input walk skips names starting with TEMP_PREFIX; the lock file must be one of them."""
    from gpu_kquant.imagefiles import TEMP_PREFIX

    lock = RunLock(tmp_path / "report.jsonl")
    assert lock.path.name.startswith(TEMP_PREFIX)
