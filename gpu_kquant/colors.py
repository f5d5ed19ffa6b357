"""Colour sets and histograms of uint8 RGB or RGBA pixels, on any device.

A colour set is an image's distinct colours with their pixel counts: k-means on it,
weighted by the counts, is exactly k-means on all pixels, at a fraction of the cost.
Pixels are handled as packed int32 keys, one per pixel. :func:`pixel_color_set` and
:func:`pixel_lookup` take the pixels themselves and run the device's compiled kernels
when it has them (:func:`gpu_kquant.kernels.image_backend`), the torch code here otherwise.
"""

from __future__ import annotations

import functools
import itertools
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .kernels import image_backend
from .reduce import FixedPointSums, fixed_point_scales

__all__ = [
    "Binned",
    "ColorSet",
    "batched_color_sets",
    "bin_colors",
    "bin_colors_many",
    "color_set",
    "color_sets",
    "lookup",
    "pack",
    "pixel_color_set",
    "pixel_lookup",
    "unpack",
]

_N_RGB_KEYS = 1 << 24


def pack(pixels: torch.Tensor) -> torch.Tensor:
    """Pack uint8 pixels (..., C), C = 3 (RGB) or 4 (RGBA), into int32 keys (...).

    The key holds channel ``i`` in bits ``8i..8i+7``, so RGB keys are in [0, 2**24).
    On little-endian hosts this is the pixel's bytes read as one int32 (RGB padded
    with a zero byte): one copy instead of a shift per channel.
    """
    if pixels.dtype != torch.uint8 or pixels.ndim < 1 or pixels.shape[-1] not in (3, 4):
        raise ValueError(f"expected uint8 pixels (..., 3) or (..., 4), got {pixels.dtype} {tuple(pixels.shape)}")
    channels = pixels.shape[-1]
    flat = pixels.reshape(-1, channels)
    if sys.byteorder == "little":
        padded = torch.nn.functional.pad(flat, (0, 1)) if channels == 3 else flat.contiguous()
        keys = padded.view(torch.int32)
    else:  # pragma: no cover - no big-endian CI
        wide = flat.long()
        keys = sum((wide[:, i] << (8 * i) for i in range(1, channels)), wide[:, 0]).to(torch.int32)
    return keys.reshape(pixels.shape[:-1])


def unpack(keys: torch.Tensor, channels: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 keys (...) -> uint8 pixels (..., channels)."""
    wide = keys.long()
    return torch.stack([(wide >> (8 * i)) & 255 for i in range(channels)], dim=-1).to(torch.uint8)


@dataclass(frozen=True)
class ColorSet:
    """Distinct colours of an image and how many pixels have each.

    Attributes:
        keys: (M,) int32 packed colours, ascending.
        counts: (M,) int64 pixel counts, all positive.
        channels: 3 for RGB, 4 for RGBA.
    """

    keys: torch.Tensor
    counts: torch.Tensor
    channels: int = 3

    @functools.cached_property
    def colors(self) -> torch.Tensor:
        """(M, channels) uint8, unpacked once."""
        return unpack(self.keys, self.channels)

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @classmethod
    def with_colors(cls, keys: torch.Tensor, counts: torch.Tensor, colors: torch.Tensor) -> ColorSet:
        """A colour set whose unpacked colours (M, C) uint8 are already known."""
        cs = cls(keys, counts, colors.shape[1])
        cs.__dict__["colors"] = colors  # what the cached property would compute
        return cs


class _Workspace(threading.local):
    """Per-thread dense tables over all 2**24 RGB colours.

    Allocating 64 MB costs more in page faults than the histogram itself, so each
    thread keeps its tables per device; the counting table is zeroed after each use.
    """

    def __init__(self) -> None:
        self.tables: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def table(self, purpose: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (purpose, device, dtype)
        if key not in self.tables:
            self.tables[key] = torch.zeros(_N_RGB_KEYS, dtype=dtype, device=device)
        return self.tables[key]


_WORKSPACE = _Workspace()

# Below this many RGB pixels, sorting the keys beats scanning the dense table.
_DENSE_MIN_PIXELS = 1 << 20


def color_set(keys: torch.Tensor, channels: int = 3) -> ColorSet:
    """Exact histogram of packed pixels (from :func:`pack`), on their device.

    Small images and RGBA sort their keys; large RGB images count into a dense 2**24
    table with integer ``index_add_`` (exact on CUDA too: integer atomics commute).
    """
    flat = keys.reshape(-1)
    if channels == 4 or flat.numel() < _DENSE_MIN_PIXELS:
        uniq, counts = torch.unique_consecutive(torch.sort(flat)[0], return_counts=True)
        return ColorSet(uniq, counts.long(), channels)
    table = _WORKSPACE.table("counts", flat.device, torch.int32)
    table.index_add_(0, flat, torch.ones(1, dtype=torch.int32, device=flat.device).expand(flat.shape[0]))
    # Scan the table as int64 words (half the elements), then split the hits.
    words = table.view(torch.int64).nonzero().squeeze(1)
    present = torch.stack([2 * words, 2 * words + 1], dim=1).reshape(-1)
    present = present[table.index_select(0, present) != 0]
    counts = table.index_select(0, present).long()
    table.index_fill_(0, present, 0)
    return ColorSet(present.to(torch.int32), counts, channels)


# Below this many RGB pixels the C kernel radix sorts all keys; from it, it counts them
# bucket by bucket of the blue byte, whose fixed cost (a 256 KB table, 256 buckets) is
# paid back from about here. Measured (1 thread): equal on 256x256 photo crops, 1.4x
# faster at 512x512, 1.7x at 1024x1024; 4-MP mosaic 48 ms vs 106 (64 MB table: 80).
_C_BUCKET_MIN_PIXELS = 1 << 16


def pixel_color_set(pixels: torch.Tensor) -> ColorSet:
    """Exact histogram of uint8 pixels (..., C), C = 3 or 4: ``color_set(pack(pixels), C)``."""
    kernels = image_backend(pixels.device)
    channels = pixels.shape[-1]
    if kernels is None:
        return color_set(pack(pixels), channels)
    buckets = channels == 3 and pixels.numel() // 3 >= _C_BUCKET_MIN_PIXELS
    return ColorSet.with_colors(*kernels.color_set(pixels, buckets))


def batched_color_sets(images: Sequence[torch.Tensor]) -> list[ColorSet]:
    """Colour sets of many uint8 images (H, W, C) from one sort keyed by (image, colour).

    Device-agnostic torch; the same sets as :func:`color_set` image by image, with one
    host sync per channel count instead of one or two per image (for CUDA, issue 11).
    """
    out: list[ColorSet | None] = [None] * len(images)
    for channels in (3, 4):
        members = [i for i, img in enumerate(images) if img.shape[-1] == channels]
        if not members:
            continue
        dev = images[members[0]].device
        sizes = torch.tensor([images[i][..., 0].numel() for i in members], device=dev)
        keys = torch.cat([pack(images[i]).reshape(-1) for i in members]).long()
        # Unsigned order of key + 2**31 is the int32 order that color_set sorts RGBA keys in.
        owner = torch.repeat_interleave(torch.arange(len(members), device=dev), sizes)
        tagged = (owner << 32) | (keys + (1 << 31))
        uniq, counts = torch.unique_consecutive(torch.sort(tagged)[0], return_counts=True)
        per_image = torch.bincount(uniq >> 32, minlength=len(members)).tolist()  # the one sync
        colour_keys = ((uniq & 0xFFFFFFFF) - (1 << 31)).to(torch.int32)
        for i, k, c in zip(members, colour_keys.split(per_image), counts.split(per_image)):
            out[i] = ColorSet(k, c, channels)
    return [cs for cs in out if cs is not None]


def color_sets(images: Sequence[torch.Tensor]) -> list[ColorSet]:
    """Colour sets of a batch of uint8 images (H, W, C), on their device.

    The device's compiled kernels image by image where it has them (CPU); one batched
    sort on CUDA (:func:`batched_color_sets`); :func:`color_set` image by image otherwise.
    """
    if images and images[0].device.type == "cuda" and image_backend(images[0].device) is None:
        return batched_color_sets(images)
    return [pixel_color_set(img) for img in images]


def pixel_lookup(cs: ColorSet, values: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Per-pixel value (shaped ``pixels.shape[:-1]``) of each pixel's colour: ``lookup(cs, values, pack(pixels))``."""
    kernels = image_backend(pixels.device)
    if kernels is None:
        return lookup(cs, values, pack(pixels))
    table = _WORKSPACE.table("lookup", pixels.device, values.dtype) if cs.channels == 3 else None
    return kernels.lookup(pixels, cs.keys, values, table)


def lookup(cs: ColorSet, values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Per-pixel value of each pixel's colour.

    Args:
        cs: the colour set the pixels came from.
        values: (M,) uint8 or int32, one value per colour of ``cs``.
        keys: (...) packed pixels; every key must belong to ``cs``.

    Returns:
        A tensor shaped like ``keys`` with the dtype of ``values``.
    """
    if cs.channels == 4:
        return values[torch.searchsorted(cs.keys, keys.reshape(-1))].reshape(keys.shape)
    # Entries of other colours are stale but never read: every key belongs to cs.
    table = _WORKSPACE.table("lookup", keys.device, values.dtype)
    table[cs.keys.long()] = values
    return table.index_select(0, keys.reshape(-1)).reshape(keys.shape)


def bin_colors(
    colors: torch.Tensor, counts: torch.Tensor, points: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge weighted colours into a histogram with ``bits`` bits per channel.

    Args:
        colors: (M, C) uint8 colours (or the corners of finer bins, to coarsen them).
        counts: (M,) int64 pixel counts.
        points: (M, D) float32, the colours in the space k-means works in (or the
            finer bins' means).
        bits: 1..8 bits per channel of the uint8 colours.

    Returns:
        Each occupied bin's weighted mean point (Q, D) float32, its pixel count (Q,)
        int64, the bin of every input (M,) int64, and each bin's lowest corner colour
        (Q, C) uint8 (feed it back with ``bits - 1`` to coarsen the histogram). The
        means are device-independent (fixed-point sums).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    kernels = image_backend(colors.device)
    if kernels is not None:
        scale_x, scale_w = fixed_point_scales(points[None], counts[None])
        return kernels.bin_colors(colors, counts, points, bits, (float(scale_x[0]), float(scale_w[0])))
    channels = colors.shape[1]
    coarse = colors.long() >> (8 - bits)
    bin_key = sum(coarse[:, i] << (bits * i) for i in range(channels))
    if bits * channels <= 21:  # a dense table of occupied bins beats sorting
        occupied = torch.zeros(1 << (bits * channels), dtype=torch.long, device=colors.device)
        occupied[bin_key] = 1
        rank = occupied.cumsum(0) - 1
        inverse = rank[bin_key]
        n_bins = int(rank[-1]) + 1
    else:
        inverse = torch.unique(bin_key, return_inverse=True)[1]
        n_bins = int(inverse.max()) + 1
    bin_counts = torch.zeros(n_bins, dtype=torch.long, device=colors.device).index_add_(0, inverse, counts)
    means, _ = FixedPointSums(points[None], counts[None].double()).means(inverse[None], n_bins)
    corners = torch.zeros((n_bins, channels), dtype=torch.uint8, device=colors.device)
    corners[inverse] = (coarse << (8 - bits)).to(torch.uint8)
    return means[0].float(), bin_counts, inverse, corners


Binned = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""What :func:`bin_colors` returns: bin means, bin counts, each colour's bin, bin corners."""


def bin_colors_many(sets: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], bits: int) -> list[Binned]:
    """:func:`bin_colors` of several ``(colors, counts, points)`` sets of one channel count, equal to it per set.

    Per set, the number of occupied bins is only known once the device has counted them:
    on CUDA a loop of :func:`bin_colors` waits for the device once per set. Here every
    set's bins come from one sort keyed by (set, bin), and the host waits twice in all.
    Each set's means are its own fixed-point sums, as in :func:`bin_colors`. Where
    compiled per-image kernels serve the device (the CPU), it is that loop.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if len(sets) < 2 or image_backend(sets[0][0].device) is not None:
        return [bin_colors(colors, counts, points, bits) for colors, counts, points in sets]
    device, channels = sets[0][0].device, sets[0][0].shape[1]
    sizes = [colors.shape[0] for colors, _, _ in sets]
    colors = torch.cat([c for c, _, _ in sets])
    counts = torch.cat([n for _, n, _ in sets])
    owner = torch.repeat_interleave(
        torch.arange(len(sets), device=device), torch.tensor(sizes, device=device), output_size=sum(sizes)
    )
    coarse = colors.long() >> (8 - bits)
    width = bits * channels
    key = (owner << width) + sum(coarse[:, i] << (bits * i) for i in range(channels))
    bin_keys, inverse = torch.unique(key, return_inverse=True)  # sorted: a set's bins in bin_colors' order
    starts = torch.searchsorted(bin_keys, torch.arange(len(sets) + 1, device=device) << width)
    local = inverse - starts[owner]
    edges = starts.tolist()
    first, n_bins = edges[:-1], [b - a for a, b in itertools.pairwise(edges)]
    bin_counts = torch.zeros(len(bin_keys), dtype=torch.long, device=device).index_add_(0, inverse, counts)
    corners = torch.zeros((len(bin_keys), channels), dtype=torch.uint8, device=device)
    corners[inverse] = (coarse << (8 - bits)).to(torch.uint8)
    pad = functools.partial(torch.nn.utils.rnn.pad_sequence, batch_first=True)
    sums = FixedPointSums(pad([p for _, _, p in sets]), pad([n.double() for _, n, _ in sets]))
    means, _ = sums.means(pad(list(local.split(sizes))), max(n_bins))
    out: list[Binned] = []
    for i, (start, n, labels) in enumerate(zip(first, n_bins, local.split(sizes))):
        out.append((means[i, :n].float(), bin_counts[start : start + n], labels, corners[start : start + n]))
    return out
