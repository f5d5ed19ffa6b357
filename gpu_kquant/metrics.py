"""Image quality metrics beyond PSNR."""

from __future__ import annotations

import numpy as np
import torch

from .spaces import ciede2000, srgb_to_lab

__all__ = ["mean_ciede2000"]


def mean_ciede2000(original: np.ndarray, palette: np.ndarray, indices: np.ndarray) -> float:
    """Mean CIEDE2000 between an image and its palette version, over visible pixels.

    Args:
        original: (H, W, C) uint8 RGB or RGBA.
        palette: (k, C') uint8; indices: (H, W) palette indices.

    Each distinct (colour, entry) pair is evaluated once and weighted by its pixel
    count, so the cost follows the number of distinct pairs, not of pixels.
    """
    px = torch.from_numpy(np.array(original, copy=True)).reshape(-1, original.shape[2])
    idx = torch.from_numpy(np.array(indices, copy=True)).reshape(-1).long()
    if px.shape[1] == 4:
        visible = px[:, 3] > 0
        px, idx = px[visible], idx[visible]
    if px.shape[0] == 0:
        return 0.0
    rgb = px[:, :3].long()
    pair = (rgb[:, 0] | (rgb[:, 1] << 8) | (rgb[:, 2] << 16)) | (idx << 24)
    uniq, counts = torch.unique(pair, return_counts=True)
    colour = torch.stack([(uniq >> s) & 255 for s in (0, 8, 16)], 1).double() / 255
    entry = torch.from_numpy(np.ascontiguousarray(palette[:, :3])).double()[(uniq >> 24).long()] / 255
    delta = ciede2000(srgb_to_lab(colour), srgb_to_lab(entry))
    return float((delta * counts).sum() / counts.sum())
