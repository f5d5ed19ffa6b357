"""Feeding one :class:`~gpu_kquant.worker.Worker` its tasks: consecutive calls, a few in flight, within a byte budget.

One call decodes while another quantizes and a third writes; each row is emitted as soon
as it is ready. Both ways the local engine runs a device, a thread of this process or a
spawned process of its own (:mod:`gpu_kquant.spawned`), feed it through :func:`feed`.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from .budget import MemoryBudget, budgeted_calls, input_bytes
from .control import call_size
from .planning import Task
from .report import Row
from .worker import Worker

__all__ = ["feed"]

# Calls in flight per device: on the CPU one decodes while one quantizes (each call
# holds two groups per quantizer thread); on a GPU one decodes, one quantizes, one writes.
_IN_FLIGHT = {"cpu": 2, "cuda": 3}

# Most estimated decoded bytes per pixel (imagefiles.estimated_decoded_bytes: an RGBA frame of
# 4 bytes, its conversion 4, the array 4). A group closes at ``batch_pixels``, so a call of G
# groups needs at most G * batch_pixels * 12 bytes; capping calls there keeps a GPU's groups of
# hundreds of small images from taking the whole budget in one call, which would make the
# calls in flight (one decoding, one quantizing, one writing) run one after another.
_MAX_BYTES_PER_PIXEL = 12


def feed(worker: Worker, tasks: list[Task], emit: Callable[[Row], None], budget: MemoryBudget) -> None:
    """Run ``tasks`` through ``worker`` in consecutive calls, a few in flight; rows are emitted as they are ready.

    Each call holds its inputs' estimated decoded bytes in ``budget`` from before it
    decodes until its outputs are written; a call closes early rather than exceed it, or
    exceed what its groups of ``batch_pixels`` can hold.
    Any exception (Ctrl-C included) sets ``worker.stop``: queued work is dropped and
    running writes finish (they are atomic).
    """
    size = call_size(worker.group_size, worker.quantizers, worker.device)
    groups = max(1, size // worker.group_size)
    limit = min(budget.limit, groups * worker.setup.batch_pixels * _MAX_BYTES_PER_PIXEL)
    in_flight = _IN_FLIGHT.get(worker.device.type, 2)
    calls = ThreadPoolExecutor(in_flight, thread_name_prefix="gpu_kquant-call")
    pending: collections.deque[Future[list[Row]]] = collections.deque()
    cost = functools.partial(_task_bytes, max_pixels=worker.setup.max_pixels)
    try:
        for call, n in budgeted_calls(tasks, size, limit, cost):
            if worker.stop.is_set():
                return
            budget.acquire(n, worker.stop)
            future = calls.submit(worker.process, call, emit)
            future.add_done_callback(_releaser(budget, n))
            pending.append(future)
            while len(pending) >= in_flight:
                pending.popleft().result()
        while pending:
            pending.popleft().result()
    except BaseException:
        worker.stop.set()
        raise
    finally:
        calls.shutdown(wait=not worker.stop.is_set(), cancel_futures=True)


def _task_bytes(task: Task, max_pixels: int | None) -> int:
    return input_bytes(task.src, max_pixels)


def _releaser(budget: MemoryBudget, n: int) -> Callable[[Future[list[Row]]], None]:
    """A done-callback giving ``n`` bytes back (also when the call was cancelled or failed)."""
    return lambda _: budget.release(n)
