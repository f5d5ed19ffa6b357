"""The memory budget in bytes (issue 12, item 16): blocking, release, oversized items, sizes, defaults."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from gpu_kquant.budget import (
    MemoryBudget,
    budgeted_calls,
    default_memory_budget,
    input_bytes,
    parse_size,
)
from gpu_kquant.stopping import StopFlag, Stopped


def acquire_in_thread(budget: MemoryBudget, n: int, stop: threading.Event | None = None) -> threading.Thread:
    thread = threading.Thread(target=budget.acquire, args=(n, stop), daemon=True)
    thread.start()
    return thread


def test_acquire_blocks_until_the_bytes_fit() -> None:
    budget = MemoryBudget(100)
    budget.acquire(60)
    waiter = acquire_in_thread(budget, 50)
    waiter.join(0.3)
    assert waiter.is_alive(), "60 + 50 bytes do not fit in 100"
    budget.release(60)
    waiter.join(5)
    assert not waiter.is_alive()
    assert budget.held == 50 and budget.peak == 60


def test_an_item_larger_than_the_budget_runs_alone_and_never_deadlocks() -> None:
    budget = MemoryBudget(100)
    budget.acquire(500)  # nothing held: admitted at once
    assert budget.held == 500
    small = acquire_in_thread(budget, 1)
    small.join(0.3)
    assert small.is_alive(), "nothing may join an oversized item"
    budget.release(500)
    small.join(5)
    assert not small.is_alive() and budget.held == 1
    big = acquire_in_thread(budget, 10**12)  # waits only for what is held, never for more room
    budget.release(1)
    big.join(5)
    assert not big.is_alive() and budget.held == 10**12


def test_waiters_are_served_in_order() -> None:
    budget = MemoryBudget(100)
    budget.acquire(100)
    big = acquire_in_thread(budget, 96)
    time.sleep(0.2)  # the big request queues first
    small = acquire_in_thread(budget, 5)
    time.sleep(0.2)
    assert not budget.try_acquire(1), "a newcomer may not pass the queue"
    budget.release(50)  # room for the small one, not for the big one at the head
    small.join(0.3)
    assert small.is_alive() and big.is_alive()
    budget.release(50)
    big.join(5)
    assert not big.is_alive() and budget.held == 96
    small.join(0.3)
    assert small.is_alive(), "96 + 5 bytes do not fit in 100"
    budget.release(96)
    small.join(5)
    assert not small.is_alive() and budget.held == 5


def test_a_stop_ends_the_wait_and_takes_nothing() -> None:
    budget = MemoryBudget(10)
    budget.acquire(10)
    stop = StopFlag()
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            budget.acquire(5, stop)
        except Stopped as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    time.sleep(0.2)
    stop.set()
    waiter.join(2)
    assert not waiter.is_alive() and len(errors) == 1
    assert budget.held == 10
    budget.release(10)
    assert budget.try_acquire(10), "the stopped waiter left the queue"


def test_release_checks_its_count() -> None:
    budget = MemoryBudget(10)
    budget.acquire(4)
    with pytest.raises(ValueError, match="only 4"):
        budget.release(5)
    with pytest.raises(ValueError, match="positive"):
        MemoryBudget(0)


@pytest.mark.parametrize(
    ("text", "value"),
    [("4G", 4 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29), ("64k", 64 << 10), ("1000", 1000), ("2gb", 2 << 30)],
)
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "-1G", "0", "4X", "1e9", "four"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_default_budget_is_a_clamped_fraction_of_available_memory() -> None:
    assert default_memory_budget(16 << 30) == 4 << 30
    assert default_memory_budget(100 << 20) == 256 << 20
    assert default_memory_budget(1 << 40) == 16 << 30
    assert 256 << 20 <= default_memory_budget() <= 16 << 30


def test_calls_close_at_a_count_or_at_the_budget() -> None:
    costs = [30, 30, 30, 200, 10, 10]
    calls = list(budgeted_calls(costs, 4, 100, int))
    assert calls == [([30, 30, 30], 90), ([200], 200), ([10, 10], 20)]
    assert [len(c) for c, _ in budgeted_calls([1] * 9, 4, 100, int)] == [4, 4, 1]
    assert list(budgeted_calls([], 4, 100, int)) == []


def test_inputs_refused_before_decoding_cost_nothing(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (3000, 2000)).save(path)
    assert input_bytes(path) == 3000 * 2000 * (4 + 4 + 3)
    assert input_bytes(path, max_pixels=1_000_000) == 0
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert input_bytes(tmp_path / "bad.png") == 0
    assert input_bytes(tmp_path / "missing.png") == 0


def test_the_cli_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gpu_kquant.cli import build_parser, run_options

    parser = build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([str(tmp_path), "--memory-budget", "4X"])
    assert exit_info.value.code == 2  # a usage error
    assert "--memory-budget: expected a size such as 4G" in capsys.readouterr().err
    args = parser.parse_args([str(tmp_path), "--memory-budget", "512M", "--device", "cpu"])
    assert run_options(args, parser).engine.memory_budget == 512 << 20
    assert run_options(parser.parse_args([str(tmp_path), "--device", "cpu"]), parser).engine.memory_budget is None
