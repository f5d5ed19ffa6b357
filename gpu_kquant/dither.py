"""Dithering onto a fixed palette: Floyd-Steinberg (plain or adaptive) on the CPU, ordered (Bayer) on the device.

Adaptive dithering is Floyd-Steinberg whose diffused error is scaled per pixel by a
strength map (:func:`dither_strength`): full in flat and smooth areas, where an
undithered palette bands, and none on edges and texture, where the quantization error
already hides in detail and dithering would only add visible noise (as pngquant does).

Both work in the fitting colour space and respect the alpha rules of the quantizer:
fully transparent pixels take the transparent entry and neither take nor pass on
error, opaque pixels only use opaque entries.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import numpy as np
import torch

from .spaces import ColorSpace

__all__ = [
    "DITHERS",
    "bayer_offsets",
    "channel_bounds",
    "dither_strength",
    "floyd_steinberg",
    "palette_spacing",
    "pixel_classes",
]

DITHERS = ("none", "fs", "adaptive", "ordered")

_fs_dither_c: Callable[..., None] | None
try:  # the C kernel, built at install time; a slow pure-Python path stands in without it
    from ._fsdither import fs_dither as _fs_dither_c
except ImportError:  # pragma: no cover - exercised only where the extension did not build
    _fs_dither_c = None

# Bit flags of palette entries (must match _fsdither.c).
FOR_OPAQUE, FOR_TRANSLUCENT, FOR_TRANSPARENT = 1, 2, 4


def pixel_classes(alpha: np.ndarray | torch.Tensor | None, shape: tuple[int, ...]) -> np.ndarray:
    """Per-pixel class (H, W) uint8: 0 fully transparent, 1 opaque, 2 translucent."""
    if alpha is None:
        return np.ones(shape, np.uint8)
    a = np.asarray(alpha.cpu() if isinstance(alpha, torch.Tensor) else alpha)
    return np.where(a == 0, 0, np.where(a == 255, 1, 2)).astype(np.uint8)


def entry_flags(palette: np.ndarray) -> np.ndarray:
    """Which pixel classes may use each palette entry (P,) uint8, as in the quantizer.

    Opaque pixels use opaque entries (any entry if there are none), translucent pixels
    any visible entry, and fully transparent pixels the most transparent entry.
    """
    alpha = palette[:, 3] if palette.shape[1] == 4 else np.full(palette.shape[0], 255, np.uint8)
    flags = np.zeros(palette.shape[0], np.uint8)
    opaque = alpha == 255
    flags[opaque if opaque.any() else np.ones_like(opaque)] |= FOR_OPAQUE
    visible = alpha > 0
    flags[visible if visible.any() else np.ones_like(visible)] |= FOR_TRANSLUCENT
    flags[int(np.argmin(alpha))] |= FOR_TRANSPARENT
    return flags


def palette_spacing(pal_points: torch.Tensor) -> float:
    """Median distance from each palette entry to its nearest neighbour (a typical step)."""
    if pal_points.shape[0] < 2:
        return 1.0
    d = torch.cdist(pal_points.double(), pal_points.double())
    d.fill_diagonal_(float("inf"))
    return max(float(d.amin(1).median()), 1e-6)


@functools.cache
def _gamut(space_name: str) -> np.ndarray:
    grid = torch.linspace(0, 255, 18).round().to(torch.uint8)
    rgb = torch.stack(torch.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3)
    pts = ColorSpace(space_name).points(rgb).numpy()
    return np.stack([pts.min(0), pts.max(0)], 1)


def channel_bounds(space: ColorSpace, dims: int) -> np.ndarray:
    """Per-channel clamp range (dims, 2) float32: the sRGB gamut in ``space`` widened by 10%."""
    gamut = _gamut(space.name)
    if dims == 4:
        gamut = np.concatenate([np.minimum(gamut, 0.0), [[0.0, 255.0 * space.alpha_scale]]])
    margin = 0.1 * (gamut[:, 1:] - gamut[:, :1])
    return np.concatenate([gamut[:, :1] - margin, gamut[:, 1:] + margin], 1).astype(np.float32)


# Adaptive strength map (tuned on the bundled photos at k = 16 and 64 against pngquant's
# default dithering; see benchmarks/quality.py):
# - a pixel whose second difference (any channel, horizontal or vertical) reaches EDGE_STEPS
#   palette steps, or EDGE_RANGE of the first channel's range (a hard edge whatever the
#   palette), is an edge or texture and is not dithered, nor are its 8 neighbours (3x3 erosion);
# - below that, strength rises linearly from FLOOR to 1 as the contrast falls to 0: on
#   coffee and chelsea at k=16, FLOOR 0.3 gains 0.13 dB of blurred PSNR for 0.006 SSIM;
# - runs of one entry in the undithered remap weigh in like pngquant's dither map:
#   1 - 20 / (20 + 10 * run length + 15 * agreeing pixels above and below);
# - a diffused error shorter than MIN_ERROR_RANGE of the channel range (1.3 sRGB levels,
#   like pngquant's threshold) is dropped: no isolated dots for invisible error.
EDGE_STEPS = 2.0
MIN_ERROR_RANGE = 0.005
EDGE_RANGE = 0.2
FLOOR = 0.3


def floyd_steinberg(image: np.ndarray, palette: np.ndarray, space: ColorSpace, *, adaptive: bool = False) -> np.ndarray:
    """Serpentine Floyd-Steinberg dithering with pngquant-style error clamping.

    The target colour (pixel plus diffused error) is clamped to the colour space's
    channel range widened by 10% (pngquant allows -0.1..1.1), and a quantization error longer than twice the palette's
    typical spacing is damped by 0.75, so saturated areas do not streak and flat areas
    do not fill with noise. With ``adaptive`` the diffused error is scaled by
    :func:`dither_strength` of the undithered remap.

    Args:
        image: (H, W, C) uint8, C = 3 or 4.
        palette: (P, C') uint8, C' = 3 or 4.
        space: the colour space the error is diffused in.

    Returns:
        (H, W) int32 palette indices.
    """
    h, w, c = image.shape
    rgba = c == 4 or palette.shape[1] == 4
    pixels = torch.from_numpy(np.ascontiguousarray(image)).reshape(-1, c)
    pal = torch.from_numpy(np.ascontiguousarray(palette))
    if rgba:
        pixels = torch.nn.functional.pad(pixels, (0, 4 - c), value=255)
        pal = torch.nn.functional.pad(pal, (0, 4 - pal.shape[1]), value=255)
    points = space.points(pixels).numpy()
    pal_points = space.points(pal)
    spacing = palette_spacing(pal_points)
    classes = pixel_classes(image[..., 3] if c == 4 else None, (h, w))
    fixed = (points, classes, pal_points.numpy(), entry_flags(palette), channel_bounds(space, points.shape[1]))
    if not adaptive:
        return _diffuse(*fixed, None, 2.0 * spacing, 0.0)
    plain = _diffuse(*fixed, np.zeros((h, w), np.float32), 2.0 * spacing, 0.0)
    span = float(np.ptp(fixed[4][0])) / 1.2  # the first channel's range (bounds are widened by 10% each side)
    strength = dither_strength(points.reshape(h, w, -1), plain, min(EDGE_STEPS * spacing, EDGE_RANGE * span))
    return _diffuse(*fixed, strength, 2.0 * spacing, MIN_ERROR_RANGE * span)


def _diffuse(
    points: np.ndarray,
    classes: np.ndarray,
    pal_points: np.ndarray,
    flags: np.ndarray,
    bounds: np.ndarray,
    strength: np.ndarray | None,
    max_error: float,
    min_error: float,
) -> np.ndarray:
    """Run the C kernel (or its Python stand-in); (H, W) int32 indices."""
    h, w = classes.shape
    out = np.empty((h, w), np.int32)
    args = (points, classes, pal_points, flags, bounds, out, strength)
    if _fs_dither_c is not None:
        _fs_dither_c(*args, h, w, points.shape[1], pal_points.shape[0], max_error, min_error)
    else:  # pragma: no cover
        warnings.warn("the compiled dithering kernel is missing; using the slow Python path", stacklevel=3)
        _fs_dither_python(*args, max_error, min_error)
    return out


def dither_strength(points: np.ndarray, plain: np.ndarray, edge: float) -> np.ndarray:
    """Per-pixel dithering strength (H, W) float32 in [0, 1] for adaptive dithering.

    Args:
        points: (H, W, D) float32 pixels in the fitting space.
        plain: (H, W) int32 undithered palette indices.
        edge: a second difference this large (in the space's units) is an edge.
    """
    x = torch.from_numpy(points).permute(2, 0, 1)[None]  # (1, D, H, W)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    d2x = (padded[..., 1:-1, :-2] + padded[..., 1:-1, 2:] - 2 * x).abs().amax(1)
    d2y = (padded[..., :-2, 1:-1] + padded[..., 2:, 1:-1] - 2 * x).abs().amax(1)
    smooth = (1.0 - torch.maximum(d2x, d2y) / edge).clamp(0.0, 1.0)
    eroded = -torch.nn.functional.max_pool2d(-smooth[None], 3, stride=1, padding=1)[0, 0].numpy()  # 3x3 erosion
    strength: np.ndarray = np.where(eroded > 0, FLOOR + (1 - FLOOR) * eroded, 0.0) * _run_weight(plain)
    return strength.astype(np.float32)


def _run_weight(plain: np.ndarray) -> np.ndarray:
    """pngquant's run term (H, W) float32: long runs of one index (banding) dither more."""
    h, w = plain.shape
    starts = np.ones((h, w), bool)
    starts[:, 1:] = plain[:, 1:] != plain[:, :-1]
    run = np.cumsum(starts.reshape(-1)).reshape(h, w) - 1  # run id of every pixel, row-major
    score = 10.0 * np.bincount(run.reshape(-1), minlength=int(run.max()) + 1)
    agree = np.zeros((h, w), np.float64)
    agree[1:] += plain[:-1] == plain[1:]
    agree[:-1] += plain[1:] == plain[:-1]
    score += 15.0 * np.bincount(run.reshape(-1), weights=agree.reshape(-1), minlength=score.shape[0])
    weight: np.ndarray = (1.0 - 20.0 / (20.0 + score))[run].astype(np.float32)
    return weight


def _fs_dither_python(
    points: np.ndarray,
    classes: np.ndarray,
    pal_points: np.ndarray,
    flags: np.ndarray,
    bounds: np.ndarray,
    out: np.ndarray,
    strength: np.ndarray | None,
    max_error: float,
    min_error: float,
) -> None:
    """Reference implementation of ``_fsdither.fs_dither`` (brute-force nearest)."""
    h, w = classes.shape
    dims = points.shape[1]
    image = points.reshape(h, w, dims).astype(np.float32)
    pal = pal_points.astype(np.float32)
    cur, nxt = np.zeros((w + 2, dims), np.float32), np.zeros((w + 2, dims), np.float32)
    transparent = int(np.flatnonzero(flags & FOR_TRANSPARENT)[0])
    allowed = {1: np.flatnonzero(flags & FOR_OPAQUE), 2: np.flatnonzero(flags & FOR_TRANSLUCENT)}
    weights = [np.float32(n / 16) for n in (7, 3, 5, 1)]
    min_error2 = np.float32(min_error) * np.float32(min_error)
    for y in range(h):
        step = 1 if y % 2 == 0 else -1
        for i in range(w):
            x = i if step == 1 else w - 1 - i
            if classes[y, x] == 0:
                out[y, x] = transparent
                continue
            spread = cur[x + 1] * (np.float32(1.0) if strength is None else strength[y, x])
            keep = _sum_squares(spread) >= min_error2
            target = np.clip(image[y, x] + spread if keep else image[y, x], bounds[:, 0], bounds[:, 1])
            cand = allowed[int(classes[y, x])]
            diff = pal[cand] - target
            j = int(cand[np.argmin((diff * diff).sum(1, dtype=np.float32))])
            out[y, x] = j
            err = target - pal[j]
            if _sum_squares(err) > np.float32(max_error) * np.float32(max_error):
                err = err * np.float32(0.75)
            cur[x + 1 + step] += err * weights[0]
            nxt[x + 1 - step] += err * weights[1]
            nxt[x + 1] += err * weights[2]
            nxt[x + 1 + step] += err * weights[3]
        cur, nxt = nxt, np.zeros_like(nxt)


def _sum_squares(v: np.ndarray) -> np.float32:
    """Sum of squares accumulated in float32 left to right, as the C kernel does."""
    total: np.float32 = np.float32(0.0)
    for t in v:
        total = np.float32(total + t * t)
    return total


_BAYER8 = np.array(
    [
        [0, 32, 8, 40, 2, 34, 10, 42],
        [48, 16, 56, 24, 50, 18, 58, 26],
        [12, 44, 4, 36, 14, 46, 6, 38],
        [60, 28, 52, 20, 62, 30, 54, 22],
        [3, 35, 11, 43, 1, 33, 9, 41],
        [51, 19, 59, 27, 49, 17, 57, 25],
        [15, 47, 7, 39, 13, 45, 5, 37],
        [63, 31, 55, 23, 61, 29, 53, 21],
    ]
)


def bayer_offsets(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Ordered-dither thresholds (H, W) float32 in (-0.5, 0.5), an 8x8 Bayer matrix tiled."""
    m = torch.as_tensor((_BAYER8 + 0.5) / 64.0 - 0.5, dtype=torch.float32, device=device)
    return m.repeat((height + 7) // 8, (width + 7) // 8)[:height, :width]
