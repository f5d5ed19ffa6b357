"""Shared test helpers: device parametrization and real photos bundled with dependencies."""

from __future__ import annotations

import functools

import numpy as np
import pytest

needs_cuda = pytest.mark.needs_cuda


def cpu_and_cuda() -> tuple:
    """Parametrize over CPU and, marked ``needs_cuda``, CUDA."""
    return ("cpu", pytest.param("cuda", marks=needs_cuda))


@functools.cache
def photo(name: str) -> np.ndarray:
    """A real photo bundled with scikit-learn or scikit-image, (H, W, 3) uint8, read-only."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        img = getattr(skimage.data, name)()
    img = np.ascontiguousarray(img[..., :3])
    img.flags.writeable = False
    return img
