"""Image quality metrics beyond PSNR: SSIM, blurred PSNR and mean CIEDE2000.

SSIM follows Wang et al. 2004 (Gaussian window sigma 1.5, K1 0.01, K2 0.03, data
range 255), as ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
sigma=1.5, use_sample_covariance=False)``: per channel, averaged over the channels,
borders cropped by the window radius. Blurred PSNR compares both images after a
Gaussian blur (sigma 1), which is roughly what the eye sees of dithering.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .spaces import ciede2000, srgb_to_lab

__all__ = ["blurred_psnr", "mean_ciede2000", "premultiplied", "psnr", "ssim"]


def _gaussian_kernel(sigma: float, truncate: float = 3.5) -> torch.Tensor:
    """1-D normalised Gaussian (2r+1,) float64, r = int(truncate * sigma + 0.5) (scipy's rule)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _filter(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Separable filter of (N, 1, H, W) float64; ``mode`` "reflect" keeps the size, "valid" crops."""
    r = kernel.shape[0] // 2
    if mode == "reflect" and r:
        x = torch.nn.functional.pad(x, (r, r, r, r), mode="reflect" if min(x.shape[-2:]) > r else "replicate")
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1))


def _planes(img: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(H, W[, C]) image -> (C, 1, H, W) float64."""
    t = torch.as_tensor(np.array(img, dtype=np.float64))
    if t.ndim == 2:
        t = t[..., None]
    return t.permute(2, 0, 1)[:, None]


def ssim(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, *, data_range: float = 255.0) -> float:
    """Mean structural similarity of two (H, W[, C]) images, averaged over channels.

    Gaussian window sigma 1.5 (radius 5); equals scikit-image's Gaussian-weighted SSIM
    with population covariance. Images smaller than 11x11 fall back to the whole image.
    """
    x, y = _planes(a), _planes(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    kernel = _gaussian_kernel(1.5)
    if min(x.shape[-2:]) < kernel.shape[0]:
        kernel = torch.ones(1, dtype=torch.float64)  # too small for the window: plain statistics per pixel
    mu_x, mu_y = _filter(x, kernel, "valid"), _filter(y, kernel, "valid")
    xx, yy, xy = (_filter(v, kernel, "valid") for v in (x * x, y * y, x * y))
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(s.mean())


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """PSNR in dB of two same-shape images on the 0..255 scale (infinite when equal)."""
    mse = float((_planes(a) - _planes(b)).square().mean())
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def blurred_psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, *, sigma: float = 1.0) -> float:
    """PSNR after a Gaussian blur (``sigma`` px, reflected borders) of both images."""
    kernel = _gaussian_kernel(sigma)
    diff = _filter(_planes(a), kernel, "reflect") - _filter(_planes(b), kernel, "reflect")
    mse = float(diff.square().mean())
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def premultiplied(rgba: np.ndarray) -> np.ndarray:
    """(…, 4) uint8 RGBA -> (…, 4) float64 with colour multiplied by alpha / 255 (alpha kept)."""
    c = np.asarray(rgba, np.float64)
    return np.concatenate([c[..., :3] * c[..., 3:] / 255.0, c[..., 3:]], -1)


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
