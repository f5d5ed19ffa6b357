"""Process-wide settings happen only where a process starts (here called directly)."""

from __future__ import annotations

import atexit
import os
import threading
from pathlib import Path

import pytest
import torch
from common_utils import python
from PIL import Image

from gpu_kquant.process import configure_process, exit_process


def test_raises_pillows_limit_never_lowers_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    configure_process(max_pixels=5000)
    assert Image.MAX_IMAGE_PIXELS == 5000
    configure_process(max_pixels=10)
    assert Image.MAX_IMAGE_PIXELS == 5000


def test_single_threaded_torch_only_when_asked() -> None:
    threads = torch.get_num_threads()
    try:
        configure_process()
        assert torch.get_num_threads() == threads
        configure_process(single_threaded_torch=True)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_importing_the_package_changes_nothing() -> None:
    code = (
        "import os, torch; from PIL import Image; before = (Image.MAX_IMAGE_PIXELS, torch.get_num_threads()); "
        "import gpu_kquant.cli, gpu_kquant.engine_local, gpu_kquant.imagefiles; "
        "assert (Image.MAX_IMAGE_PIXELS, torch.get_num_threads()) == before"
    )
    result = python("-c", code)
    assert result.returncode == 0, result.stderr


class _Exited(Exception):
    """Stands in for os._exit, which would end the test process."""


@pytest.fixture
def exits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the exit handlers' run and os._exit's code instead of doing them."""
    calls: list[str] = []

    def fake_exit(code: int) -> None:
        calls.append(f"_exit {code}")
        raise _Exited

    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: calls.append("handlers"))
    # Only the main thread (pytest-timeout's timer thread would otherwise count as one to wait for).
    monkeypatch.setattr(threading, "enumerate", lambda: [threading.main_thread()])
    monkeypatch.setattr(os, "_exit", fake_exit)
    return calls


def test_exit_runs_the_exit_handlers_then_ends_with_the_code(exits: list[str]) -> None:
    with pytest.raises(_Exited):
        exit_process(3)
    assert exits == ["handlers", "_exit 3"]


def test_exit_at_once_skips_the_handlers(exits: list[str]) -> None:
    with pytest.raises(_Exited):
        exit_process(130, at_once=True)
    assert exits == ["_exit 130"]


def test_exit_waits_like_python_while_a_thread_is_alive(exits: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    worker = threading.Thread(target=release.wait, daemon=False)
    worker.start()
    monkeypatch.setattr(threading, "enumerate", lambda: [threading.main_thread(), worker])
    try:
        with pytest.raises(SystemExit) as info:
            exit_process(1)
    finally:
        release.set()
        worker.join()
    assert info.value.code == 1
    assert exits == []


def test_the_command_runs_exit_handlers_and_keeps_its_code(tmp_path: Path) -> None:
    code = (
        "import atexit, sys; atexit.register(print, 'handler ran', flush=True); "
        "from gpu_kquant.cli import command; sys.argv = ['gpu-kquant', sys.argv[1]]; command()"
    )
    result = python("-c", code, tmp_path / "missing.png")
    assert "handler ran" in result.stdout
    assert result.returncode == 2, result.stderr  # a missing input is a usage error
    assert "missing.png" in result.stderr
