"""The palette fit under ``--dither adaptive`` on 22 photo cases (``python -m benchmarks.dither_fit``).

Issue 15's remaining SSIM misses (hubble_deep_field, immunohistochemistry) lose SSIM already undithered:
pngquant's palette has less PSNR and more SSIM. Two changes to the fit are scored here, on the 22 cases
of :mod:`benchmarks.dither_generalise` against pngquant's default dithering:

- the exact finish (:attr:`gpu_kquant.options.FitOptions.exact_finish`): after a fit on a 6-bit
  histogram, Lloyd on the exact colours (trial b, the default for adaptive dithering; trial a without);
- SSIM weights: each pixel counts c2 / (2 var + c2) (var its local variance, SSIM's window and c2),
  the first-order SSIM cost of its squared error: quantizing a window of variance var with an error of
  variance e lowers SSIM's structure term by about e / (2 var + c2). pngquant weights its histogram by
  a similar importance map. Trials c (the weight) and d (its square root), with the exact finish.

Then the cost of the exact finish in an adaptive quantize (interleaved, median of 3), and what it
does undithered (PSNR and SSIM against ``pngquant --nofs``, seconds per quantize, median of 3) on the
same 11 images, where it stays off by default. Needs ``pngquant``. Writes OUT/dither_fit_<machine>_<date>.{csv,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import time
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import torch

import gpu_kquant.fitplan as fitplan_mod
from gpu_kquant import quantize
from gpu_kquant.colors import ColorSet, pack
from gpu_kquant.metrics import local_variance, ssim
from gpu_kquant.options import FitOptions

from .dither_generalise import Case, patched, report, trial_args
from .dither_refine import timing_table
from .quality import pngquant

quantize_mod = importlib.import_module("gpu_kquant.quantize")

# name -> (exact finish, SSIM weight exponent; 0: plain pixel counts)
Trial = tuple[bool, float]
TRIALS: dict[str, Trial] = {
    "a no exact finish (before)": (False, 0.0),
    "b exact finish (main)": (True, 0.0),
    "c SSIM weights + exact finish": (True, 1.0),
    "d SSIM weights^0.5 + exact finish": (True, 0.5),
}
_WEIGHT_SCALE = 16  # integer counts: weight 1 becomes 16, the smallest weights 1


def _local_variance(image: torch.Tensor) -> torch.Tensor:
    """(H, W, C) uint8 -> (H, W) float64: per-channel variance in SSIM's window (Gaussian sigma 1.5), averaged."""
    return local_variance(image[..., :3].double())


def ssim_weighted_sets(gamma: float) -> Callable[[Sequence[torch.Tensor]], list[ColorSet]]:
    """Stand-in for quantize's color_sets: counts are summed integer SSIM weights (c2 / (2 var + c2))^gamma."""
    c2 = (0.03 * 255) ** 2

    def sets(images: Sequence[torch.Tensor]) -> list[ColorSet]:
        out = []
        for img in images:
            w = (_WEIGHT_SCALE * (c2 / (2 * _local_variance(img) + c2)) ** gamma).round().clamp_min(1).long()
            keys, inverse = torch.unique(pack(img).reshape(-1), return_inverse=True)
            counts = torch.zeros(keys.shape[0], dtype=torch.long).index_add_(0, inverse, w.reshape(-1))
            out.append(ColorSet(keys, counts, img.shape[-1]))
        return out

    return sets


def _no_finish(*_: Any) -> None:
    """Stand-in for fitplan._finish_exact: the histogram's fit unchanged."""


@contextlib.contextmanager
def fit_settings(trial: Trial) -> Iterator[None]:
    """Set the fit of one trial in this process; restore it on exit."""
    finish, gamma = trial
    patches: list[tuple[ModuleType, str, object]] = [
        (fitplan_mod, "_finish_exact", fitplan_mod._finish_exact if finish else _no_finish),
        (quantize_mod, "color_sets", ssim_weighted_sets(gamma) if gamma else quantize_mod.color_sets),
    ]
    with patched(patches):
        yield


def undithered_table(all_cases: list[Case], repeats: int = 3) -> list[str]:
    """Undithered, with and without the exact finish: Δ PSNR and Δ SSIM against pngquant --nofs, seconds."""
    lines = [
        "| set | image | k | ΔPSNR dB without | ΔPSNR dB with | ΔSSIM without | ΔSSIM with | s without | s with |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for set_name, name, img, k in all_cases:
        ref, _ = pngquant(img, k, "--nofs")
        ref_mse, ref_ssim = float(((ref.astype(np.float64) - img) ** 2).mean()), ssim(img, ref)
        cells: list[list[float]] = [[], []]
        for finish in (False, True):
            options = FitOptions(k=k, exact_finish=finish)
            secs = []
            for _ in range(repeats):
                started = time.perf_counter()
                q = quantize(img, k, options=options, device="cpu")
                secs.append(time.perf_counter() - started)
            gain = 10 * np.log10(ref_mse / q.mse)
            cells[finish] = [gain, ssim(img, q.to_array()) - ref_ssim, float(np.median(secs))]
        (pa, sa, ta), (pb, sb, tb) = cells
        row = f"| {set_name} | {name} | {k} | {pa:+.2f} | {pb:+.2f} | {sa:+.4f} | {sb:+.4f} | {ta:.3f} | {tb:.3f} |"
        lines.append(row)
    return ["\n".join(lines)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return trial_args("benchmarks.dither_fit", __doc__ or "", TRIALS, argv)


def main(argv: Sequence[str] | None = None) -> int:
    title = "# The palette fit of adaptive dithering on tuned and held-out cases (issue 15)"
    pair = (TRIALS["a no exact finish (before)"], TRIALS["b exact finish (main)"])
    return report(
        parse_args(argv),
        "dither_fit",
        TRIALS,
        fit_settings,
        title,
        lambda table, all_cases: [*timing_table(all_cases, fit_settings, pair, 3), *undithered_table(all_cases)],
    )


if __name__ == "__main__":
    raise SystemExit(main())
