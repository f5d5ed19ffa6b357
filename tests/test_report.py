"""Report rows as JSON lines, the summary's counts and the exit-code rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

from gpu_kquant.report import ReportWriter, Row, Summary


def test_row_json_has_no_infinity_and_no_preview() -> None:
    row = Row("a.png", "out/a.png", "ok", psnr=math.inf, preview={"input": "a.png"})
    data = json.loads(row.to_json())
    assert data["psnr"] == "inf" and "preview" not in data
    assert data["input"] == "a.png" and data["status"] == "ok"


def test_writer_appends_one_line_per_row_and_sums(tmp_path: Path) -> None:
    summary = Summary()
    writer = ReportWriter(tmp_path / "sub" / "report.jsonl", summary)
    writer.write(Row("a", "x", "ok", width=4, height=5, input_bytes=100, output_bytes=25, psnr=30.0))
    writer.write(Row("b", "y", "ok", width=2, height=2, input_bytes=100, output_bytes=75, psnr=40.0))
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
    assert "50.0% saved" in text and "mean PSNR: 35.00 dB" in text


def test_summary_says_how_to_resume_when_interrupted() -> None:
    summary = Summary(interrupted=True)
    summary.add_stage("decode", 1.5)
    summary.add_stage("decode", 0.5)
    text = "\n".join(summary.lines())
    assert "decode 2.0 s" in text and "rerun the same command to resume" in text
