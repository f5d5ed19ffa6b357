"""pngquant's run gate in ``--dither adaptive`` on 40 photo cases (``python -m benchmarks.dither_gate``).

:func:`gpu_kquant.dither.run_gate` scales the diffused error and divides the refinement's weight on each
pixel's own error by how long the pixel's run of equal undithered labels is (pngquant's dither map).
Trials: without it (a: the gate 1 everywhere) and with it (b, main), on the 22 cases of
:mod:`benchmarks.dither_generalise` (10 tuning, 12 held-out; all seen before) and the 12 of
:mod:`benchmarks.dither_fresh` (looked at once, with main before the gate, which showed our dithering
trading more SSIM for blurred PSNR than pngquant's at k = 16) plus its 6 "unseen" ones (added after the
gate was chosen), against pngquant's default dithering.
Needs ``pngquant`` and pip. Writes OUT/dither_gate_<machine>_<date>.{csv,md}.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Sequence

import numpy as np

import gpu_kquant.dither as dither_mod

from .dither_fresh import cases as fresh_cases
from .dither_generalise import Case, cases, patched, report, trial_args

TRIALS = {"a no run gate (before)": False, "b run gate (main)": True}


def _no_gate(labels: np.ndarray) -> np.ndarray:
    """Stand-in for run_gate: dither every pixel fully (the refinement's weight unchanged)."""
    return np.ones(labels.shape, np.float32)


@contextlib.contextmanager
def gate_settings(on: bool) -> Iterator[None]:
    with patched([(dither_mod, "run_gate", dither_mod.run_gate if on else _no_gate)]):
        yield


def all_cases(ks: Sequence[int]) -> list[Case]:
    return [*cases(ks), *fresh_cases(ks)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return trial_args("benchmarks.dither_gate", __doc__ or "", TRIALS, argv)


def main(argv: Sequence[str] | None = None) -> int:
    title = "# pngquant's run gate in adaptive dithering (issue 15)"
    return report(parse_args(argv), "dither_gate", TRIALS, gate_settings, title, all_cases=all_cases)


if __name__ == "__main__":
    raise SystemExit(main())
