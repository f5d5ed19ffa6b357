"""One balance of SSIM against blurred PSNR per image? (``python -m benchmarks.dither_balance``).

``--dither adaptive`` trades SSIM (fewer dots) against blurred PSNR (more) with one constant, the
refinement's weight on each pixel's own error (:data:`gpu_kquant.refine.LAMBDA`, with
``dither.LAMBDA_FLAT``). Each trial multiplies both by m, on the 40 cases of
:mod:`benchmarks.dither_gate` and the 12 "dev2" ones of :mod:`benchmarks.dither_ssimweight` (not its
test set), against pngquant's default dithering. The extra table gives each case's interval of m
(log-interpolated between trials) where SSIM >= pngquant's and blurred PSNR >= pngquant's + 0.3 dB,
and how many cases the best m per image would meet: the most a per-image balance could gain.
Needs ``pngquant`` and the package registry. Writes OUT/dither_balance_<machine>_<date>.{csv,md}.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

import gpu_kquant.dither as dither_mod
from gpu_kquant.refine import LAMBDA

from .dither_generalise import Case, patched, report, trial_args
from .dither_ssimweight import all_cases as weight_cases
from .quality import BLUR_DB_MARGIN

MULTIPLIERS = (0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 3.0)
TRIALS = {f"m {m}" + (" (main)" if m == 1.0 else ""): m for m in MULTIPLIERS}


@contextlib.contextmanager
def balance_settings(m: float) -> Iterator[None]:
    patches = [(dither_mod, "LAMBDA", LAMBDA * m), (dither_mod, "LAMBDA_FLAT", dither_mod.LAMBDA_FLAT * m)]
    with patched(patches):
        yield


def all_cases(ks: Sequence[int]) -> list[Case]:
    """The 40 cases of benchmarks.dither_gate and the 12 dev2 ones (not the test set)."""
    return [c for c in weight_cases(ks) if c[0] != "test"]


def _interval(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(lowest m meeting SSIM, highest m meeting blurred PSNR), log-interpolated; SSIM rises with m."""
    rows = sorted(rows, key=lambda r: TRIALS[r["trial"]])
    logm = np.log([TRIALS[r["trial"]] for r in rows])
    ssim = np.array([r["ssim_vs_ref"] for r in rows])
    blur = np.array([r["blur_db_vs_ref"] - BLUR_DB_MARGIN for r in rows])
    low = np.inf if ssim[-1] < 0 else float(np.exp(np.interp(0.0, ssim, logm, left=-np.inf)))
    high = 0.0 if blur[0] < 0 else float(np.exp(np.interp(0.0, -blur, logm, right=np.inf)))
    return low, high


def intervals(table: list[dict[str, Any]], cases: list[Case]) -> list[str]:
    """Per case, the m that would meet both quality targets; and the count with the best m per image."""
    lines = [
        "| set | image | k | m meeting SSIM from | m meeting blurred PSNR up to | some m meets both |",
        "|---|---|---:|---:|---:|---|",
    ]
    feasible = 0
    for set_name, name, _, k in cases:
        rows = [r for r in table if r["set"] == set_name and r["image"] == name and r["k"] == k]
        low, high = _interval(rows)
        both = low <= high and MULTIPLIERS[0] <= high and low <= MULTIPLIERS[-1]
        feasible += both
        lines.append(f"| {set_name} | {name} | {k} | {low:.2f} | {high:.2f} | {'yes' if both else ''} |")
    best = f"With the best m per image ({MULTIPLIERS[0]} to {MULTIPLIERS[-1]}): **{feasible}/{len(cases)}** meet both."
    return [best, "\n".join(lines)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return trial_args("benchmarks.dither_balance", __doc__ or "", TRIALS, argv)


def main(argv: Sequence[str] | None = None) -> int:
    title = "# The balance of SSIM against blurred PSNR, per image (issue 15)"
    return report(parse_args(argv), "dither_balance", TRIALS, balance_settings, title, intervals, all_cases)


if __name__ == "__main__":
    raise SystemExit(main())
