"""CIEDE2000 of a quantized image against scikit-image's reference implementation."""

from __future__ import annotations

import numpy as np
import pytest
from common_utils import photo

from gpu_kquant import quantize
from gpu_kquant.metrics import mean_ciede2000

skimage_color = pytest.importorskip("skimage.color")


def reference(original: np.ndarray, palette: np.ndarray, indices: np.ndarray) -> float:
    """Per-pixel CIEDE2000 from scikit-image (float64), averaged over visible pixels.

    The two implementations' sRGB-to-Lab constants differ in the fifth digit, hence a
    relative tolerance of 1e-4 (a CIEDE2000 of 0.0003 on a mean near 2 is invisible).
    """
    rgb = original[..., :3].astype(np.float64) / 255
    mapped = palette[indices][..., :3].astype(np.float64) / 255
    delta = skimage_color.deltaE_ciede2000(skimage_color.rgb2lab(rgb), skimage_color.rgb2lab(mapped))
    if original.shape[2] == 4:
        delta = delta[original[..., 3] > 0]
    return float(delta.mean())


def test_matches_scikit_image_on_a_photo() -> None:
    img = np.ascontiguousarray(photo("coffee")[:96, :128])
    q = quantize(img, 8)
    assert mean_ciede2000(img, q.palette, q.indices) == pytest.approx(reference(img, q.palette, q.indices), rel=1e-4)


def test_transparent_pixels_do_not_count() -> None:
    img = np.dstack([photo("chelsea")[:64, :64], np.full((64, 64), 255, np.uint8)])
    img[:, :32, 3] = 0
    q = quantize(img, 8)
    got = mean_ciede2000(img, q.palette, q.indices)
    assert got == pytest.approx(reference(img, q.palette, q.indices), rel=1e-4)
    assert mean_ciede2000(np.zeros((4, 4, 4), np.uint8), np.zeros((1, 4), np.uint8), np.zeros((4, 4), np.uint8)) == 0.0
