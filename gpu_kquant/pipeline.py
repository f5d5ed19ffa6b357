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
import dataclasses
import hashlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .device import resolve_device
from .imagefiles import IMAGE_EXTENSIONS, TEMP_PREFIX, Decoded, DecodeError, encode, load_image, write_atomic
from .metrics import mean_ciede2000
from .palette import ColorHistogram, Palette
from .preview import Gallery, side_by_side, thumbnail_pair
from .quantize import Quantized, map_to_palette, quantize_batch
from .report import ReportWriter, Row, Summary

__all__ = [
    "Config",
    "Job",
    "JobError",
    "Pipeline",
    "Task",
    "configure",
    "execute",
    "open_report",
    "output_path_for",
    "plan_tasks",
    "prepare",
    "resolve_palette",
    "run",
    "shard_of",
    "shared_histogram",
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
    dither: str = "none"
    palette: str | None = None
    quality: tuple[float, float] | None = None
    skip_if_larger: bool = False
    ciede2000: bool = False
    preview: bool = False
    quantize_options: dict = field(default_factory=dict)
    # Filled in by the run itself: the fixed palette every image maps to (from
    # --palette), and where preview files go ("gallery" folder or None).
    fixed_palette: Palette | None = None
    preview_dir: Path | None = None


class JobError(Exception):
    """A problem with the run as a whole (not with one file); the message is one line."""


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


def remove_stale_temps(roots: list[Path]) -> None:
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


def _reach_quality(pixels: np.ndarray, config: Config, device: torch.device, **options: object) -> Quantized:
    """The result at the smallest k up to ``config.k`` whose PSNR reaches the target maximum.

    PSNR grows with k, so a binary search needs about log2(k) quantizations; when even
    k colours fall short of the maximum, the k-colour result is returned as is.
    """
    _, target = config.quality  # type: ignore[misc]
    best = quantize_batch([pixels], config.k, device=device, **options)[0]
    if best.psnr < target:
        return best
    lo, hi = 2, best.n_colors
    while lo < hi:
        mid = (lo + hi) // 2
        q = quantize_batch([pixels], mid, device=device, **options)[0]
        if q.psnr >= target:
            hi, best = mid, q
        else:
            lo = mid + 1
    return best


def quantize_items(items: list[Item], config: Config, device: torch.device) -> list[Quantized | Exception]:
    """One batched quantization; a failing batch is retried image by image.

    Maps to ``config.fixed_palette`` when set, searches the smallest k for
    ``config.quality``, and leaves Floyd-Steinberg dithering to :func:`encode_item`
    (CPU threads, in parallel across files). Each item's ``seconds`` grows by its
    pixel share of the batch time.
    """
    t0 = time.perf_counter()
    dither = "ordered" if config.dither == "ordered" else "none"
    options = {"space": config.space, "seed": config.seed, "dither": dither, **config.quantize_options}
    pixels = [item.decoded.pixels for item in items]

    def run(batch: list[np.ndarray]) -> list[Quantized]:
        if config.fixed_palette is not None:
            pal = config.fixed_palette
            return map_to_palette(batch, pal.colors, space=pal.space, dither=dither, device=device)
        if config.quality is not None:
            return [_reach_quality(px, config, device, **options) for px in batch]
        return quantize_batch(batch, config.k, device=device, **options)

    try:
        results: list[Quantized | Exception] = list(run(pixels))
    except Exception:
        results = []
        for px in pixels:
            try:
                results.append(run([px])[0])
            except Exception as exc:
                results.append(exc)
    seconds = time.perf_counter() - t0
    total = sum(px.shape[0] * px.shape[1] for px in pixels) or 1
    for item, px in zip(items, pixels):
        item.seconds += seconds * px.shape[0] * px.shape[1] / total
    return results


def _preview(item: Item, result: Quantized, config: Config, row: Row) -> None:
    """Write this image's preview files and attach the gallery entry to its row."""
    assert config.preview_dir is not None
    pixels = item.decoded.pixels
    quantized = result.to_array() if pixels.shape[2] == 4 or result.has_alpha else result.to_rgb()
    if config.preview_dir == item.task.dst.parent and len(config.inputs) == 1 and config.inputs[0].is_file():
        side_by_side(pixels, quantized, item.task.dst.with_name(item.task.dst.stem + ".preview.png"))
        return
    thumbs = thumbnail_pair(pixels, quantized, config.preview_dir, item.task.key)
    row.preview = {
        "input": row.input,
        "name": item.task.key,
        **thumbs,
        "palette": ["#" + bytes(c[:3]).hex() for c in result.palette.tolist()],
        "colors": row.colors,
        "psnr": row.psnr if row.psnr is None or math.isfinite(row.psnr) else "inf",
        "input_bytes": row.input_bytes,
        "output_bytes": row.output_bytes,
    }


def encode_item(item: Item, result: Quantized | Exception, config: Config) -> Row:
    """Dither (Floyd-Steinberg), check the quality and size guards, encode and write one output.

    Returns its report row: ``ok``, ``quality`` (below the minimum PSNR, not written),
    ``larger`` (bigger than the input with --skip-if-larger, not written) or ``failed``.
    """
    task = item.task
    h, w = item.decoded.pixels.shape[:2]
    if isinstance(result, Exception):
        return failed_row(task, config, f"quantization failed: {result}", width=w, height=h)
    t0 = time.perf_counter()
    space = config.fixed_palette.space if config.fixed_palette is not None else config.space
    common = {
        "width": w,
        "height": h,
        "k": config.k,
        "input_bytes": item.input_bytes,
        "space": space,
        "dither": config.dither,
    }
    if config.quality is not None and result.psnr < config.quality[0]:
        reason = f"PSNR {result.psnr:.2f} dB is below the minimum of {config.quality[0]:g} dB"
        return Row(
            str(task.src),
            str(task.dst),
            "quality",
            reason=reason,
            colors=result.n_colors,
            mse=round(result.mse, 4),
            psnr=round(result.psnr, 3),
            **common,
        )
    try:
        if config.dither == "fs":
            result = map_to_palette([item.decoded.pixels], result.palette, space=space, dither="fs", device="cpu")[0]
        data, notes = encode(config.fmt, result.palette, result.indices, compress_level=config.compress_level)
        if config.skip_if_larger and len(data) > item.input_bytes:
            reason = f"output would be {len(data)} bytes, larger than the input's {item.input_bytes}"
            return Row(
                str(task.src),
                str(task.dst),
                "larger",
                reason=reason,
                colors=result.n_colors,
                output_bytes=len(data),
                psnr=round(result.psnr, 3),
                **common,
            )
        write_atomic(task.dst, data)
    except Exception as exc:
        return failed_row(task, config, f"cannot write output: {exc}", width=w, height=h)
    row = Row(
        str(task.src),
        str(task.dst),
        "ok",
        colors=result.n_colors,
        output_bytes=len(data),
        mse=round(result.mse, 4),
        psnr=round(result.psnr, 3),
        psnr_blur=None if result.blurred_psnr is None else round(result.blurred_psnr, 3),
        notes=item.decoded.notes + notes,
        **common,
    )
    if config.ciede2000:
        row.ciede2000 = round(mean_ciede2000(item.decoded.pixels, result.palette, result.indices), 4)
    if config.preview:
        _preview(item, result, config, row)
    row.seconds = round(item.seconds + time.perf_counter() - t0, 4)
    return row


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

    def __init__(
        self,
        config: Config,
        progress: Callable[[int, int], None] | None = None,
        summary: Summary | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.summary = summary or Summary()
        self.report: ReportWriter | None = None
        self._progress = progress
        self._stop = stop or threading.Event()
        self._encode_slots = threading.BoundedSemaphore(2 * config.workers)
        self._quantizers = 1 if self.device.type == "cuda" else max(1, os.cpu_count() or 1)
        # Big batches feed a GPU; on the CPU small ones keep every quantizer busy.
        self.batch_size = config.batch_size or (16 if self.device.type == "cuda" else 4)

    def _timed(self, stage: str, fn: Callable, *args: object) -> object:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.summary.add_stage(stage, time.perf_counter() - t0)

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
                if self._stop.is_set():
                    raise _Stop()
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
    out_dir: Path


PALETTE_FILES = ("palette.json", "palette.npy", "palette.gpl")


def prepare(config: Config) -> Job:
    """Walk the inputs and decide every output path and the report path."""
    tasks, ignored, roots = plan_tasks(config)
    out_dir = config.out or roots[0]
    report = config.report
    if report is None:
        shard = "" if config.shard[1] == 1 else f".shard-{config.shard[0]}-of-{config.shard[1]}"
        report = out_dir / DEFAULT_REPORT.replace(".jsonl", f"{shard}.jsonl")
    return Job(tasks, ignored, roots, report, out_dir)


def shared_histogram(tasks: list[Task], config: Config, device: torch.device) -> ColorHistogram:
    """First pass of ``--palette shared``: the exact colour histogram summed over all inputs.

    Files are decoded on a thread pool with bounded prefetch, so memory stays flat;
    undecodable files are left out here and get their failed row in the second pass.
    """
    hist = ColorHistogram(device)
    with ThreadPoolExecutor(config.workers, thread_name_prefix="histogram") as pool:
        pending: collections.deque[Future] = collections.deque()

        def drain(limit: int) -> None:
            while len(pending) > limit:
                try:
                    hist.add(pending.popleft().result().decoded.pixels)
                except Exception:
                    continue

        for task in tasks:
            pending.append(pool.submit(decode_task, task, config))
            drain(2 * config.workers)
        drain(0)
    return hist


HistogramPass = Callable[[list[Task], Config, torch.device], ColorHistogram]


def resolve_palette(
    job: Job, config: Config, device: torch.device, histogram: HistogramPass = shared_histogram
) -> Palette | None:
    """The fixed palette of this run (``--palette FILE`` or ``shared``), or None.

    A shared palette already saved in the output folder is reused (so a resumed run
    maps to the same palette); otherwise it is fitted on the histogram of every input,
    over all shards (``histogram`` runs that pass: local threads, or Ray), and saved as
    palette.json, palette.npy and palette.gpl.
    """
    if config.palette is None:
        return None
    if config.palette != "shared":
        path = Path(config.palette)
        try:
            return Palette.load(path, space=None if path.suffix.lower() == ".json" else config.space)
        except (OSError, ValueError, KeyError) as exc:
            raise JobError(f"cannot read palette {path}: {exc}") from None
    saved = job.out_dir / PALETTE_FILES[0]
    if saved.exists() and not config.overwrite:
        return Palette.load(saved)
    everything, _, _ = plan_tasks(dataclasses.replace(config, shard=(0, 1)))
    hist = histogram(everything, config, device)
    if hist.pixels == 0:
        raise JobError("no decodable image to fit a shared palette on")
    palette = Palette.fit(
        hist, config.k, space=config.space, device=device, seed=config.seed, **config.quantize_options
    )
    job.out_dir.mkdir(parents=True, exist_ok=True)
    for name in PALETTE_FILES:
        tmp = job.out_dir / f"{TEMP_PREFIX}{os.getpid()}-{name}"
        palette.save(tmp.with_suffix(Path(name).suffix))
        os.replace(tmp.with_suffix(Path(name).suffix), job.out_dir / name)
    return palette


def open_report(job: Job, config: Config, summary: Summary) -> ReportWriter:
    """The report writer of a run, with the preview gallery attached when asked for."""
    summary.ignored = job.ignored
    gallery = Gallery(config.preview_dir) if config.preview_dir is not None else None
    return ReportWriter(job.report, summary, gallery)


def configure(job: Job, config: Config, device: torch.device, histogram: HistogramPass = shared_histogram) -> Config:
    """Resolve what a run decides once: the fixed palette and the preview folder."""
    single_file = len(config.inputs) == 1 and config.inputs[0].is_file()
    preview_dir = None
    if config.preview:
        preview_dir = job.tasks[0].dst.parent if single_file and job.tasks else job.out_dir / "preview"
    palette = resolve_palette(job, config, device, histogram)
    k = len(palette) if palette is not None else config.k
    return dataclasses.replace(config, fixed_palette=palette, preview_dir=preview_dir, k=k)


def devices_for(config: Config) -> list[torch.device]:
    """Devices a run uses: every GPU when ``--device cuda`` names none and there are several."""
    device = resolve_device(config.device)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [device]


def split_tasks(tasks: list[Task], parts: int, sharded: bool = False) -> list[list[Task]]:
    """Deal tasks to ``parts`` workers with the deterministic split of ``--shard``.

    Inside a run that is itself one shard of several, the key is salted: all its
    tasks share one residue of the outer split, which would send them to one worker.
    """
    out: list[list[Task]] = [[] for _ in range(parts)]
    for task in tasks:
        out[shard_of(task.key + "#device" if sharded else task.key, parts)].append(task)
    return out


def execute(job: Job, config: Config, progress: Callable[[int, int], None] | None = None) -> Summary:
    """Run a prepared job, writing its report; returns the summary.

    With several GPUs, one pipeline per GPU works on its own part of the tasks; they
    share the report. ``progress(images, pixels)`` is called as each input finishes.
    """
    remove_stale_temps(job.roots)
    devices = devices_for(config)
    config = configure(job, config, devices[0])
    summary = Summary()
    report = open_report(job, config, summary)
    stop = threading.Event()
    pipelines = []
    for device in devices:
        pipeline = Pipeline(dataclasses.replace(config, device=str(device)), progress, summary, stop)
        pipeline.report = report
        pipelines.append(pipeline)
    try:
        if len(pipelines) == 1:
            return pipelines[0].run(job.tasks)
        parts = split_tasks(job.tasks, len(pipelines), sharded=config.shard[1] > 1)
        start = time.perf_counter()
        previous = _install_sigterm()
        with ThreadPoolExecutor(len(pipelines), thread_name_prefix="device") as pool:
            futures = [pool.submit(p.run, part) for p, part in zip(pipelines, parts)]
            try:
                for future in futures:
                    future.result()
            except (KeyboardInterrupt, _Stop):
                stop.set()
                summary.interrupted = True
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)
        summary.seconds = time.perf_counter() - start
        return summary
    finally:
        report.close()


def run(config: Config, progress: Callable[[int, int], None] | None = None) -> Summary:
    """Plan and run a whole job (:func:`prepare` then :func:`execute`)."""
    return execute(prepare(config), config, progress)
