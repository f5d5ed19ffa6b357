"""Device processes: each device's part of a local run in a spawned process of its own.

Threads of one process share one GIL with every decode and encode thread, so several
GPUs driven from one process starve each other. Here every device (``--processes N``:
N per device) gets a spawned process with its own :class:`~gpu_kquant.worker.Worker`,
decode and encode pools, memory budget and share of the CPU cores. The parent keeps the
report, the manifest and the progress bar: a child sends each row as it is ready, then
its stage seconds.

Stopping: Ctrl-C and SIGTERM reach the parent, which sets one event; children ignore
both signals themselves (a terminal sends Ctrl-C to the whole process group) so that
their running writes finish and are reported. A child that dies or fails gets a failed
row for each of its tasks it did not report, naming the device and the cause, and the
other devices go on.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .budget import MemoryBudget
from .control import StageClock, default_batch_size, quantizer_threads
from .feed import feed
from .planning import Task
from .process import configure_process
from .report import Row
from .rows import failed_row
from .runsetup import RunSetup
from .stopping import StopFlag
from .worker import Worker

__all__ = ["ChildPlan", "plan_children", "run_children"]

# Seconds between the parent's checks that its children are alive (rows arrive in between).
_POLL = 0.2
# After a stop, seconds a child gets to finish its running writes and report them before
# it is terminated (a k-means batch stops between iterations, well under a second at k = 256).
_STOP_GRACE = 60.0
# Seconds to wait for a child that has reported everything to exit before it is terminated.
_EXIT_WAIT = 10.0
# the signals a child ignores (``_child_main``), held while it starts
_HELD = {signal.SIGINT, signal.SIGTERM}


@dataclass(frozen=True)
class ChildPlan:
    """One device process: what it runs and with which share of the machine.

    Attributes:
        setup: the run's decisions (pickled into the child).
        device: ``"cpu"`` or ``"cuda:N"``.
        tasks: its part of the run's tasks.
        io_threads: decode and write threads.
        quantizers: quantizer threads.
        group_size: images per batched k-means.
        memory_budget: bytes of decoded pixels it may hold (its share of the run's budget).
    """

    setup: RunSetup
    device: str
    tasks: list[Task]
    io_threads: int
    quantizers: int
    group_size: int
    memory_budget: int


def plan_children(
    setup: RunSetup,
    devices: list[torch.device],
    parts: list[list[Task]],
    *,
    io_threads: int,
    group_size: int | None,
    memory_budget: int,
) -> list[ChildPlan]:
    """One plan per part: part ``i`` runs on ``devices[i * len(devices) // len(parts)]``.

    The CPU cores, the I/O threads and the memory budget are shared evenly; each
    process's quantizer threads follow :func:`~gpu_kquant.control.quantizer_threads`
    on its share of the cores.
    """
    n = len(parts)
    cores = max(1, (os.cpu_count() or 1) // n)
    plans = []
    for i, part in enumerate(parts):
        device = devices[i * len(devices) // n]
        plans.append(
            ChildPlan(
                setup=setup,
                device=str(device),
                tasks=part,
                io_threads=max(1, io_threads // n),
                quantizers=quantizer_threads(device, cpus=cores),
                group_size=group_size or default_batch_size(device),
                memory_budget=max(1, memory_budget // n),
            )
        )
    return plans


def run_children(plans: list[ChildPlan], emit: Callable[[Row], None]) -> dict[str, float]:
    """Run every plan in its own spawned process; rows go to ``emit`` (in this thread) as they come.

    Returns the children's stage seconds, summed. A ``KeyboardInterrupt`` or
    :class:`~gpu_kquant.stopping.Stopped` raised here stops the children, still emits the
    rows of the writes they finish, and is raised again.
    """
    ctx = multiprocessing.get_context("spawn")  # fork would copy CUDA state and held locks
    messages: Any = ctx.Queue()
    stop = ctx.Event()
    procs = [
        ctx.Process(target=_child_main, args=(i, plan, messages, stop), name=f"gpu_kquant-{plan.device}-{i}")
        for i, plan in enumerate(plans)
    ]
    parent = _Parent(plans, procs, messages, emit)
    try:
        with _signals_held():
            for proc in procs:
                proc.start()
        parent.drain(lambda: False)
    except BaseException:
        stop.set()
        parent.stopping = True
        # processes that never started (a plan that cannot be pickled) send nothing to wait for
        parent.running &= {i for i, proc in enumerate(procs) if proc.pid is not None}
        deadline = time.monotonic() + _STOP_GRACE
        parent.drain(lambda: time.monotonic() > deadline)
        raise
    finally:
        for proc in procs:
            if proc.pid is not None:
                proc.join(timeout=_EXIT_WAIT)  # a child that sent its last row exits at once
                if proc.is_alive():
                    proc.terminate()
                    proc.join()
        messages.close()
    return parent.clock.take()


class _Parent:
    """The parent's side: routes messages to ``emit`` and turns a dead child's tasks into failed rows."""

    def __init__(self, plans: list[ChildPlan], procs: list[Any], messages: Any, emit: Callable[[Row], None]) -> None:
        self.plans, self.procs, self.messages, self.emit = plans, procs, messages, emit
        self.unreported = [{str(t.src) for t in plan.tasks} for plan in plans]
        self.running = set(range(len(plans)))
        self.clock = StageClock()
        self.stopping = False

    def drain(self, give_up: Callable[[], bool]) -> None:
        """Handle messages until every child has ended (or ``give_up()``)."""
        while self.running and not give_up():
            try:
                self.handle(*self.messages.get(timeout=_POLL))
            except queue.Empty:
                for i in sorted(self.running):
                    if not self.procs[i].is_alive() and self.procs[i].exitcode is not None:
                        self.lost(i, f"exit code {self.procs[i].exitcode}")

    def handle(self, i: int, kind: str, payload: Any) -> None:
        """One message of child ``i``: a row, its end (stage seconds), or its failure."""
        if kind == "row":
            self.unreported[i].discard(payload.input)
            self.emit(payload)
        elif kind == "done":
            for stage, seconds in payload.items():
                self.clock.add(stage, seconds)
            self.running.discard(i)
        else:
            self.lost(i, payload)

    def lost(self, i: int, cause: str) -> None:
        """Child ``i`` ended without finishing: its unreported tasks get a failed row each."""
        if i not in self.running:
            return
        try:  # rows it sent before it ended come first
            while True:
                j, kind, payload = self.messages.get(timeout=_POLL)
                if (j, kind) == (i, "done"):
                    break
                self.handle(j, kind, payload)
        except queue.Empty:
            pass
        if i not in self.running:
            return
        self.running.discard(i)
        if self.stopping:  # after a stop, unfinished tasks are simply not done (a resume redoes them)
            return
        plan = self.plans[i]
        reason = f"the process for {plan.device} ended before this input: {cause}"
        for task in plan.tasks:
            if str(task.src) in self.unreported[i]:
                self.emit(failed_row(task, plan.setup.fit.k, reason))


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM in this thread while children start; they arrive here on exit.

    A spawned child inherits the blocked mask, so a signal sent to the group while it is
    still importing (seconds, before ``_child_main`` can ignore it) waits instead of
    raising ``KeyboardInterrupt`` inside multiprocessing's bootstrap (the Ctrl-C test
    caught that traceback once, in CI on b8b40a4). The same trick as CPython's own
    ``resource_tracker``.
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no masks, and no process groups either
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _child_main(index: int, plan: ChildPlan, messages: Any, stop_event: Any) -> None:
    """A device process's entry: set the process up, feed its worker, report back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # held since the spawn (``_signals_held``); ignored from now on
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)
    device = torch.device(plan.device)
    configure_process(max_pixels=plan.setup.max_pixels, single_threaded_torch=device.type == "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    stop = StopFlag()
    threading.Thread(target=_watch, args=(stop_event, stop), daemon=True, name="gpu_kquant-stop").start()
    clock = StageClock()
    worker = Worker(
        plan.setup, device, io_threads=plan.io_threads, quantizers=plan.quantizers,
        group_size=plan.group_size, stop=stop, clock=clock,
    )  # fmt: skip
    try:
        feed(worker, plan.tasks, lambda row: messages.put((index, "row", row)), MemoryBudget(plan.memory_budget))
        worker.close()
        messages.put((index, "done", clock.take()))
    except BaseException as exc:
        worker.close()
        if stop.is_set():  # stopping: what is not done stays undone, to be resumed
            messages.put((index, "done", clock.take()))
        else:
            messages.put((index, "failed", f"{type(exc).__name__}: {exc}"))


def _watch(stop_event: Any, stop: StopFlag) -> None:
    """Set ``stop`` once the parent asks, or once the parent is gone (killed)."""
    parent = multiprocessing.parent_process()
    while not stop_event.wait(1.0):
        if parent is not None and not parent.is_alive():
            break
    stop.set()
