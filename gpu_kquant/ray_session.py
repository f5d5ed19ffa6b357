"""Ray as the Ray engine needs it: connected (or started), quiet, and tolerant of failed blocks.

Needs the ``ray`` extra; imported only by :mod:`gpu_kquant.engine_ray`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import ray
import ray.data

from .control import sigterm_stops
from .planning import JobError, Task

__all__ = [
    "STALL_SECONDS",
    "Stalled",
    "batches_within",
    "connected",
    "from_items",
    "ray_settings",
    "task_from_item",
    "task_item",
]

STALL_SECONDS = 900.0
"""Longest wait for the next batch from Ray. Every wait on Ray has a timeout: when none arrives
for this long, the inputs still in flight get failed rows and the run ends, instead of hanging
(and Ctrl-C or SIGTERM are handled within a second while waiting). Unbounded, the 'always kills
its worker' test hung for more than 7 minutes (issue 12, item 18)."""


class Stalled(Exception):
    """No batch arrived from Ray within the allowed wait (its args: what the raiser adds)."""


def batches_within(iterable: Iterable[Any], seconds: float) -> Iterator[Any]:
    """The items of a Ray Data iterator, each waited for at most ``seconds`` (else :class:`Stalled`).

    Ray's iterators have no timeout, so a helper thread drives it and the caller waits on a
    queue with one: a wait that never ends becomes an error, and the main thread stays in
    Python, where Ctrl-C and SIGTERM are handled. The iterator is closed when it ends or
    once the caller has gone.
    """
    items: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=2)
    done = object()
    stop = threading.Event()

    def offer(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():  # never blocks for good once the caller has gone
            with contextlib.suppress(queue.Full):
                items.put(entry, timeout=0.5)
                return True
        return False

    def pump() -> None:
        try:
            for item in iterable:
                if not offer(("item", item)):
                    break
            else:
                offer(("item", done))
        except BaseException as exc:
            offer(("error", exc))
        finally:
            close = getattr(iterable, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()

    thread = threading.Thread(target=pump, name="gpu_kquant-ray-rows", daemon=True)
    thread.start()
    try:
        while True:
            try:
                kind, item = items.get(timeout=seconds)
            except queue.Empty:
                raise Stalled() from None
            if kind == "error":
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()


def _check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """Fail fast on a HOST:PORT nobody listens on (Ray itself keeps retrying, deaf to Ctrl-C)."""
    if not address or "://" in address or address == "auto" or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    if port.isdigit():
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass


@contextlib.contextmanager
def connected(address: str | None) -> Iterator[None]:
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


@contextlib.contextmanager
def ray_settings() -> Iterator[None]:
    """Ray Data quiet and tolerant inside a run (the CLI has its own progress bar)."""
    if not ray.is_initialized():
        yield
        return
    settings = {
        "enable_progress_bars": False,
        "enable_auto_log_stats": False,
        "print_on_execution_start": False,
        "max_errored_blocks": -1,  # a batch that exhausted its retries is handled by the engine, not fatal
    }
    # SIGTERM again once connected: Ray's core installs its own handler, which just dies
    with sigterm_stops(), _data_context(**settings), _quiet_ray_data():
        yield


def from_items(items: list[dict[str, Any]], blocks: int) -> ray.data.Dataset:
    """A dataset of small rows in ``blocks`` blocks."""
    try:
        return ray.data.from_items(items, override_num_blocks=blocks)
    except TypeError:  # Ray < 2.10 calls it parallelism
        return ray.data.from_items(items, parallelism=blocks)


def task_item(task: Task) -> dict[str, Any]:
    """A task as a Ray Data row: paths as bytes (``os.fsencode``).

    A file name that is not UTF-8 is kept by Python with surrogate escapes, which pyarrow
    cannot encode as a string (UnicodeEncodeError, issue 12 item 5); bytes carry any name.
    """
    key = task.key.encode("utf-8", "surrogateescape")  # keys are made from the same names
    return {"src": os.fsencode(task.src), "dst": os.fsencode(task.dst), "key": key}


def _text(value: Any) -> str:
    """``str`` from a ``bytes``/``np.bytes_`` made by :func:`task_item`, or from a plain string."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


def task_from_item(src: Any, dst: Any, key: Any) -> Task:
    """The :class:`Task` of one row made by :func:`task_item` (also accepts rows with string paths)."""
    return Task(Path(_text(src)), Path(_text(dst)), _text(key))
