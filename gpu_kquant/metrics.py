"""Image quality metrics beyond PSNR: SSIM, blurred PSNR and mean CIEDE2000.

SSIM follows Wang et al. 2004 (Gaussian window sigma 1.5, K1 0.01, K2 0.03, data
range 255), as ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
sigma=1.5, use_sample_covariance=False)``: per channel, averaged over the channels,
borders cropped by the window radius. Blurred PSNR compares both images after a
Gaussian blur (sigma 1), which is roughly what the eye sees of dithering.

:func:`sampled_ssim` is the same SSIM evaluated only at window centres on a grid
(non-overlapping 11x11 windows, spaced so that at most ``max_windows`` are used):
cheap enough for every report row, on the quantize device (see its docstring).
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np
import torch

from .spaces import ciede2000, srgb_to_lab

_sums_c: Any
try:  # dithered_errors' integer sums for RGB in C (gpu_kquant/_metrics.c); torch stands in without it
    _sums_c = importlib.import_module("gpu_kquant._metrics")
except ImportError:  # pragma: no cover - exercised only where the extension did not build
    _sums_c = None

__all__ = [
    "binomial_blur",
    "blurred_psnr",
    "dithered_errors",
    "local_variance",
    "mean_ciede2000",
    "pixel_error",
    "premultiplied",
    "premultiplied_rgba",
    "psnr",
    "psnr_of_mse",
    "sampled_ssim",
    "sampled_ssim_tensor",
    "ssim",
    "ssim_grid",
    "ssim_window",
]


def _gaussian_kernel(sigma: float, truncate: float = 3.5) -> torch.Tensor:
    """1-D normalised Gaussian (2r+1,) float64, r = int(truncate * sigma + 0.5) (scipy's rule)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def ssim_gaussian() -> torch.Tensor:
    """SSIM's separable window: the 1-D Gaussian of sigma 1.5, (11,) float64, summing to 1."""
    return _gaussian_kernel(1.5)


def _filter(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Separable filter of (N, 1, H, W) float64; ``mode`` "reflect" keeps the size, "valid" crops."""
    r = kernel.shape[0] // 2
    if mode == "reflect" and r:
        x = torch.nn.functional.pad(x, (r, r, r, r), mode="reflect" if min(x.shape[-2:]) > r else "replicate")
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1))


def local_variance(points: torch.Tensor) -> torch.Tensor:
    """Each pixel's variance in SSIM's window (Gaussian sigma 1.5, reflected borders), averaged over channels.

    Args:
        points: (H, W, C) float32 or float64.

    Returns:
        (H, W) of the same dtype, >= 0.
    """
    x = points.permute(2, 0, 1)
    # C + 1 maps (the channels and the sum of their squares), blurred by shifted adds: 3x faster than
    # conv2d per map (0.14 s against 0.44 s per megapixel on one thread, measured on a loaded 2-core VM).
    blurred = _shifted_blur(torch.cat([x, (x * x).sum(0, keepdim=True)]), ssim_gaussian().to(x.dtype))
    return ((blurred[-1] - (blurred[:-1] ** 2).sum(0)) / x.shape[0]).clamp_min(0)


def _shifted_blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable filter of (N, H, W) with reflected borders (replicated where the image is too small)."""
    r = kernel.shape[0] // 2
    for dim in (2, 1):
        size = x.shape[dim]
        pad = (r, r, 0, 0) if dim == 2 else (0, 0, r, r)
        padded = torch.nn.functional.pad(x[None], pad, mode="reflect" if size > r else "replicate")[0]
        out = kernel[0] * padded.narrow(dim, 0, size)
        for i in range(1, 2 * r + 1):
            out += kernel[i] * padded.narrow(dim, i, size)
        x = out
    return x


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


# 4096 windows of 11x11 pixels: at most 0.5 MP (x channels) read, whatever the image size. On a
# 4-MP photo mosaic (benchmarks.images.image_of_size(4)) the sampled SSIM was within 0.002 of
# the full one at k = 16 and 256 (16384 windows: no closer, 6x the time); tests/test_metrics.py
# checks it against scikit-image on real photos.
MAX_WINDOWS = 4096
_WINDOW = 11  # the Gaussian window of sigma 1.5: radius int(3.5 * 1.5 + 0.5) = 5


def ssim_grid(height: int, width: int, max_windows: int = MAX_WINDOWS) -> int:
    """Grid step (>= 11 px) of :func:`sampled_ssim`'s window centres for an image of this size."""
    step = _WINDOW
    while ((height - _WINDOW) // step + 1) * ((width - _WINDOW) // step + 1) > max_windows:
        step += 1
    return step


def _grid_windows(img: torch.Tensor, step: int) -> torch.Tensor:
    """(H, W, C) -> (ny, nx, C, 11, 11) strided view: the windows whose corners lie on a grid of ``step``."""
    h, w, c = img.shape
    ny, nx = (h - _WINDOW) // step + 1, (w - _WINDOW) // step + 1
    s0, s1, s2 = img.stride()
    return img.as_strided((ny, nx, c, _WINDOW, _WINDOW), (step * s0, step * s1, s2, s0, s1), img.storage_offset())


def sampled_ssim(
    original: torch.Tensor, palette: torch.Tensor, indices: torch.Tensor, *, max_windows: int = MAX_WINDOWS
) -> float:
    """:func:`sampled_ssim_tensor` as a float."""
    return float(sampled_ssim_tensor(original, palette, indices, max_windows=max_windows))


def sampled_ssim_tensor(
    original: torch.Tensor,
    palette: torch.Tensor,
    indices: torch.Tensor,
    *,
    max_windows: int = MAX_WINDOWS,
    window: torch.Tensor | None = None,
) -> torch.Tensor:
    """SSIM of an image and its palette version ``palette[indices]``, at window centres on a grid.

    Each window's statistic is exactly :func:`ssim`'s (Gaussian sigma 1.5, 11x11,
    population covariance, averaged over channels), but only windows whose top-left
    corners lie on a grid of step :func:`ssim_grid` (>= 11, so they never overlap) are
    used, at most ``max_windows``: the cost is bounded whatever the image size, and the
    palette image is only built inside the windows. Equals the mean of scikit-image's
    full SSIM map at those centres. RGBA (either side) is compared premultiplied, alpha
    included, as the MSE is. Runs on the tensors' device, in float64. An image under
    11 px high or wide is one window, the whole image, uniformly weighted.

    Args:
        original: (H, W, C) uint8, C = 3 or 4.
        palette: (k, C') uint8; indices: (H, W) integer, on the same device.
        window: :func:`ssim_window` on the device, to upload it once for many images.

    Returns:
        0-d float64 on the device (no host sync when ``window`` is given).
    """
    h, w = indices.shape
    if original.shape[:2] != indices.shape:
        raise ValueError(f"image and indices differ in shape: {tuple(original.shape)} vs {tuple(indices.shape)}")
    rgba = original.shape[2] == 4 or palette.shape[1] == 4
    if min(h, w) < _WINDOW:  # one window: the whole image
        x, idx = original.permute(2, 0, 1).reshape(original.shape[2], -1), indices.reshape(-1)
        weight = torch.full((h * w,), 1.0 / (h * w), dtype=torch.float64, device=original.device)
    else:
        step = ssim_grid(h, w, max_windows)
        x = _grid_windows(original, step).permute(2, 0, 1, 3, 4).reshape(original.shape[2], -1)  # (C, n * 121)
        idx = _grid_windows(indices[..., None], step).reshape(-1)
        weight = ssim_window(original.device) if window is None else window
    # Both sides as (C, n * window) float64: the palette side is looked up from a float64 palette.
    x, y = (_window_values(v, rgba, weight.shape[0]) for v in (x.double(), palette.double().t()[:, idx.long()]))
    mu_x, mu_y = x @ weight, y @ weight
    var_x, var_y, cov = (x * x) @ weight - mu_x**2, (y * y) @ weight - mu_y**2, (x * y) @ weight - mu_x * mu_y
    c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean()


def ssim_window(device: torch.device) -> torch.Tensor:
    """Weights (121,) float64 of :func:`sampled_ssim`'s 11x11 Gaussian window, sums to 1, on ``device``."""
    g = _gaussian_kernel(1.5).to(device)
    return (g[:, None] * g[None, :]).reshape(-1)


def _window_values(v: torch.Tensor, rgba: bool, size: int) -> torch.Tensor:
    """(C, n * size) float64 -> (C' * n, size), premultiplied RGBA (C' = 4) when ``rgba``."""
    if rgba:
        if v.shape[0] == 3:
            v = torch.cat([v, torch.full_like(v[:1], 255.0)])
        v = torch.cat([v[:3] * v[3:] / 255.0, v[3:]])
    return v.reshape(-1, size)


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """PSNR in dB of two same-shape images on the 0..255 scale (infinite when equal)."""
    return psnr_of_mse(float((_planes(a) - _planes(b)).square().mean()))


def psnr_of_mse(mse: float) -> float:
    """PSNR in dB of a mean squared error on the 0..255 scale (infinite for 0)."""
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


# Pixels read by mean_ciede2000 (a regular grid of rows and columns on larger images). The exact
# mean of a 4-MP photo mosaic at k=16 in --space lab took 7.5-9.2 s, as long as the whole
# quantization (2-core EPYC, shared); sampled it takes under 2% of that, within 0.5% of the exact
# mean (tests/test_metrics.py checks 1% against scikit-image on a whole photo).
CIEDE_PIXELS = 1 << 16


def mean_ciede2000(
    original: np.ndarray, palette: np.ndarray, indices: np.ndarray, *, max_pixels: int | None = CIEDE_PIXELS
) -> float:
    """Mean CIEDE2000 between an image and its palette version, over visible pixels.

    Args:
        original: (H, W, C) uint8 RGB or RGBA.
        palette: (k, C') uint8; indices: (H, W) palette indices.
        max_pixels: above this many pixels, only every s-th row and column is read (s the
            smallest step that fits), an estimate of the mean; None reads every pixel.

    Each distinct (colour, entry) pair is evaluated once and weighted by its pixel
    count, so the cost follows the number of distinct pairs, not of pixels.
    """
    h, w = indices.shape
    step = 1
    while max_pixels is not None and -(-h // step) * -(-w // step) > max_pixels:
        step += 1
    original, indices = original[::step, ::step], indices[::step, ::step]
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


def premultiplied_rgba(colors: torch.Tensor) -> torch.Tensor:
    """(..., 3 or 4) uint8 colours as (..., 4) float64 premultiplied RGBA, opaque when RGB (the error space)."""
    c = colors.double()
    if c.shape[-1] == 3:
        c = torch.nn.functional.pad(c, (0, 1), value=255.0)
    return torch.cat([c[..., :3] * c[..., 3:] / 255.0, c[..., 3:]], dim=-1)


def pixel_error(src: torch.Tensor, dst: torch.Tensor, channels: int) -> torch.Tensor:
    """Squared error summed over channels (...,), premultiplied when RGBA is involved."""
    if src.shape[-1] == 3 and dst.shape[-1] == 3:  # exact in int32; channel by channel is 4x faster than sum(-1)
        d = src.int() - dst.int()
        d = d * d
        return (d[..., 0] + d[..., 1] + d[..., 2]).double()
    return (premultiplied_rgba(src) - premultiplied_rgba(dst)).square().sum(-1)


def binomial_blur(img: torch.Tensor) -> torch.Tensor:
    """3x3 binomial blur of (H, W, C) floats, edges replicated; same dtype.

    Two [1, 2, 1] passes of shifted adds, then / 16 (the same floats as / 4 after each pass: scaling
    by a power of two is exact): a float64 conv2d has no fast CPU kernel and took 29 ms per call on
    a 0.27 MP image (a sixth of an adaptive quantize).
    """
    return _binomial_sums(img) / 16


def _binomial_sums(x: torch.Tensor) -> torch.Tensor:
    """16x :func:`binomial_blur` of (H, W, C) numbers, edges replicated; exact for integers."""
    x = torch.cat([x[:1], x, x[-1:]], 0)
    x = x[:-2] + 2 * x[1:-1] + x[2:]
    x = torch.cat([x[:, :1], x, x[:, -1:]], 1)
    return x[:, :-2] + 2 * x[:, 1:-1] + x[:, 2:]


def dithered_errors(src: torch.Tensor, dst: torch.Tensor) -> tuple[float, float]:
    """Per-channel MSE of two (H, W, C) uint8 images, and the same after :func:`binomial_blur` of both.

    The error is :func:`pixel_error`'s (premultiplied RGBA when either side has alpha), divided by
    ``src``'s channels. RGB sums run in integers (16x the blurred difference is an integer), exact as
    the float64 sums they replaced: 54 ms per MP in torch (97 in float64), 8 ms in C where
    ``gpu_kquant._metrics`` built (one thread, 2026-12-03).
    """
    c = src.shape[-1]
    rgb = c == 3 and dst.shape[-1] == 3
    if rgb and _sums_c is not None and src.device.type == "cpu" and src.dtype == dst.dtype == torch.uint8:
        n = src.numel()
        squares, blurred = _sums_c.rgb_error_sums(src.contiguous().numpy(), dst.contiguous().numpy(), *src.shape[:2])
        return squares / n, blurred / (256 * n)  # the C kernel's sums are the torch code's, exactly
    if rgb:
        d = src.int() - dst.int()
        b = _binomial_sums(d)
        n = d.numel()
        return int((d * d).sum(dtype=torch.int64)) / n, int((b * b).sum(dtype=torch.int64)) / (256 * n)
    diff = premultiplied_rgba(src) - premultiplied_rgba(dst)
    mse = float(diff.square().sum(-1).mean()) / c
    return mse, float(binomial_blur(diff).square().mean()) * diff.shape[-1] / c
