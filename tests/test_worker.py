"""The worker: tasks in, rows out, in task order; results do not depend on how tasks are grouped."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from common_utils import digest, photo
from PIL import Image

from gpu_kquant import quantize_batch
from gpu_kquant.fitting import quantize_images
from gpu_kquant.options import FitOptions, OutputOptions
from gpu_kquant.planning import Task
from gpu_kquant.runsetup import RunSetup
from gpu_kquant.stopping import StopFlag
from gpu_kquant.worker import Worker


def tasks_for(tmp_path: Path, out: str) -> list[Task]:
    src = tmp_path / "in"
    if not src.exists():
        src.mkdir()
        for i in range(5):
            Image.fromarray(np.roll(photo("chelsea")[:48, :64], 7 * i, axis=1)).save(src / f"{i}.png")
        (src / "bad.png").write_bytes(b"not an image")
    names = ["0.png", "bad.png", "1.png", "2.png", "3.png", "4.png"]
    return [Task(src / n, tmp_path / out / n, n) for n in names]


def setup(k: int = 6) -> RunSetup:
    return RunSetup(FitOptions(k=k), OutputOptions())


def test_rows_in_task_order_with_the_decode_failure(tmp_path: Path) -> None:
    tasks = tasks_for(tmp_path, "a")
    worker = Worker(setup(), "cpu", io_threads=2, quantizers=2, group_size=2)
    try:
        rows = worker.process(tasks)
    finally:
        worker.close()
    assert [r.input for r in rows] == [str(t.src) for t in tasks]
    assert [r.status for r in rows] == ["ok", "failed", "ok", "ok", "ok", "ok"]
    assert "not a recognised image format" in (rows[1].reason or "")
    for row in rows:
        if row.status == "ok":
            assert Path(row.output or "").stat().st_size == row.output_bytes
            assert row.k == 6 and (row.colors or 0) <= 6 and (row.seconds or 0) > 0
    assert set(worker.clock.take()) == {"decode", "quantize", "encode"}


def test_grouping_does_not_change_any_output(tmp_path: Path) -> None:
    for out, group, quantizers in (("one", 1, 1), ("four", 4, 2)):
        worker = Worker(setup(), "cpu", io_threads=2, quantizers=quantizers, group_size=group)
        try:
            worker.process(tasks_for(tmp_path, out))
        finally:
            worker.close()
    assert digest(tmp_path / "one") == digest(tmp_path / "four") and len(digest(tmp_path / "one")) == 5


@pytest.mark.needs_cuda
def test_on_cuda_two_stream_owning_quantizers_write_what_one_writes(tmp_path: Path) -> None:
    streams: set[int] = set()
    for out, quantizers in (("one", 1), ("two", 2)):
        worker = Worker(setup(), "cuda", io_threads=2, quantizers=quantizers, group_size=1)
        quantize = worker.quantize

        def record_stream(*args: object, _q: object = quantize) -> object:
            streams.add(torch.cuda.current_stream().cuda_stream)
            return _q(*args)  # type: ignore[operator]

        worker.quantize = record_stream  # type: ignore[method-assign]
        try:
            worker.process(tasks_for(tmp_path, out))
        finally:
            worker.close()
    assert digest(tmp_path / "one") == digest(tmp_path / "two") and len(digest(tmp_path / "one")) == 5
    default = torch.cuda.default_stream().cuda_stream
    assert default not in streams and len(streams) >= 2  # never the default stream; a stream per thread


def test_a_stopped_worker_writes_nothing_more(tmp_path: Path) -> None:
    stop = threading.Event()
    stop.set()
    worker = Worker(setup(), "cpu", io_threads=2, stop=stop)
    try:
        rows = worker.process(tasks_for(tmp_path, "stopped"))
    finally:
        worker.close()
    assert [r.status for r in rows] == ["failed"]  # only the decode failure, found before the stop
    assert not (tmp_path / "stopped").exists()


@pytest.mark.parametrize("dither", ["none", "fs", "ordered"])
def test_fit_options_reach_quantize_batch_whole(dither: str) -> None:
    img = np.ascontiguousarray(photo("coffee")[:40, :56])
    fit = FitOptions(k=7, space="oklab", seed=3, n_init=2, max_iter=50, tol=1e-3, max_fit_points=4096)
    got = quantize_images([img], fit, dither=dither, device=torch.device("cpu"))[0]
    kwargs = {"seed": 3, "n_init": 2, "max_iter": 50, "tol": 1e-3, "max_fit_points": 4096}
    want = quantize_batch([img], 7, space="oklab", dither=dither, device="cpu", **kwargs)[0]
    assert np.array_equal(got.palette, want.palette) and np.array_equal(got.indices, want.indices)


def test_a_stop_ends_a_running_k256_fit_within_two_seconds(tmp_path: Path) -> None:
    """The worker's stop flag reaches k-means: no waiting for the batch, no failed row (issue 12, item 17)."""
    rng = np.random.default_rng(0)
    tasks = []
    for i in range(8):  # many colours: 8 fine fits at k = 256 in one call run for seconds with tol 0
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)).save(path, compress_level=1)
        tasks.append(Task(path, tmp_path / "out" / path.name, path.name))
    stop = StopFlag()
    slow = RunSetup(FitOptions(k=256, tol=0.0, max_iter=100_000), OutputOptions())
    worker = Worker(slow, "cpu", io_threads=2, quantizers=1, group_size=8, stop=stop)
    rows: list[object] = []
    thread = threading.Thread(target=lambda: rows.extend(worker.process(tasks)), daemon=True)
    try:
        thread.start()
        deadline = time.perf_counter() + 60
        while "decode" not in worker.clock.seconds and time.perf_counter() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # well inside the fit
        assert thread.is_alive(), "the fit should still be running"
        stop.set()
        start = time.perf_counter()
        thread.join(30)
        assert time.perf_counter() - start < 2.0
    finally:
        stop.set()
        worker.close()
    assert rows == [] and not (tmp_path / "out").exists()


def test_the_dataset_path_takes_the_fit_options_whole() -> None:
    """Every FitOptions field reaches the fit from the dataset codec too (it once passed six of them)."""
    from gpu_kquant.datasets.codec import quantize_images as dataset_quantize

    img = np.ascontiguousarray(photo("hubble_deep_field")[::4, ::4])  # > max_fit_points colours: binned
    got = {}
    for finish in (False, True):
        fit = FitOptions(k=12, seed=1, max_fit_points=512, exact_finish=finish)
        (q,) = dataset_quantize([img], fit, palette=None, palette_space="rgb", dither="none", device="cpu")
        assert not isinstance(q, Exception)
        want = quantize_batch([img], dither="none", device="cpu", options=fit)[0]
        assert np.array_equal(q.palette, want.palette) and np.array_equal(q.indices, want.indices)
        got[finish] = q.palette
    assert not np.array_equal(got[False], got[True])
