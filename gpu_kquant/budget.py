"""A budget in bytes for decoded pixels, shared by a run's decode prefetch and its batches.

Counting files does not bound memory: a 79 KB PNG of a flat 9000x9000 image decodes to
81 megapixels, and four such files in flight peaked at 2.8 GB. Each input is charged
:func:`gpu_kquant.imagefiles.estimated_decoded_bytes` (read from its header, nothing
decoded) before it is read, and the bytes come back when its batch's results are written.
"""

from __future__ import annotations

import collections
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from .imagefiles import DecodeError, estimated_decoded_bytes
from .stopping import check_stop

__all__ = [
    "MemoryBudget",
    "available_memory",
    "budgeted_calls",
    "default_memory_budget",
    "input_bytes",
    "parse_size",
]

T = TypeVar("T")

# The decoded-byte estimate covers decoding only; quantizing an image needs working memory
# on top (colour set, labels, mapped indices, the encoded file). Measured (2-core EPYC, CPU,
# MALLOC_ARENA_MAX=2): four flat 9000x9000 PNGs (estimate 891 MB each) run with a 1 GiB budget,
# so one at a time, peak at 1.89 GB RSS, of which 0.37 GB is the interpreter with PyTorch: the
# working memory is about 0.7x the estimate again. A quarter of the available RAM for the
# estimates thus keeps the peak near half of it, leaving the rest to the machine.
_BUDGET_FRACTION = 0.25
# Clamps (chosen, not measured): 256 MiB still holds three 8-megapixel photos at once (88 MB
# each by the estimate); 16 GiB holds about 1,500 megapixels, far more than the few calls in
# flight can use (a k-means batch closes at 64 megapixels, EngineOptions.batch_pixels).
_MIN_BUDGET = 256 << 20
_MAX_BUDGET = 16 << 30
# Seconds between checks of the stop flag while waiting for bytes.
_POLL = 0.1

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from ``4G``, ``512M``, ``1.5GiB``, ``64k`` or a plain number (binary units).

    Raises:
        ValueError: not a positive size.
    """
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"expected a size such as 4G, 512M or 1000000, got {text!r}")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value < 1:
        raise ValueError(f"expected a positive size, got {text!r}")
    return value


def available_memory() -> int | None:
    """Bytes of RAM available to new work: ``MemAvailable`` (Linux), else free pages, else ``None``."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def default_memory_budget(available: int | None = None) -> int:
    """A quarter of the available RAM, clamped to 256 MiB..16 GiB (``available``: measured now when ``None``)."""
    if available is None:
        available = available_memory()
    if available is None:
        return 2 << 30  # no way to ask: a size most machines that run PyTorch have spare
    return int(min(_MAX_BUDGET, max(_MIN_BUDGET, available * _BUDGET_FRACTION)))


def input_bytes(path: Path, max_pixels: int | None = None) -> int:
    """The bytes to charge for decoding ``path``: 0 when it will be refused before decoding.

    A header that cannot be read, or a size above ``max_pixels``, gives a failed row
    without any pixel decoded, so it costs nothing.
    """
    try:
        return estimated_decoded_bytes(path, max_pixels=max_pixels)
    except DecodeError:
        return 0


def budgeted_calls(
    items: Sequence[T], size: int, limit: int, cost: Callable[[T], int]
) -> Iterator[tuple[list[T], int]]:
    """Consecutive calls of at most ``size`` items and ``limit`` bytes each, with their bytes.

    An item costing more than ``limit`` makes a call of its own. ``cost`` runs lazily, as
    the calls are taken, so a long list of inputs is not read ahead.
    """
    call: list[T] = []
    total = 0
    for item in items:
        n = cost(item)
        if call and (len(call) >= size or total + n > limit):
            yield call, total
            call, total = [], 0
        call.append(item)
        total += n
    if call:
        yield call, total


class MemoryBudget:
    """Bytes held at once, at most ``limit``; waiters are served first come, first served.

    ``acquire(n)`` blocks until ``n`` more bytes fit; a request larger than the whole
    budget is admitted alone (when nothing else is held), so it never deadlocks.
    Thread-safe. ``peak`` records the most bytes ever held.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a memory budget must be a positive number of bytes, got {limit}")
        self.limit = limit
        self.held = 0
        self.peak = 0
        self._cond = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()

    def _fits(self, n: int) -> bool:
        return self.held == 0 or self.held + n <= self.limit

    def _take(self, n: int) -> None:
        self.held += n
        self.peak = max(self.peak, self.held)

    def try_acquire(self, n: int) -> bool:
        """Take ``n`` bytes if they fit now and nobody waits before us; never blocks."""
        with self._cond:
            if n > 0 and (self._queue or not self._fits(n)):
                return False
            self._take(max(0, n))
            return True

    def acquire(self, n: int, stop: threading.Event | None = None) -> None:
        """Wait until ``n`` bytes fit, then take them.

        Raises:
            Stopped: ``stop`` was set while waiting (nothing is taken).
        """
        if n <= 0:
            return
        token = object()
        with self._cond:
            self._queue.append(token)
            try:
                while not (self._queue[0] is token and self._fits(n)):
                    check_stop(stop)
                    self._cond.wait(_POLL)
                self._take(n)
            finally:
                self._queue.remove(token)
                self._cond.notify_all()

    def release(self, n: int) -> None:
        """Give back ``n`` bytes taken before."""
        if n <= 0:
            return
        with self._cond:
            if n > self.held:
                raise ValueError(f"releasing {n} bytes but only {self.held} are held")
            self.held -= n
            self._cond.notify_all()
