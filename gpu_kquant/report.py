"""Per-file report rows (JSON lines) and the end-of-run summary.

The report is appended to, never truncated: a resumed run adds its rows after the
earlier runs' ones, each row carries its run's id, and :func:`summarize_report` gives
the final state of every input. A run holds an advisory lock (``flock``) beside its
report, so a second run writing the same report at the same time is refused.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import threading
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

from .imagefiles import TEMP_PREFIX
from .preview import Gallery

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory lock
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FAILURES",
    "ReportError",
    "ReportWriter",
    "Row",
    "RunLock",
    "Summary",
    "check_report_path",
    "new_run_id",
    "summarize_report",
]

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
    ssim: float | None = None
    notes: list[str] = field(default_factory=list)
    # blake2b-128 (hex) of an ``ok`` row's output bytes, as the manifest records it (gpu_kquant.manifest).
    output_hash: str | None = None
    # The run that wrote the row (set by ReportWriter): rows of resumed runs accumulate.
    run: str | None = None
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
    ssim_sum: float = 0.0
    ssim_n: int = 0
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
            if row.ssim is not None:
                self.ssim_sum += row.ssim
                self.ssim_n += 1

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
        if self.ssim_n:
            out.append(f"  mean SSIM: {self.ssim_sum / self.ssim_n:.4f}")
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


class ReportError(ValueError):
    """The report cannot be used (a folder, not a report, an input, or locked by another run); one line."""


LOCK_PREFIX = TEMP_PREFIX
"""Lock files start like temporary files (imagefiles.TEMP_PREFIX), so the input walk skips them."""

_SNIFF_BYTES = 1 << 20


def new_run_id() -> str:
    """A fresh run id: 12 hex digits, unique enough to tell the runs of one report apart."""
    return uuid.uuid4().hex[:12]


def _is_report(path: Path) -> bool:
    """True when ``path`` is empty or its first line is a report row (a JSON object with input and status)."""
    with open(path, "rb") as f:
        first = f.readline(_SNIFF_BYTES)
    if not first.strip():
        return True
    try:
        row = json.loads(first)
    except ValueError:
        return False
    return isinstance(row, dict) and "input" in row and "status" in row


def check_report_path(path: Path, inputs: Iterable[Path] = ()) -> None:
    """Refuse a report path that would destroy something: a folder, a non-report file, an input.

    Raises:
        ReportError: with a one-line reason; nothing is opened for writing.
    """
    resolved = path.resolve()
    if any(resolved == Path(p).resolve() for p in inputs):
        raise ReportError(f"the report {path} is an input file; choose another --report")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ReportError(f"cannot use the report {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise ReportError(f"the report {path} is a folder; --report names a file")
    if not stat.S_ISREG(mode):
        raise ReportError(f"the report {path} is not a regular file")
    try:
        ok = _is_report(path)
    except OSError as exc:
        raise ReportError(f"cannot read the report {path}: {exc.strerror or exc}") from None
    if not ok:
        raise ReportError(f"{path} exists and is not a gpu_kquant report; refusing to overwrite it")


_HELD: dict[str, list[Any]] = {}  # lock file -> [open file, holders]: re-entry within one process
_HELD_GUARD = threading.Lock()


class RunLock:
    """An advisory ``flock`` on ``FOLDER/.gpu_kquant-REPORT.lock``, held while a run writes that report.

    The default report lives in the output folder, so two runs into one folder exclude
    each other while ``--shard`` runs (one report each) do not. Re-entrant within a
    process (the CLI takes it before planning, the report writer again). The lock file
    is removed on release (a run killed with -9 leaves it, unlocked and harmless); a
    newcomer checks that the file it locked is still the one at the path. Without
    ``fcntl`` (Windows) it does nothing.
    """

    def __init__(self, report: Path) -> None:
        self.path = report.parent / f"{LOCK_PREFIX}{report.name}.lock"
        self._key = ""

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`ReportError` at once when another process holds it."""
        if fcntl is None or self._key:
            return self
        key = os.path.realpath(self.path)
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held is not None:
                held[1] += 1
                self._key = key
                return self
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                f = open(self.path, "a+")  # noqa: SIM115 - kept open while the lock is held
            except OSError as exc:  # a read-only or missing output location is a usage error
                raise ReportError(f"cannot write in {self.path.parent}: {exc.strerror or exc}") from None
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                owner = f.read(200).strip()
                f.close()
                raise ReportError(
                    f"another gpu_kquant run is writing {self.path.parent} ({owner or 'lock held'}); "
                    "wait for it to finish or choose another -o/--report"
                ) from None
            if not _same_file(f, self.path):  # the previous holder unlinked it meanwhile
                f.close()
                raise ReportError(f"another gpu_kquant run is writing {self.path.parent}; try again")
            f.truncate(0)
            f.write(f"pid {os.getpid()}\n")
            f.flush()
            _HELD[key] = [f, 1]
            self._key = key
        return self

    def release(self) -> None:
        """Drop this holder; the lock is released when the last holder of the process lets go."""
        if not self._key:
            return
        with _HELD_GUARD:
            held = _HELD[self._key]
            held[1] -= 1
            if held[1] == 0:
                del _HELD[self._key]
                with contextlib.suppress(OSError):
                    os.unlink(self.path)  # while still locked: a newcomer checks it locked the live file
                held[0].close()  # closing the file releases the flock
        self._key = ""

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(f: IO[str], path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
    except OSError:
        return False


class ReportWriter:
    """Appends rows to a JSON-lines file as they arrive (thread-safe), and sums them.

    The file is never truncated: rows go after those of earlier runs (a resumed run
    keeps the first run's rows), each stamped with ``run_id``. Opening checks the path
    (:func:`check_report_path`) and takes the :class:`RunLock` until :meth:`close`.

    Raises:
        ReportError: the path is a folder, not a report, or locked by another run.
    """

    def __init__(
        self, path: Path | None, summary: Summary, gallery: Gallery | None = None, *, run_id: str | None = None
    ) -> None:
        self.path = path
        self.summary = summary
        self.gallery = gallery
        self.run_id = run_id or new_run_id()
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self._run_lock: RunLock | None = None
        if path is not None:
            check_report_path(path)
            self._run_lock = RunLock(path).acquire()
            try:
                self._file = _open_append(path)
            except BaseException:
                self._run_lock.release()
                raise

    def write(self, row: Row) -> None:
        with self._lock:
            if row.run is None:
                row.run = self.run_id
            self.summary.add(row)
            if self._file is not None:
                self._file.write(row.to_json() + "\n")
                self._file.flush()
            if self.gallery is not None and row.preview is not None:
                self.gallery.add(row.preview)

    def close(self) -> None:
        """Flush the report, render the preview gallery, if any, and release the lock."""
        try:
            if self.gallery is not None:
                self.gallery.render()
        finally:
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                self._file = None
            if self._run_lock is not None:
                self._run_lock.release()
                self._run_lock = None


def _open_append(path: Path) -> IO[str]:
    """Open for appending; a last line cut short by a killed run is ended first, so rows stay whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - closed in ReportWriter.close()
    if f.tell() > 0:
        with open(path, "rb") as raw:
            raw.seek(-1, os.SEEK_END)
            if raw.read(1) != b"\n":
                f.write("\n")
    return f


_ROW_FIELDS = {f.name for f in fields(Row)} - {"preview"}


def summarize_report(path: Path) -> Summary:
    """The final state of every input over all the runs in a report: the last row per input wins.

    A ``skipped`` row (its output already existed) does not replace an earlier row of the
    same input, which says how that output was made. Lines that are not rows (cut short
    by a kill) are left out.
    """
    final: dict[str, Row] = {}
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if not isinstance(data, dict) or "input" not in data or "status" not in data:
                continue
            for key in ("psnr", "psnr_blur"):
                if data.get(key) == "inf":
                    data[key] = math.inf
            row = Row(**{k: v for k, v in data.items() if k in _ROW_FIELDS})
            if row.status == "skipped" and row.input in final:
                continue
            final[row.input] = row
    summary = Summary()
    for row in final.values():
        summary.add(row)
    return summary
