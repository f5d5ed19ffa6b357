"""CPU per-image kernels: the compiled C extension ``gpu_kquant._imagekernels``.

Colour sets, histogram bins, the pixel -> palette lookup and the exact RGB error, with
the same results as the torch code in :mod:`gpu_kquant.colors` and
:mod:`gpu_kquant.quantize` (the reference, used where this extension did not build or
``GPU_KQUANT_KERNELS=torch``). Inputs are CPU tensors; the GIL is released while a
kernel runs, on one thread.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

try:  # built at install time; the torch code stands in without it
    _imagekernels: Any = importlib.import_module("gpu_kquant._imagekernels")
except ImportError:  # pragma: no cover - exercised only where the extension did not build
    _imagekernels = None

__all__ = ["AVAILABLE", "bin_colors", "color_set", "lookup", "rgb_error"]

AVAILABLE = _imagekernels is not None


def _flat_pixels(pixels: torch.Tensor) -> torch.Tensor:
    if pixels.dtype != torch.uint8 or pixels.ndim < 1 or pixels.shape[-1] not in (3, 4):
        raise ValueError(f"expected uint8 pixels (..., 3) or (..., 4), got {pixels.dtype} {tuple(pixels.shape)}")
    return pixels.reshape(-1, pixels.shape[-1]).contiguous()


def color_set(pixels: torch.Tensor, buckets: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct colours of uint8 pixels (..., C) with counts, as :func:`gpu_kquant.colors.color_set`.

    Args:
        pixels: (..., C) uint8, C = 3 or 4.
        buckets: for RGB, count bucket by bucket of the blue byte (faster for large
            images); otherwise (and always for RGBA) radix sort all the keys.

    Returns:
        keys (M,) int32 ascending, counts (M,) int64 and colours (M, C) uint8.
    """
    flat = _flat_pixels(pixels)
    n, c = flat.shape
    keys = torch.empty(n, dtype=torch.int32)
    counts = torch.empty(n, dtype=torch.int64)
    colors = torch.empty((n, c), dtype=torch.uint8)
    m = _imagekernels.color_set(flat.numpy(), keys.numpy(), counts.numpy(), colors.numpy(), n, c, buckets)
    return keys[:m], counts[:m], colors[:m]


def lookup(pixels: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor | None) -> torch.Tensor:
    """Per-pixel value of each pixel's colour, as :func:`gpu_kquant.colors.lookup`.

    Args:
        pixels: (..., C) uint8; every pixel's colour must be among ``keys``.
        keys: (M,) int32 ascending packed colours (a colour set's keys).
        values: (M,) uint8, int16 or int32.
        table: for RGB only, a (2**24,) table of the dtype of ``values``, any content
            (overwritten where read); ``None`` (always for RGBA) searches the sorted keys.

    Returns:
        A tensor shaped ``pixels.shape[:-1]`` with the dtype of ``values``.
    """
    flat = _flat_pixels(pixels)
    n, c = flat.shape
    vals = values.contiguous()
    out = torch.empty(n, dtype=vals.dtype)
    _imagekernels.lookup(
        flat.numpy(), keys.contiguous().numpy(), vals.numpy(), None if table is None else table.numpy(), out.numpy(),
        n, keys.shape[0], c, vals.element_size(),
    )  # fmt: skip
    return out.reshape(pixels.shape[:-1])


def bin_colors(
    colors: torch.Tensor, counts: torch.Tensor, points: torch.Tensor, bits: int, scales: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted colours merged into bins, as :func:`gpu_kquant.colors.bin_colors`.

    ``scales`` are the fixed-point scales of (points x counts, counts) from
    :func:`gpu_kquant.reduce.fixed_point_scales`; the means are those of
    :class:`gpu_kquant.reduce.FixedPointSums` bit for bit.
    """
    m, c = colors.shape
    d = points.shape[1]
    inverse = torch.empty(m, dtype=torch.int64)
    means = torch.empty((m, d), dtype=torch.float32)
    bin_counts = torch.empty(m, dtype=torch.int64)
    corners = torch.empty((m, c), dtype=torch.uint8)
    q = _imagekernels.bin_colors(
        colors.contiguous().numpy(), counts.contiguous().numpy(), points.float().contiguous().numpy(),
        inverse.numpy(), means.numpy(), bin_counts.numpy(), corners.numpy(), m, c, d, bits, scales[0], scales[1],
    )  # fmt: skip
    return means[:q], bin_counts[:q], inverse, corners[:q]


def rgb_error(
    colors: torch.Tensor, counts: torch.Tensor, labels: torch.Tensor, palette: torch.Tensor
) -> tuple[int, torch.Tensor]:
    """Exact total squared error of RGB colours against their entries, and each entry's pixel count.

    Args:
        colors: (M, 3) uint8; counts: (M,) int64; labels: (M,) int64 entries of
            ``palette`` (P, 3) uint8.

    Returns:
        sum over colours of count x squared error (summed over channels), and usage (P,) int64.
    """
    usage = torch.zeros(palette.shape[0], dtype=torch.int64)
    total = _imagekernels.rgb_error(
        colors.contiguous().numpy(), counts.contiguous().numpy(), labels.long().contiguous().numpy(),
        palette.contiguous().numpy(), usage.numpy(), colors.shape[0], palette.shape[0],
    )  # fmt: skip
    return int(total), usage
