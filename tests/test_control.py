"""The control concepts both engines share: batching, thread policy, stopping on signals."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from gpu_kquant.control import (
    Stopped,
    batch_groups,
    call_size,
    default_batch_size,
    even_group_size,
    quantizer_threads,
    sigterm_stops,
    stoppable,
)
from gpu_kquant.report import Summary


def test_groups_close_at_a_count_or_a_pixel_budget() -> None:
    sizes = [10, 10, 10, 10, 10]
    assert batch_groups(sizes, 2, 1000, int) == [[10, 10], [10, 10], [10]]
    assert batch_groups(sizes, 10, 25, int) == [[10, 10, 10], [10, 10]]
    assert batch_groups([], 4, 100, int) == []
    assert [len(g) for g in batch_groups([1] * 7, even_group_size(4, 7, 4), 10**9, int)] == [2, 2, 2, 1]


def test_default_batch_and_thread_policy() -> None:
    assert default_batch_size("cpu") == 4 and default_batch_size("cuda") == 256
    assert quantizer_threads("cuda") == 2 and quantizer_threads("cpu", cpus=6) == 6
    assert call_size(4, 2, "cpu") == 16 and call_size(16, 2, "cuda") == 32


def test_sigterm_stops_the_run_like_ctrl_c() -> None:
    before = signal.getsignal(signal.SIGTERM)
    summary, stop = Summary(), threading.Event()
    with stoppable(summary, stop):
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("SIGTERM did not stop the body")  # pragma: no cover
    assert summary.interrupted and stop.is_set()
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is only there during the run


def test_sigterm_handler_is_scoped() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped), sigterm_stops():
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before
