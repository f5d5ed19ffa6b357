"""The Ray engine: the same :class:`~gpu_kquant.worker.Worker` in Ray actors, fed by Ray Data.

``python -m gpu_kquant DIR --engine ray [--ray-address ADDRESS]``:

1. the driver plans the tasks (paths only, never pixels) and skips the outputs its
   manifest says are done (resume, :mod:`gpu_kquant.manifest`) before anything is scheduled;
2. ``map_batches`` over the paths with an actor pool (:class:`WorkerActor`, one GPU per
   actor when the cluster has GPUs): each actor keeps one worker across batches, which
   decodes, quantizes and writes every output itself and returns only report rows;
3. the driver streams the rows into the same report as the local engine, and each
   output's size and hash into the manifest.

Only paths and rows cross the object store; the run's setup (fixed palette included)
reaches each actor once, in its constructor. Memory: an actor runs one call at a time, and
splits it into parts whose decoded bytes fit ``--memory-budget`` (default: a quarter of the
RAM available on the actor's node when it starts), processed one after another; an image
above the budget is a part of its own. The driver holds paths and rows only. Workers that die are restarted and their
batches retried (a batch that keeps failing is redone one image at a time, so only the
culprit gets a failed row); writes are atomic. Inputs and outputs must be on a file
system every node sees at the same paths. Needs the ``ray`` extra.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

try:
    import ray
    import ray.data
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "the Ray engine needs Ray Data: pip install 'gpu_kquant[ray]' (or 'ray[data]>=2.9')", name="ray"
    ) from exc

from . import ray_session
from .budget import budgeted_calls, default_memory_budget, input_bytes
from .control import Progress, RowEmitter, call_size, default_batch_size, open_report, stoppable
from .device import resolve_device
from .manifest import Manifest, open_manifest
from .options import EngineOptions, RunOptions
from .planning import Job, JobError, Task, remove_stale_temps
from .process import configure_process
from .ray_histogram import ray_histogram
from .ray_session import Stalled, batches_within, connected, from_items, ray_settings, task_from_item, task_item
from .report import Row, Summary
from .rows import failed_row, precheck
from .runsetup import RunSetup, setup_run, shared_palette_to_fit
from .worker import Worker

__all__ = [
    "MAX_INPUT_BLOCKS",
    "MAX_RESTARTS",
    "RESCUE_MIN",
    "RETRIES",
    "Resources",
    "WorkerActor",
    "resources",
    "run_on_ray",
]

MAX_INPUT_BLOCKS = 10_000
"""Blocks of paths at most (a block is a unit of Ray's scheduling, not of work)."""

RETRIES = 3
"""Attempts after the first for a batch whose worker died."""

RESCUE_MIN = 64
"""Lost inputs are retried one by one when at most this many (or 5% of the job) were lost."""

MAX_RESTARTS = 16
"""Restarts of one worker actor at most. Unbounded (-1), an actor whose restart keeps failing
(its constructor crashing, killed for memory while importing PyTorch) left Ray Data waiting for it
forever: the 'always kills its worker' test hung for more than 7 minutes (issue 12, item 18)."""

_LOST = "lost: its Ray task failed {n} times (worker crash, out of memory or an error; see the Ray logs)"
_STALLED = "lost: the Ray job made no progress for {s:g} s (workers stuck or failing to start; see the Ray logs)"


@dataclass(frozen=True)
class Resources:
    """What the actor pool asks Ray for, and how each actor splits its batch.

    Attributes:
        num_gpus: GPUs per actor (1 with GPUs, else 0).
        num_cpus: logical CPUs per actor (below 1 when actors would leave no CPU to Ray's reads).
        concurrency: number of actors.
        threads: decode and write threads inside one actor (also its quantizers on the CPU).
        sub_batch: images per batched k-means (``--batch-size``).
        batch_size: images per actor call (two ``sub_batch`` per thread on the CPU).
    """

    num_gpus: int
    num_cpus: float
    concurrency: int
    threads: int
    sub_batch: int
    batch_size: int

    @property
    def device(self) -> str:
        """The device an actor quantizes on (Ray sets ``CUDA_VISIBLE_DEVICES`` per actor)."""
        return "cuda" if self.num_gpus else "cpu"


def resources(
    n_gpus: int,
    cpus: int,
    *,
    device: str | None = None,
    workers: int | None = None,
    batch_size: int | None = None,
) -> Resources:
    """The actor pool's resource requests for a cluster of ``n_gpus`` GPUs and ``cpus`` CPUs.

    With GPUs (and ``device`` auto or CUDA): one GPU per actor, one actor per GPU
    (``workers`` caps it). Without (or with ``device="cpu"``): ``workers`` CPU actors
    (default 1) that share the CPUs like the local engine's quantizer threads (one
    single-threaded quantizer per core). Actors leave at least one CPU to Ray's own
    tasks (reading the paths), so the pipeline can never starve itself.

    Raises:
        ValueError: CUDA was asked for and the cluster has no GPU.
    """
    kind = None if device in (None, "auto") else device.split(":")[0]
    if kind == "cuda" and n_gpus < 1:
        raise ValueError(f"device {device!r} was requested but the Ray cluster has no GPU")
    cpus = max(1, int(cpus))
    use_gpu = n_gpus >= 1 and kind != "cpu"
    target = "cuda" if use_gpu else "cpu"
    sub_batch = batch_size or default_batch_size(target)
    if use_gpu:
        concurrency = max(1, min(workers or n_gpus, int(n_gpus)))
        threads = max(1, min(16, cpus // concurrency))  # decode and write threads feeding the GPU
        size = call_size(sub_batch, 1, target)
    else:
        concurrency = max(1, workers or 1)
        threads = max(1, cpus // concurrency)
        size = call_size(sub_batch, threads, target)
    num_cpus = math.floor(min(1.0, (cpus - 1) / concurrency) * 100) / 100
    return Resources(1 if use_gpu else 0, num_cpus, concurrency, threads, sub_batch, size)


def row_to_json(row: Row) -> str:
    """A row as JSON, preview entry included (json keeps floats exactly and reads back Infinity)."""
    return json.dumps(asdict(row))


def row_from_json(text: str) -> Row:
    """The row :func:`row_to_json` wrote."""
    return Row(**json.loads(text))


class WorkerActor:
    """One Ray actor per GPU (or CPU worker): a :class:`Worker` kept alive across batches.

    Each call reads the paths of its batch (``i``, ``src``, ``dst``, ``key``), runs them
    through the worker (decode, quantize, write) and returns ``i``, ``row`` (JSON) and
    the stage seconds of the call (on its first row). The actor's constructor is its
    process's entry, so it makes the process-wide settings the worker needs.
    """

    worker_class: type[Worker] = Worker

    def __init__(self, setup: RunSetup, device: str, threads: int, sub_batch: int) -> None:
        on_cpu = resolve_device(device).type == "cpu"
        configure_process(max_pixels=setup.max_pixels, single_threaded_torch=on_cpu)
        self.worker = self.worker_class(
            setup, device, io_threads=threads, quantizers=threads if on_cpu else 1, group_size=sub_batch
        )
        self.memory_budget = setup.memory_budget or default_memory_budget()

    def _cost(self, task: Task) -> int:
        return input_bytes(task.src, self.worker.setup.max_pixels)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        columns = zip(batch["src"], batch["dst"], batch["key"])
        tasks = [task_from_item(src, dst, key) for src, dst, key in columns]
        rows = []
        for part, _ in budgeted_calls(tasks, len(tasks), self.memory_budget, self._cost):
            rows += self.worker.process(part)
        if len(rows) != len(tasks):  # pragma: no cover - only a stopped worker returns fewer
            raise RuntimeError(f"the worker returned {len(rows)} rows for {len(tasks)} tasks")
        stages = self.worker.clock.take()
        first = np.zeros(len(tasks), dtype=np.float64)
        out: dict[str, np.ndarray] = {
            "i": np.asarray(batch["i"], dtype=np.int64),
            "row": np.asarray([row_to_json(r) for r in rows], dtype=object),
        }
        for stage in ("decode", "quantize", "encode"):
            column = first.copy()
            if len(column):
                column[0] = stages.get(stage, 0.0)
            out[f"{stage}_s"] = column
        return out


def build_dataset(
    tasks: list[tuple[int, Task]],
    setup: RunSetup,
    plan: Resources,
    actor: type[WorkerActor] = WorkerActor,
    *,
    alone: bool = False,
) -> ray.data.Dataset:
    """The lazy dataset: paths -> worker actors -> report rows.

    ``alone`` puts one image in each actor call, with one call in flight per actor, so
    that an image that kills its worker takes no other with it.
    """
    if alone:
        plan = dataclasses.replace(plan, sub_batch=1, batch_size=1)
    # no more actors than batches: each one is a new process that imports PyTorch
    plan = dataclasses.replace(plan, concurrency=max(1, min(plan.concurrency, math.ceil(len(tasks) / plan.batch_size))))
    items = [{"i": i, **task_item(t)} for i, t in tasks]
    with warnings.catch_warnings():
        # Ray deprecates remote args without a named parameter (max_restarts,
        # max_task_retries) and some of its own DataContext fields; neither concerns users.
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = from_items(items, max(1, min(MAX_INPUT_BLOCKS, math.ceil(len(items) / plan.batch_size))))
        return ds.map_batches(
            actor,
            batch_size=plan.batch_size,
            batch_format="numpy",
            compute=_actor_pool(plan.concurrency, alone),
            fn_constructor_kwargs={
                "setup": setup,
                "device": plan.device,
                "threads": plan.threads,
                "sub_batch": plan.sub_batch,
            },
            num_gpus=plan.num_gpus,
            num_cpus=plan.num_cpus,
            max_restarts=MAX_RESTARTS,  # a node may go away several times over a long job, not forever
            max_task_retries=RETRIES,  # ...and a batch that keeps killing its worker gives up
        )


def _actor_pool(size: int, alone: bool) -> ray.data.ActorPoolStrategy:
    """A fixed pool of ``size`` actors; ``alone``: one call in flight per actor."""
    if alone:
        return ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1)
    return ray.data.ActorPoolStrategy(size=size)


def _driver_device(engine: EngineOptions) -> torch.device:
    """This machine's device for work done on the driver (fitting a shared palette)."""
    try:
        return resolve_device(engine.device)
    except ValueError:  # e.g. --device cuda given to a head node without a GPU
        return torch.device("cpu")


def cluster_resources() -> tuple[int, int]:
    """GPUs and CPUs of the connected Ray cluster."""
    total: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    return int(total.get("GPU", 0)), int(total.get("CPU", 1))


def _needs_ray(job: Job, run: RunOptions, inputs: set[Path]) -> bool:
    """Whether there is work for Ray: a shared palette to fit or an input whose output is to be (re)done."""
    if shared_palette_to_fit(job, run):
        return True
    setup = setup_run(job, run, _driver_device(run.engine), ray_histogram)  # no histogram: no palette to fit
    manifest = open_manifest(job, run, setup, "")  # only read here
    return any(precheck(t, run.output, setup.fit.k, inputs, manifest) is None for t in job.tasks)


def run_on_ray(
    job: Job, run: RunOptions, progress: Progress | None = None, *, actor: type[WorkerActor] = WorkerActor
) -> Summary:
    """Run a planned job on Ray, writing the same report as :func:`gpu_kquant.engine_local.run_local`.

    ``run.engine.ray_address``: a cluster to join (``auto`` finds a local one); default: start
    a local Ray, or use the one this process is connected to. ``run.engine.ray_workers``:
    actors, at most one per GPU (default: every GPU), or CPU actors without GPUs (default 1).
    ``actor``: the actor class (tests inject one that crashes). Ctrl-C (or SIGTERM) stops
    early and returns the summary with ``interrupted=True``: the driver stops reading rows
    and leaves the dataset, and Ray ends the actors (a k-means in progress with them) when
    the pool is torn down or, for a Ray this command started, at its shutdown. Each actor's
    worker also has its own stop flag, checked by k-means between iterations, for callers
    that stop a worker in place.
    """
    start = time.perf_counter()
    remove_stale_temps(job.roots)
    summary = Summary()
    stages: dict[str, float] = {}
    inputs = {t.src.resolve() for t in job.tasks if t.error is None}
    report = None
    manifest: Manifest | None = None
    try:
        # Ray starts only when there is work: a finished job resumes without it.
        ray_up = connected(run.engine.ray_address) if _needs_ray(job, run, inputs) else contextlib.nullcontext()
        with stoppable(summary, threading.Event()), ray_up, ray_settings():
            # The fixed palette and the preview target are decided once, as in the local
            # engine; --palette shared counts its histogram on Ray and fits on the driver.
            setup = setup_run(job, run, _driver_device(run.engine), ray_histogram)
            report = open_report(job, setup, summary)
            manifest = open_manifest(job, run, setup, report.run_id)
            emit = RowEmitter(report, progress, manifest)
            todo: list[tuple[int, Task]] = []
            for i, task in enumerate(job.tasks):
                row = precheck(task, run.output, setup.fit.k, inputs, manifest)
                if row is None:
                    todo.append((i, task))
                else:
                    emit(row)
            manifest.claim(t.dst for _, t in todo)  # before any actor writes: its outputs are known as ours
            if todo:
                _process_on_ray(todo, setup, run.engine, actor, emit, stages)
    finally:
        if manifest is not None:
            manifest.close()  # before the report releases the run's lock
        if report is not None:
            report.close()
        summary.stage_seconds.update(stages)
        summary.seconds = time.perf_counter() - start
    return summary


def _process_on_ray(
    todo: list[tuple[int, Task]],
    setup: RunSetup,
    engine: EngineOptions,
    actor: type[WorkerActor],
    emit: Callable[[Row], None],
    stages: dict[str, float],
) -> None:
    """Stream the rows of ``todo`` into ``emit``; inputs whose batch kept failing get one more try alone."""
    n_gpus, cpus = cluster_resources()
    try:
        plan = resources(n_gpus, cpus, device=engine.device, workers=engine.ray_workers, batch_size=engine.batch_size)
    except ValueError as exc:
        raise JobError(str(exc)) from None
    try:
        lost = _stream(todo, setup, plan, actor, emit, stages)
        if lost and len(lost) <= max(RESCUE_MIN, len(todo) // 20):
            # Something in those batches kills its worker (or raises): redo them one image per
            # call, so that only the culprit is lost. Not when much of the job failed: that is
            # no bad file but a broken setup, and one by one would take ages.
            lost = _stream(lost, setup, plan, actor, emit, stages, alone=True)
            attempts = 2 * (RETRIES + 1)
        else:
            attempts = RETRIES + 1
    except Stalled as stalled:
        stuck: list[tuple[int, Task]] = stalled.args[0]
        for _, task in stuck:
            emit(failed_row(task, setup.fit.k, _STALLED.format(s=ray_session.STALL_SECONDS)))
        return
    for _, task in lost:
        emit(failed_row(task, setup.fit.k, _LOST.format(n=attempts)))


def _stream(
    todo: list[tuple[int, Task]],
    setup: RunSetup,
    plan: Resources,
    actor: type[WorkerActor],
    emit: Callable[[Row], None],
    stages: dict[str, float],
    *,
    alone: bool = False,
) -> list[tuple[int, Task]]:
    """Run one dataset over ``todo``, emitting rows as they arrive; returns the tasks without a row.

    Raises:
        Stalled: no rows for ray_session.STALL_SECONDS; its argument is the tasks without a row.
    """
    ds = build_dataset(todo, setup, plan, actor, alone=alone)
    seen: set[int] = set()
    # no prefetching: rows are tiny, and a prefetched batch is only handed over with the next one
    batches = ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0)
    try:
        for batch in batches_within(batches, ray_session.STALL_SECONDS):
            for stage in ("decode", "quantize", "encode"):
                stages[stage] = stages.get(stage, 0.0) + float(np.sum(batch[f"{stage}_s"]))
            for j in range(len(batch["i"])):
                i = int(batch["i"][j])
                if i in seen:  # never expected: Ray keeps only a successful attempt's output
                    continue
                seen.add(i)
                emit(row_from_json(str(batch["row"][j])))
    except Stalled:
        raise Stalled([(i, task) for i, task in todo if i not in seen]) from None
    return [(i, task) for i, task in todo if i not in seen]
