"""Ablations of ``--dither adaptive`` on the tuning and held-out cases (``python -m benchmarks.dither_generalise``).

Issue 15's adaptive dithering has three fitted parts: the hysteresis peak (dither.HYSTERESIS for given
palettes, ditherpalette.FITTED_HYSTERESIS for fitted ones), the noise gate that scales it
(dither.NOISE_LOW / NOISE_HIGH) and the outward spread of a fitted palette (ditherpalette.spread_palette).
Each trial sets some of them (module attributes, restored afterwards) and is scored on all 22 cases:
the ten tuning cases (:func:`benchmarks.quality.bundled_photos` at k = 16, 64) and the twelve held-out
ones (:data:`benchmarks.dither_heldout.HELDOUT`), as :mod:`benchmarks.dither_heldout` scores them.
pngquant runs once per case. Needs ``pngquant`` on PATH. Writes OUT/dither_generalise_<machine>_<date>.{csv,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

import gpu_kquant.dither as dither_mod
from gpu_kquant.colors import ColorSet

from .dither_heldout import HELDOUT, _versus, load
from .harness import machine_info, machine_markdown, markdown_table, output_stem, write_csv, write_markdown
from .quality import RESULTS, _scores, bundled_photos, ours, pngquant, pngquant_missing

# The module, not the function of the same name that gpu_kquant re-exports (``import a.b as c`` gets that).
quantize_mod = importlib.import_module("gpu_kquant.quantize")


def _no_spread(cs: ColorSet, labels: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Stand-in for spread_palette: the k-means palette unchanged."""
    return palette


# (set, image name, (H, W, 3) uint8 image, k)
Case = tuple[str, str, np.ndarray, int]

# name -> (fitted-palette hysteresis peak, spread on, NOISE_LOW, NOISE_HIGH)
Trial = tuple[float, bool, float, float]
TRIALS: dict[str, Trial] = {
    "a main (spread, h 1.5)": (1.5, True, 0.3, 0.8),
    "b no spread, h 1.375": (1.375, False, 0.3, 0.8),
    "c spread, h 1.375": (1.375, True, 0.3, 0.8),
    "b2 no spread, h 1.5": (1.5, False, 0.3, 0.8),
    "d1 spread, h 1.25": (1.25, True, 0.3, 0.8),
    "d2 spread, h 1.0": (1.0, True, 0.3, 0.8),
    "d3 no spread, h 1.25": (1.25, False, 0.3, 0.8),
    "d4 no spread, h 1.0": (1.0, False, 0.3, 0.8),
    "e1 main, gate +0.5 (0.8-1.3)": (1.5, True, 0.8, 1.3),
    "e2 main, gate +1.0 (1.3-1.8)": (1.5, True, 1.3, 1.8),
    "f1 spread, h 1.75": (1.75, True, 0.3, 0.8),
    "f2 spread, h 2.0": (2.0, True, 0.3, 0.8),
    "g main, gate 0.3-0.55": (1.5, True, 0.3, 0.55),
}


@contextlib.contextmanager
def patched(patches: Sequence[tuple[ModuleType, str, object]]) -> Iterator[None]:
    """Set module attributes (module, name, value) in this process; restore them on exit."""
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


@contextlib.contextmanager
def trial_settings(trial: Trial) -> Iterator[None]:
    """Set the adaptive constants of one trial in this process; restore them on exit."""
    peak, spread, low, high = trial
    patches: list[tuple[ModuleType, str, object]] = [
        (quantize_mod, "FITTED_HYSTERESIS", peak),
        (quantize_mod, "spread_palette", quantize_mod.spread_palette if spread else _no_spread),
        (dither_mod, "NOISE_LOW", low),
        (dither_mod, "NOISE_HIGH", high),
    ]
    with patched(patches):
        yield


def cases(ks: Sequence[int]) -> list[Case]:
    """(set, image name, (H, W, 3) uint8 image, k) for the tuning and the held-out cases."""
    tuned = bundled_photos()
    held = {n: load(n, f) for n, f in HELDOUT.items()}
    return [(s, n, img, k) for s, imgs in (("tuned", tuned), ("heldout", held)) for n, img in imgs.items() for k in ks]


def rows(
    all_cases: list[Case],
    trials: dict[str, Any],
    settings: Callable[[Any], contextlib.AbstractContextManager[None]] = trial_settings,
) -> list[dict[str, Any]]:
    """One row per case and trial (set up by ``settings``), scored against pngquant's default dithering."""
    out = []
    for set_name, name, img, k in all_cases:
        ref = _scores(img, *pngquant(img, k))
        for label, trial in trials.items():
            with settings(trial):
                started = time.perf_counter()
                result = ours(img, k, "adaptive")
                seconds = time.perf_counter() - started
            scores = _scores(img, *result)
            r = _versus({"set": set_name, "image": name, "k": k, "trial": label, **scores, "seconds": seconds}, ref)
            out.append(r)
            deltas = f"{r['ssim_vs_ref']:+.4f} {r['blur_db_vs_ref']:+.2f} {r['bytes_vs_ref']:.3f}"
            print(set_name, name, k, label, deltas, flush=True)
    return out


def totals(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per trial: met count and summed shortfall score per set of cases (tuned, held-out, ...) and on all."""
    out = []
    sets = list(dict.fromkeys(r["set"] for r in table))
    for trial in dict.fromkeys(r["trial"] for r in table):
        row: dict[str, Any] = {"trial": trial}
        for part, keep in [*((s, {s}) for s in sets), ("all", set(sets))]:
            rs = [r for r in table if r["trial"] == trial and r["set"] in keep]
            row[f"met_{part}"] = f"{sum(r['met'] for r in rs)}/{len(rs)}"
            row[f"score_{part}"] = sum(r["score"] for r in rs)
        out.append(row)
    return out


TITLE = "# Adaptive dithering ablations on tuned and held-out cases (issue 15)"


def markdown(table: list[dict[str, Any]], info: dict[str, Any], title: str = TITLE) -> list[str]:
    """Totals per trial, then one per-case table (cells ΔSSIM / Δblur dB / bytes ×)."""
    trials = list(dict.fromkeys(r["trial"] for r in table))
    per_case: list[dict[str, Any]] = []
    for r in table:
        if r["trial"] == trials[0]:
            per_case.append({"set": r["set"], "image": r["image"], "k": r["k"]})
        cell = f"{r['ssim_vs_ref']:+.4f} / {r['blur_db_vs_ref']:+.2f} / {r['bytes_vs_ref']:.2f}"
        per_case[-1][r["trial"]] = cell + (" **met**" if r["met"] else "")
    tot_cols = [("trial", "trial", "")]
    for part in [*dict.fromkeys(r["set"] for r in table), "all"]:
        tot_cols += [(f"met_{part}", f"met {part}", ""), (f"score_{part}", f"score {part}", ".2f")]
    case_cols = [("set", "set", ""), ("image", "image", ""), ("k", "k", "d"), *[(t, t.split()[0], "") for t in trials]]
    return [
        title,
        machine_markdown(info),
        markdown_table(totals(table), tot_cols),
        "Each cell: ΔSSIM / Δ blurred PSNR dB / bytes × against pngquant's default dithering at the same k.",
        markdown_table(per_case, case_cols),
    ]


def trial_args(module: str, doc: str, trials: dict[str, Any], argv: Sequence[str] | None) -> argparse.Namespace:
    """The flags every dithering trial benchmark takes: --trials (names of ``trials``), --k, --out."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
    p.add_argument("--trials", nargs="+", choices=list(trials), default=list(trials), metavar="TRIAL")
    p.add_argument("--k", nargs="+", type=int, default=[16, 64])
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return trial_args("benchmarks.dither_generalise", __doc__ or "", TRIALS, argv)


def report(
    args: argparse.Namespace,
    prefix: str,
    trials: dict[str, Any],
    settings: Callable[[Any], contextlib.AbstractContextManager[None]],
    title: str = TITLE,
    extra: Callable[[list[dict[str, Any]], list[Case]], list[str]] | None = None,
    all_cases: Callable[[Sequence[int]], list[Case]] = cases,
) -> int:
    """Score ``args.trials`` on every case (``all_cases(args.k)``; default the 22), write
    OUT/<prefix>_<machine>_<date>.{csv,md} (plus the ``extra`` sections of the table and the cases)
    and print the Markdown; 2 without pngquant."""
    if pngquant_missing():
        return 2
    started, info = time.time(), machine_info()
    scored = all_cases(args.k)
    table = rows(scored, {t: trials[t] for t in args.trials}, settings)
    stem = output_stem(prefix, info)
    write_csv(table, args.out / f"{stem}.csv")
    sections = [*markdown(table, info, title), *(extra(table, scored) if extra else [])]
    path = write_markdown(sections, args.out, stem, started)
    print(path.read_text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return report(parse_args(argv), "dither_generalise", TRIALS, trial_settings)


if __name__ == "__main__":
    raise SystemExit(main())
