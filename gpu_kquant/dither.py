"""Dithering onto a fixed palette: Floyd-Steinberg (plain or adaptive) on the CPU, ordered (Bayer) on the device.

Adaptive dithering is Floyd-Steinberg with two per-pixel maps (:func:`hysteresis_map`,
:func:`hard_edges`): in noisy areas a pixel keeps its own nearest entry until the diffused
error is large (hysteresis; the whole error is still passed on, so the local mean is kept),
which places fewer, later dots where the photo's own noise already hides banding; in
noise-free gradients it is plain Floyd-Steinberg; and next to hard edges it does not
dither at all, as pngquant does. The diffused result is then refined under an eye model
(:func:`gpu_kquant.refine.refine`, hard-edge pixels locked): each pixel moves to a neighbouring
entry when that lowers the blurred error plus a weight on its own error: higher where the image
is noisy, divided by pngquant's run gate (:func:`run_gate`) and scaled by what error costs SSIM
there (:func:`ssim_weight`: more in smooth areas, less in texture).

Both work in the fitting colour space and respect the alpha rules of the quantizer:
fully transparent pixels take the transparent entry and neither take nor pass on
error, opaque pixels only use opaque entries.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .metrics import local_variance, ssim_gaussian
from .nearest import assign
from .refine import LAMBDA, refine
from .spaces import ColorSpace

__all__ = [
    "DITHERS",
    "bayer_offsets",
    "channel_bounds",
    "floyd_steinberg",
    "hard_edges",
    "hysteresis_map",
    "palette_spacing",
    "pixel_classes",
    "run_gate",
    "ssim_weight",
]

DITHERS = ("none", "fs", "adaptive", "ordered")

_fs_dither_c: Callable[..., None] | None
try:  # the C kernel, built at install time; a slow pure-Python path stands in without it
    from ._fsdither import fs_dither as _fs_dither_c
except ImportError:  # pragma: no cover - exercised only where the extension did not build
    _fs_dither_c = None

_maps_c: Any
try:  # the maps of adaptive dithering in C (noise ramp, local variance); torch stands in without it
    _maps_c = importlib.import_module("gpu_kquant._dithermaps")
except ImportError:  # pragma: no cover - exercised only where the extension did not build
    _maps_c = None

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
    """Per-channel clamp range (dims, 2) float32: the sRGB gamut in ``space`` widened by 10%.

    With alpha (``dims`` 4) the colour channels are premultiplied, so their range also reaches 0.
    """
    gamut = _gamut(space.name)
    if dims == 4:
        premultiplied = np.stack([np.minimum(gamut[:, 0], 0.0), np.maximum(gamut[:, 1], 0.0)], 1)
        gamut = np.concatenate([premultiplied, [[0.0, 255.0 * space.alpha_scale]]])
    margin = 0.1 * (gamut[:, 1:] - gamut[:, :1])
    return np.concatenate([gamut[:, :1] - margin, gamut[:, 1:] + margin], 1).astype(np.float32)


# Adaptive dithering (issue 15), tuned on the bundled photos at k = 16 and 64 against pngquant's
# default dithering (benchmarks/results/dither_perimage_intel-xeon_2c_nogpu_2026-12-02.md):
# - HYSTERESIS h where the photo is noisy: the entry is chosen for the pixel plus 1 / (1 + h) of
#   the diffused error, and the whole error target - entry is passed on. Dots start later and
#   stray less (higher SSIM) while the local mean is kept (blurred PSNR). h 1.375 meets all three
#   targets on 6/10 cases (h 1.25: also 6/10 but with SSIM margins of +0.000; the previous
#   strength map 2/10).
# - h scales with the local noise, the mean |second difference| over a (2 NOISE_RADIUS + 1)^2 box,
#   from 0 at NOISE_LOW to h at NOISE_HIGH levels (1/255 of the first channel's range). In a
#   noise-free gradient (a ramp of 1 level a row rounds to <= 0.3) hysteresis would hold back up
#   to (1 + h) / 2 palette steps of error before the first dot, i.e. band for several rows; in a
#   photo the image's own noise hides that delay. (Gating on the age of the last dot instead passed the
#   gradient test only for 8-9 px and banded 4x as many rows as plain FS on other ramps.)
# - a hard edge, a step of EDGE_RANGE of the first channel's range between two flat runs (the
#   steps next to it at most EDGE_FLAT of it), and its 8 neighbours are not dithered. Blurred
#   photo edges and texture keep their dithering: cutting every pixel next to a second
#   difference of 0.2 of the range (9-47% of photo pixels) cost up to 1 dB of blurred PSNR
#   and 4 of the 6 cases.
# - a diffused error shorter than MIN_ERROR_RANGE of the range (1.3 sRGB levels, like pngquant's
#   threshold) is dropped: no isolated dots for invisible error.
HYSTERESIS = 1.375  # for given palettes; fitted ones are spread and use ditherpalette.FITTED_HYSTERESIS
NOISE_LOW, NOISE_HIGH, NOISE_RADIUS = 0.3, 0.8, 4
EDGE_RANGE, EDGE_FLAT = 0.2, 0.25
MIN_ERROR_RANGE = 0.005
# The refinement's weight of each pixel's own error (gpu_kquant.refine) where the image is noise-free
# (refine.LAMBDA where it is noisy, the noise ramp between). A uniform error under refine.dead_zone of
# a palette step gets no dots: with the squared penalty at lam 0.3 everywhere, 15% of a step, so a
# clean ramp left rows within 9 levels of a grey undithered (test_dither's gradient; 0.1 still left
# one row of a dotted lattice single-coloured, 0.05 passes). Photos barely change (china at k = 64,
# the squared penalty: SSIM +0.0002 with 0.1, -0.00003 with 0.05; benchmarks/results/dither_refine_*).
LAMBDA_FLAT = 0.05


def floyd_steinberg(
    image: np.ndarray, palette: np.ndarray, space: ColorSpace, *, adaptive: bool = False, hysteresis: float = HYSTERESIS
) -> np.ndarray:
    """Serpentine Floyd-Steinberg dithering with pngquant-style error clamping.

    The target colour (pixel plus diffused error) is clamped to the colour space's
    channel range widened by 10% (pngquant allows -0.1..1.1), and a quantization error longer than twice the palette's
    typical spacing is damped by 0.75, so saturated areas do not streak and flat areas
    do not fill with noise. With ``adaptive`` the entry is chosen with hysteresis
    (:func:`hysteresis_map`) and pixels next to :func:`hard_edges` are not dithered.

    Args:
        image: (H, W, C) uint8, C = 3 or 4.
        palette: (P, C') uint8, C' = 3 or 4.
        space: the colour space the error is diffused in.
        hysteresis: the adaptive hysteresis in noisy areas (:func:`hysteresis_map`).

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
        return _diffuse(*fixed, None, None, 2.0 * spacing, 0.0)
    span = float(np.ptp(fixed[4][0])) / 1.2  # the first channel's range (bounds are widened by 10% each side)
    grid = points.reshape(h, w, -1)
    gate = run_gate(assign(torch.from_numpy(points)[None], pal_points[None])[0][0].reshape(h, w).numpy())
    strength = np.where(hard_edges(grid, EDGE_RANGE * span), 0.0, gate).astype(np.float32)
    ramp = noise_ramp(grid, span / 255.0)
    labels = _diffuse(*fixed, strength, hysteresis * ramp, 2.0 * spacing, MIN_ERROR_RANGE * span)
    lam = (LAMBDA_FLAT + (LAMBDA - LAMBDA_FLAT) * ramp * ssim_weight(grid, classes, span)) / gate
    return refine(grid, classes, fixed[2], fixed[3], labels, locked=strength == 0, lam=lam, span=span)


def run_gate(labels: np.ndarray) -> np.ndarray:
    """How much to dither each pixel (H, W) float32 in [1/3, 1), from its undithered labels (H, W).

    After pngquant's dither map (libimagequant's update_dither_map): a pixel in a horizontal run
    of n equal labels, m of whose pixels have the same label above or below, gets
    1 - 20 / (20 + 10 n + 15 m): long flat runs, where banding shows, are dithered fully; pixels
    whose undithered labels already vary (texture) little. Adaptive dithering scales the diffused
    error by it and divides the refinement's weight on each pixel's own error by it: SSIM rose on all
    40 cases of benchmarks/dither_gate.py and blurred PSNR fell (0.03-0.68 dB). Issue 15's targets:
    22/40 met with or without it (22 seen cases 18 vs 17, 12 fresh 3 vs 3, 6 unseen 1 vs 2).
    """
    h, w = labels.shape
    if _maps_c is not None:  # the same numbers, 0.03 -> 0.003 s per MP
        out = np.empty((h, w), np.float32)
        _maps_c.run_gate(np.ascontiguousarray(labels, np.int64), out, h, w)
        return out
    starts = np.ones((h, w), bool)
    starts[:, 1:] = labels[:, 1:] != labels[:, :-1]
    run = np.cumsum(starts.reshape(-1)) - 1  # every pixel's run, row by row
    same = np.zeros((h, w), np.int64)
    same[1:] += labels[1:] == labels[:-1]
    same[:-1] += labels[:-1] == labels[1:]
    count = 10 * np.bincount(run) + 15 * np.bincount(run, weights=same.reshape(-1))
    gate: np.ndarray = (1.0 - 20.0 / (20.0 + count))[run].reshape(h, w).astype(np.float32)
    return gate


def ssim_weight(points: np.ndarray, classes: np.ndarray, span: float) -> np.ndarray:
    """How much SSIM each pixel's own error costs, relative to the image's mean: (H, W) float32 > 0.

    Error of variance e in a window of variance v lowers SSIM's structure term by about
    e / (2 v + c2) (c2 = (0.03 span)^2, SSIM's constant; v in SSIM's Gaussian window of 1.5 px,
    averaged over channels): dots cost SSIM in smooth areas and little in texture. Adaptive dithering
    multiplies the refinement's weight on each pixel's own error (where the image is noisy) by the
    square root of that cost over its mean on the visible pixels, so the image's overall balance of
    SSIM against blurred PSNR stays and the dots move from smooth areas into texture. Issue 15's
    targets against pngquant's default dithering (benchmarks/results/dither_ssimweight_*): 32/52 on
    the cases seen while choosing it (27 without), 14/22 on 11 photos scored once afterwards (13
    without). In the trial that chose it, SSIM at equal blurred PSNR rose on all 52 (up to +0.022);
    the cost itself (exponent 1) met as many but lost SSIM on 5.

    Args:
        points: (H, W, D) float32 pixels in the fitting space.
        classes: (H, W) uint8 pixel classes (0: transparent, not counted in the mean).
        span: the first channel's range in the space's units (255 for sRGB).
    """
    c2 = (0.03 * span) ** 2
    weight = np.sqrt(c2 / (2.0 * _local_variance(points) + c2))
    visible = classes > 0
    scale = float(weight[visible].mean()) if visible.any() else 1.0
    result: np.ndarray = (weight / scale).astype(np.float32)
    return result


def _diffuse(
    points: np.ndarray,
    classes: np.ndarray,
    pal_points: np.ndarray,
    flags: np.ndarray,
    bounds: np.ndarray,
    strength: np.ndarray | None,
    hysteresis: np.ndarray | None,
    max_error: float,
    min_error: float,
) -> np.ndarray:
    """Run the C kernel (or its Python stand-in); (H, W) int32 indices."""
    h, w = classes.shape
    out = np.empty((h, w), np.int32)
    args = (points, classes, pal_points, flags, bounds, out, strength, hysteresis)
    if _fs_dither_c is not None:
        _fs_dither_c(*args, h, w, points.shape[1], pal_points.shape[0], max_error, min_error)
    else:  # pragma: no cover
        warnings.warn("the compiled dithering kernel is missing; using the slow Python path", stacklevel=3)
        _fs_dither_python(*args, max_error, min_error)
    return out


def hard_edges(points: np.ndarray, step: float) -> np.ndarray:
    """Pixels (H, W) bool within 1 px of a hard edge, for adaptive dithering.

    A hard edge is a step of at least ``step`` (largest channel, between two horizontally or
    vertically adjacent pixels) whose neighbouring steps are at most EDGE_FLAT of it: two
    flat runs meeting, as in drawings and screenshots, not a photo's blurred edge or texture.

    Args:
        points: (H, W, D) float32 pixels in the fitting space.
        step: the smallest step (in the space's units) that is an edge.
    """
    h, w = points.shape[:2]
    if _maps_c is not None:  # the same pixels in 8 instead of 25 ms per MP (one thread, 2026-12-03)
        touched = np.empty((h, w), np.uint8)
        _maps_c.hard_edges(np.ascontiguousarray(points, np.float32), touched, h, w, points.shape[2], step, EDGE_FLAT)
        return _dilate(touched.view(bool))
    edge = np.zeros((h, w), bool)
    for axis in (0, 1):
        steps = np.abs(np.diff(points, axis=axis))
        # d[i]: the step between pixels i and i + 1, its largest channel. Channel by channel:
        # numpy's max over a last axis of 3 took 10x as long (38 ms per megapixel).
        d = functools.reduce(np.maximum, [steps[..., i] for i in range(steps.shape[-1])])
        if axis == 1:  # work along the first axis either way
            d, edge = d.T, edge.T
        padded = np.pad(d, [(1, 1), (0, 0)])  # no step beyond the border
        hard = (d >= step) & (padded[:-2] <= EDGE_FLAT * d) & (padded[2:] <= EDGE_FLAT * d)
        edge[:-1] |= hard
        edge[1:] |= hard
        if axis == 1:
            edge = edge.T
    return _dilate(edge)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Each pixel of (H, W) bool or'ed with its 8 neighbours: a 3x3 max filter (0.7 ms per MP; max_pool2d 39 ms)."""
    rows = mask.copy()
    rows[1:] |= mask[:-1]
    rows[:-1] |= mask[1:]
    out: np.ndarray = rows.copy()
    out[:, 1:] |= rows[:, :-1]
    out[:, :-1] |= rows[:, 1:]
    return out


def hysteresis_map(points: np.ndarray, level: float, peak: float = HYSTERESIS) -> np.ndarray:
    """Per-pixel hysteresis (H, W) float32 in [0, peak], rising with the local noise.

    Args:
        points: (H, W, D) float32 pixels in the fitting space.
        level: one level of noise in the space's units (1/255 of the first channel's range).
        peak: the hysteresis where the photo is noisy.
    """
    result: np.ndarray = (peak * noise_ramp(points, level)).astype(np.float32)
    return result


def _local_variance(points: np.ndarray) -> np.ndarray:
    """:func:`gpu_kquant.metrics.local_variance` of (H, W, D) float32, in C where it was built: (H, W) float32."""
    if _maps_c is None:
        var: np.ndarray = local_variance(torch.from_numpy(points)).numpy()
        return var
    h, w, d = points.shape
    kernel = ssim_gaussian().numpy()
    out = np.empty((h, w), np.float32)
    _maps_c.local_variance(np.ascontiguousarray(points, np.float32), kernel, out, h, w, d, kernel.shape[0] // 2)
    return out


def noise_ramp(points: np.ndarray, level: float) -> np.ndarray:
    """How noisy each pixel's surroundings are, (H, W) float32 in [0, 1] (NOISE_LOW to NOISE_HIGH levels).

    Computed in C where the extension was built (0.016 s per megapixel against 0.13 s in torch, one
    thread), otherwise by :func:`_noise_ramp_torch`, which defines it.
    """
    if _maps_c is None:
        return _noise_ramp_torch(points, level)
    h, w, d = points.shape
    out = np.empty((h, w), np.float32)
    pts = np.ascontiguousarray(points, np.float32)
    _maps_c.noise_ramp(pts, out, h, w, d, NOISE_RADIUS, level, NOISE_LOW, NOISE_HIGH)
    return out


def _noise_ramp_torch(points: np.ndarray, level: float) -> np.ndarray:
    """:func:`noise_ramp` in torch: the mean |second difference| over a box, as a ramp."""
    x = torch.from_numpy(points).permute(2, 0, 1)[None]  # (1, D, H, W)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    d2x = (padded[..., 1:-1, :-2] + padded[..., 1:-1, 2:] - 2 * x).abs().mean(1)
    d2y = (padded[..., :-2, 1:-1] + padded[..., 2:, 1:-1] - 2 * x).abs().mean(1)
    r = NOISE_RADIUS
    box = torch.nn.functional.pad((d2x + d2y)[None] / 2, (r, r, r, r), mode="replicate")
    noise = torch.nn.functional.avg_pool2d(box, 2 * r + 1, stride=1)[0, 0]
    ramp = ((noise / level - NOISE_LOW) / (NOISE_HIGH - NOISE_LOW)).clamp(0.0, 1.0)
    result: np.ndarray = ramp.numpy().astype(np.float32)
    return result


def _fs_dither_python(
    points: np.ndarray,
    classes: np.ndarray,
    pal_points: np.ndarray,
    flags: np.ndarray,
    bounds: np.ndarray,
    out: np.ndarray,
    strength: np.ndarray | None,
    hysteresis: np.ndarray | None,
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
            seen = np.float32(1.0) / (np.float32(1.0) + (np.float32(0.0) if hysteresis is None else hysteresis[y, x]))
            target = np.clip(image[y, x] + spread if keep else image[y, x], bounds[:, 0], bounds[:, 1])
            choice = np.clip(image[y, x] + spread * seen if keep else image[y, x], bounds[:, 0], bounds[:, 1])
            cand = allowed[int(classes[y, x])]
            diff = pal[cand] - choice
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
