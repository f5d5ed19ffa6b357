"""The local engine: a run on this machine, one :class:`~gpu_kquant.worker.Worker` per device process.

One device runs in this process: its tasks go to its worker in consecutive calls, a few in
flight (:func:`gpu_kquant.feed.feed`), and each row is reported as soon as it is ready.
With several GPUs (or ``--processes``) each device process is spawned
(:mod:`gpu_kquant.spawned`) and gets its own deterministic part of the tasks (the
``--shard`` split); this process keeps the one report and manifest. Memory is bounded by
a :class:`~gpu_kquant.budget.MemoryBudget` in bytes of decoded pixels
(``--memory-budget``), shared by the shared-palette pass and the calls (split evenly
between device processes): a call takes its inputs' estimated bytes before it decodes
and gives them back once its outputs are written.
"""

from __future__ import annotations

import collections
import functools
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .budget import MemoryBudget, default_memory_budget, input_bytes
from .control import Progress, RowEmitter, StageClock, open_report, stoppable
from .device import resolve_device
from .feed import feed
from .manifest import open_manifest
from .options import EngineOptions, RunOptions
from .palette import ColorHistogram
from .planning import Job, Task, remove_stale_temps, split_tasks
from .report import Summary
from .rows import precheck
from .runsetup import RunSetup, setup_run
from .spawned import plan_children, run_children
from .stopping import StopFlag
from .worker import Worker, read_task

__all__ = ["devices_for", "memory_budget", "run_local", "shared_histogram"]


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


def _run_todo(
    todo: list[Task],
    devices: list[torch.device],
    setup: RunSetup,
    run: RunOptions,
    emit: RowEmitter,
    budget: MemoryBudget,
    clock: StageClock,
    stop: StopFlag,
) -> None:
    """The tasks left to do: in this process on one device, else in spawned device processes."""
    io_threads = 2 * run.engine.workers  # decode and write share one pool: ``workers`` threads for each
    processes = run.engine.processes or (1 if len(devices) > 1 else 0)
    if not processes:
        worker = Worker(
            setup, devices[0], io_threads=io_threads, group_size=run.engine.batch_size, stop=stop, clock=clock
        )
        try:
            feed(worker, todo, emit, budget)
        finally:
            worker.close()
        return
    n = processes * len(devices)
    sharded = run.engine.shard[1] > 1
    plans = plan_children(
        setup,
        devices,
        split_tasks(todo, n, sharded=sharded),
        io_threads=io_threads,
        group_size=run.engine.batch_size,
        memory_budget=budget.limit,
    )
    for stage, seconds in run_children(plans, emit).items():
        clock.add(stage, seconds)


def run_local(job: Job, run: RunOptions, progress: Progress | None = None) -> Summary:
    """Run a planned job on this machine, writing its report; returns the summary.

    One device runs in this process, several (or ``--processes``) in spawned device
    processes (:mod:`gpu_kquant.spawned`) that send their rows here. Ctrl-C (or SIGTERM)
    stops early and still returns the summary (``interrupted``): queued work is dropped,
    running writes finish, a batch still in k-means is abandoned. On the CPU, each
    quantizer thread is best single-threaded in torch: the process entry sets that
    (:func:`gpu_kquant.process.configure_process`, as the CLI and device processes do).
    """
    start = time.perf_counter()
    remove_stale_temps(job.roots)
    budget = memory_budget(run.engine)
    devices = devices_for(run.engine)
    setup = setup_run(job, run, devices[0], functools.partial(shared_histogram, budget=budget))
    summary = Summary()
    report = open_report(job, setup, summary)
    manifest = open_manifest(job, run, setup, report.run_id)
    emit = RowEmitter(report, progress, manifest)
    stop, clock = StopFlag(), StageClock()
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
            _run_todo(todo, devices, setup, run, emit, budget, clock, stop)
    finally:
        manifest.close()  # before the report releases the run's lock
        report.close()
        summary.stage_seconds.update(clock.take())
        summary.seconds = time.perf_counter() - start
    return summary
