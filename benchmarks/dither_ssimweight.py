"""SSIM's own weighting in ``--dither adaptive`` on 74 photo cases (``python -m benchmarks.dither_ssimweight``).

:func:`gpu_kquant.dither.ssim_weight` multiplies the refinement's weight on each pixel's own error by
the square root of what that error costs SSIM there (c2 / (2 var + c2)) over its image mean. Trials:
without it (a, before) and with it (b, main), against pngquant's default dithering (the issue 15
targets), on the 40 cases of :mod:`benchmarks.dither_gate` (all seen before) and on colour photos
from OpenCV's samples (the opencv-python sdist, pinned; the registry is the only network): set
"dev2" (6 photos, used to choose the weighting's exponent, 0.5 against 1) and set "test" (11 photos,
picked before anything was scored and scored once, by this benchmark, after every choice was made).
Needs ``pngquant`` and the package registry. Writes OUT/dither_ssimweight_<machine>_<date>.{csv,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import tarfile
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

import gpu_kquant.dither as dither_mod

from .dither_gate import all_cases as gate_cases
from .dither_generalise import Case, patched, report, trial_args
from .dither_heldout import load_encoded
from .pipeline import CACHE

SDIST = (
    "https://files.pythonhosted.org/packages/4a/e7/b70a2d9ab205110d715906fc8ec83fbb00404aeb3a37a0654fdb68eb0c8c/"
    "opencv-python-4.10.0.84.tar.gz"
)
SDIST_SHA256 = "72d234e4582e9658ffea8e9cae5b63d488ad06994ef12d81dc303b17472f3526"
SAMPLES = "opencv-python-4.10.0.84/opencv/samples/data/"
# Chosen by name and colour (mean chroma over 3 levels, photos; no near-duplicates) before any was scored.
DEV2 = ("aloeL.jpg", "apple.jpg", "butterfly.jpg", "building.jpg", "HappyFish.jpg", "board.jpg")
TEST = (
    "baboon.jpg", "fruits.jpg", "home.jpg", "messi5.jpg", "orange.jpg", "squirrel_cls.jpg", "rubberwhale1.png",
    "graf1.png", "licenseplate_motion.jpg", "leuvenA.jpg", "starry_night.jpg",
)  # fmt: skip
TRIALS = {"a no SSIM weight (before)": False, "b SSIM weight (main)": True}


def _sdist(cache: Path) -> Path:
    """The pinned opencv-python sdist (95 MB), downloaded once into ``cache`` and checked."""
    path = cache / SDIST.rsplit("/", 1)[1]
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(".part")
        with urllib.request.urlopen(SDIST) as response, part.open("wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        part.replace(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{path}: sha256 {digest}, expected {SDIST_SHA256}")
    return path


def opencv_photos(names: Sequence[str], cache: Path) -> dict[str, np.ndarray]:
    """name -> (H, W, 3) uint8 from OpenCV's sample data."""
    out = {}
    with tarfile.open(_sdist(cache)) as tar:
        for name in names:
            member = tar.extractfile(SAMPLES + name)
            assert member is not None, name
            data = member.read()
            out[Path(name).stem] = load_encoded(Path(name).stem, data)
    return out


def all_cases(ks: Sequence[int], cache: Path = CACHE.parent / "sdists") -> list[Case]:
    """The 40 cases of benchmarks.dither_gate, then "dev2" and "test" from OpenCV's samples, at every k."""
    extra = [(label, name, img, k) for label, names in (("dev2", DEV2), ("test", TEST))
             for name, img in opencv_photos(names, cache).items() for k in ks]  # fmt: skip
    return [*gate_cases(ks), *extra]


def _no_weight(points: np.ndarray, classes: np.ndarray, span: float) -> np.ndarray:
    """Stand-in for ssim_weight: the same weight everywhere."""
    return np.ones(classes.shape, np.float32)


@contextlib.contextmanager
def weight_settings(on: bool) -> Iterator[None]:
    with patched([(dither_mod, "ssim_weight", dither_mod.ssim_weight if on else _no_weight)]):
        yield


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return trial_args("benchmarks.dither_ssimweight", __doc__ or "", TRIALS, argv)


def main(argv: Sequence[str] | None = None) -> int:
    title = "# SSIM's own weighting in adaptive dithering (issue 15)"
    return report(parse_args(argv), "dither_ssimweight", TRIALS, weight_settings, title, all_cases=all_cases)


if __name__ == "__main__":
    raise SystemExit(main())
