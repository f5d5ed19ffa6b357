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

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .colors import ColorSet, bin_colors, color_set, lookup, pack
from .device import resolve_device
from .dither import DITHERS, bayer_offsets, floyd_steinberg, palette_spacing
from .kmeans import best_restarts, kmeans
from .nearest import assign, assign_with_bounds, nearest_two
from .options import auto_fit_points, auto_n_init
from .spaces import SPACES, ColorSpace

__all__ = ["DITHERS", "SPACES", "Quantized", "fit_palette", "map_to_palette", "quantize", "quantize_batch", "to_tensor"]

# k-means++ and the first Lloyd run use a set of at most this many points, with a looser
# tolerance; Lloyd on the fine set then starts close to convergence. Measured on 12
# 256x256 photo crops (CPU time, C kernels): 4096 instead of 16384 costs 0.01 dB at
# k = 16 (1.6x faster), 0.07 dB at k = 64 (2.6x) and 0.02 dB at k = 256 (1.4x).
_SEED_POINTS = 1 << 12
_SEED_TOL_FACTOR = 10.0
# Restarts carried on from the coarse to the fine set (see _fit).
_REFINED = 2


# Colour sets above the fit budget are merged into 6-bit-per-channel bins (4x4x4 sRGB
# cubes). Measured on a 4-megapixel photo mosaic at k=256, 7-bit bins gain 0.08 dB of
# PSNR for twice the fit time; at k=16 the difference is under 0.5% of MSE.
FINE_BITS = 6


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
    """

    palette: np.ndarray
    indices: np.ndarray
    mse: float
    blur_mse: float | None = None

    @property
    def n_colors(self) -> int:
        """Number of palette entries, k'."""
        return int(self.palette.shape[0])

    @property
    def has_alpha(self) -> bool:
        """Whether the palette is RGBA."""
        return self.palette.shape[1] == 4

    @property
    def psnr(self) -> float:
        """Peak signal-to-noise ratio in dB (infinite for a lossless result)."""
        return _psnr(self.mse)

    @property
    def blurred_psnr(self) -> float | None:
        """PSNR after a small blur of both images (dithered results only)."""
        return None if self.blur_mse is None else _psnr(self.blur_mse)

    def to_array(self) -> np.ndarray:
        """(H, W, C) uint8 image, ``palette[indices]``, C = 3 or 4."""
        return self.palette[self.indices]

    def to_rgb(self) -> np.ndarray:
        """(H, W, 3) uint8 colour channels (alpha, if any, is left out)."""
        return self.palette[:, :3][self.indices]

    def to_pil(self) -> Image.Image:
        """A mode "P" image (RGBA palette when transparent) when k' <= 256, else RGB(A)."""
        if self.n_colors > 256:
            return Image.fromarray(self.to_array(), "RGBA" if self.has_alpha else "RGB")
        img = Image.fromarray(self.indices, "P")
        img.putpalette(self.palette.reshape(-1).tolist(), rawmode="RGBA" if self.has_alpha else "RGB")
        return img


def _psnr(mse: float) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


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


@dataclass(frozen=True)
class _Group:
    """Colours of one image that share a fit: its opaque or its translucent colours.

    Attributes:
        members: (M,) indices into the image's colour set.
        colors: (M, C) uint8: RGB for opaque colours, RGBA for translucent ones.
        counts: (M,) int64 pixel counts.
        points: (M, D) float32 points in the fitting space.
    """

    members: torch.Tensor
    colors: torch.Tensor
    counts: torch.Tensor
    points: torch.Tensor


@dataclass(frozen=True)
class _Plan:
    """What k-means sees of one group: a coarse set to seed on and a fine set to finish on.

    ``bins`` holds the fine set's bin means and the bin of every colour, used to guess
    each colour's palette entry; ``None`` when the fine set is the exact colour set.
    """

    seed: tuple[torch.Tensor, torch.Tensor]
    fine: tuple[torch.Tensor, torch.Tensor]
    bins: tuple[torch.Tensor, torch.Tensor] | None


def _plan(group: _Group, max_points: int) -> _Plan:
    """Pick the exact colours (at most ``max_points``) or a fine histogram, and a seed set.

    Larger colour sets are merged into ``FINE_BITS`` bins, coarser only if those still
    number more than four times ``max_points``; the seed set has at most 4096 points.
    Coarser histograms are built from the finer bins.
    """
    exact = (group.points, group.counts.float())
    n = group.colors.shape[0]
    fine = exact if n <= max_points else None
    seed = exact if n <= min(max_points, _SEED_POINTS) else None
    bins = None
    colors, counts, points = group.colors, group.counts, group.points
    bin_of = None  # the current bin of every colour
    for bits in range(FINE_BITS, 0, -1):
        if fine is not None and seed is not None:
            break
        points, counts, inverse, colors = bin_colors(colors, counts, points, bits)
        bin_of = inverse if bin_of is None else inverse[bin_of]
        if fine is None and (points.shape[0] <= 4 * max_points or bits == 1):
            fine, bins = (points, counts.float()), (points, bin_of)
        if seed is None and (points.shape[0] <= min(max_points, _SEED_POINTS) or bits == 1):
            seed = (points, counts.float())
    assert fine is not None and seed is not None
    return _Plan(seed, fine, bins)


def _split(cs: ColorSet, space: ColorSpace) -> tuple[bool, _Group, _Group]:
    """Split a colour set into (has fully transparent pixels, opaque, translucent)."""
    colors = cs.colors
    if cs.channels == 3:
        everything = torch.arange(len(cs), device=colors.device)
        opaque = _Group(everything, colors, cs.counts, space.points(colors))
        none = everything[:0]
        return False, opaque, _Group(none, colors[:0], cs.counts[:0], space.points(colors[:0]))
    alpha = colors[:, 3]

    def group(mask: torch.Tensor, channels: int) -> _Group:
        idx = mask.nonzero().squeeze(1)
        sub = colors[idx, :channels]
        return _Group(idx, sub, cs.counts[idx], space.points(sub))

    return bool((alpha == 0).any()), group(alpha == 255, 3), group((alpha > 0) & (alpha < 255), 4)


# _share_k estimates each group's error curve on at most this many of its colours.
_SHARE_POINTS = 4096


def _error_curve(group: _Group, most: int) -> torch.Tensor:
    """Estimated squared error (most,) float64 of the group with 1..most entries.

    Greedy farthest-point centres on the group's colours (a deterministic stride of at
    most ``_SHARE_POINTS``, counts scaled to the whole group): the first centre is the
    weighted mean, each next one the colour with the largest weighted error. An upper
    bound of what k-means reaches, with the right shape at small k, where the
    high-resolution rule N sigma^2 k^(-2/3) fails.
    """
    points, counts = group.points.double(), group.counts.double()
    if points.shape[0] > _SHARE_POINTS:
        idx = torch.linspace(0, points.shape[0] - 1, _SHARE_POINTS, device=points.device).long()
        points, counts = points[idx], counts[idx] * (counts.sum() / counts[idx].sum())
    mean = (counts[:, None] * points).sum(0) / counts.sum()
    d2 = (points - mean).square().sum(1)
    curve = torch.empty(most, dtype=torch.float64)
    for m in range(most):
        curve[m] = (counts * d2).sum()
        far = int(torch.argmax(counts * d2))
        d2 = torch.minimum(d2, (points - points[far]).square().sum(1))
    return curve


def _share_k(k: int, groups: list[_Group]) -> list[int]:
    """Split k entries between groups (opaque, translucent) to minimise their estimated total error.

    Every non-empty group gets one entry, then each further entry goes to the group whose
    estimated error (:func:`_error_curve`) it lowers most; never more than a group's
    distinct colours. The previous rule, shares in proportion to (pixels x variance)^0.6,
    gave the few hundred translucent edge colours of an icon one or two entries and
    measured 1.8x pngquant --nofs's premultiplied MSE on 12 Adwaita icons at k=16.
    """
    sizes = [g.colors.shape[0] for g in groups]
    live = [i for i, n in enumerate(sizes) if n]
    share = [0] * len(groups)
    if len(live) == 1:
        share[live[0]] = min(k, sizes[live[0]])
        return share
    curves = {i: _error_curve(groups[i], min(k, sizes[i])) for i in live}
    for i in live:
        share[i] = 1
    for _ in range(k - sum(share)):
        gains = {i: float(curves[i][share[i] - 1] - curves[i][share[i]]) for i in live if share[i] < len(curves[i])}
        if not gains:
            break
        best = max(gains, key=lambda i: (gains[i], -i))
        share[best] += 1
    return share


def _pad(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stack (N_i, ...) tensors into (B, max N_i, ...), zero-padded."""
    longest = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros((len(rows), longest, *rows[0].shape[1:]))
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


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


def _as_rgba(colors: torch.Tensor) -> torch.Tensor:
    return colors if colors.shape[-1] == 4 else torch.nn.functional.pad(colors, (0, 1), value=255)


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
        rgba = _as_rgba(colors)
        if cs.channels == 3 and palette.shape[1] == 4:
            return space.points(rgba), rgba[:, 3]
        return space.points(rgba if palette.shape[1] == 4 else colors[:, :3]), rgba[:, 3]
    return space.points(colors), torch.full((len(cs),), 255, dtype=torch.uint8, device=colors.device)


def _palette_points(palette: torch.Tensor, space: ColorSpace, rgba: bool) -> tuple[torch.Tensor, torch.Tensor]:
    pal = _as_rgba(palette) if rgba else palette
    return space.points(pal), _as_rgba(palette)[:, 3]


def _premultiplied(colors: torch.Tensor) -> torch.Tensor:
    c = _as_rgba(colors).double()
    return torch.cat([c[..., :3] * c[..., 3:] / 255.0, c[..., 3:]], dim=-1)


def _pixel_error(src: torch.Tensor, dst: torch.Tensor, channels: int) -> torch.Tensor:
    """Squared error summed over channels (...,), premultiplied when RGBA is involved."""
    if src.shape[-1] == 3 and dst.shape[-1] == 3:
        return (src.long() - dst.long()).square().sum(-1).double()
    return (_premultiplied(src) - _premultiplied(dst)).square().sum(-1)


def _blur(img: torch.Tensor) -> torch.Tensor:
    """3x3 binomial blur of (H, W, C) float64, edges replicated."""
    x = img.permute(2, 0, 1)[:, None]
    k = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device) / 4
    x = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    x = torch.nn.functional.conv2d(x, (k[:, None] * k[None, :])[None, None])
    return x[:, 0].permute(1, 2, 0)


def _finish(
    pixels: torch.Tensor,
    keys: torch.Tensor,
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
    dev = keys.device
    rgba = cs.channels == 4 or palette.shape[1] == 4
    pal_points, pal_alpha = _palette_points(palette, space, rgba)
    blur_mse = None
    if dither == "none":
        points, alpha = _colour_points(cs, space, palette)
        labels = _assign_constrained(points, alpha, pal_points, pal_alpha, None if rgba else bins)
        err = _pixel_error(cs.colors, palette[labels], cs.channels)
        mse = float((err * cs.counts).sum()) / (cs.channels * keys.numel())
        usage = torch.zeros(palette.shape[0], dtype=torch.long, device=dev).index_add_(0, labels, cs.counts)
    else:
        h, w, c = pixels.shape
        if dither in ("fs", "adaptive"):
            pal_np = palette.cpu().numpy()
            fs = floyd_steinberg(pixels.cpu().numpy(), pal_np, space, adaptive=dither == "adaptive")
            pixel_labels = torch.from_numpy(fs).to(dev).long()
        else:
            flat = pixels.reshape(-1, c)
            points = space.points(_as_rgba(flat) if rgba else flat)
            step = bayer_offsets(h, w, dev).reshape(-1, 1) * palette_spacing(pal_points)
            alpha = _as_rgba(flat)[:, 3]
            points[:, :3] += step * (alpha[:, None].float() / 255.0 if rgba else 1.0)
            pixel_labels = _assign_constrained(points, alpha, pal_points, pal_alpha)
        pixel_labels = pixel_labels.reshape(h, w)
        out = palette[pixel_labels]
        mse = float(_pixel_error(pixels, out, c).mean()) / c
        src, dst = (_premultiplied(pixels), _premultiplied(out)) if rgba else (pixels.double(), out.double())
        blur_mse = float((_blur(src) - _blur(dst)).square().mean()) * src.shape[-1] / c
        usage = torch.bincount(pixel_labels.reshape(-1), minlength=palette.shape[0])
    order = torch.arange(palette.shape[0], device=dev) if fixed else _used_in_order(pal_alpha, usage)
    remap = torch.empty(palette.shape[0], dtype=torch.long, device=dev)
    remap[order] = torch.arange(order.shape[0], device=dev)
    palette = palette[order]
    index_dtype = torch.uint8 if palette.shape[0] <= 256 else torch.int32
    if dither == "none":
        indices = lookup(cs, remap[labels].to(index_dtype), keys)
    else:
        indices = remap[pixel_labels].to(index_dtype)
    indices = indices.cpu().numpy()
    if index_dtype != torch.uint8:
        indices = indices.astype(np.uint16)
    return Quantized(palette.cpu().numpy(), indices, mse, blur_mse)


def _used_in_order(pal_alpha: torch.Tensor, usage: torch.Tensor) -> torch.Tensor:
    """Indices of the used palette entries: those with transparency first, then by pixel count."""
    opaque = pal_alpha == 255
    order = torch.argsort(opaque.long() * (usage.max() + 1) - usage, stable=True)
    return order[usage[order] > 0]


def _fit_options(k: int, space: str, n_init: int | None, max_fit_points: int | None, dither: str) -> tuple[int, int]:
    """Check the options of a fit and fill in the defaults; returns (n_init, max_fit_points)."""
    n_init = auto_n_init(k) if n_init is None else n_init
    _check_options(k, space, n_init, dither)
    return n_init, auto_fit_points(k) if max_fit_points is None else max_fit_points


def _check_options(k: int, space: str, n_init: int, dither: str) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 1 << 16:
        raise ValueError(f"k must be an integer in 1..65536, got {k!r}")
    if space not in SPACES:
        raise ValueError(f"space must be one of {', '.join(SPACES)}, got {space!r}")
    if dither not in DITHERS:
        raise ValueError(f"dither must be one of {', '.join(DITHERS)}, got {dither!r}")
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}")


def _fit(
    jobs: list[_Plan],
    k: int,
    *,
    seed: int,
    n_init: int,
    max_iter: int,
    tol: float,
    device: torch.device,
) -> torch.Tensor:
    """Batched two-stage k-means over plans of one dimensionality; centroids (B, k, D).

    All ``n_init`` restarts run on the coarse set (cheap); the ``_REFINED`` with the
    lowest coarse inertia go on to the fine set, where the lowest inertia wins. Coarse
    inertia ranks restarts well but not perfectly, hence more than one goes on.
    """
    coarse = kmeans(
        _pad([p.seed[0] for p in jobs]),
        k,
        weights=_pad([p.seed[1] for p in jobs]),
        n_init=n_init,
        max_iter=max_iter,
        tol=tol * _SEED_TOL_FACTOR,
        seed=seed,
        device=device,
        keep_restarts=True,
    )
    refine = [row for row, p in enumerate(jobs) if p.fine is not p.seed]
    best = best_restarts(coarse, n_init).centroids
    if not refine:
        return best
    m = min(n_init, _REFINED)
    dev = coarse.centroids.device
    ranked = coarse.inertia.view(len(jobs), n_init).argsort(dim=1, stable=True)[:, :m]
    rows = (ranked + torch.arange(len(jobs), device=dev)[:, None] * n_init)[torch.tensor(refine, device=dev)]
    fine = kmeans(
        _pad([jobs[r].fine[0] for r in refine]).repeat_interleave(m, 0),
        k,
        weights=_pad([jobs[r].fine[1] for r in refine]).repeat_interleave(m, 0),
        init=coarse.centroids[rows.reshape(-1)],
        max_iter=max_iter,
        tol=tol,
        device=device,
    )
    best[torch.tensor(refine, device=dev)] = best_restarts(fine, m).centroids
    return best


def _fit_palettes(
    sets: list[ColorSet],
    k: int,
    space: ColorSpace,
    *,
    seed: int,
    n_init: int,
    max_iter: int,
    tol: float,
    max_fit_points: int,
    device: torch.device,
) -> list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]]:
    """Fit one palette per colour set, all k-means problems of a kind in one batch.

    Returns (palette uint8 (P, C), bins of the opaque fit or None) per set, where
    P <= k and C is the set's channel count.
    """
    # parts[i]: palette pieces of set i; a None piece is filled by the batched fit of
    # the job that points at it.
    parts: list[list[torch.Tensor | None]] = []
    bins: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    jobs: dict[tuple[int, int], list[tuple[int, int, _Plan]]] = {}
    for i, cs in enumerate(sets):
        transparent, opaque, translucent = _split(cs, space)
        pieces: list[torch.Tensor | None] = []
        if transparent:
            pieces.append(torch.zeros((1, 4), dtype=torch.uint8, device=device))
        shares = _share_k(max(1, k - len(pieces)), [opaque, translucent])
        bins.append(None)
        for group, k_group in zip((opaque, translucent), shares):
            if k_group == 0:
                continue
            if group.colors.shape[0] <= k_group:
                pieces.append(group.colors)
                continue
            plan = _plan(group, max_fit_points)
            if group is opaque:
                bins[i] = plan.bins
            jobs.setdefault((group.points.shape[1], k_group), []).append((i, len(pieces), plan))
            pieces.append(None)
        parts.append(pieces)

    for (_, k_group), batch in jobs.items():
        plans = [plan for _, _, plan in batch]
        centroids = _fit(plans, k_group, seed=seed, n_init=n_init, max_iter=max_iter, tol=tol, device=device)
        for row, (i, slot, _) in enumerate(batch):
            parts[i][slot] = space.colors(centroids[row])

    out = []
    for cs, pieces, b in zip(sets, parts, bins):
        done = [p for p in pieces if p is not None]
        if cs.channels == 4:
            done = [_as_rgba(p) for p in done]
        out.append((torch.cat(done), b))
    return out


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
) -> np.ndarray:
    """Fit a palette of at most k colours to a colour histogram (e.g. summed over images).

    Returns (k', C) uint8, ordered like a quantized image's palette: entries with
    transparency first, then by pixel count; unused entries dropped.
    """
    n_init, max_fit_points = _fit_options(k, space, n_init, max_fit_points, "none")
    dev = resolve_device(device)
    sp = ColorSpace(space)
    cs = ColorSet(cs.keys.to(dev), cs.counts.to(dev), cs.channels)
    ((palette, bins),) = _fit_palettes(
        [cs], k, sp, seed=seed, n_init=n_init, max_iter=max_iter, tol=tol, max_fit_points=max_fit_points, device=dev
    )
    rgba = cs.channels == 4
    points, alpha = _colour_points(cs, sp, palette)
    labels = _assign_constrained(points, alpha, *_palette_points(palette, sp, rgba), None if rgba else bins)
    usage = torch.zeros(palette.shape[0], dtype=torch.long, device=dev).index_add_(0, labels, cs.counts)
    return palette[_used_in_order(_as_rgba(palette)[:, 3], usage)].cpu().numpy()


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
) -> list[Quantized]:
    """Quantize many images of any sizes with one batched k-means.

    Args:
        images: PIL images, or (H, W, 3) RGB / (H, W, 4) RGBA uint8 arrays or tensors.
        k: palette size, 1..65536. A transparent image spends one entry on full
            transparency and shares the rest between opaque and translucent colours.
        space: colour space of the fit and of the mapping: ``"rgb"`` (sRGB, best
            PSNR), ``"oklab"`` or ``"lab"`` (CIELAB D65, best CIEDE2000).
        dither: ``"none"``, ``"fs"`` (serpentine Floyd-Steinberg with error clamping,
            on the CPU) or ``"ordered"`` (8x8 Bayer, on the device).
        palette: map to this fixed palette instead of fitting one (a
            :class:`gpu_kquant.Palette` or a (k, 3|4) uint8 array); ``k`` is ignored.
        device: where to compute; ``None`` picks CUDA when available.
        seed: seed of each image's own random stream: an image's result does not
            depend on which other images share its batch.
        n_init: k-means++ restarts per image, run as extra batch rows on the coarse
            seed set; the best two by inertia are refined on the fine set and the
            lower inertia wins. Default: :func:`auto_n_init`.
        max_iter, tol: Lloyd stopping rule (see :func:`gpu_kquant.kmeans.kmeans`).
        max_fit_points: colour sets with more colours are fitted on a 6-bit histogram
            (see :func:`_plan`). Default: :func:`auto_fit_points`.

    Returns:
        One :class:`Quantized` per image, in order. An image with at most k distinct
        colours keeps them exactly (no k-means).
    """
    if palette is not None:
        return map_to_palette(images, palette, space=space, dither=dither, device=device)
    n_init, max_fit_points = _fit_options(k, space, n_init, max_fit_points, dither)
    dev = resolve_device(device)
    sp = ColorSpace(space)
    tensors = [to_tensor(img).to(dev, non_blocking=True) for img in images]
    keys = [pack(t) for t in tensors]
    sets = [color_set(kk, t.shape[2]) for kk, t in zip(keys, tensors)]
    fitted = _fit_palettes(
        sets, k, sp, seed=seed, n_init=n_init, max_iter=max_iter, tol=tol, max_fit_points=max_fit_points, device=dev
    )
    return [
        _finish(t, kk, cs, sp, pal, b if dither == "none" else None, fixed=False, dither=dither)
        for t, kk, cs, (pal, b) in zip(tensors, keys, sets, fitted)
    ]


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
    _check_options(pal.shape[0], space, 1, dither)
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
        kk = pack(t)
        p = clear if t.shape[2] == 4 else pal
        out.append(_finish(t, kk, color_set(kk, t.shape[2]), sp, p, None, fixed=True, dither=dither))
    return out


def quantize(
    image: object,
    k: int = 16,
    *,
    device: str | torch.device | None = None,
    seed: int = 0,
    **options: object,
) -> Quantized:
    """Quantize one image to at most k colours; options as in :func:`quantize_batch`."""
    return quantize_batch([image], k, device=device, seed=seed, **options)[0]
