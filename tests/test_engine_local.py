"""The local engine: bounded memory, every GPU, several devices sharing one report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from common_utils import ROOT, photo
from PIL import Image

from gpu_kquant import budget as budget_module
from gpu_kquant import engine_local
from gpu_kquant import worker as worker_module
from gpu_kquant.imagefiles import Decoded, estimated_decoded_bytes
from gpu_kquant.options import EngineOptions, FitOptions, OutputOptions, RunOptions
from gpu_kquant.planning import plan_job


def test_memory_is_bounded(tmp_path: Path) -> None:
    base = np.tile(photo("astronaut"), (2, 3, 1))  # 1.5 megapixels, 4.7 MB decoded

    def peak_rss_kb(n: int) -> int:
        src = tmp_path / f"in{n}"
        src.mkdir()
        for i in range(n):
            Image.fromarray(np.roll(base, i, axis=1)).save(src / f"{i}.bmp")
        code = (
            "import resource, sys; from gpu_kquant.cli import main; rc = main(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
        )
        # Two malloc arenas: glibc's per-thread arenas add hundreds of MB of noise to the peak.
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_ARENA_MAX": "2"}
        cmd = [sys.executable, "-c", code, str(src), "-k", "4", "--quiet"]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr
        return int(result.stdout.split("PEAK")[1])

    # Both runs reach the steady state (every queue full); holding the extra 96 decoded
    # images would add 450 MB, while bounded queues keep the peak where it was.
    few, many = peak_rss_kb(48), peak_rss_kb(144)
    assert many < few + 200_000, (few, many)


def test_every_gpu_gets_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    devices = engine_local.devices_for(EngineOptions(device="cuda"))
    assert [str(d) for d in devices] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert [str(d) for d in engine_local.devices_for(EngineOptions(device="cuda:2"))] == ["cuda:2"]


def test_several_devices_share_one_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    src = tmp_path / "in"
    src.mkdir()
    for i in range(12):
        Image.fromarray(np.roll(photo("chelsea")[:60, :80], i, axis=1)).save(src / f"{i:02d}.png")
    (src / "bad.png").write_bytes(b"nope")
    monkeypatch.setattr(engine_local, "devices_for", lambda engine: [torch.device("cpu"), torch.device("cpu")])
    run = RunOptions((src,), FitOptions(k=4), OutputOptions(out=tmp_path / "out"), EngineOptions(workers=1))
    summary = engine_local.run_local(plan_job(run), run)
    assert summary.counts["ok"] == 12 and summary.counts["failed"] == 1
    assert len(list((tmp_path / "out").glob("*.png"))) == 12
    rows = (tmp_path / "out" / "gpu_kquant_report.jsonl").read_text().splitlines()
    assert len(rows) == 13


# -- the memory budget in bytes (issue 12, item 16) ------------------------------------------------------------------


class LiveDecoded:
    """Records the estimated bytes of every decoded image still alive, and their peak."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live = 0
        self.peak = 0
        self.decoded = 0

    def wrap(self, load: Callable[..., Decoded]) -> Callable[..., Decoded]:
        def load_and_count(path: Path, **kwargs: object) -> Decoded:
            decoded = load(path, **kwargs)
            n = estimated_decoded_bytes(path)
            with self.lock:
                self.live += n
                self.peak = max(self.peak, self.live)
                self.decoded += 1
            weakref.finalize(decoded.pixels, self.free, n)
            return decoded

        return load_and_count

    def free(self, n: int) -> None:
        with self.lock:
            self.live -= n


def test_decoded_bytes_stay_within_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small files that decode large: counted in files, all six were held at once (issue 12, item 16)."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):  # about 8 KB on disk, 3 megapixels decoded
        Image.new("RGB", (2000, 1500), (10 * i, 80, 160)).save(src / f"{i}.png")
    each = estimated_decoded_bytes(src / "0.png")
    assert (src / "0.png").stat().st_size < 50_000 and each == 2000 * 1500 * 11
    live = LiveDecoded()
    monkeypatch.setattr(worker_module, "load_image", live.wrap(worker_module.load_image))
    budget = int(2.5 * each)  # two images at once, not three
    engine = EngineOptions(workers=4, batch_size=4, memory_budget=budget)
    run = RunOptions((src,), FitOptions(k=4), OutputOptions(out=tmp_path / "out"), engine)
    summary = engine_local.run_local(plan_job(run), run)
    assert summary.counts["ok"] == 6 and live.decoded == 6
    assert live.peak <= budget, (live.peak, budget)
    assert live.peak >= 2 * each  # the budget allows two, and the prefetch uses them


def test_an_image_over_the_whole_budget_runs_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.new("RGB", (1000, 800), (40 * i, 0, 0)).save(src / f"{i}.png")
    each = estimated_decoded_bytes(src / "0.png")
    live = LiveDecoded()
    monkeypatch.setattr(worker_module, "load_image", live.wrap(worker_module.load_image))
    run = RunOptions(
        (src,), FitOptions(k=4), OutputOptions(out=tmp_path / "out"), EngineOptions(memory_budget=each // 2)
    )
    summary = engine_local.run_local(plan_job(run), run)
    assert summary.counts["ok"] == 3
    assert live.peak == each, "each image over the budget is decoded alone"


def test_images_over_the_pixel_limit_are_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decompression bomb gets a failed row from its header; no pixel is decoded, no budget is taken."""
    from PIL import ImageFile

    src = tmp_path / "in"
    src.mkdir()
    Image.new("L", (6000, 5000)).save(src / "bomb.png")
    assert (src / "bomb.png").stat().st_size < 100_000

    def no_decoding(self: object) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    taken: list[int] = []
    acquire = budget_module.MemoryBudget.acquire
    monkeypatch.setattr(
        budget_module.MemoryBudget, "acquire", lambda self, n, stop=None: (taken.append(n), acquire(self, n, stop))
    )
    engine = EngineOptions(max_pixels=10_000_000, memory_budget=1 << 20)
    run = RunOptions((src,), FitOptions(k=4), OutputOptions(out=tmp_path / "out"), engine)
    summary = engine_local.run_local(plan_job(run), run)
    assert summary.counts["failed"] == 1
    lines = (tmp_path / "out" / "gpu_kquant_report.jsonl").read_text().splitlines()
    (row,) = [r for r in map(json.loads, lines) if str(r.get("input", "")).endswith("bomb.png")]
    assert "above the limit of 10000000" in row["reason"], row
    assert taken == [0]


def test_the_shared_palette_pass_keeps_to_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        Image.new("RGB", (1000, 800), (40 * i, 90, 0)).save(src / f"{i}.png")
    (src / "bad.png").write_bytes(b"nope")
    each = estimated_decoded_bytes(src / "0.png")
    live = LiveDecoded()
    monkeypatch.setattr(worker_module, "load_image", live.wrap(worker_module.load_image))
    run = RunOptions((src,), FitOptions(k=4), OutputOptions(out=tmp_path / "out"), EngineOptions(workers=4))
    budget = budget_module.MemoryBudget(int(2.5 * each))
    hist = engine_local.shared_histogram(plan_job(run).tasks, run, torch.device("cpu"), budget)
    assert hist.pixels == 6 * 1000 * 800 and live.decoded == 6
    assert live.peak <= budget.limit and budget.held == 0
