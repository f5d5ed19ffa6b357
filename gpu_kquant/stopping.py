"""A cooperative stop: the flag a run sets on Ctrl-C or SIGTERM, and the exception it leads to.

Long loops (the Lloyd loop, the compiled whole-loop kernel) check a :class:`StopFlag`
between iterations and raise :class:`Stopped`, so a stopped run frees its threads within
one iteration instead of finishing a batch nobody will use. The flag travels with the
fit options (:attr:`gpu_kquant.options.FitOptions.stop`); nothing here is global.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["StopFlag", "Stopped", "check_stop"]


class Stopped(Exception):
    """The run was asked to stop: SIGTERM in the main thread, or a set :class:`StopFlag` in a loop."""


class StopFlag(threading.Event):
    """A :class:`threading.Event` that compiled loops can read too.

    :meth:`set` also writes 1 into :attr:`buffer`, a one-byte array the C kernels poll
    between Lloyd iterations (they run without the GIL, so they cannot call Python).
    A flag belongs to one process: a pickled copy (a Ray actor's) starts unset.
    """

    def __init__(self) -> None:
        super().__init__()
        self.buffer = np.zeros(1, dtype=np.uint8)

    def set(self) -> None:
        self.buffer[0] = 1
        super().set()

    def clear(self) -> None:
        self.buffer[0] = 0
        super().clear()

    def __reduce__(self) -> tuple[type[StopFlag], tuple[()]]:
        return (StopFlag, ())


def check_stop(stop: threading.Event | None) -> None:
    """Raise :class:`Stopped` when ``stop`` is set (``None``: never)."""
    if stop is not None and stop.is_set():
        raise Stopped("stopped")
