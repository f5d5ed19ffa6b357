"""Feeding a worker (gpu_kquant.feed): calls bounded by count, by the budget and by their groups' pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from common_utils import photo
from PIL import Image

from gpu_kquant.budget import MemoryBudget
from gpu_kquant.feed import feed
from gpu_kquant.imagefiles import estimated_decoded_bytes
from gpu_kquant.options import FitOptions, OutputOptions
from gpu_kquant.planning import Task
from gpu_kquant.report import Row
from gpu_kquant.runsetup import RunSetup
from gpu_kquant.worker import Worker


def _calls(tmp_path: Path, batch_pixels: int, budget: int) -> list[int]:
    src = tmp_path / "in"
    src.mkdir(exist_ok=True)
    tasks = []
    for i in range(12):
        Image.fromarray(np.roll(photo("coffee")[:40, :50], i, axis=1)).save(src / f"{i:02d}.png")
        tasks.append(Task(src / f"{i:02d}.png", tmp_path / "out" / f"{batch_pixels}-{i:02d}.png", str(i)))
    setup = RunSetup(FitOptions(k=4), OutputOptions(), batch_pixels=batch_pixels)
    # group_size 100: only bytes close a call here (a GPU's groups hold hundreds of small images)
    worker = Worker(setup, "cpu", io_threads=1, quantizers=1, group_size=100)
    sizes: list[int] = []
    process = worker.process

    def record(call: list[Task], emit: object = None) -> list[Row]:
        sizes.append(len(call))
        return process(call, emit)  # type: ignore[arg-type]

    worker.process = record  # type: ignore[method-assign]
    rows: list[Row] = []
    try:
        feed(worker, tasks, rows.append, MemoryBudget(budget))
    finally:
        worker.close()
    assert len(rows) == 12 and all(r.status == "ok" for r in rows)
    return sizes


def test_a_call_holds_what_its_groups_can_quantize(tmp_path: Path) -> None:
    # groups close at 3 images' pixels: a call (two groups on the CPU) holds at most
    # 2 x 3 x 12 bytes a pixel of decoded estimate, fewer than the 12 tasks
    sizes = _calls(tmp_path, batch_pixels=3 * 40 * 50, budget=1 << 30)
    each = estimated_decoded_bytes(tmp_path / "in" / "00.png")
    assert sum(sizes) == 12 and len(sizes) > 1 and max(sizes) == (2 * 3 * 40 * 50 * 12) // each
    # with a generous pixel budget, the same tasks go in one call
    assert _calls(tmp_path, batch_pixels=64_000_000, budget=1 << 30) == [12]
