"""The eye-model refinement of ``--dither adaptive`` on 22 photo cases (``python -m benchmarks.dither_refine``).

Adaptive dithering ends with :func:`gpu_kquant.refine.refine`: a direct binary search that lowers
||G * E||^2 + sum lam_p penalty(E_p) (G a Gaussian of sigma 1 px; the penalty |E|^2 up to HUBER of the
range, then linear). Its settings are the weight lam where the image is noisy (dither.LAMBDA) and where
it is noise-free (dither.LAMBDA_FLAT), the penalty's threshold (refine.HUBER; 0: squared everywhere),
the passes (refine.SWEEPS) and the candidates per pixel (refine.NEIGHBOURS). Each trial sets them (module
attributes, restored afterwards) and is scored on the 22 cases of :mod:`benchmarks.dither_generalise`
(10 tuning, 12 held-out) against pngquant's default dithering, with the seconds of each quantize;
then the refinement's cost on the tuning photos (interleaved runs, median of 5).
Needs ``pngquant`` on PATH. Writes OUT/dither_refine_<machine>_<date>.{csv,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np

import gpu_kquant.dither as dither_mod
import gpu_kquant.refine as refine_mod

from .dither_generalise import Case, patched, report, trial_args
from .quality import ours

# name -> (lam where noisy, lam where noise-free, sweeps, neighbours, huber); lam < 0: no refinement.
Trial = tuple[float, float, int, int, float]
TRIALS: dict[str, Trial] = {
    "a no refinement (before)": (-1.0, -1.0, 2, 8, 0.0),
    "b main (huber 0.03, lam 0.8, flat 0.05)": (0.8, 0.05, 2, 8, 0.03),
    "c squared, lam 0.3": (0.3, 0.05, 2, 8, 0.0),
    "d squared, lam 0.2": (0.2, 0.05, 2, 8, 0.0),
    "e squared, lam 0.35": (0.35, 0.05, 2, 8, 0.0),
    "f huber 0.03, lam 0.5": (0.5, 0.05, 2, 8, 0.03),
    "g huber 0.03, lam 1.0": (1.0, 0.05, 2, 8, 0.03),
    "h huber 0.06, lam 0.4": (0.4, 0.05, 2, 8, 0.06),
    "i huber 0.06, lam 0.6": (0.6, 0.05, 2, 8, 0.06),
    "j main, flat 0": (0.8, 0.0, 2, 8, 0.03),
    "k main, flat 0.8 (no noise gate)": (0.8, 0.8, 2, 8, 0.03),
    "l main, 4 sweeps": (0.8, 0.05, 4, 8, 0.03),
    "m main, 16 neighbours": (0.8, 0.05, 2, 16, 0.03),
}


def _unrefined(
    points: np.ndarray, classes: np.ndarray, pal: np.ndarray, flags: np.ndarray, labels: np.ndarray, **_: Any
) -> np.ndarray:
    """Stand-in for refine: the error-diffused labels unchanged."""
    return labels


@contextlib.contextmanager
def refine_settings(trial: Trial) -> Iterator[None]:
    """Set the refinement constants of one trial in this process; restore them on exit."""
    lam, flat, sweeps, count, huber = trial
    patches: list[tuple[ModuleType, str, object]] = [
        (dither_mod, "LAMBDA", lam),
        (dither_mod, "LAMBDA_FLAT", flat),
        (dither_mod, "refine", _unrefined if lam < 0 else refine_mod.refine),
        (refine_mod, "SWEEPS", sweeps),
        (refine_mod, "NEIGHBOURS", count),
        (refine_mod, "HUBER", huber),
    ]
    with patched(patches):
        yield


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return trial_args("benchmarks.dither_refine", __doc__ or "", TRIALS, argv)


def seconds_table(table: list[dict[str, Any]]) -> list[str]:
    """Mean seconds of an adaptive quantize per trial (one run each, as scored: a rough figure)."""
    lines = ["| trial | mean s per quantize (one run each) |", "|---|---|"]
    for trial in dict.fromkeys(r["trial"] for r in table):
        secs = [r["seconds"] for r in table if r["trial"] == trial]
        lines.append(f"| {trial} | {sum(secs) / len(secs):.3f} |")
    return ["\n".join(lines)]


def timing_table(
    all_cases: list[Case],
    settings: Callable[[Any], contextlib.AbstractContextManager[None]] = refine_settings,
    pair: tuple[Any, Any] = (TRIALS["a no refinement (before)"], TRIALS["b main (huber 0.03, lam 0.8, flat 0.05)"]),
    repeats: int = 5,
) -> list[str]:
    """The cost of a change: an adaptive quantize of each tuning photo under the two trials of ``pair``
    (without, with; by default the refinement), runs interleaved, median of ``repeats``."""
    lines = ["| image | pixels | k | s without | s with | ratio |", "|---|---:|---:|---:|---:|---:|"]
    for set_name, name, img, k in all_cases:
        if set_name != "tuned":
            continue
        secs: list[list[float]] = [[], []]
        for _ in range(repeats):
            for i, trial in enumerate(pair):
                with settings(trial):
                    started = time.perf_counter()
                    ours(img, k, "adaptive")
                    secs[i].append(time.perf_counter() - started)
        a, b = (float(np.median(s)) for s in secs)
        lines.append(f"| {name} | {img.shape[0] * img.shape[1]} | {k} | {a:.3f} | {b:.3f} | {b / a:.2f} |")
    return ["\n".join(lines)]


def main(argv: Sequence[str] | None = None) -> int:
    title = "# The eye-model refinement of adaptive dithering on tuned and held-out cases (issue 15)"
    return report(
        parse_args(argv),
        "dither_refine",
        TRIALS,
        refine_settings,
        title,
        lambda table, all_cases: [*seconds_table(table), *timing_table(all_cases)],
    )


if __name__ == "__main__":
    raise SystemExit(main())
