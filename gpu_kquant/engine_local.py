"""The local engine: one :class:`~gpu_kquant.worker.Worker` per device of this machine.

The tasks of each device go to its worker in consecutive calls, a few in flight so
that one call decodes while another quantizes and a third writes; each row is reported
as soon as it is ready. With several GPUs each one gets its own deterministic part of the
tasks (the ``--shard`` split) and all share the report. Memory is bounded by one
:class:`~gpu_kquant.budget.MemoryBudget` in bytes of decoded pixels (``--memory-budget``),
shared by every device's calls and the shared-palette pass: a call takes its inputs'
estimated bytes before it decodes and gives them back once its outputs are written.
"""

from __future__ import annotations

import collections
import functools
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .budget import MemoryBudget, budgeted_calls, default_memory_budget, input_bytes
from .control import Progress, RowEmitter, StageClock, call_size, open_report, stoppable
from .device import resolve_device
from .manifest import open_manifest
from .options import EngineOptions, RunOptions
from .palette import ColorHistogram
from .planning import Job, Task, remove_stale_temps, split_tasks
from .report import Row, Summary
from .rows import precheck
from .runsetup import setup_run
from .stopping import StopFlag
from .worker import Worker, read_task

__all__ = ["devices_for", "memory_budget", "run_local", "shared_histogram"]

# Calls in flight per device: on the CPU one decodes while one quantizes (each call
# holds two groups per quantizer thread); on a GPU one decodes, one quantizes, one writes.
_IN_FLIGHT = {"cpu": 2, "cuda": 3}


def devices_for(engine: EngineOptions) -> list[torch.device]:
    """Devices a run uses: every GPU when ``--device cuda`` names none and there are several."""
    device = resolve_device(engine.device)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [device]


def memory_budget(engine: EngineOptions) -> MemoryBudget:
    """The run's budget of decoded bytes: ``engine.memory_budget``, else the default from free RAM."""
    return MemoryBudget(engine.memory_budget or default_memory_budget())


def shared_histogram(
    tasks: list[Task], run: RunOptions, device: torch.device, budget: MemoryBudget | None = None
) -> ColorHistogram:
    """First pass of ``--palette shared``: the exact colour histogram summed over all inputs.

    Files are decoded on a thread pool, a few ahead and within the memory budget, so memory
    stays flat; undecodable files are left out here and get their failed row in the second pass.
    """
    hist = ColorHistogram(device)
    budget = budget or memory_budget(run.engine)
    workers, max_pixels = run.engine.workers, run.engine.max_pixels
    with ThreadPoolExecutor(workers, thread_name_prefix="gpu_kquant-histogram") as pool:
        pending: collections.deque[tuple[Future[object], int]] = collections.deque()

        def take_one() -> None:
            future, n = pending.popleft()
            try:
                hist.add(future.result().decoded.pixels)  # type: ignore[attr-defined]
            except Exception:
                pass
            finally:
                del future
                budget.release(n)

        for task in tasks:
            n = input_bytes(task.src, max_pixels)
            while not budget.try_acquire(n):  # the bytes held here come back as files are taken
                if not pending:
                    budget.acquire(n)
                    break
                take_one()
            pending.append((pool.submit(read_task, task, max_pixels, run.output.resize), n))
            while len(pending) > 2 * workers:
                take_one()
        while pending:
            take_one()
    return hist


def _feed(worker: Worker, tasks: list[Task], emit: Callable[[Row], None], budget: MemoryBudget) -> None:
    """Run ``tasks`` through ``worker`` in consecutive calls, a few in flight; rows are emitted as they are ready.

    Each call holds its inputs' estimated decoded bytes in ``budget`` from before it
    decodes until its outputs are written; a call closes early rather than exceed it.
    """
    size = call_size(worker.group_size, worker.quantizers, worker.device)
    in_flight = _IN_FLIGHT.get(worker.device.type, 2)
    calls = ThreadPoolExecutor(in_flight, thread_name_prefix="gpu_kquant-call")
    pending: collections.deque[Future[list[Row]]] = collections.deque()
    cost = functools.partial(_task_bytes, max_pixels=worker.setup.max_pixels)
    try:
        for call, n in budgeted_calls(tasks, size, budget.limit, cost):
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
        worker.stop.set()  # queued work is dropped; running writes finish (they are atomic)
        raise
    finally:
        calls.shutdown(wait=not worker.stop.is_set(), cancel_futures=True)


def _task_bytes(task: Task, max_pixels: int | None) -> int:
    return input_bytes(task.src, max_pixels)


def _releaser(budget: MemoryBudget, n: int) -> Callable[[Future[list[Row]]], None]:
    """A done-callback giving ``n`` bytes back (also when the call was cancelled or failed)."""
    return lambda _: budget.release(n)


def _run_workers(
    workers: list[Worker], parts: list[list[Task]], emit: Callable[[Row], None], budget: MemoryBudget
) -> None:
    """Each worker on its part: in this thread for one device, else one feeding thread per device."""
    if len(workers) == 1:
        _feed(workers[0], parts[0], emit, budget)
        return
    pool = ThreadPoolExecutor(len(workers), thread_name_prefix="gpu_kquant-device")
    try:
        futures = [pool.submit(_feed, w, part, emit, budget) for w, part in zip(workers, parts)]
        for future in futures:
            future.result()
    except BaseException:
        workers[0].stop.set()
        raise
    finally:
        pool.shutdown(wait=not workers[0].stop.is_set(), cancel_futures=True)


def run_local(job: Job, run: RunOptions, progress: Progress | None = None) -> Summary:
    """Run a planned job on this machine, writing its report; returns the summary.

    Ctrl-C (or SIGTERM) stops early and still returns the summary (``interrupted``): queued
    work is dropped, running writes finish, a batch still in k-means is abandoned. On the
    CPU, each quantizer thread is best single-threaded in torch: the process entry sets
    that (:func:`gpu_kquant.process.configure_process`, as the CLI does).
    """
    start = time.perf_counter()
    remove_stale_temps(job.roots)
    devices = devices_for(run.engine)
    budget = memory_budget(run.engine)
    setup = setup_run(job, run, devices[0], functools.partial(shared_histogram, budget=budget))
    summary = Summary()
    report = open_report(job, setup, summary)
    manifest = open_manifest(job, run, setup, report.run_id)
    emit = RowEmitter(report, progress, manifest)
    stop, clock = StopFlag(), StageClock()
    # decode and write share one pool: ``workers`` threads for each, as --workers says
    io_threads = 2 * run.engine.workers
    workers = [
        Worker(setup, d, io_threads=io_threads, group_size=run.engine.batch_size, stop=stop, clock=clock)
        for d in devices
    ]
    try:
        with stoppable(summary, stop):
            inputs = {t.src.resolve() for t in job.tasks if t.error is None}
            todo: list[Task] = []
            for task in job.tasks:
                row = precheck(task, run.output, setup.fit.k, inputs, manifest)
                if row is None:
                    todo.append(task)
                else:
                    emit(row)
            manifest.claim(t.dst for t in todo)  # before any write: an output renamed into place is known as ours
            parts = split_tasks(todo, len(workers), sharded=run.engine.shard[1] > 1) if len(workers) > 1 else [todo]
            _run_workers(workers, parts, emit, budget)
    finally:
        for worker in workers:
            worker.close()
        manifest.close()  # before the report releases the run's lock
        report.close()
        summary.stage_seconds.update(clock.take())
        summary.seconds = time.perf_counter() - start
    return summary
