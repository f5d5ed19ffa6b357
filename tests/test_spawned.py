"""Device processes (issue 11, item 5): each device's part of a run in a spawned process of its own."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from common_utils import ROOT, cli, digest, needs_cuda, photo, read_report, recorded_outputs
from PIL import Image

from gpu_kquant.options import FitOptions, OutputOptions, RunOptions
from gpu_kquant.planning import Task, plan_job
from gpu_kquant.report import Row
from gpu_kquant.runsetup import RunSetup
from gpu_kquant.spawned import plan_children, run_children


def _folder(root: Path, n: int, size: tuple[int, int] = (60, 80)) -> Path:
    root.mkdir()
    for i in range(n):
        crop = np.roll(photo("chelsea"), 7 * i, axis=1)[: size[0], : size[1]]
        Image.fromarray(crop).save(root / f"{i:02d}.png")
    return root


def test_two_processes_write_what_one_process_writes(tmp_path: Path) -> None:
    src = _folder(tmp_path / "in", 9)
    (src / "bad.png").write_bytes(b"not a png")
    one = cli(src, "-k", "8", "-o", tmp_path / "one", "--device", "cpu", "--quiet")
    two = cli(src, "-k", "8", "-o", tmp_path / "two", "--device", "cpu", "--processes", "2", "--quiet")
    assert one.returncode == two.returncode == 1, two.stderr  # the bad file fails in both
    images = {name: h for name, h in digest(tmp_path / "one").items() if name.endswith(".png")}
    assert len(images) == 9
    assert {name: h for name, h in digest(tmp_path / "two").items() if name.endswith(".png")} == images
    rows = read_report(tmp_path / "two" / "gpu_kquant_report.jsonl")
    assert sorted(rows) == sorted([*(f"{i:02d}.png" for i in range(9)), "bad.png"])
    assert rows["bad.png"]["status"] == "failed" and "bad.png" not in str(rows["bad.png"]["reason"])
    assert len(recorded_outputs(tmp_path / "two")) == 9  # the parent recorded every child's output
    again = cli(src, "-k", "8", "-o", tmp_path / "two", "--device", "cpu", "--processes", "2")
    assert "9 skipped" in again.stderr, again.stderr


def test_plans_share_the_devices_and_the_machine() -> None:
    setup = RunSetup(FitOptions(k=4), OutputOptions())
    parts: list[list[Task]] = [[], [], [], []]
    gpus = [torch.device("cuda", 0), torch.device("cuda", 1)]
    plans = plan_children(setup, gpus, parts, io_threads=16, group_size=None, memory_budget=4 << 30)
    assert [p.device for p in plans] == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert {(p.io_threads, p.quantizers, p.group_size, p.memory_budget) for p in plans} == {(4, 2, 256, 1 << 30)}
    cpu = plan_children(setup, [torch.device("cpu")], parts[:2], io_threads=1, group_size=3, memory_budget=10)
    assert [(p.io_threads, p.group_size, p.memory_budget) for p in cpu] == [(1, 3, 5)] * 2
    assert cpu[0].quantizers == max(1, (os.cpu_count() or 1) // 2)


class _DiesWhenUnpickled(Task):
    """A task whose unpickling ends the process at once, as a crash in a device process would."""

    def __reduce__(self) -> tuple[object, tuple[int]]:
        return (os._exit, (3,))


def test_a_dead_process_gives_failed_rows_and_the_others_go_on(tmp_path: Path) -> None:
    src = _folder(tmp_path / "in", 4)
    run = RunOptions((src,), FitOptions(k=4), OutputOptions(out=tmp_path / "out"))
    tasks = plan_job(run).tasks
    doomed = _DiesWhenUnpickled(**{f.name: getattr(tasks[3], f.name) for f in dataclasses.fields(Task)})
    setup = RunSetup(FitOptions(k=4), OutputOptions(out=tmp_path / "out"))
    plans = plan_children(
        setup, [torch.device("cpu")], [tasks[:3], [doomed]], io_threads=2, group_size=2, memory_budget=1 << 28
    )
    rows: list[Row] = []
    run_children(plans, rows.append)
    by_input = {Path(r.input).name: r for r in rows}
    assert [by_input[f"0{i}.png"].status for i in range(3)] == ["ok"] * 3
    lost = by_input["03.png"]
    assert lost.status == "failed" and lost.reason == "the process for cpu ended before this input: exit code 3"
    assert len(rows) == 4


def _group_is_gone(pgid: int, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _launch_big_run(tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    """A CLI run with two CPU device processes and minutes of work, started in a session of its own."""
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    big = np.tile(photo("astronaut"), (2, 2, 1)).astype(np.int16)  # 1 MP, with noise: a million colours
    noisy = np.clip(big + rng.integers(-6, 7, big.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(src / "000.png", compress_level=1)
    for i in range(1, 600):  # each link is an input of its own: 0.15 s each on 2 cores, 90 s in all
        (src / f"{i:03d}.png").symlink_to(src / "000.png")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "gpu_kquant", str(src), "-k", "256", "-o", str(out), "--quiet"]
    args += ["--device", "cpu", "--processes", "2", "--batch-size", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    restore = functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL)  # as a terminal's Ctrl-C meets it
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=restore,
        start_new_session=True,
    )  # fmt: skip
    return proc, out


def _start_big_run(tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    """:func:`_launch_big_run`, once its first output is written."""
    proc, out = _launch_big_run(tmp_path)
    deadline = time.time() + 180
    while time.time() < deadline and not list(out.glob("*.png")):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted: give it more work"
    return proc, out


@pytest.fixture
def big_run(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    proc, out = _start_big_run(tmp_path)
    try:
        yield proc, out
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the test left running
        proc.communicate()


def test_ctrl_c_to_the_whole_group_stops_every_process(big_run: tuple[subprocess.Popen[str], Path]) -> None:
    """A terminal sends Ctrl-C to every process of the group: the run still ends with its summary."""
    proc, out = big_run
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert _group_is_gone(proc.pid, 10), "a device process outlived the run"
    rows = read_report(out / "gpu_kquant_report.jsonl")
    assert rows and all(r["status"] == "ok" for r in rows.values())  # no invented failures for undone work
    assert {f"{name}" for name in rows} == {Path(p).name for p in recorded_outputs(out)}
    assert not [p for p in out.iterdir() if p.name.startswith(".gpu_kquant-")]


def _spawned_in_group(pgid: int) -> int:
    """How many processes of group ``pgid`` are multiprocessing spawns (Linux ``/proc``)."""
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and "spawn_main" in (stat.parent / "cmdline").read_text():
                count += 1
    return count


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the device processes through /proc")
def test_ctrl_c_while_device_processes_start(tmp_path: Path) -> None:
    """Ctrl-C to the group while the children still import torch: no traceback, a clean stop."""
    proc, out = _launch_big_run(tmp_path)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and _spawned_in_group(proc.pid) < 2:
            time.sleep(0.01)
        assert proc.poll() is None and _spawned_in_group(proc.pid) == 2, "the device processes never started"
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        assert "interrupted" in stderr and "Traceback" not in stderr
        assert _group_is_gone(proc.pid, 10), "a device process outlived the run"
        assert not list(out.glob(".gpu_kquant-*"))  # no temporaries left (out may not exist yet)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def test_device_processes_end_when_the_parent_is_killed(big_run: tuple[subprocess.Popen[str], Path]) -> None:
    proc, _ = big_run
    proc.kill()
    proc.communicate(timeout=60)
    assert _group_is_gone(proc.pid, 15), "device processes kept running after their parent was killed"


@needs_cuda
def test_two_processes_on_one_gpu_write_what_one_writes(tmp_path: Path) -> None:
    src = _folder(tmp_path / "in", 6, (120, 160))
    one = cli(src, "-k", "16", "-o", tmp_path / "one", "--device", "cuda", "--quiet")
    two = cli(src, "-k", "16", "-o", tmp_path / "two", "--device", "cuda", "--processes", "2", "--quiet")
    assert one.returncode == two.returncode == 0, two.stderr
    images = {name: h for name, h in digest(tmp_path / "one").items() if name.endswith(".png")}
    assert len(images) == 6
    assert {name: h for name, h in digest(tmp_path / "two").items() if name.endswith(".png")} == images


def test_processes_usage_errors(tmp_path: Path) -> None:
    src = _folder(tmp_path / "in", 1)
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        tar.add(src / "00.png", arcname="a.png")
    for args, says in (
        ([src, "--processes", "0"], "--processes"),
        ([src, "--processes", "2", "--engine", "ray"], "--processes is for --engine local"),
        ([tmp_path / "shard.tar", "--processes", "2"], "--processes is for image files"),
    ):
        result = cli(*args, "-o", tmp_path / "out")
        assert result.returncode == 2, (args, result.stderr)
        assert says in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_a_plan_that_cannot_be_sent_fails_at_once(tmp_path: Path) -> None:
    """A start that fails (here: a plan that cannot be pickled) raises without waiting for the stop grace."""
    setup = dataclasses.replace(RunSetup(FitOptions(k=4), OutputOptions()), batch_pixels=lambda: 0)  # type: ignore[arg-type]
    plans = plan_children(setup, [torch.device("cpu")], [[], []], io_threads=1, group_size=1, memory_budget=1 << 20)
    start = time.monotonic()
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        run_children(plans, lambda row: None)
    assert time.monotonic() - start < 20
