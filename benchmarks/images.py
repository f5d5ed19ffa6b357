"""Deterministic benchmark images built from photos bundled with scikit-learn and scikit-image.

Nothing is downloaded: the ten source photos ship inside the two packages. A mosaic
tiles them in rows of equal height, each photo resized once (Lanczos) from its
original to the row height with its aspect ratio kept, the last tile of a row
cropped at the right edge. The layout depends only on the mosaic index, so the
same index gives the same pixels at every size; :func:`image_of_size` uses that for
scaling curves (bigger images are the same picture at a higher resolution).
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "MOSAIC_SIZE",
    "PHOTOS",
    "distinct_colors",
    "image_of_size",
    "load_images",
    "mosaic",
    "photo",
    "save_png",
]

# Width x height of the classic tutorial image (2560 x 1600, 4.1 MP).
MOSAIC_SIZE = (2560, 1600)
ROWS = 4


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")

    return load


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        img = getattr(skimage.data, name)()
        return img[0] if isinstance(img, tuple) else img  # stereo_motorcycle() -> (left, right, disparity)

    return load


PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "china": _sklearn("china"),
    "flower": _sklearn("flower"),
    "astronaut": _skimage("astronaut"),
    "coffee": _skimage("coffee"),
    "chelsea": _skimage("chelsea"),
    "rocket": _skimage("rocket"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "retina": _skimage("retina"),
    "stereo_motorcycle": _skimage("stereo_motorcycle"),
}


@functools.cache
def photo(name: str) -> np.ndarray:
    """One bundled source photo as an (H, W, 3) uint8 array (read-only, cached)."""
    if name not in PHOTOS:
        raise KeyError(f"unknown photo {name!r}; choose from {', '.join(PHOTOS)}")
    img = np.ascontiguousarray(PHOTOS[name]()[..., :3], dtype=np.uint8)
    img.setflags(write=False)
    return img


def _resize_to_height(img: np.ndarray, height: int) -> np.ndarray:
    width = max(1, round(img.shape[1] * height / img.shape[0]))
    return np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.LANCZOS))


def mosaic(width: int, height: int, index: int = 0, rows: int = ROWS) -> np.ndarray:
    """A (height, width, 3) uint8 mosaic of the bundled photos, fully determined by its arguments.

    Mosaic ``index`` uses its own order of the photos (a seeded permutation) and
    mirrors some tiles, so different indices give different images.
    """
    if width < 1 or height < rows:
        raise ValueError(f"mosaic too small: {width}x{height} with {rows} rows")
    rng = np.random.default_rng(10_000 + index)
    names = [list(PHOTOS)[i] for i in rng.permutation(len(PHOTOS))]
    out = np.empty((height, width, 3), dtype=np.uint8)
    bounds = [round(r * height / rows) for r in range(rows + 1)]
    tile = 0
    for top, bottom in itertools.pairwise(bounds):
        x = 0
        while x < width:
            img = _resize_to_height(photo(names[tile % len(names)]), bottom - top)
            if rng.random() < 0.5:
                img = img[:, ::-1]
            w = min(img.shape[1], width - x)
            out[top:bottom, x : x + w] = img[:, :w]
            x += w
            tile += 1
    return out


def image_of_size(megapixels: float, index: int = 0) -> np.ndarray:
    """A 16:10 mosaic of about ``megapixels`` MP (same layout as the 2560x1600 mosaic of ``index``)."""
    if not 0.01 <= megapixels <= 64:
        raise ValueError(f"megapixels must be in 0.01..64, got {megapixels}")
    width = round(math.sqrt(megapixels * 1e6 * 1.6))
    return mosaic(width, round(width / 1.6), index)


def load_images(spec: Sequence[str], use_mosaics: bool = True) -> dict[str, np.ndarray]:
    """Resolve an image selection into {name: image}.

    ``spec`` is either one count N (the first N mosaics at 2560x1600, or with
    ``use_mosaics=False`` the first N source photos at their own size) or names:
    photo names, ``mosaic<i>`` (2560x1600) or ``<mp>mp`` / ``<mp>mp-<i>``
    (:func:`image_of_size`, e.g. ``0.25mp``).
    """
    if len(spec) == 1 and spec[0].isdigit():
        n = int(spec[0])
        spec = [f"mosaic{i}" for i in range(n)] if use_mosaics else list(PHOTOS)[:n]
    out: dict[str, np.ndarray] = {}
    for name in spec:
        if name in PHOTOS:
            out[name] = photo(name)
        elif m := re.fullmatch(r"mosaic(\d+)", name):
            out[name] = mosaic(*MOSAIC_SIZE, index=int(m.group(1)))
        elif m := re.fullmatch(r"([0-9.]+)mp(?:-(\d+))?", name):
            out[name] = image_of_size(float(m.group(1)), int(m.group(2) or 0))
        else:
            raise ValueError(f"unknown image {name!r}: use a count, a photo name, mosaic<i> or <mp>mp[-<i>]")
    return out


def save_png(image: np.ndarray, path: Path) -> Path:
    """Write an RGB image as PNG (Pillow defaults) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def distinct_colors(image: np.ndarray) -> int:
    """Number of distinct RGB colours in an (H, W, 3) uint8 image."""
    rgb = image.reshape(-1, 3).astype(np.uint32)
    return int(np.unique((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]).size)
