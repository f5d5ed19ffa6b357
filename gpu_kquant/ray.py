"""The Ray Data engine: the directory pipeline on a Ray cluster, or on every GPU of one machine.

Stages (``python -m gpu_kquant DIR --engine ray [--ray-address ADDRESS]``):

1. the driver plans the tasks (file paths only, never pixels) and runs :func:`precheck`,
   so existing outputs are skipped (resume) before anything is scheduled;
2. CPU tasks (``map_batches`` with a function) decode a few files each with
   :func:`decode_task`; a bad file becomes a failed row and never fails the job;
3. an actor pool (``map_batches`` with :class:`Quantizer`, one GPU per actor when the
   cluster has GPUs) runs :func:`quantize_items` and writes every output itself with
   :func:`encode_item` (atomic, mirrored paths), returning only report rows;
4. the driver streams the rows into the same report as the local engine.

A decoded image crosses the object store once (decode task -> actor); execution is
streaming, so the store holds a bounded window of images, not the dataset. Workers that
die are restarted and their batches retried (a batch that keeps failing is redone one
image at a time, so only the culprit gets a failed row); writes are atomic, so no output
is ever truncated. ``--palette`` and ``--preview`` are resolved once on the driver, as in
the local engine, and travel to the actors inside the config. Inputs and outputs must be
on a file system every node sees at the same paths. Needs the ``ray`` extra (``pip
install "gpu_kquant[ray]"``); importing :mod:`gpu_kquant` does not import this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import socket
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

try:
    import ray
    import ray.data
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "the Ray engine needs Ray Data: pip install 'gpu_kquant[ray]' (or 'ray[data]>=2.9')", name="ray"
    ) from exc

from .colors import ColorSet, color_set, pack
from .device import resolve_device
from .imagefiles import Decoded, DecodeError
from .palette import ColorHistogram
from .pipeline import (
    PALETTE_FILES,
    Config,
    Item,
    Job,
    JobError,
    Task,
    configure,
    decode_task,
    encode_item,
    failed_row,
    open_report,
    precheck,
    quantize_items,
    remove_stale_temps,
)
from .quantize import Quantized
from .report import Row, Summary

__all__ = [
    "DECODE_BATCH",
    "MAX_INPUT_BLOCKS",
    "RESCUE_MIN",
    "RETRIES",
    "Quantizer",
    "Resources",
    "histogram_files",
    "ray_histogram",
    "resources",
    "run_job",
]

DECODE_BATCH = 4
"""Files per decode task: enough to amortise a task's overhead, few enough to spread them."""

MAX_INPUT_BLOCKS = 10_000
"""Blocks of paths at most; beyond ``DECODE_BATCH * MAX_INPUT_BLOCKS`` files, a decode task takes several batches."""

RETRIES = 3
"""Attempts after the first for a decode task or a quantize batch whose worker died."""

RESCUE_MIN = 64
"""Lost inputs are retried one by one when at most this many (or 5% of the job) were lost."""

_LOST = "lost: its Ray task failed {n} times (worker crash, out of memory or an error; see the Ray logs)"


# -- resources -------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """What the quantize stage asks Ray for, and how each actor splits its batch.

    Attributes:
        num_gpus: GPUs per actor (1 with GPUs, else 0).
        num_cpus: logical CPUs per actor (below 1 when actors would leave no CPU to decode).
        concurrency: number of actors.
        threads: quantize (CPU) or encode (GPU) threads inside one actor.
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
    """The quantize stage's resource requests for a cluster of ``n_gpus`` GPUs and ``cpus`` CPUs.

    With GPUs (and ``device`` auto or CUDA): one GPU per actor, one actor per GPU
    (``workers`` caps it). Without (or with ``device="cpu"``): ``workers`` CPU actors
    (default 1) that share the CPUs like the local engine's quantizer threads (one
    single-threaded quantizer per core). Actors leave at least one CPU to the decode
    tasks, so the pipeline can never starve itself.

    Raises:
        ValueError: CUDA was asked for and the cluster has no GPU.
    """
    kind = None if device in (None, "auto") else device.split(":")[0]
    if kind == "cuda" and n_gpus < 1:
        raise ValueError(f"device {device!r} was requested but the Ray cluster has no GPU")
    cpus = max(1, int(cpus))
    use_gpu = n_gpus >= 1 and kind != "cpu"
    if use_gpu:
        concurrency = max(1, min(workers or n_gpus, int(n_gpus)))
        threads = max(1, min(8, cpus // (2 * concurrency)))  # encoders; the other half of the CPUs decode
        sub_batch = batch_size or 16
        size = sub_batch
    else:
        concurrency = max(1, workers or 1)
        threads = max(1, cpus // concurrency)
        sub_batch = batch_size or 4
        size = sub_batch * threads * 2  # two groups per thread: a call waits for its slowest thread
    num_cpus = math.floor(min(1.0, (cpus - 1) / concurrency) * 100) / 100
    return Resources(1 if use_gpu else 0, num_cpus, concurrency, threads, sub_batch, size)


# -- stage 2: decode (CPU tasks) ------------------------------------------------------


def _row_json(row: Row) -> str:
    # json keeps floats exactly and writes inf as Infinity, which it reads back
    return json.dumps(asdict(row))


def _row_from_json(text: str) -> Row:
    return Row(**json.loads(text))


_EMPTY = np.zeros((0, 0, 3), dtype=np.uint8)


def _column(values: list[Any]) -> np.ndarray:
    """A 1-D object column (arrays of different shapes must not be stacked by numpy)."""
    out = np.empty(len(values), dtype=object)
    for j, value in enumerate(values):
        out[j] = value
    return out


def decode_files(batch: dict[str, np.ndarray], config: Config, max_image_pixels: int | None) -> dict[str, np.ndarray]:
    """Decode a batch of files (a Ray task); failures become rows in the ``row`` column."""
    Image.MAX_IMAGE_PIXELS = max_image_pixels  # the driver's Pillow limit (the CLI raises it to --max-pixels)
    pixels: list[np.ndarray] = []
    notes: list[str] = []
    sizes: list[int] = []
    seconds: list[float] = []
    rows: list[str] = []
    for src, dst, key in zip(batch["src"], batch["dst"], batch["key"]):
        task = Task(Path(str(src)), Path(str(dst)), str(key))
        row: Row | None = None
        try:
            item = decode_task(task, config)
        except DecodeError as exc:
            row = failed_row(task, config, str(exc))
        except Exception as exc:
            row = failed_row(task, config, f"cannot decode: {type(exc).__name__}: {exc}")
        if row is not None:
            pixels.append(_EMPTY)
            notes.append("[]")
            sizes.append(0)
            seconds.append(0.0)
            rows.append(_row_json(row))
        else:
            pixels.append(item.decoded.pixels)
            notes.append(json.dumps(item.decoded.notes))
            sizes.append(item.input_bytes)
            seconds.append(item.seconds)
            rows.append("")
    return {
        "i": np.asarray(batch["i"], dtype=np.int64),
        "src": np.asarray(batch["src"], dtype=object),
        "dst": np.asarray(batch["dst"], dtype=object),
        "key": np.asarray(batch["key"], dtype=object),
        "pixels": _column(pixels),
        "notes": np.asarray(notes, dtype=object),
        "input_bytes": np.asarray(sizes, dtype=np.int64),
        "seconds": np.asarray(seconds, dtype=np.float64),
        "row": np.asarray(rows, dtype=object),
    }


def histogram_files(batch: dict[str, np.ndarray], config: Config, max_image_pixels: int | None) -> dict[str, Any]:
    """The colour histogram of a few files, merged (a Ray task of the ``--palette shared`` pass).

    Returns one row: the block's opaque (packed RGB) and translucent (packed RGBA) colour
    counts and how many images they came from. Undecodable files are left out; the
    mapping pass gives them their failed row.
    """
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    hist = {3: ([], []), 4: ([], [])}
    images = 0
    for src, dst, key in zip(batch["src"], batch["dst"], batch["key"]):
        try:
            pixels = decode_task(Task(Path(str(src)), Path(str(dst)), str(key)), config).decoded.pixels
        except Exception:
            continue
        cs = color_set(pack(torch.from_numpy(pixels)), pixels.shape[2])
        hist[cs.channels][0].append(cs.keys)
        hist[cs.channels][1].append(cs.counts)
        images += 1
    out: dict[str, Any] = {"images": np.asarray([images], dtype=np.int64)}
    for channels, (keys, counts) in hist.items():
        merged_keys, merged_counts = torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int64)
        if keys:
            merged_keys, inverse = torch.unique(torch.cat(keys), return_inverse=True)
            merged_counts = torch.zeros(merged_keys.shape[0], dtype=torch.int64).index_add_(
                0, inverse, torch.cat(counts)
            )
        out[f"keys{channels}"] = _column([merged_keys.numpy()])
        out[f"counts{channels}"] = _column([merged_counts.numpy()])
    return out


def ray_histogram(tasks: list[Task], config: Config, device: torch.device) -> ColorHistogram:
    """The ``--palette shared`` histogram pass on Ray: CPU tasks count, the driver sums (a reduce).

    Exact: the summed counts equal the local engine's, so the fitted palette is the same.
    Needs a connected Ray (see :func:`run_job`).
    """
    items = [{"src": str(t.src), "dst": str(t.dst), "key": t.key} for t in tasks]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = _map_files(items, histogram_files, DECODE_BATCH, config)
    hist = ColorHistogram(device)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        for j in range(len(batch["images"])):
            images = int(batch["images"][j])
            for channels in (3, 4):
                keys = torch.from_numpy(np.array(batch[f"keys{channels}"][j]))
                counts = torch.from_numpy(np.array(batch[f"counts{channels}"][j]))
                hist.add_colors(ColorSet(keys, counts, channels), images=images if channels == 3 else 0)
    return hist


# -- stage 3: quantize and write (actors) ---------------------------------------------


def _groups(items: list[Item], size: int, max_pixels: int) -> list[list[Item]]:
    """Split a batch like the local engine: at most ``size`` images or ``max_pixels`` pixels each."""
    groups: list[list[Item]] = []
    group: list[Item] = []
    pixels = 0
    for item in items:
        group.append(item)
        pixels += item.decoded.pixels.shape[0] * item.decoded.pixels.shape[1]
        if len(group) >= size or pixels >= max_pixels:
            groups.append(group)
            group, pixels = [], 0
    if group:
        groups.append(group)
    return groups


class Quantizer:
    """The quantize stage: one per GPU (or CPU worker), kept alive across batches.

    Each call quantizes its images with :func:`quantize_items` in groups of
    ``sub_batch``, writes the outputs with :func:`encode_item` and returns the report
    rows (``i``, ``row`` as JSON, and the seconds per stage). On the CPU the groups run
    on ``threads`` single-threaded quantizers, as in the local engine; on a GPU they run
    one after another while ``threads`` encoders write the previous ones.
    """

    def __init__(self, config: Config, device: str, threads: int, sub_batch: int) -> None:
        self.config = config
        self.device = resolve_device(device)
        self.sub_batch = sub_batch
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="gpu_kquant")
        # CPU: groups on parallel single-threaded quantizers; GPU: one group at a time, encoders behind
        self.parallel_groups = self.device.type == "cpu"

    def encode(self, item: Item, result: Quantized | Exception) -> Row:
        """Write one output and return its row (a method, so tests can make it fail)."""
        return encode_item(item, result, self.config)

    def _encode_timed(self, item: Item, result: Quantized | Exception) -> tuple[Row, float]:
        t0 = time.perf_counter()
        row = self.encode(item, result)
        return row, time.perf_counter() - t0

    def _quantize(self, group: list[Item]) -> tuple[list[Quantized | Exception], list[float]]:
        """Quantize a group; also returns each item's share of the time (by pixels)."""
        t0 = time.perf_counter()
        results = quantize_items(group, self.config, self.device)
        seconds = time.perf_counter() - t0
        px = [item.decoded.pixels.shape[0] * item.decoded.pixels.shape[1] for item in group]
        total = sum(px) or 1
        return results, [seconds * p / total for p in px]

    def _process(self, group: list[Item]) -> list[tuple[Row, float, float]]:
        results, shares = self._quantize(group)
        return [(*self._encode_timed(item, result), share) for item, result, share in zip(group, results, shares)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["i"])
        rows: list[str] = [""] * n
        decode_s = np.asarray(batch["seconds"], dtype=np.float64)
        quantize_s = np.zeros(n, dtype=np.float64)
        encode_s = np.zeros(n, dtype=np.float64)
        items: list[Item] = []
        index: dict[int, int] = {}
        for j in range(n):
            if batch["row"][j]:
                rows[j] = str(batch["row"][j])
                continue
            task = Task(Path(str(batch["src"][j])), Path(str(batch["dst"][j])), str(batch["key"][j]))
            decoded = Decoded(batch["pixels"][j], json.loads(str(batch["notes"][j])))
            items.append(Item(task, decoded, int(batch["input_bytes"][j]), float(batch["seconds"][j])))
            index[id(items[-1])] = j
        size = self.sub_batch
        if self.parallel_groups:  # a short batch (the last one) still keeps every thread busy
            size = max(1, min(size, math.ceil(len(items) / self.threads)))
        groups = _groups(items, size, self.config.batch_pixels)
        done: list[tuple[Item, Row, float, float]] = []
        if self.parallel_groups:
            for group, out in zip(groups, self._pool.map(self._process, groups)):
                done += [(item, *res) for item, res in zip(group, out)]
        else:
            pending = []
            for group in groups:
                results, shares = self._quantize(group)
                pending += [
                    (item, self._pool.submit(self._encode_timed, item, result), share)
                    for item, result, share in zip(group, results, shares)
                ]
            done = [(item, *future.result(), share) for item, future, share in pending]
        for item, row, enc, share in done:
            j = index[id(item)]
            rows[j] = _row_json(row)
            encode_s[j] = enc
            quantize_s[j] = share
        return {
            "i": np.asarray(batch["i"], dtype=np.int64),
            "row": np.asarray(rows, dtype=object),
            "decode_s": decode_s,
            "quantize_s": quantize_s,
            "encode_s": encode_s,
        }


# -- driver ---------------------------------------------------------------------------


class _Stop(Exception):
    """Raised in the main thread by SIGTERM so that the run stops like Ctrl-C."""


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise _Stop()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """Fail fast on a HOST:PORT nobody listens on (Ray itself keeps retrying, deaf to Ctrl-C)."""
    if not address or "://" in address or address == "auto" or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    if port.isdigit():
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass


@contextlib.contextmanager
def _connected(address: str | None) -> Iterator[None]:
    """Join ``address`` or start a local Ray; leaves an existing connection alone.

    Disconnecting from a cluster does not stop it; only a Ray started here is stopped.
    """
    if ray.is_initialized():
        yield
        return
    where = f"join the Ray cluster at {address}" if address else "start a local Ray"
    try:
        _check_reachable(address)
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except (OSError, RuntimeError, ValueError) as exc:
        raise JobError(f"cannot {where}: {exc}") from None
    try:
        yield
    finally:
        ray.shutdown()


class _QuietConsole(logging.Filter):
    """Drops Ray Data's INFO lines and its notice that progress bars are off (the CLI has its own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and not str(record.msg).startswith("Progress bars disabled")


@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Keep Ray Data's warnings and errors on the console, without its progress chatter."""
    handlers = [
        h
        for h in logging.getLogger("ray.data").handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    quiet = _QuietConsole()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


@contextlib.contextmanager
def _data_context(**settings: Any) -> Iterator[None]:
    """Set DataContext attributes (those this Ray version has) for the datasets built inside."""
    with warnings.catch_warnings():  # Ray's own deprecated fields warn when the context is created
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ray.data.DataContext.get_current()
    saved = {name: getattr(ctx, name) for name in settings if hasattr(ctx, name)}
    for name in saved:
        setattr(ctx, name, settings[name])
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(ctx, name, value)


def _from_items(items: list[dict[str, Any]], blocks: int) -> ray.data.Dataset:
    try:
        return ray.data.from_items(items, override_num_blocks=blocks)
    except TypeError:  # Ray < 2.10 calls it parallelism
        return ray.data.from_items(items, parallelism=blocks)


def _map_files(
    items: list[dict[str, Any]], fn: Callable[..., dict[str, Any]], batch_size: int, config: Config
) -> ray.data.Dataset:
    """A dataset of file rows mapped by ``fn`` (a file reader) in 1-CPU tasks of ``batch_size`` files.

    Call it inside a block that silences Ray's DeprecationWarnings (see :func:`build_dataset`).
    """
    ds = _from_items(items, max(1, min(MAX_INPUT_BLOCKS, math.ceil(len(items) / batch_size))))
    return ds.map_batches(
        fn,
        batch_size=batch_size,
        batch_format="numpy",
        fn_kwargs={"config": config, "max_image_pixels": Image.MAX_IMAGE_PIXELS},
        num_cpus=1,
        max_retries=RETRIES,
    )


def build_dataset(
    tasks: list[tuple[int, Task]],
    config: Config,
    plan: Resources,
    quantizer: type[Quantizer] = Quantizer,
    *,
    alone: bool = False,
) -> ray.data.Dataset:
    """The lazy dataset: paths -> decode tasks -> quantize actors -> report rows.

    ``alone`` puts one image in each decode task and each actor call, with one call in
    flight per actor, so that an image that kills its worker takes no other with it.
    """
    decode_batch = 1 if alone else DECODE_BATCH
    if alone:
        plan = dataclasses.replace(plan, sub_batch=1, batch_size=1)
    # no more actors than batches: each one is a new process that imports PyTorch
    plan = dataclasses.replace(plan, concurrency=max(1, min(plan.concurrency, math.ceil(len(tasks) / plan.batch_size))))
    items = [{"i": i, "src": str(t.src), "dst": str(t.dst), "key": t.key} for i, t in tasks]
    with warnings.catch_warnings():
        # Ray deprecates remote args without a named parameter (max_retries, max_restarts,
        # max_task_retries) and some of its own DataContext fields; neither concerns users.
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = _map_files(items, decode_files, decode_batch, config)
        # config.fixed_palette (--palette FILE or shared, resolved on the driver) travels to
        # every actor inside config, so they all map to the same palette.
        pool = {"size": plan.concurrency, **({"max_tasks_in_flight_per_actor": 1} if alone else {})}
        return ds.map_batches(
            quantizer,
            batch_size=plan.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(**pool),
            fn_constructor_kwargs={
                "config": config,
                "device": plan.device,
                "threads": plan.threads,
                "sub_batch": plan.sub_batch,
            },
            num_gpus=plan.num_gpus,
            num_cpus=plan.num_cpus,
            max_restarts=-1,  # a node may go away any number of times over a long job
            max_task_retries=RETRIES,  # ...but a batch that keeps killing its worker gives up
        )


def _driver_device(config: Config) -> torch.device:
    """This machine's device for work done on the driver (fitting a shared palette)."""
    try:
        return resolve_device(config.device)
    except ValueError:  # e.g. --device cuda given to a head node without a GPU
        return torch.device("cpu")


def cluster_resources() -> tuple[int, int]:
    """GPUs and CPUs of the connected Ray cluster."""
    total = ray.cluster_resources()
    return int(total.get("GPU", 0)), int(total.get("CPU", 1))


def run_job(
    job: Job,
    config: Config,
    address: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    workers: int | None = None,
    quantizer: type[Quantizer] = Quantizer,
) -> Summary:
    """Run a prepared job on Ray, writing the same report as :func:`gpu_kquant.pipeline.execute`.

    Args:
        job: from :func:`gpu_kquant.pipeline.prepare`.
        config: the run's options (``device`` auto/None uses the cluster's GPUs when it has any).
        address: a Ray cluster to join (``auto`` finds a local one); default: start a local Ray,
            or use the one this process is already connected to.
        progress: ``progress(images, pixels)`` as each input finishes.
        workers: number of quantize actors: at most one per GPU (default: every GPU), or CPU
            actors without GPUs (default 1).
        quantizer: the actor class (tests inject one that crashes).

    Ctrl-C (or SIGTERM) stops early and returns the summary with ``interrupted=True``.
    """
    start = time.perf_counter()
    remove_stale_temps(job.roots)
    summary = Summary()
    stages: Counter = Counter()
    inputs = {t.src.resolve() for t in job.tasks}
    saved = job.out_dir / PALETTE_FILES[0]
    fits_palette = config.palette == "shared" and (config.overwrite or not saved.exists())
    busy = fits_palette or any(precheck(t, config, inputs) is None for t in job.tasks)
    report = None

    def emit(row: Row) -> None:
        assert report is not None
        report.write(row)
        if progress is not None:
            progress(1, (row.width or 0) * (row.height or 0) if row.status == "ok" else 0)

    try:
        # Ray starts only when there is work: a finished job resumes without it.
        with _sigterm_stops(), _connected(address) if busy else contextlib.nullcontext(), _ray_settings():
            # The fixed palette and the preview folder are decided once, as in the local
            # engine; --palette shared counts its histogram on Ray and fits on the driver.
            config = configure(job, config, _driver_device(config), histogram=ray_histogram)
            report = open_report(job, config, summary)
            todo: list[tuple[int, Task]] = []
            for i, task in enumerate(job.tasks):
                row = precheck(task, config, inputs)
                if row is None:
                    todo.append((i, task))
                else:
                    emit(row)
            if todo:
                _run(todo, config, workers, quantizer, emit, stages)
    except (KeyboardInterrupt, _Stop):
        summary.interrupted = True
    finally:
        if report is not None:
            report.close()
        summary.stage_seconds.update(stages)
        summary.seconds = time.perf_counter() - start
    return summary


@contextlib.contextmanager
def _ray_settings() -> Iterator[None]:
    """Ray Data quiet and tolerant inside a run (the CLI has its own progress bar)."""
    if not ray.is_initialized():
        yield
        return
    settings = {
        "enable_progress_bars": False,
        "enable_auto_log_stats": False,
        "print_on_execution_start": False,
        "max_errored_blocks": -1,  # a batch that exhausted its retries is handled by _run, not fatal
    }
    # SIGTERM again once connected: Ray's core installs its own handler, which just dies
    with _sigterm_stops(), _data_context(**settings), _quiet_ray_data():
        yield


def _run(
    todo: list[tuple[int, Task]],
    config: Config,
    workers: int | None,
    quantizer: type[Quantizer],
    emit: Callable[[Row], None],
    stages: Counter,
) -> None:
    """Stream the rows of ``todo`` into ``emit``; inputs whose batch kept failing get one more try alone."""
    n_gpus, cpus = cluster_resources()
    try:
        plan = resources(n_gpus, cpus, device=config.device, workers=workers, batch_size=config.batch_size)
    except ValueError as exc:
        raise JobError(str(exc)) from None
    lost = _stream(todo, config, plan, quantizer, emit, stages)
    if lost and len(lost) <= max(RESCUE_MIN, len(todo) // 20):
        # Something in those batches kills its worker (or raises): redo them one image per
        # task and per batch, so that only the culprit is lost. Not when much of the job
        # failed: that is no bad file but a broken setup, and one by one would take ages.
        lost = _stream(lost, config, plan, quantizer, emit, stages, alone=True)
        attempts = 2 * (RETRIES + 1)
    else:
        attempts = RETRIES + 1
    for _, task in lost:
        emit(failed_row(task, config, _LOST.format(n=attempts)))


def _stream(
    todo: list[tuple[int, Task]],
    config: Config,
    plan: Resources,
    quantizer: type[Quantizer],
    emit: Callable[[Row], None],
    stages: Counter,
    *,
    alone: bool = False,
) -> list[tuple[int, Task]]:
    """Run one dataset over ``todo``, emitting rows as they arrive; returns the tasks without a row."""
    ds = build_dataset(todo, config, plan, quantizer, alone=alone)
    seen: set[int] = set()
    # no prefetching: rows are tiny, and a prefetched batch is only handed over with the next one
    batches = ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0)
    try:
        for batch in batches:
            for j in range(len(batch["i"])):
                i = int(batch["i"][j])
                if i in seen:  # never expected: Ray keeps only a successful attempt's output
                    continue
                seen.add(i)
                stages["decode"] += float(batch["decode_s"][j])
                stages["quantize"] += float(batch["quantize_s"][j])
                stages["encode"] += float(batch["encode_s"][j])
                emit(_row_from_json(str(batch["row"][j])))
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    return [(i, task) for i, task in todo if i not in seen]
