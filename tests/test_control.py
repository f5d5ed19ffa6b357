"""The control concepts both engines share: batching, thread policy, stopping on signals."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from gpu_kquant.control import (
    Stopped,
    balanced_groups,
    batch_groups,
    call_size,
    default_batch_size,
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


@pytest.mark.parametrize(
    ("pixels", "size", "threads"),
    [([1] * 7, 4, 4), ([1, 4] * 6, 4, 2), ([4, 1] * 6, 4, 2), ([1] * 9, 4, 2), ([100, 1, 1, 1], 4, 2), ([5], 4, 2)],
)
def test_balanced_groups_share_the_pixels_out(pixels: list[int], size: int, threads: int) -> None:
    """Every item once, in order within its group, at most ``size`` per group, and the threads
    (each taking the next group when free) finish within one item of each other where possible."""
    items = list(enumerate(pixels))  # (position, pixels)
    groups = balanced_groups(items, size, threads, 10**9, lambda item: item[1])
    assert sorted(i for g in groups for i, _ in g) == list(range(len(pixels)))
    assert all(0 < len(g) <= size and [i for i, _ in g] == sorted(i for i, _ in g) for g in groups)
    finish = [0] * threads
    for g in groups:  # the pool's order: the first free thread takes the next group
        finish[finish.index(min(finish))] += sum(p for _, p in g)
    assert max(finish) - min(finish) <= max(pixels)
    # Splitting the call evenly by count alone (the groups of batch_groups): the makespan is never shorter.
    even = [0] * threads
    for g in batch_groups(items, size, 10**9, lambda item: item[1]):
        even[even.index(min(even))] += sum(p for _, p in g)
    assert max(finish) <= max(even)


def test_balanced_groups_keep_the_pixel_budget() -> None:
    assert balanced_groups([10] * 5, 2, 2, 25, int) == [[10, 10], [10], [10], [10]]
    assert balanced_groups([10] * 5, 2, 1, 25, int) == batch_groups([10] * 5, 2, 25, int)
    assert balanced_groups([], 4, 2, 100, int) == []


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
