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
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from . import spaces
from .colors import ColorSet, bin_colors, color_set, lookup, pack
from .device import resolve_device
from .kmeans import assign, assign_with_bounds, kmeans, nearest_two

__all__ = ["SPACES", "Quantized", "map_to_palette", "quantize", "quantize_batch"]

SPACES = ("rgb", "oklab", "lab")

# Colour sets larger than this are fitted on the finest histogram (bits per channel)
# that has at most this many occupied bins.
MAX_FIT_POINTS = 1 << 17
# k-means++ and the first Lloyd run use a set this many times smaller, with a looser
# tolerance; Lloyd on the fine set then starts close to convergence.
_SEED_DIVISOR = 16
_SEED_TOL_FACTOR = 10.0


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
    """

    palette: np.ndarray
    indices: np.ndarray
    mse: float

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
        return math.inf if self.mse == 0 else 10.0 * math.log10(255.0**2 / self.mse)

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


class _Space:
    """Turns uint8 colours into the float points k-means clusters, and back.

    RGBA colours become premultiplied colour plus alpha scaled to the colour range,
    so a barely visible pixel barely counts.
    """

    _SCALE: ClassVar[dict[str, float]] = {"rgb": 255.0, "oklab": 100.0, "lab": 1.0}

    def __init__(self, name: str) -> None:
        if name not in SPACES:
            raise ValueError(f"space must be one of {', '.join(SPACES)}, got {name!r}")
        self.name = name

    def _forward(self, rgb: torch.Tensor) -> torch.Tensor:
        if self.name == "rgb":
            return rgb * 255.0
        fn = spaces.srgb_to_oklab if self.name == "oklab" else spaces.srgb_to_lab
        return fn(rgb) * self._SCALE[self.name]

    def _inverse(self, pts: torch.Tensor) -> torch.Tensor:
        if self.name == "rgb":
            return pts / 255.0
        fn = spaces.oklab_to_srgb if self.name == "oklab" else spaces.lab_to_srgb
        return fn(pts / self._SCALE[self.name])

    def _alpha_scale(self) -> float:
        return 1.0 if self.name == "rgb" else 100.0 / 255.0

    def points(self, colors: torch.Tensor) -> torch.Tensor:
        """uint8 colours (M, 3 or 4) -> float32 points (M, 3 or 4)."""
        pts = self._forward(colors[:, :3].double() / 255.0)
        if colors.shape[1] == 4:
            alpha = colors[:, 3:].double()
            pts = torch.cat([pts * (alpha / 255.0), alpha * self._alpha_scale()], dim=1)
        return pts.float()

    def colors(self, pts: torch.Tensor) -> torch.Tensor:
        """Float points (k, 3 or 4) -> the nearest representable uint8 colours."""
        pts = pts.double()
        if pts.shape[1] == 3:
            return self._to_uint8(self._inverse(pts))
        alpha = (pts[:, 3:] / self._alpha_scale()).clamp(1.0, 255.0)
        rgb = self._to_uint8(self._inverse(pts[:, :3] * (255.0 / alpha)))
        return torch.cat([rgb, alpha.round().to(torch.uint8)], dim=1)

    @staticmethod
    def _to_uint8(rgb: torch.Tensor) -> torch.Tensor:
        return (rgb * 255.0).round().clamp(0, 255).to(torch.uint8)


def _to_tensor(image: object) -> torch.Tensor:
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
    """Pick the exact colours or the finest histogram within ``max_points`` bins."""
    exact = (group.points, group.counts.float())
    n = group.colors.shape[0]
    fine = exact if n <= max_points else None
    seed = exact if n <= max_points // _SEED_DIVISOR else None
    bins = None
    for bits in (7, 6, 5, 4, 3, 2, 1):
        if fine is not None and seed is not None:
            break
        means, counts, inverse = bin_colors(group.colors, group.counts, group.points, bits)
        if fine is None and (means.shape[0] <= max_points or bits == 1):
            fine, bins = (means, counts.float()), (means, inverse)
        if seed is None and (means.shape[0] <= max_points // _SEED_DIVISOR or bits == 1):
            seed = (means, counts.float())
    assert fine is not None and seed is not None
    return _Plan(seed, fine, bins)


def _split(cs: ColorSet, space: _Space) -> tuple[bool, _Group, _Group]:
    """Split a colour set into (has fully transparent pixels, opaque, translucent)."""
    colors = cs.colors
    alpha = colors[:, 3] if cs.channels == 4 else torch.full_like(cs.counts, 255, dtype=torch.uint8)

    def group(mask: torch.Tensor, channels: int) -> _Group:
        idx = mask.nonzero().squeeze(1)
        sub = colors[idx, :channels]
        return _Group(idx, sub, cs.counts[idx], space.points(sub))

    return bool((alpha == 0).any()), group(alpha == 255, 3), group((alpha > 0) & (alpha < 255), 4)


def _share_k(k: int, groups: list[_Group]) -> list[int]:
    """Split k entries between groups in proportion to (pixels x variance) ** 0.6.

    That is the allocation minimising total distortion under the high-resolution
    approximation (error of a 3-D group ~ N sigma^2 k^(-2/3)); every non-empty group
    gets at least one entry and never more than its distinct colours.
    """
    sizes = [g.colors.shape[0] for g in groups]
    live = [i for i, n in enumerate(sizes) if n]
    share = [0] * len(groups)
    if len(live) == 1:
        share[live[0]] = min(k, sizes[live[0]])
        return share
    mass = []
    for i in live:
        g = groups[i]
        w = g.counts.double()[:, None]
        mean = (w * g.points).sum(0) / w.sum()
        mass.append(float((w * (g.points - mean).square()).sum()) ** 0.6 + 1e-12)
    for i, m in zip(live, mass):
        share[i] = max(1, min(sizes[i], round(k * m / sum(mass))))
    while sum(share) > k:
        big = max(live, key=lambda i: share[i])
        share[big] -= 1
    spare = k - sum(share)
    for i in sorted(live, key=lambda i: -mass[live.index(i)]):
        extra = min(spare, sizes[i] - share[i])
        share[i] += extra
        spare -= extra
    return share


def _pad(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stack (N_i, ...) tensors into (B, max N_i, ...), zero-padded."""
    longest = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros((len(rows), longest, *rows[0].shape[1:]))
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def _nearest(
    points: torch.Tensor, pal_points: torch.Tensor, bins: tuple[torch.Tensor, torch.Tensor] | None
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


def _map_colors(
    cs: ColorSet,
    space: _Space,
    palette: torch.Tensor,
    bins: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Palette entry (M,) of every colour of the set, nearest in ``space``.

    Opaque colours go to opaque entries only (when the palette has any), fully
    transparent colours to the most transparent entry, translucent colours to any
    visible entry. ``bins`` (from the opaque group's fit) speeds up the opaque group.
    """
    transparent, opaque, translucent = _split(cs, space)
    labels = torch.empty(len(cs), dtype=torch.long, device=cs.keys.device)
    rgba = palette if palette.shape[1] == 4 else torch.nn.functional.pad(palette, (0, 1), value=255)
    pal_alpha = rgba[:, 3]
    opaque_entries = (pal_alpha == 255).nonzero().squeeze(1)
    if opaque.members.numel():
        if opaque_entries.numel():
            pal_points = space.points(rgba[opaque_entries, :3])
            labels[opaque.members] = opaque_entries[_nearest(opaque.points, pal_points, bins)]
        else:
            points = space.points(torch.nn.functional.pad(opaque.colors, (0, 1), value=255))
            labels[opaque.members] = _nearest(points, space.points(rgba), None)
    if translucent.members.numel():
        visible = (pal_alpha > 0).nonzero().squeeze(1)
        if visible.numel() == 0:
            visible = torch.arange(rgba.shape[0], device=rgba.device)
        labels[translucent.members] = visible[_nearest(translucent.points, space.points(rgba[visible]), None)]
    if transparent:
        labels[cs.colors[:, 3] == 0] = pal_alpha.argmin()
    return labels


def _error(cs: ColorSet, palette: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean squared error per channel (premultiplied for RGBA) over all pixels."""
    src, dst = cs.colors, palette[labels]
    if cs.channels == 3 and palette.shape[1] == 3:
        err = (src.long() - dst.long()).square().sum(1).double()
    else:

        def premultiplied(c: torch.Tensor) -> torch.Tensor:
            c = torch.nn.functional.pad(c, (0, 1), value=255).double() if c.shape[1] == 3 else c.double()
            return torch.cat([c[:, :3] * c[:, 3:] / 255.0, c[:, 3:]], dim=1)

        err = (premultiplied(src) - premultiplied(dst)).square().sum(1)
    return float((err * cs.counts).sum()) / (cs.channels * float(cs.counts.sum()))


def _finish(
    keys: torch.Tensor,
    cs: ColorSet,
    space: _Space,
    palette: torch.Tensor,
    bins: tuple[torch.Tensor, torch.Tensor] | None,
    fixed: bool,
) -> Quantized:
    """Map every pixel to its palette entry and package the result.

    A fitted palette drops unused entries and is reordered (entries with transparency
    first, then by pixel count); a fixed palette is kept as given.
    """
    labels = _map_colors(cs, space, palette, bins)
    mse = _error(cs, palette, labels)
    if not fixed:
        usage = torch.zeros(palette.shape[0], dtype=torch.long, device=keys.device).index_add_(0, labels, cs.counts)
        opaque = palette[:, 3] == 255 if palette.shape[1] == 4 else torch.ones_like(usage, dtype=torch.bool)
        order = torch.argsort(opaque.long() * (usage.max() + 1) - usage, stable=True)
        order = order[usage[order] > 0]
        remap = torch.empty_like(usage)
        remap[order] = torch.arange(order.shape[0], device=keys.device)
        labels, palette = remap[labels], palette[order]
    index_dtype = torch.uint8 if palette.shape[0] <= 256 else torch.int32
    indices = lookup(cs, labels.to(index_dtype), keys).cpu().numpy()
    if index_dtype != torch.uint8:
        indices = indices.astype(np.uint16)
    return Quantized(palette.cpu().numpy(), indices, mse)


def _check_options(k: int, space: str, n_init: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 1 << 16:
        raise ValueError(f"k must be an integer in 1..65536, got {k!r}")
    if space not in SPACES:
        raise ValueError(f"space must be one of {', '.join(SPACES)}, got {space!r}")
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
    """Batched two-stage k-means over plans of one dimensionality; centroids (B, k, D)."""
    coarse = kmeans(
        _pad([p.seed[0] for p in jobs]),
        k,
        weights=_pad([p.seed[1] for p in jobs]),
        n_init=n_init,
        max_iter=max_iter,
        tol=tol * _SEED_TOL_FACTOR,
        seed=seed,
        device=device,
    )
    centroids = coarse.centroids
    refine = [row for row, p in enumerate(jobs) if p.fine is not p.seed]
    if refine:
        fine = kmeans(
            _pad([jobs[r].fine[0] for r in refine]),
            k,
            weights=_pad([jobs[r].fine[1] for r in refine]),
            init=centroids[refine],
            max_iter=max_iter,
            tol=tol,
            device=device,
        )
        centroids = centroids.clone()
        centroids[refine] = fine.centroids
    return centroids


def quantize_batch(
    images: Sequence[object],
    k: int = 16,
    *,
    space: str = "rgb",
    device: str | torch.device | None = None,
    seed: int = 0,
    n_init: int = 2,
    max_iter: int = 300,
    tol: float = 1e-4,
    max_fit_points: int = MAX_FIT_POINTS,
) -> list[Quantized]:
    """Quantize many images of any sizes with one batched k-means.

    Args:
        images: PIL images, or (H, W, 3) RGB / (H, W, 4) RGBA uint8 arrays or tensors.
        k: palette size, 1..65536. A transparent image spends one entry on full
            transparency and shares the rest between opaque and translucent colours.
        space: colour space of the fit and of the mapping: ``"rgb"`` (sRGB, best
            PSNR), ``"oklab"`` or ``"lab"`` (CIELAB D65, best CIEDE2000).
        device: where to compute; ``None`` picks CUDA when available.
        seed: seed of each image's own random stream: an image's result does not
            depend on which other images share its batch.
        n_init: k-means++ restarts per image, run as extra batch rows; the lowest
            inertia wins.
        max_iter, tol: Lloyd stopping rule (see :func:`gpu_kquant.kmeans.kmeans`).
        max_fit_points: colour sets larger than this are fitted on the finest colour
            histogram with at most this many occupied bins.

    Returns:
        One :class:`Quantized` per image, in order. An image with at most k distinct
        colours keeps them exactly (no k-means).
    """
    _check_options(k, space, n_init)
    dev = resolve_device(device)
    sp = _Space(space)
    tensors = [_to_tensor(img) for img in images]
    keys = [pack(t.to(dev, non_blocking=True)) for t in tensors]
    sets = [color_set(kk, t.shape[2]) for kk, t in zip(keys, tensors)]

    # parts[i]: palette pieces of image i (uint8, RGBA when the image is); a None piece
    # is filled by the batched fit of the job at the same position.
    parts: list[list[torch.Tensor | None]] = []
    bins: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    jobs: dict[tuple[int, int], list[tuple[int, int, _Plan]]] = {}
    for i, cs in enumerate(sets):
        transparent, opaque, translucent = _split(cs, sp)
        pieces: list[torch.Tensor | None] = []
        if transparent:
            pieces.append(torch.zeros((1, 4), dtype=torch.uint8, device=dev))
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
        centroids = _fit(
            [plan for _, _, plan in batch], k_group, seed=seed, n_init=n_init, max_iter=max_iter, tol=tol, device=dev
        )
        for row, (i, slot, _) in enumerate(batch):
            parts[i][slot] = sp.colors(centroids[row])

    results = []
    for kk, cs, pieces, b in zip(keys, sets, parts, bins):
        if cs.channels == 4:
            pieces = [p if p.shape[1] == 4 else torch.nn.functional.pad(p, (0, 1), value=255) for p in pieces]
        results.append(_finish(kk, cs, sp, torch.cat(pieces), b, fixed=False))
    return results


def map_to_palette(
    images: Sequence[object],
    palette: np.ndarray | torch.Tensor,
    *,
    space: str = "rgb",
    device: str | torch.device | None = None,
) -> list[Quantized]:
    """Map every image to a fixed palette (k, 3) RGB or (k, 4) RGBA uint8, no fitting.

    Every result carries the same palette, in the given order.
    """
    pal = torch.as_tensor(np.asarray(palette))
    if pal.dtype != torch.uint8 or pal.ndim != 2 or pal.shape[1] not in (3, 4) or not 1 <= pal.shape[0] <= 1 << 16:
        raise ValueError(f"palette must be a (k, 3) or (k, 4) uint8 array with 1 <= k <= 65536, got {tuple(pal.shape)}")
    _check_options(pal.shape[0], space, 1)
    dev = resolve_device(device)
    sp = _Space(space)
    pal = pal.to(dev)
    out = []
    for img in images:
        t = _to_tensor(img)
        kk = pack(t.to(dev, non_blocking=True))
        out.append(_finish(kk, color_set(kk, t.shape[2]), sp, pal, None, fixed=True))
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
