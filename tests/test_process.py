"""Process-wide settings happen only where a process starts (here called directly)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from gpu_kquant.process import configure_process


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
    import os
    import subprocess
    import sys

    from common_utils import ROOT

    code = (
        "import os, torch; from PIL import Image; before = (Image.MAX_IMAGE_PIXELS, torch.get_num_threads()); "
        "import gpu_kquant.cli, gpu_kquant.engine_local, gpu_kquant.imagefiles; "
        "assert (Image.MAX_IMAGE_PIXELS, torch.get_num_threads()) == before"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
