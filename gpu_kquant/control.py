"""What both engines share: stopping, emitting rows, the batching rule and the thread policy.

One definition of each control concept; the local and the Ray engine only differ in
how they get tasks to a :class:`gpu_kquant.worker.Worker` and its rows back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import torch

from .manifest import Manifest
from .naming import display_path
from .planning import Job
from .preview import Gallery
from .report import ReportWriter, Row, Summary
from .runsetup import RunSetup
from .stopping import Stopped  # SIGTERM raises it in the main thread; a stopped k-means in a worker

__all__ = [
    "Progress",
    "RowEmitter",
    "StageClock",
    "Stopped",
    "balanced_groups",
    "batch_groups",
    "call_size",
    "default_batch_size",
    "open_report",
    "quantizer_threads",
    "sigterm_stops",
    "stoppable",
]

T = TypeVar("T")

Progress = Callable[[int, int], None]
"""``progress(images, pixels)``, called as inputs finish."""

# Images per batched k-means at most. On the CPU small batches keep every quantizer thread
# busy. On a GPU a batch is sized by its pixels (``batch_pixels``, 64 MP: sixteen 4-MP photos),
# the count only bounds one batch's per-image Python work: 256 lets 0.25-MP images fill a
# batch too (at 16 they made 4-MP batches, too small to keep a GPU busy). Not yet measured on
# a GPU (benchmarks/gpu_check.py times both image sizes).
_DEFAULT_BATCH = {"cuda": 256, "cpu": 4}


def default_batch_size(device: torch.device | str) -> int:
    """Images per batched k-means without ``--batch-size``: 256 on CUDA, 4 on the CPU (or ``batch_pixels``)."""
    kind = torch.device(device).type
    return _DEFAULT_BATCH.get(kind, _DEFAULT_BATCH["cpu"])


# Quantizer threads per GPU, each owning a CUDA stream (gpu_kquant.worker): while one thread does
# its batch's host-side work (planning, launches, the few syncs; the GIL is released while it
# waits on the device), the other's kernels keep the GPU busy. Issue 11 asks for one or two;
# not yet measured on a GPU (benchmarks/gpu_check.py's pipeline step will show whether it pays).
_CUDA_QUANTIZERS = 2


def quantizer_threads(device: torch.device | str, cpus: int | None = None) -> int:
    """Quantizer threads for one device: two stream-owning threads on CUDA; on the CPU one per core.

    Multi-threaded torch ops wait at a barrier for every thread, so any other busy
    thread on the machine (our own decoders included) stalls every op; single-threaded
    quantizers working on different batches keep all cores busy instead. The process
    entry makes torch single-threaded (:func:`gpu_kquant.process.configure_process`).
    """
    if torch.device(device).type == "cuda":
        return _CUDA_QUANTIZERS
    return max(1, cpus if cpus is not None else os.cpu_count() or 1)


def call_size(group_size: int, quantizers: int, device: torch.device | str) -> int:
    """Tasks per worker call: one group per quantizer thread on a GPU; on the CPU two.

    A call waits for its slowest thread, so on the CPU two groups per thread even the
    threads out; a GPU's calls overlap (three in flight), which does the same.
    """
    if torch.device(device).type == "cuda":
        return group_size * quantizers
    return group_size * quantizers * 2


def batch_groups(items: Sequence[T], size: int, max_pixels: int, pixels: Callable[[T], int]) -> list[list[T]]:
    """Consecutive groups of at most ``size`` items; a group also closes at ``max_pixels`` pixels."""
    groups: list[list[T]] = []
    group: list[T] = []
    total = 0
    for item in items:
        group.append(item)
        total += pixels(item)
        if len(group) >= size or total >= max_pixels:
            groups.append(group)
            group, total = [], 0
    if group:
        groups.append(group)
    return groups


def balanced_groups(
    items: Sequence[T], size: int, threads: int, max_pixels: int, pixels: Callable[[T], int]
) -> list[list[T]]:
    """Groups of ``items`` for ``threads`` quantizers that take groups in turn, with about equal pixels.

    A multiple of ``threads`` groups of at most ``size`` items: the largest item goes first, each to
    the group with the fewest pixels that has room (longest processing time first), so the threads
    finish a call together; items keep their order within a group. A group that would pass
    ``max_pixels`` is split as :func:`batch_groups` splits. The groups of a 12-photo call of 0.25
    and 1 MP photos on 2 CPU threads were 4, 4, 4 photos (2.5 MP each: one thread quantized two
    groups while the other waited); now four of 1.75-2.0 MP.
    """
    if threads <= 1 or not items:
        return batch_groups(items, size, max_pixels, pixels)
    count = threads * math.ceil(len(items) / (threads * size))
    weights = [pixels(item) for item in items]
    members: list[list[int]] = [[] for _ in range(count)]
    loads = [0] * count
    for i in sorted(range(len(items)), key=lambda i: -weights[i]):  # stable: equal weights keep their order
        g = min((g for g in range(count) if len(members[g]) < size), key=lambda g: loads[g])
        members[g].append(i)
        loads[g] += weights[i]
    groups = [[items[i] for i in sorted(m)] for m in members if m]
    return [part for g in groups for part in batch_groups(g, size, max_pixels, pixels)]


class StageClock:
    """Seconds spent per stage (decode, quantize, encode), summed over threads; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def take(self) -> dict[str, float]:
        """The seconds so far, and a fresh start."""
        with self._lock:
            out, self.seconds = self.seconds, {}
        return out


def open_report(job: Job, setup: RunSetup, summary: Summary) -> ReportWriter:
    """The report writer of a run, with the preview gallery attached when asked for."""
    summary.ignored = job.ignored
    target = setup.preview
    gallery = Gallery(target.folder) if target is not None and not target.side_by_side else None
    return ReportWriter(job.report, summary, gallery)


def _displayable(row: Row) -> Row:
    """``row`` with its paths as text a UTF-8 report can hold (file names that are not UTF-8 shown escaped)."""
    text, out = display_path(row.input), None if row.output is None else display_path(row.output)
    if text == row.input and out == row.output:
        return row
    preview = None if row.preview is None else {**row.preview, "input": text}
    return dataclasses.replace(row, input=text, output=out, preview=preview)


class RowEmitter:
    """Writes each row to the report (an ``ok`` row's output also to the manifest) and tells the progress callback.

    Thread-safe through the report and the manifest.
    """

    def __init__(
        self, report: ReportWriter, progress: Progress | None = None, manifest: Manifest | None = None
    ) -> None:
        self.report = report
        self.progress = progress
        self.manifest = manifest

    def __call__(self, row: Row) -> None:
        if self.manifest is not None and row.status == "ok" and row.output and row.output_hash is not None:
            self.manifest.record(Path(row.output), row.output_bytes or 0, row.output_hash)
        self.report.write(_displayable(row))
        if self.progress is not None:
            self.progress(1, (row.width or 0) * (row.height or 0) if row.status == "ok" else 0)


@contextlib.contextmanager
def sigterm_stops() -> Iterator[None]:
    """Inside, SIGTERM (a scheduler's stop) raises :class:`Stopped` in the main thread; restored after.

    The one signal handler gpu_kquant installs, and only for the duration of a run;
    outside the main thread it does nothing (Python delivers signals there only).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Stopped()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def stoppable(summary: Summary, stop: threading.Event) -> Iterator[None]:
    """Run the body so that Ctrl-C or SIGTERM ends it early: ``stop`` is set and the summary says interrupted."""
    try:
        with sigterm_stops():
            yield
    except (KeyboardInterrupt, Stopped):
        stop.set()
        summary.interrupted = True
