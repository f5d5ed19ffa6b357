"""The worker: a list of tasks in, their report rows out. Both engines call exactly this.

For each task: decode and ``--resize`` (:func:`read_task`), quantize in batches on the device with
dithering included (:func:`quantize_items`), then guards, atomic write, CIEDE2000 and
preview (:func:`gpu_kquant.writing.write_result`). Decoding and writing run on
``io_threads`` threads (Pillow and zlib release the GIL); quantization runs on
``quantizers`` threads (two on CUDA, each with its own stream; one per core on the CPU), one group of images per
batched k-means. A bad file only ever gives a failed row.

On CUDA the decode threads also copy the pixels into pinned memory, and a group's upload is
queued on a copy stream as soon as the group is formed, so it overlaps the group before it
(:mod:`gpu_kquant.staging`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor

import numpy as np
import torch

from .control import StageClock, balanced_groups, default_batch_size, quantizer_threads
from .device import resolve_device
from .fitting import map_images, quantize_images, reach_quality
from .imagefiles import DecodeError, load_image
from .options import ResizeOptions
from .planning import Task
from .quantize import Quantized
from .report import Row
from .resize import resize_decoded
from .rows import decode_failure_row, failed_row
from .runsetup import RunSetup
from .staging import Stager, Uploaded
from .stopping import StopFlag, Stopped
from .writing import Item, write_result

__all__ = ["Item", "Worker", "add_pixel_shares", "quantize_items", "read_task"]

Result = Quantized | Exception
Pixels = Sequence[np.ndarray | torch.Tensor]
RowSink = Callable[[Row], None]


def read_task(task: Task, max_pixels: int | None, resize: ResizeOptions | None = None) -> Item:
    """Decode one input, resized when ``resize`` says so (``--resize``, before quantization).

    Raises:
        DecodeError: with the reason (:func:`~gpu_kquant.imagefiles.load_image`), also for a
            task planning found unusable (never opened).
    """
    if task.error is not None:
        raise DecodeError(task.error)
    t0 = time.perf_counter()
    decoded = resize_decoded(load_image(task.src, max_pixels=max_pixels), resize)
    return Item(task, decoded, task.src.stat().st_size, time.perf_counter() - t0)


def _quantize(pixels: Pixels, setup: RunSetup, device: torch.device) -> list[Quantized]:
    dither = setup.output.dither
    if setup.palette is not None:
        return map_images(pixels, setup.palette, dither=dither, device=device)
    if setup.output.quality is not None:
        target = setup.output.quality[1]
        return [reach_quality(px, setup.fit, target, dither=dither, device=device) for px in pixels]
    return quantize_images(pixels, setup.fit, dither=dither, device=device)


def quantize_items(
    items: list[Item], setup: RunSetup, device: torch.device, pixels: Pixels | None = None
) -> list[Result]:
    """One batched quantization (fixed palette, ``--quality`` search or a fit per image).

    ``pixels`` are the items' (H, W, C) uint8 pixels already uploaded (default: their
    decoded arrays). A failing batch is retried image by image, so only the culprit gets an exception.

    Raises:
        Stopped: ``setup.fit.stop`` was set (no image failed; the run is stopping).
    """
    if pixels is None:
        pixels = [item.decoded.pixels for item in items]
    try:
        return list(_quantize(pixels, setup, device))
    except Stopped:
        raise
    except Exception:
        results: list[Result] = []
        for px in pixels:
            try:
                results.append(_quantize([px], setup, device)[0])
            except Stopped:
                raise
            except Exception as exc:
                results.append(exc)
        return results


def add_pixel_shares(items: list[Item], seconds: float) -> None:
    """Charge each item its pixel share of a batch's ``seconds``."""
    total = sum(item.pixels for item in items) or 1
    for item in items:
        item.seconds += seconds * item.pixels / total


class Worker:
    """Turns tasks into rows on one device; thread-safe, so calls may overlap.

    Args:
        setup: what the run decided (options, fixed palette, preview target).
        device: where to quantize.
        io_threads: decode and write threads.
        quantizers: quantize threads (default: :func:`~gpu_kquant.control.quantizer_threads`).
        group_size: images per batched k-means (default: :func:`~gpu_kquant.control.default_batch_size`).
        stop: once set, calls finish early and return the rows they have; k-means stops
            between iterations (a :class:`~gpu_kquant.stopping.StopFlag` also inside the
            CPU kernels; a plain event is checked by the Python loops only).
        clock: where stage seconds are added.
        staging: stage and upload through :class:`~gpu_kquant.staging.Stager` (a pass-through
            on the CPU), through the given one, or (``False``) not at all.
    """

    def __init__(
        self,
        setup: RunSetup,
        device: torch.device | str | None,
        *,
        io_threads: int,
        quantizers: int | None = None,
        group_size: int | None = None,
        stop: threading.Event | None = None,
        clock: StageClock | None = None,
        staging: bool | Stager = True,
    ) -> None:
        self.device = resolve_device(device)
        self.quantizers = quantizers or quantizer_threads(self.device)
        self.group_size = group_size or default_batch_size(self.device)
        self.stop = stop if stop is not None else StopFlag()
        self.setup = dataclasses.replace(setup, fit=dataclasses.replace(setup.fit, stop=self.stop))
        self.clock = clock or StageClock()
        self._stager = Stager(self.device) if staging is True else staging or None
        self._io = ThreadPoolExecutor(max(1, io_threads), thread_name_prefix="gpu_kquant-io")
        self._quantize_pool = ThreadPoolExecutor(self.quantizers, thread_name_prefix="gpu_kquant-quantize")
        self._streams = threading.local()  # each quantizer thread's CUDA stream, made on first use

    def read(self, task: Task) -> Item | Row:
        """The decoded task, or its failed row."""
        t0 = time.perf_counter()
        try:
            return self._stage(read_task(task, self.setup.max_pixels, self.setup.output.resize))
        except Exception as exc:
            return decode_failure_row(task, self.setup.fit.k, exc)
        finally:
            self.clock.add("decode", time.perf_counter() - t0)

    def _stage(self, item: Item) -> Item:
        """``item`` with its pixels staged for the upload (on the decode thread that read it)."""
        if self._stager is None:
            return item
        item.staged = self._stager.stage(item.decoded.pixels)
        if item.staged.data_ptr() != item.decoded.pixels.ctypes.data:
            # A pinned copy: the writer reads it too, so the pageable array is freed and the
            # host holds the pixels once (as the memory budget assumes).
            item.decoded.pixels = item.staged.numpy()
        return item

    def quantize(self, group: list[Item], pixels: Pixels | None = None) -> list[Result]:
        """Quantize one group (``pixels``: uploaded already); each item is charged its pixel share of the time."""
        t0 = time.perf_counter()
        results = quantize_items(group, self.setup, self.device, pixels)
        seconds = time.perf_counter() - t0
        add_pixel_shares(group, seconds)
        self.clock.add("quantize", seconds)
        return results

    def write(self, item: Item, result: Result) -> Row:
        """Guard, write and report one image (a method, so tests can make it fail)."""
        t0 = time.perf_counter()
        try:
            return write_result(item, result, self.setup)
        except Exception as exc:  # a preview or metric that failed must not lose the row
            return failed_row(item.task, self.setup.fit.k, f"cannot finish output: {type(exc).__name__}: {exc}")
        finally:
            self.clock.add("encode", time.perf_counter() - t0)

    def process(self, tasks: list[Task], on_row: RowSink | None = None) -> list[Row]:
        """The rows of ``tasks``, in task order (fewer when the run was stopped).

        ``on_row`` also gets each row the moment it is ready (from worker threads), so a
        stopped run still reports every output it wrote.
        """
        rows: list[Row | None] = [None] * len(tasks)
        try:
            self._process(tasks, rows, on_row)
        except (CancelledError, RuntimeError, Stopped):
            if not self.stop.is_set():  # a stop cancels queued work; anything else is a bug
                raise
        return [row for row in rows if row is not None]

    def _process(self, tasks: list[Task], rows: list[Row | None], on_row: RowSink | None) -> None:
        items: list[tuple[int, Item]] = []
        for j, out in enumerate(self._io.map(self.read, tasks)):
            if isinstance(out, Row):
                rows[j] = out
                if on_row is not None:
                    on_row(out)
            else:
                items.append((j, out))
        # Even shares of the call's pixels for the quantizer threads, a short call (the last) included.
        groups = balanced_groups(
            items, self.group_size, self.quantizers, self.setup.batch_pixels, lambda pair: pair[1].pixels
        )
        # Each group's upload is queued as it is submitted: it runs while earlier groups compute.
        quantized = [self._quantize_pool.submit(self._quantize_unless_stopped, g, self._upload(g)) for g in groups]
        writes: list[tuple[int, Future[Row]]] = []
        for group, future in zip(groups, quantized):
            results = future.result()
            if results is None or self.stop.is_set():
                break
            writes += [
                (j, self._io.submit(self._write_to, on_row, item, res)) for (j, item), res in zip(group, results)
            ]
        for j, written in writes:
            rows[j] = written.result()

    def _write_to(self, on_row: RowSink | None, item: Item, result: Result) -> Row:
        row = self.write(item, result)
        if on_row is not None:
            on_row(row)
        return row

    def _upload(self, group: list[tuple[int, Item]]) -> Uploaded | None:
        staged = [item.staged for _, item in group]
        if self._stager is None or any(t is None for t in staged):
            return None
        return self._stager.upload([t for t in staged if t is not None])

    def _quantize_unless_stopped(self, group: list[tuple[int, Item]], uploaded: Uploaded | None) -> list[Result] | None:
        if self.stop.is_set():
            return None
        with self._own_stream():
            return self.quantize([item for _, item in group], None if uploaded is None else uploaded.take())

    def _own_stream(self) -> contextlib.AbstractContextManager[object]:
        """On CUDA, this quantizer thread's own stream: two threads' batches run side by side."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        return torch.cuda.stream(stream)

    def close(self) -> None:
        """Shut the threads down: wait for them, or after a stop drop what is queued."""
        stopped = self.stop.is_set()
        self._quantize_pool.shutdown(wait=not stopped, cancel_futures=stopped)
        self._io.shutdown(wait=True, cancel_futures=stopped)
