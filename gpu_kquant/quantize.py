"""Image colour quantization: an image becomes a palette of at most k colours plus indices.

Built on :mod:`gpu_kquant.colors` (colour sets) and :mod:`gpu_kquant.kmeans` (the
engine). k-means runs on each image's weighted colour set (or a fine histogram of
it), all images of a batch in one call; then the palette is rounded to uint8 and
every pixel is mapped to its nearest palette entry in the same colour space, so
``palette[indices]`` is exactly what gets written.

RGBA images are clustered in premultiplied colour with alpha as a fourth dimension.
Fully transparent pixels share one palette entry (0, 0, 0, 0), opaque pixels only
map to opaque entries, and entries with transparency come first in the palette.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from .batchfinish import applies, finish_batch
from .colors import ColorSet, color_sets, pixel_color_set, pixel_lookup
from .device import resolve_device
from .dither import DITHERS, HYSTERESIS, bayer_offsets, floyd_steinberg, palette_spacing
from .ditherpalette import FITTED_HYSTERESIS, spread_palette
from .fitplan import as_rgba, fit_palettes
from .kernels import image_backend
from .metrics import dithered_errors, pixel_error, psnr_of_mse, sampled_ssim
from .nearest import assign, assign_with_bounds, nearest_two
from .options import FitOptions
from .spaces import SPACES, ColorSpace
from .stopping import check_stop

__all__ = ["DITHERS", "SPACES", "Quantized", "fit_palette", "map_to_palette", "quantize", "quantize_batch", "to_tensor"]


@dataclass(frozen=True)
class Quantized:
    """A quantized image.

    Attributes:
        palette: (k', 3) uint8 RGB, or (k', 4) RGBA when the image has transparency.
            Fitted palettes are ordered with transparent entries first, then by pixel
            count, and every entry is used; a fixed palette keeps its own order.
        indices: (H, W) uint8 when the palette has at most 256 entries, else uint16.
        mse: mean squared error per channel against the input on the 0..255 scale
            (premultiplied by alpha for RGBA, so invisible differences do not count).
        blur_mse: the same after a 3x3 binomial blur of both images; set for dithered
            results, whose per-pixel error overstates what the eye sees.
        ssim: structural similarity to the input, sampled on a grid of windows
            (:func:`gpu_kquant.metrics.sampled_ssim`, computed on the quantize device).
    """

    palette: np.ndarray
    indices: np.ndarray
    mse: float
    blur_mse: float | None = None
    ssim: float | None = None

    @property
    def n_colors(self) -> int:
        """Number of palette entries, k'."""
        return int(self.palette.shape[0])

    @property
    def has_alpha(self) -> bool:
        """Whether the palette is RGBA."""
        return int(self.palette.shape[1]) == 4

    @property
    def psnr(self) -> float:
        """Peak signal-to-noise ratio in dB (infinite for a lossless result)."""
        return psnr_of_mse(self.mse)

    @property
    def blurred_psnr(self) -> float | None:
        """PSNR after a small blur of both images (dithered results only)."""
        return None if self.blur_mse is None else psnr_of_mse(self.blur_mse)

    def to_array(self) -> np.ndarray:
        """(H, W, C) uint8 image, ``palette[indices]``, C = 3 or 4."""
        image: np.ndarray = self.palette[self.indices]
        return image

    def to_rgb(self) -> np.ndarray:
        """(H, W, 3) uint8 colour channels (alpha, if any, is left out)."""
        rgb: np.ndarray = self.palette[:, :3][self.indices]
        return rgb

    def to_pil(self) -> Image.Image:
        """A mode "P" image (RGBA palette when transparent) when k' <= 256, else RGB(A)."""
        if self.n_colors > 256:
            return Image.fromarray(self.to_array(), "RGBA" if self.has_alpha else "RGB")
        img = Image.fromarray(self.indices, "P")
        img.putpalette(self.palette.reshape(-1).tolist(), rawmode="RGBA" if self.has_alpha else "RGB")
        return img


def to_tensor(image: object) -> torch.Tensor:
    """A PIL image or an (H, W, 3|4) uint8 array/tensor -> (H, W, C) uint8 tensor.

    PIL images with transparency become RGBA, all others RGB. RGBA whose alpha is
    255 everywhere is reduced to RGB.
    """
    if isinstance(image, Image.Image):
        transparent = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
        image = np.asarray(image.convert("RGBA" if transparent else "RGB"))
    if isinstance(image, np.ndarray):
        arr = np.ascontiguousarray(image)
        tensor = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    elif isinstance(image, torch.Tensor):
        tensor = image
    else:
        raise TypeError(f"expected a PIL image, numpy array or tensor, got {type(image).__name__}")
    if tensor.dtype != torch.uint8 or tensor.ndim != 3 or tensor.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) or (H, W, 4) uint8 image, got {tensor.dtype} {tuple(tensor.shape)}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"image is empty: shape {tuple(tensor.shape)}")
    if tensor.shape[2] == 4 and bool((tensor[..., 3] == 255).all()):
        tensor = tensor[..., :3]
    return tensor


def _nearest(
    points: torch.Tensor, pal_points: torch.Tensor, bins: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """Exact nearest palette entry (M,) of every point (M, D) among (P, D).

    With bins, each point starts from its bin's nearest entry with a lower bound from
    the bin's second-nearest distance (triangle inequality), so only points near a
    Voronoi boundary need a full search.
    """
    pal = pal_points[None]
    if bins is None or pal_points.shape[0] == 1:
        return assign(points[None], pal)[0][0]
    means, inverse = bins
    bin_labels, second = nearest_two(means[None], pal)
    offset = (points - means[inverse]).square().sum(1).sqrt()
    labels, _ = assign_with_bounds(points[None], pal, bin_labels[:, inverse], (second[0, inverse] - offset)[None])
    return labels[0]


def _assign_constrained(
    points: torch.Tensor,
    alpha: torch.Tensor,
    pal_points: torch.Tensor,
    pal_alpha: torch.Tensor,
    bins: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Nearest allowed palette entry (M,) of points (M, D) with alpha (M,) uint8.

    Opaque points go to opaque entries only (any entry when there are none), fully
    transparent points to the most transparent entry, the others to any visible entry.
    ``bins`` (over the opaque points, in order) may speed them up (see :func:`_nearest`).
    """
    labels = torch.empty(points.shape[0], dtype=torch.long, device=points.device)
    entries = torch.arange(pal_alpha.shape[0], device=pal_alpha.device)
    for members, allowed, guide in (
        (alpha == 255, pal_alpha == 255, bins),
        ((alpha > 0) & (alpha < 255), pal_alpha > 0, None),
    ):
        idx = members.nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        subset = entries[allowed] if bool(allowed.any()) else entries
        labels[idx] = subset[_nearest(points[idx], pal_points[subset], guide)]
    labels[alpha == 0] = pal_alpha.argmin()
    return labels


def _colour_points(cs: ColorSet, space: ColorSpace, palette: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Points of the colour set for mapping to ``palette``, with the colours' alpha."""
    colors = cs.colors
    if palette.shape[1] == 4 or cs.channels == 4:
        rgba = as_rgba(colors)
        if cs.channels == 3 and palette.shape[1] == 4:
            return space.points(rgba), rgba[:, 3]
        return space.points(rgba if palette.shape[1] == 4 else colors[:, :3]), rgba[:, 3]
    return space.points(colors), torch.full((len(cs),), 255, dtype=torch.uint8, device=colors.device)


def _palette_points(palette: torch.Tensor, space: ColorSpace, rgba: bool) -> tuple[torch.Tensor, torch.Tensor]:
    pal = as_rgba(palette) if rgba else palette
    return space.points(pal), as_rgba(palette)[:, 3]


def _error_and_usage(cs: ColorSet, palette: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Squared error summed over all pixels and channels, and pixels per palette entry (P,) int64.

    The RGB error is an exact integer (the C kernel's, or the torch sum, which is exact
    below 2**53), so both paths give the same float.
    """
    kernels = image_backend(labels.device)
    if kernels is not None and cs.channels == 3 and palette.shape[1] == 3:
        total, usage = kernels.rgb_error(cs.colors, cs.counts, labels, palette)
        return float(total), usage
    err = pixel_error(cs.colors, palette[labels], cs.channels)
    usage = torch.zeros(palette.shape[0], dtype=torch.long, device=labels.device).index_add_(0, labels, cs.counts)
    return float((err * cs.counts).sum()), usage


def _finish(
    pixels: torch.Tensor,
    cs: ColorSet,
    space: ColorSpace,
    palette: torch.Tensor,
    bins: tuple[torch.Tensor, torch.Tensor] | None,
    fixed: bool,
    dither: str,
) -> Quantized:
    """Map every pixel to its palette entry and package the result.

    Without dithering each distinct colour is mapped once and pixels look their colour
    up; with dithering every pixel is mapped on its own. A fitted palette drops unused
    entries and is reordered (entries with transparency first, then by pixel count); a
    fixed palette is kept as given.
    """
    dev = pixels.device
    rgba = cs.channels == 4 or palette.shape[1] == 4
    pal_points, pal_alpha = _palette_points(palette, space, rgba)
    blur_mse = None
    if dither == "adaptive" and not fixed:  # a palette spread for dithering (issue 15)
        points, alpha = _colour_points(cs, space, palette)
        palette = spread_palette(cs, _assign_constrained(points, alpha, pal_points, pal_alpha), palette)
        pal_points, pal_alpha = _palette_points(palette, space, rgba)
    if dither == "none":
        points, alpha = _colour_points(cs, space, palette)
        # Opaque colours and palette: every entry is allowed, so skip the alpha masks.
        if rgba:
            labels = _assign_constrained(points, alpha, pal_points, pal_alpha)
        else:
            labels = _nearest(points, pal_points, bins)
        total, usage = _error_and_usage(cs, palette, labels)
        mse = total / (cs.channels * pixels.shape[0] * pixels.shape[1])
    else:
        pixel_labels, mse, blur_mse, usage = _map_dithered(pixels, palette, pal_points, pal_alpha, space, dither, fixed)
    order = torch.arange(palette.shape[0], device=dev) if fixed else _used_in_order(pal_alpha, usage)
    remap = torch.empty(palette.shape[0], dtype=torch.long, device=dev)
    remap[order] = torch.arange(order.shape[0], device=dev)
    palette = palette[order]
    index_dtype = torch.uint8 if palette.shape[0] <= 256 else torch.int32
    if dither == "none":
        indices = pixel_lookup(cs, remap[labels].to(index_dtype), pixels)
    else:
        indices = remap[pixel_labels].to(index_dtype)
    similarity = sampled_ssim(pixels, palette, indices)
    host = indices.cpu().numpy()
    if index_dtype != torch.uint8:
        host = host.astype(np.uint16)
    return Quantized(palette.cpu().numpy(), host, mse, blur_mse, similarity)


def _map_dithered(
    pixels: torch.Tensor,
    palette: torch.Tensor,
    pal_points: torch.Tensor,
    pal_alpha: torch.Tensor,
    space: ColorSpace,
    dither: str,
    fixed: bool,
) -> tuple[torch.Tensor, float, float, torch.Tensor]:
    """Every pixel mapped on its own with dithering (a fitted, spread palette with more hysteresis).

    Returns:
        The (H, W) int64 labels, the per-channel MSE, the blurred MSE, and the (k,) usage counts.
    """
    dev = pixels.device
    h, w, c = pixels.shape
    rgba = c == 4 or palette.shape[1] == 4
    if dither in ("fs", "adaptive"):
        pal_np = palette.cpu().numpy()
        peak = HYSTERESIS if fixed else FITTED_HYSTERESIS
        fs = floyd_steinberg(pixels.cpu().numpy(), pal_np, space, adaptive=dither == "adaptive", hysteresis=peak)
        pixel_labels = torch.from_numpy(fs).to(dev).long()
    else:
        flat = pixels.reshape(-1, c)
        points = space.points(as_rgba(flat) if rgba else flat)
        step = bayer_offsets(h, w, dev).reshape(-1, 1) * palette_spacing(pal_points)
        alpha = as_rgba(flat)[:, 3]
        points[:, :3] += step * (alpha[:, None].float() / 255.0 if rgba else 1.0)
        pixel_labels = _assign_constrained(points, alpha, pal_points, pal_alpha)
    pixel_labels = pixel_labels.reshape(h, w)
    mse, blur_mse = dithered_errors(pixels, palette[pixel_labels])
    usage = torch.bincount(pixel_labels.reshape(-1), minlength=palette.shape[0])
    return pixel_labels, mse, blur_mse, usage


def _used_in_order(pal_alpha: torch.Tensor, usage: torch.Tensor) -> torch.Tensor:
    """Indices of the used palette entries: those with transparency first, then by pixel count."""
    opaque = pal_alpha == 255
    order = torch.argsort(opaque.long() * (usage.max() + 1) - usage, stable=True)
    return order[usage[order] > 0]


def _fit_options(options: FitOptions | None, dither: str, **fields: object) -> FitOptions:
    """The fit's typed options: ``options`` as given, or built from the keyword fields; ``exact_finish`` resolved."""
    if dither not in DITHERS:
        raise ValueError(f"dither must be one of {', '.join(DITHERS)}, got {dither!r}")
    fit = options if options is not None else FitOptions(**fields)  # type: ignore[arg-type]
    return fit if fit.exact_finish is not None else replace(fit, exact_finish=dither == "adaptive")


def fit_palette(
    cs: ColorSet,
    k: int,
    *,
    space: str = "rgb",
    device: str | torch.device | None = None,
    seed: int = 0,
    n_init: int | None = None,
    max_iter: int = 300,
    tol: float = 1e-4,
    max_fit_points: int | None = None,
    options: FitOptions | None = None,
) -> np.ndarray:
    """Fit a palette of at most k colours to a colour histogram (e.g. summed over images).

    Returns (k', C) uint8, ordered like a quantized image's palette: entries with
    transparency first, then by pixel count; unused entries dropped.
    """
    fit = _fit_options(
        options, "none", k=k, space=space, seed=seed, n_init=n_init, max_iter=max_iter, tol=tol,
        max_fit_points=max_fit_points,
    )  # fmt: skip
    dev = resolve_device(device)
    sp = ColorSpace(fit.space)
    cs = ColorSet(cs.keys.to(dev), cs.counts.to(dev), cs.channels)
    ((palette, bins),) = fit_palettes([cs], fit, dev)
    rgba = cs.channels == 4
    points, alpha = _colour_points(cs, sp, palette)
    labels = _assign_constrained(points, alpha, *_palette_points(palette, sp, rgba), None if rgba else bins)
    usage = torch.zeros(palette.shape[0], dtype=torch.long, device=dev).index_add_(0, labels, cs.counts)
    return palette[_used_in_order(as_rgba(palette)[:, 3], usage)].cpu().numpy()


def quantize_batch(
    images: Sequence[object],
    k: int = 16,
    *,
    space: str = "rgb",
    dither: str = "none",
    palette: object | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    n_init: int | None = None,
    max_iter: int = 300,
    tol: float = 1e-4,
    max_fit_points: int | None = None,
    options: FitOptions | None = None,
) -> list[Quantized]:
    """Quantize many images of any sizes with one batched k-means.

    Args:
        images: PIL images, or (H, W, 3) RGB / (H, W, 4) RGBA uint8 arrays or tensors.
        k: palette size, 1..65536. A transparent image spends one entry on full
            transparency and shares the rest between opaque and translucent colours.
        space: colour space of the fit and of the mapping: ``"rgb"`` (sRGB, best
            PSNR), ``"oklab"`` or ``"lab"`` (CIELAB D65, best CIEDE2000).
        dither: ``"none"``, ``"fs"`` / ``"adaptive"`` (serpentine Floyd-Steinberg, on the
            CPU; see :mod:`gpu_kquant.dither`; ``adaptive`` finishes its fit on the exact colours, spreads
            the palette outward (:mod:`gpu_kquant.ditherpalette`), ends with :mod:`gpu_kquant.refine`) or ``"ordered"``
            (8x8 Bayer, on the device).
        palette: a fixed palette to map to (:class:`gpu_kquant.Palette` or (k, 3|4) uint8); ``k`` ignored.
        device: where to compute; ``None`` picks CUDA when available.
        seed: seed of each image's own random stream: an image's result does not
            depend on which other images share its batch.
        n_init: k-means++ restarts per image, run as extra batch rows on the coarse
            seed set; the best two by inertia are refined on the fine set and the
            lower inertia wins. Default: :func:`gpu_kquant.options.auto_n_init`.
        max_iter, tol: Lloyd stopping rule (see :func:`gpu_kquant.kmeans.kmeans`).
        options: all fit settings as one :class:`gpu_kquant.options.FitOptions`; when
            given, the fit keywords (k, space, seed, n_init, max_iter, tol, max_fit_points) are ignored.
        max_fit_points: colour sets with more colours are fitted on a 6-bit histogram
            (:func:`gpu_kquant.fitplan._plan`). Default: :func:`gpu_kquant.options.auto_fit_points`.

    Returns:
        One :class:`Quantized` per image, in order. An image with at most k distinct
        colours keeps them exactly (no k-means).
    """
    fit = _fit_options(
        options, dither, k=k, space=space, seed=seed, n_init=n_init, max_iter=max_iter, tol=tol,
        max_fit_points=max_fit_points,
    )  # fmt: skip
    if palette is not None:
        return map_to_palette(images, palette, space=fit.space, dither=dither, device=device)
    dev = resolve_device(device)
    sp = ColorSpace(fit.space)
    tensors = [to_tensor(img).to(dev, non_blocking=True) for img in images]
    sets = color_sets(tensors)
    fitted = fit_palettes(sets, fit, dev)
    if applies(dev, tensors, palettes := [pal for pal, _ in fitted], dither):  # the whole batch at once (issue 11)
        return [Quantized(*m) for m in finish_batch(tensors, sets, palettes, sp, fit.stop)]
    out = []
    for t, cs, (pal, b) in zip(tensors, sets, fitted):
        check_stop(fit.stop)  # mapping a large image takes seconds at k = 256
        out.append(_finish(t, cs, sp, pal, b if dither == "none" else None, fixed=False, dither=dither))
    return out


def map_to_palette(
    images: Sequence[object],
    palette: object,
    *,
    space: str = "rgb",
    dither: str = "none",
    device: str | torch.device | None = None,
) -> list[Quantized]:
    """Map every image to a fixed palette, no fitting; every result keeps it whole and in order.

    Args:
        palette: a :class:`gpu_kquant.Palette` or a (k, 3) RGB / (k, 4) RGBA uint8 array. An RGB
            palette maps an image with transparency as (k + 1, 4) RGBA: one transparent entry is appended.
    """
    colors = getattr(palette, "colors", palette)
    pal = torch.as_tensor(np.asarray(colors))
    if pal.dtype != torch.uint8 or pal.ndim != 2 or pal.shape[1] not in (3, 4) or not 1 <= pal.shape[0] <= 1 << 16:
        raise ValueError(f"palette must be a (k, 3) or (k, 4) uint8 array with 1 <= k <= 65536, got {tuple(pal.shape)}")
    _fit_options(None, dither, k=pal.shape[0], space=space)  # checks the space and the dither name
    dev = resolve_device(device)
    sp = ColorSpace(space)
    pal = pal.to(dev)
    # An RGB palette gains one fully transparent entry, last, for images with alpha (and only for them).
    clear = pal
    if pal.shape[1] == 3 and pal.shape[0] < 1 << 16:  # 65536 entries already fill uint16 indices
        clear = torch.cat([torch.cat([pal, pal.new_full((len(pal), 1), 255)], 1), pal.new_zeros(1, 4)])
    out = []
    for img in images:
        t = to_tensor(img).to(dev, non_blocking=True)
        p = clear if t.shape[2] == 4 else pal
        out.append(_finish(t, pixel_color_set(t), sp, p, None, fixed=True, dither=dither))
    return out


def quantize(
    image: object,
    k: int = 16,
    *,
    device: str | torch.device | None = None,
    seed: int = 0,
    **options: Any,
) -> Quantized:
    """Quantize one image to at most k colours; options as in :func:`quantize_batch`."""
    return quantize_batch([image], k, device=device, seed=seed, **options)[0]
