"""Process-wide settings, made once at a process's entry: the CLI, or a Ray worker process.

Library code never changes them on its own; everything that does is here, so a
program embedding gpu_kquant decides for itself whether to call it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import warnings
from typing import NoReturn, TextIO

import torch
from PIL import Image

__all__ = ["configure_process", "exit_process"]


def configure_process(*, max_pixels: int | None = None, single_threaded_torch: bool = False) -> None:
    """Make this process ready for gpu_kquant's engines.

    Args:
        max_pixels: the run's per-image pixel limit. Pillow's own decompression-bomb
            limit is raised to at least this, so that the decoder's clear per-file reason
            (not Pillow's) reports larger images, and Pillow's warning is silenced.
        single_threaded_torch: one torch thread, for CPU quantizer threads that each run
            their own batch (multi-threaded torch ops wait at a barrier for every thread,
            so one busy thread would stall them all).
    """
    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max(max_pixels, Image.MAX_IMAGE_PIXELS or 0)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    if single_threaded_torch and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def _flush(stream: TextIO | None) -> None:
    """Flush a standard stream; None (no console) or a closed pipe: nothing more can be said on it."""
    if stream is not None:
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


def exit_process(code: int, *, at_once: bool = False) -> NoReturn:
    """End this process with ``code``, skipping the interpreter's teardown of every module.

    That teardown (freeing torch's modules and libraries) took about 0.7 s of every CLI run on
    a 2-core Xeon: one 256x256 image 3.31 -> 2.57 s wall, median of 10 interleaved rounds
    (``python -c "import torch"``: 2.8-3.1 s, and 2.2-2.4 s when it ends in ``os._exit``).
    The ``atexit`` handlers still run first (Ray's shutdown, multiprocessing's and tempfile's
    clean-up), and while a thread that Python would wait for is alive this is a plain
    ``SystemExit``. ``at_once`` skips both: the end of an interrupted run, which must not wait
    for a k-means batch nobody will use.
    """
    if not at_once:
        main = threading.main_thread()
        if any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate()):
            raise SystemExit(code)
        atexit._run_exitfuncs()  # what the interpreter would run at exit; it prints their errors
    _flush(sys.stdout)
    _flush(sys.stderr)
    os._exit(code)
