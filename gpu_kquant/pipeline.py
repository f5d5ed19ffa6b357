"""The directory pipeline: walk -> decode pool -> device batches -> encode pool -> report.

Decoding and encoding run on thread pools (Pillow and zlib release the GIL); decoded
images are grouped into batches for one batched k-means on the device. Queues are
bounded, so memory does not grow with the number of images. Every output is written
atomically, existing outputs are skipped (resume), and a bad file only ever produces
a failed row.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .device import resolve_device
from .io import IMAGE_EXTENSIONS, TEMP_PREFIX, Decoded, DecodeError, encode, load_image, write_atomic
from .quantize import Quantized, quantize_batch
from .report import ReportWriter, Row, Summary

__all__ = [
    "Config",
    "Job",
    "Pipeline",
    "Task",
    "execute",
    "output_path_for",
    "plan_tasks",
    "prepare",
    "run",
    "shard_of",
]

DEFAULT_REPORT = "gpu_kquant_report.jsonl"
_STALE_TEMP_SECONDS = 600


@dataclass
class Config:
    """Everything a run needs; the CLI fills it from its flags."""

    inputs: list[Path]
    k: int = 16
    out: Path | None = None
    fmt: str = "png"
    device: str | None = None
    batch_size: int | None = None
    batch_pixels: int = 64_000_000
    workers: int = max(1, os.cpu_count() or 1)
    overwrite: bool = False
    report: Path | None = None
    shard: tuple[int, int] = (0, 1)
    quiet: bool = False
    compress_level: int | None = None
    max_pixels: int | None = None
    seed: int = 0
    space: str = "rgb"
    quantize_options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """One input file and where its output goes; ``key`` is stable across machines."""

    src: Path
    dst: Path
    key: str


def shard_of(key: str, count: int) -> int:
    """Deterministic shard (0..count-1) of a task key, the same on every machine."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count


def output_path_for(src: Path, root: Path, out_root: Path, fmt: str) -> Path:
    """Mirror ``src`` (inside ``root``) under ``out_root`` with the format's extension."""
    return (out_root / src.relative_to(root)).with_suffix("." + fmt)


def _walk_dir(root: Path, exclude: set[Path]) -> Iterator[Path]:
    """Files under ``root`` in sorted order; symlinked folders followed once (no loops)."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or Path(real) in exclude:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if Path(os.path.realpath(os.path.join(dirpath, d))) not in exclude)
        for name in sorted(filenames):
            yield Path(dirpath) / name


def plan_tasks(config: Config) -> tuple[list[Task], int, list[Path]]:
    """Turn the inputs into tasks.

    Raises:
        ValueError: when an output folder is an input folder.

    Returns:
        The tasks of this shard, the number of non-image files ignored, and the output
        roots (folders written into).
    """
    tasks: list[Task] = []
    ignored = 0
    roots: list[tuple[Path, Path, bool]] = []  # (input, output root, is_dir)
    names: collections.Counter = collections.Counter()
    for inp in config.inputs:
        is_dir = inp.is_dir()
        base = inp if is_dir else inp.parent
        if config.out is None:
            out_root = base.parent / f"{base.resolve().name}_k{config.k}" if is_dir else base
        elif len(config.inputs) == 1 or not is_dir:
            out_root = config.out
        else:
            names[inp.name] += 1
            suffix = "" if names[inp.name] == 1 else f"_{names[inp.name]}"
            out_root = config.out / f"{inp.resolve().name}{suffix}"
        if is_dir and out_root.resolve() == inp.resolve():
            raise ValueError(f"the output folder is the input folder {inp}; choose another -o")
        roots.append((inp, out_root, is_dir))
    exclude = {Path(os.path.realpath(r)) for _, r, is_dir in roots if is_dir or config.out is not None}
    for inp, out_root, is_dir in roots:
        if is_dir:
            for src in _walk_dir(inp, exclude):
                if src.suffix.lower() not in IMAGE_EXTENSIONS or src.name.startswith(TEMP_PREFIX):
                    ignored += 1
                    continue
                rel = src.relative_to(inp).as_posix()
                tasks.append(Task(src, output_path_for(src, inp, out_root, config.fmt), f"{inp.resolve().name}/{rel}"))
        else:
            stem = inp.stem if config.out is not None else f"{inp.stem}_k{config.k}"
            tasks.append(Task(inp, out_root / f"{stem}.{config.fmt}", inp.name))
    tasks = _resolve_collisions(tasks, config.fmt)
    index, count = config.shard
    if count > 1:
        tasks = [t for t in tasks if shard_of(t.key, count) == index]
    return tasks, ignored, [r for _, r, _ in roots]


def _resolve_collisions(tasks: list[Task], fmt: str) -> list[Task]:
    """Inputs that would share an output name (a.jpg and a.png) keep their extension."""
    by_dst = collections.Counter(t.dst for t in tasks)
    return [Task(t.src, t.dst.with_name(f"{t.src.name}.{fmt}"), t.key) if by_dst[t.dst] > 1 else t for t in tasks]


def _remove_stale_temps(roots: list[Path]) -> None:
    """Delete temporary files a killed run left behind (old enough not to be in use)."""
    now = time.time()
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, _, filenames in os.walk(root):
            for name in filenames:
                if name.startswith(TEMP_PREFIX) and name.endswith(".tmp"):
                    path = os.path.join(dirpath, name)
                    with contextlib.suppress(OSError):
                        if now - os.path.getmtime(path) > _STALE_TEMP_SECONDS:
                            os.unlink(path)


@dataclass
class Item:
    """A decoded image travelling through the pipeline."""

    task: Task
    decoded: Decoded
    input_bytes: int
    seconds: float


# -- per-item stages, shared by the local pipeline and the Ray engine ------------------


def precheck(task: Task, config: Config, inputs: set[Path]) -> Row | None:
    """The row for a task that needs no work (output exists) or must not run, else None."""
    if task.dst.resolve() in inputs:
        return failed_row(task, config, "output path is an input file; choose another -o or --format")
    if task.dst.exists() and not config.overwrite:
        return Row(str(task.src), str(task.dst), "skipped", reason="output exists", k=config.k)
    return None


def failed_row(task: Task, config: Config, reason: str, **extra: object) -> Row:
    """A failed row with a one-line reason."""
    return Row(str(task.src), str(task.dst), "failed", reason=reason, k=config.k, **extra)


def decode_task(task: Task, config: Config) -> Item:
    """Decode one input; raises :class:`DecodeError` with the reason."""
    t0 = time.perf_counter()
    decoded = load_image(task.src, max_pixels=config.max_pixels)
    return Item(task, decoded, task.src.stat().st_size, time.perf_counter() - t0)


def quantize_items(items: list[Item], config: Config, device: torch.device) -> list[Quantized | Exception]:
    """One batched quantization; a failing batch is retried image by image.

    Each item's ``seconds`` grows by its pixel share of the batch time.
    """
    t0 = time.perf_counter()
    options = {"space": config.space, "seed": config.seed, **config.quantize_options}
    pixels = [item.decoded.pixels for item in items]
    try:
        results: list[Quantized | Exception] = list(quantize_batch(pixels, config.k, device=device, **options))
    except Exception:
        results = []
        for px in pixels:
            try:
                results.append(quantize_batch([px], config.k, device=device, **options)[0])
            except Exception as exc:
                results.append(exc)
    seconds = time.perf_counter() - t0
    total = sum(px.shape[0] * px.shape[1] for px in pixels) or 1
    for item, px in zip(items, pixels):
        item.seconds += seconds * px.shape[0] * px.shape[1] / total
    return results


def encode_item(item: Item, result: Quantized | Exception, config: Config) -> Row:
    """Encode and atomically write one output; returns its report row."""
    task = item.task
    h, w = item.decoded.pixels.shape[:2]
    if isinstance(result, Exception):
        return failed_row(task, config, f"quantization failed: {result}", width=w, height=h)
    t0 = time.perf_counter()
    try:
        data, notes = encode(config.fmt, result.palette, result.indices, compress_level=config.compress_level)
        write_atomic(task.dst, data)
    except Exception as exc:
        return failed_row(task, config, f"cannot write output: {exc}", width=w, height=h)
    return Row(
        str(task.src),
        str(task.dst),
        "ok",
        width=w,
        height=h,
        k=config.k,
        colors=result.n_colors,
        input_bytes=item.input_bytes,
        output_bytes=len(data),
        mse=round(result.mse, 4),
        psnr=round(result.psnr, 3),
        seconds=round(item.seconds + time.perf_counter() - t0, 4),
        notes=item.decoded.notes + notes,
    )


class _Stop(Exception):
    """Raised in the main thread by SIGTERM so that it stops like Ctrl-C."""


class Pipeline:
    """One run over a list of tasks on this machine; :meth:`run` returns the summary.

    Threads: ``workers`` decoders, ``workers`` encoders and the quantizers: one on
    CUDA; on the CPU one per core, each with a single torch thread. (Multi-threaded
    torch ops wait at a barrier for every thread, so any other busy thread on the
    machine, our own decoders included, stalls every op; single-threaded quantizers
    working on different batches keep all cores busy instead.)
    """

    def __init__(self, config: Config, progress: Callable[[int, int], None] | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.summary = Summary()
        self.report: ReportWriter | None = None
        self._progress = progress
        self._stage_lock = threading.Lock()
        self._stop = threading.Event()
        self._encode_slots = threading.BoundedSemaphore(2 * config.workers)
        self._quantizers = 1 if self.device.type == "cuda" else max(1, os.cpu_count() or 1)
        # Big batches feed a GPU; on the CPU small ones keep every quantizer busy.
        self.batch_size = config.batch_size or (16 if self.device.type == "cuda" else 4)

    def _timed(self, stage: str, fn: Callable, *args: object) -> object:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            with self._stage_lock:
                self.summary.stage_seconds[stage] += time.perf_counter() - t0

    def _emit(self, row: Row) -> None:
        assert self.report is not None
        self.report.write(row)
        if self._progress is not None:
            self._progress(1, (row.width or 0) * (row.height or 0) if row.status == "ok" else 0)

    def _encode(self, item: Item, result: Quantized | Exception) -> None:
        try:
            self._emit(self._timed("encode", encode_item, item, result, self.config))
        finally:
            self._encode_slots.release()

    def _process(self, batch: list[Item], encoders: ThreadPoolExecutor) -> None:
        """Quantize one batch and queue its encodes (runs on a quantizer thread)."""
        results = self._timed("quantize", quantize_items, batch, self.config, self.device)
        for item, result in zip(batch, results):
            if self._stop.is_set():
                return
            self._encode_slots.acquire()
            try:
                encoders.submit(self._encode, item, result)
            except RuntimeError:  # the pool shut down after an interrupt
                self._encode_slots.release()
                return

    def run(self, tasks: list[Task]) -> Summary:
        """Process ``tasks``; Ctrl-C (or SIGTERM) stops early and still returns the summary.

        On an interrupt, queued work is dropped and running encodes finish (their
        writes are atomic anyway); a batch still in k-means is abandoned.
        """
        cfg = self.config
        inputs = {t.src.resolve() for t in tasks}
        start = time.perf_counter()
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        decoders = ThreadPoolExecutor(cfg.workers, thread_name_prefix="decode")
        quantizers = ThreadPoolExecutor(self._quantizers, thread_name_prefix="quantize")
        encoders = ThreadPoolExecutor(cfg.workers, thread_name_prefix="encode")
        decoding: collections.deque[tuple[Task, Future]] = collections.deque()
        batches: collections.deque[Future] = collections.deque()
        batch: list[Item] = []
        previous = _install_sigterm()

        def flush() -> None:
            while len(batches) > self._quantizers:
                batches.popleft().result()
            if batch:
                batches.append(quantizers.submit(self._process, list(batch), encoders))
                batch.clear()

        def take(task: Task, future: Future) -> None:
            try:
                batch.append(future.result())
            except DecodeError as exc:
                self._emit(failed_row(task, cfg, str(exc)))
                return
            except Exception as exc:
                self._emit(failed_row(task, cfg, f"cannot decode: {type(exc).__name__}: {exc}"))
                return
            pixels = sum(i.decoded.pixels.shape[0] * i.decoded.pixels.shape[1] for i in batch)
            if len(batch) >= self.batch_size or pixels >= cfg.batch_pixels:
                flush()

        try:
            for task in tasks:
                row = precheck(task, cfg, inputs)
                if row is not None:
                    self._emit(row)
                    continue
                decoding.append((task, decoders.submit(self._timed, "decode", decode_task, task, cfg)))
                while len(decoding) > 2 * max(self.batch_size, cfg.workers):
                    take(*decoding.popleft())
            while decoding:
                take(*decoding.popleft())
            flush()
            while batches:
                batches.popleft().result()
        except (KeyboardInterrupt, _Stop):
            self._stop.set()
            self.summary.interrupted = True
        finally:
            decoders.shutdown(wait=not self._stop.is_set(), cancel_futures=True)
            quantizers.shutdown(wait=not self._stop.is_set(), cancel_futures=True)
            encoders.shutdown(wait=True, cancel_futures=self._stop.is_set())
            torch.set_num_threads(threads)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.summary.seconds = time.perf_counter() - start
        return self.summary


def _install_sigterm() -> object | None:
    """Make SIGTERM (a scheduler's stop) behave like Ctrl-C in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: object) -> None:
        raise _Stop()

    return signal.signal(signal.SIGTERM, handler)


@dataclass
class Job:
    """A planned run: the tasks of this shard, where outputs and the report go."""

    tasks: list[Task]
    ignored: int
    roots: list[Path]
    report: Path


def prepare(config: Config) -> Job:
    """Walk the inputs and decide every output path and the report path."""
    tasks, ignored, roots = plan_tasks(config)
    report = config.report
    if report is None:
        shard = "" if config.shard[1] == 1 else f".shard-{config.shard[0]}-of-{config.shard[1]}"
        report = (config.out or roots[0]) / DEFAULT_REPORT.replace(".jsonl", f"{shard}.jsonl")
    return Job(tasks, ignored, roots, report)


def execute(job: Job, config: Config, progress: Callable[[int, int], None] | None = None) -> Summary:
    """Run a prepared job, writing its report; returns the summary.

    ``progress(images, pixels)`` is called as each input finishes.
    """
    _remove_stale_temps(job.roots)
    pipeline = Pipeline(config, progress)
    pipeline.summary.ignored = job.ignored
    pipeline.report = ReportWriter(job.report, pipeline.summary)
    try:
        return pipeline.run(job.tasks)
    finally:
        pipeline.report.close()


def run(config: Config, progress: Callable[[int, int], None] | None = None) -> Summary:
    """Plan and run a whole job (:func:`prepare` then :func:`execute`)."""
    return execute(prepare(config), config, progress)
