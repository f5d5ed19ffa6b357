"""Per-file report rows (JSON lines) and the end-of-run summary."""

from __future__ import annotations

import json
import math
import os
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from .preview import Gallery

__all__ = ["FAILURES", "ReportWriter", "Row", "Summary"]

STATUSES = ("ok", "skipped", "failed")
# Statuses that make the exit code say some inputs failed ("larger" is a chosen skip).
FAILURES = ("failed", "quality")


@dataclass
class Row:
    """One input's outcome, as written to the report."""

    input: str
    output: str | None
    status: str
    reason: str | None = None
    width: int | None = None
    height: int | None = None
    k: int | None = None
    colors: int | None = None
    input_bytes: int | None = None
    output_bytes: int | None = None
    mse: float | None = None
    psnr: float | None = None
    seconds: float | None = None
    space: str | None = None
    dither: str | None = None
    psnr_blur: float | None = None
    ciede2000: float | None = None
    notes: list[str] = field(default_factory=list)
    # What the --preview gallery shows of this image; not written to the report.
    preview: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> str:
        data = asdict(self)
        del data["preview"]
        for key in ("psnr", "psnr_blur"):
            if data[key] is not None and math.isinf(data[key]):
                data[key] = "inf"  # JSON has no infinity
        return json.dumps(data, ensure_ascii=False)


@dataclass
class Summary:
    """Totals of a run, filled as rows arrive."""

    counts: Counter[str] = field(default_factory=Counter)
    bytes_in: int = 0
    bytes_out: int = 0
    pixels: int = 0
    psnr_sum: float = 0.0
    psnr_n: int = 0
    ciede_sum: float = 0.0
    ciede_n: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
    ignored: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_stage(self, stage: str, seconds: float) -> None:
        """Add time spent in a pipeline stage (thread-safe)."""
        with self._lock:
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    def add(self, row: Row) -> None:
        self.counts[row.status] += 1
        if row.status == "ok":
            self.bytes_in += row.input_bytes or 0
            self.bytes_out += row.output_bytes or 0
            self.pixels += (row.width or 0) * (row.height or 0)
            if row.psnr is not None and math.isfinite(row.psnr):
                self.psnr_sum += row.psnr
                self.psnr_n += 1
            if row.ciede2000 is not None:
                self.ciede_sum += row.ciede2000
                self.ciede_n += 1

    @property
    def failed(self) -> int:
        return sum(self.counts.get(status, 0) for status in FAILURES)

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        parts = [f"{self.counts.get(s, 0)} {s}" for s in STATUSES]
        parts += [f"{n} {s}" for s, n in sorted(self.counts.items()) if s not in STATUSES]
        out = [
            "gpu_kquant: " + ", ".join(parts) + (f" ({self.ignored} non-image files ignored)" if self.ignored else "")
        ]
        if self.bytes_in:
            saving = 100.0 * (1 - self.bytes_out / self.bytes_in)
            out.append(f"  bytes: {_size(self.bytes_in)} in, {_size(self.bytes_out)} out ({saving:.1f}% saved)")
        if self.psnr_n:
            out.append(f"  mean PSNR: {self.psnr_sum / self.psnr_n:.2f} dB")
        if self.ciede_n:
            out.append(f"  mean CIEDE2000: {self.ciede_sum / self.ciede_n:.3f}")
        ok = self.counts.get("ok", 0)
        if self.seconds > 0 and ok:
            out.append(
                f"  speed: {ok / self.seconds:.2f} images/s, {self.pixels / 1e6 / self.seconds:.2f} megapixels/s"
                f" in {self.seconds:.1f} s"
            )
        if self.stage_seconds:
            stages = ", ".join(f"{name} {sec:.1f} s" for name, sec in self.stage_seconds.items())
            out.append(f"  time by stage (summed over threads): {stages}")
        if self.interrupted:
            out.append("  interrupted: rerun the same command to resume (finished outputs are skipped)")
        return out


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"  # pragma: no cover


class ReportWriter:
    """Appends rows to a JSON-lines file as they arrive (thread-safe), and sums them."""

    def __init__(self, path: Path | None, summary: Summary, gallery: Gallery | None = None) -> None:
        self.path = path
        self.summary = summary
        self.gallery = gallery
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, row: Row) -> None:
        with self._lock:
            self.summary.add(row)
            if self._file is not None:
                self._file.write(row.to_json() + "\n")
                self._file.flush()
            if self.gallery is not None and row.preview is not None:
                self.gallery.add(row.preview)

    def close(self) -> None:
        """Flush the report and render the preview gallery, if any."""
        if self.gallery is not None:
            self.gallery.render()
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
