"""``python -m benchmarks.gpu_check --dry-run`` runs every step at tiny sizes on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys

from common_utils import ROOT

# The dry run takes under a minute on an idle 2-core machine; the timeout leaves room for shared CI runners.
TIMEOUT_S = 300


def test_gpu_check_dry_run(tmp_path: object) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = list(tmp_path.glob("gpu_check_*.md"))  # type: ignore[attr-defined]
    assert len(reports) == 1
    text = reports[0].read_text()
    for title in ("Transfers", "Distance kernel", "Fit+map", "Host syncs", "Folder pipeline", "Tests"):
        assert f"## {title}" in text
    assert "skipped (time budget)" not in text and "timed out" not in text
    assert "LABELS DIFFER" not in text
    assert "skipped (no CUDA)" in text or "cuda" in text.lower()
