"""Banding of dithering on noise-free grey ramps (``python -m benchmarks.dither_ramps``).

Sixteen ramps (0-255, 100/200/400/600 lines, vertical and horizontal, 120 px across) mapped to grey
palettes at steps of 64 and 32 (255 included): the count of single-colour lines more than 1/8 of a
step from every palette grey, i.e. lines that band where dithering should mix two greys. The issue-15
gradient test (tests/test_dither.py) is one such ramp; these are the others. Writes
OUT/dither_ramps_<machine>_<date>.md.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gpu_kquant import map_to_palette

from .harness import machine_info, machine_markdown, output_stem, write_markdown
from .quality import RESULTS

KINDS = ("none", "fs", "adaptive")


def banded_lines(kind: str, step: int, lines: int, vertical: bool) -> int:
    """Single-colour lines of one ramp that lie more than step / 8 from every palette grey."""
    greys = np.array(sorted({*range(0, 256, step), 255}), np.uint8)
    ramp = np.rint(np.linspace(0, 255, lines)).astype(np.uint8)
    img = np.repeat(np.repeat(ramp[:, None, None], 3, 2), 120, 1)
    if not vertical:
        img = np.ascontiguousarray(img.transpose(1, 0, 2))
    out = map_to_palette([img], np.repeat(greys[:, None], 3, 1), dither=kind)[0].to_rgb()[..., 0]
    if not vertical:
        out = out.T
    far = np.abs(ramp[:, None].astype(float) - greys[None, :]).min(1) > step / 8
    single = np.array([len(np.unique(line)) == 1 for line in out])
    return int((single & far).sum())


def table() -> str:
    """One row per dithering kind: banded lines per palette step and in all."""
    rows = ["| dither | step 64 | step 32 | all 16 ramps |", "|---|---:|---:|---:|"]
    for kind in KINDS:
        per_step = {
            step: sum(banded_lines(kind, step, n, v) for n in (100, 200, 400, 600) for v in (True, False))
            for step in (64, 32)
        }
        rows.append(f"| {kind} | {per_step[64]} | {per_step[32]} | {sum(per_step.values())} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dither_ramps", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    started, info = time.time(), machine_info()
    text = ["# Banding on noise-free grey ramps (issue 15)", machine_markdown(info), table()]
    path = write_markdown(text, args.out, output_stem("dither_ramps", info), started)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
