"""The control layer's one door into :mod:`gpu_kquant.quantize`: fit options in, results out.

Every call from the pipeline to the quantizer goes through these functions, built from
a whole :class:`~gpu_kquant.options.FitOptions`: ``quantize_batch`` takes it whole
(``options=``); ``Palette.fit`` still takes its fields as keywords.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .options import FitOptions
from .palette import ColorHistogram, Palette
from .quantize import Quantized, map_to_palette, quantize_batch

__all__ = ["fit_shared_palette", "map_images", "quantize_images", "reach_quality"]


def quantize_images(
    images: Sequence[np.ndarray | torch.Tensor], fit: FitOptions, *, dither: str, device: torch.device
) -> list[Quantized]:
    """One batched quantization of (H, W, 3|4) uint8 images (arrays or tensors), dithering included, on ``device``."""
    return quantize_batch(images, dither=dither, device=device, options=fit)


def map_images(
    images: Sequence[np.ndarray | torch.Tensor], palette: Palette, *, dither: str, device: torch.device
) -> list[Quantized]:
    """Map (H, W, 3|4) uint8 images to a fixed palette (in the palette's own space), dithering included."""
    return map_to_palette(images, palette.colors, space=palette.space, dither=dither, device=device)


def fit_shared_palette(hist: ColorHistogram, fit: FitOptions, device: torch.device) -> Palette:
    """One palette of at most ``fit.k`` colours for a whole colour histogram."""
    return Palette.fit(hist, fit.k, device=device, options=fit)


def reach_quality(
    pixels: np.ndarray | torch.Tensor, fit: FitOptions, target: float, *, dither: str, device: torch.device
) -> Quantized:
    """The result at the smallest k up to ``fit.k`` whose PSNR reaches ``target`` dB.

    PSNR grows with k, so a binary search needs about log2(k) quantizations; when even
    k colours fall short of the target, the k-colour result is returned as is.
    """
    best = quantize_images([pixels], fit, dither=dither, device=device)[0]
    if best.psnr < target:
        return best
    lo, hi = 2, best.n_colors
    while lo < hi:
        mid = (lo + hi) // 2
        q = quantize_images([pixels], fit.with_k(mid), dither=dither, device=device)[0]
        if q.psnr >= target:
            hi, best = mid, q
        else:
            lo = mid + 1
    return best
