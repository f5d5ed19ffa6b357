"""The local engine: bounded memory, every GPU, several devices sharing one report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from common_utils import ROOT, photo
from PIL import Image

from gpu_kquant import engine_local
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
