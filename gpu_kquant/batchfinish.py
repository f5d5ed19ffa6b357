"""The batched finish of :func:`gpu_kquant.quantize.quantize_batch` for RGB images without dithering.

The per-image finish (:func:`gpu_kquant.quantize._finish`) maps each image's colours,
sums its error and palette usage, reorders its palette and downloads its indices, with
several host syncs per image. Here a whole batch does each step once (issue 11, item 3):

- every image's colour points are cut into rows of at most :data:`TILE` points, each row
  paired with its image's palette, and one batched :func:`gpu_kquant.nearest.assign`
  maps them all (palettes are padded to the batch's largest with copies of their first
  entry, which never win: ties go to the lowest index);
- squared error and usage are segment sums (``index_add_`` over image * k_max + label,
  exact int64), palettes are reordered by one stable sort per row;
- all pixels look their colour's new index up with one ``searchsorted`` over keys
  tagged with the image number, and one gather;
- everything comes back in one (pinned, on CUDA) download, split on the host.

The results are bit-identical to the per-image path (tests/test_batchfinish.py). On CUDA
the host waits for the device twice per batch, whatever the number of images: for the
SSIM window's upload (before any work is queued) and for the download.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .colors import ColorSet, pack
from .metrics import sampled_ssim_tensor, ssim_window
from .nearest import assign
from .spaces import ColorSpace
from .stopping import check_stop

__all__ = ["FORCE", "TILE", "Mapped", "applies", "finish_batch"]

# Use the batched finish on any device, not only CUDA (tests set it to run it on CPU tensors).
FORCE = False

# Colour points per row of the batched assignment (at least the largest palette's size). A
# row never mixes images, so each image wastes under one row of padding; 4096 points is many
# blocks of the Triton kernel per row (not measured on a GPU yet: issue 11's gpu_check should).
TILE = 4096


def applies(
    device: torch.device, images: Sequence[torch.Tensor], palettes: Sequence[torch.Tensor], dither: str
) -> bool:
    """Whether the batched finish serves this batch: CUDA (or :data:`FORCE`), no dither, all RGB.

    Args:
        images: (H, W, C) uint8 per image; palettes: (k_i, C') uint8 fitted palettes.
    """
    if not (FORCE or device.type == "cuda") or dither != "none" or not images:
        return False
    return all(t.shape[2] == 3 for t in images) and all(p.shape[1] == 3 for p in palettes)


class Mapped(NamedTuple):
    """One image's result, the fields of :class:`gpu_kquant.quantize.Quantized` in order."""

    palette: np.ndarray  # (k', 3) uint8, used entries by pixel count
    indices: np.ndarray  # (H, W) uint8 when k' <= 256, else uint16
    mse: float
    blur_mse: None
    ssim: float


@dataclass(frozen=True)
class _Sizes:
    """Host-known sizes of a batch (no sync needed to learn them)."""

    colours: list[int]  # distinct colours per image
    entries: list[int]  # palette entries per image
    pixels: list[int]  # pixels per image
    tile: int  # points per assignment row

    @property
    def k_max(self) -> int:
        return max(self.entries)

    def rows(self, i: int) -> int:
        return -(-self.colours[i] // self.tile)


def _sizes(images: Sequence[torch.Tensor], sets: Sequence[ColorSet], palettes: Sequence[torch.Tensor]) -> _Sizes:
    colours, entries = [len(cs) for cs in sets], [int(p.shape[0]) for p in palettes]
    # Each row carries a copy of its palette: rows of at least k_max points keep the copies
    # no larger than the points (k = 65536 would otherwise copy 0.8 MB per 4096 points).
    tile = min(max(TILE, max(entries)), 1 << max(0, max(colours) - 1).bit_length())
    pixels = [int(t.shape[0]) * int(t.shape[1]) for t in images]
    return _Sizes(colours, entries, pixels, tile)


def _padded(x: torch.Tensor, length: int) -> torch.Tensor:
    """(n, ...) -> (length, ...): rows past n are copies of row 0 (n >= 1)."""
    return torch.cat([x, x[:1].expand(length - x.shape[0], *x.shape[1:])]) if length > x.shape[0] else x


def _map_colours(
    sets: Sequence[ColorSet], palettes: Sequence[torch.Tensor], space: ColorSpace, sizes: _Sizes
) -> torch.Tensor:
    """Nearest palette entry of every colour of every set, offset by image: image * k_max + label.

    Returns:
        (sum of M_i,) int64, the sets' colours in order.
    """
    rows, pals = [], []
    for i, (cs, pal) in enumerate(zip(sets, palettes)):
        # Points per image, exactly as the per-image path computes them (Lab/OKLab math
        # on a different tensor could round differently).
        rows.append(_padded(space.points(cs.colors), sizes.rows(i) * sizes.tile))
        pals.append(_padded(space.points(pal), sizes.k_max).expand(sizes.rows(i), -1, -1))
    points = torch.cat(rows).reshape(-1, sizes.tile, rows[0].shape[1])
    labels = assign(points, torch.cat(pals).contiguous())[0].reshape(-1)
    out, row = [], 0
    for i, m in enumerate(sizes.colours):
        out.append(labels[row * sizes.tile : row * sizes.tile + m] + i * sizes.k_max)
        row += sizes.rows(i)
    return torch.cat(out)


def _reorder(
    sets: Sequence[ColorSet], palettes: Sequence[torch.Tensor], slots: torch.Tensor, sizes: _Sizes
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Error and usage by segment sums, then palettes by pixel count as ``_used_in_order`` orders them.

    Args:
        slots: (sum of M_i,) int64 from :func:`_map_colours`.

    Returns:
        Squared error per image (B,) int64 (exact), used entries per image (B,) int64,
        reordered palettes (B, k_max, 3) uint8 (used entries first), and the new index of
        every colour (sum of M_i,) int64.
    """
    b, k_max = len(sets), sizes.k_max
    dev = slots.device
    colors = torch.cat([cs.colors for cs in sets])
    counts = torch.cat([cs.counts for cs in sets])
    flat_pal = torch.cat([_padded(p, k_max) for p in palettes])  # (B * k_max, 3)
    err = (colors.long() - flat_pal[slots].long()).square().sum(1) * counts
    total = torch.zeros(b * k_max, dtype=torch.long, device=dev).index_add_(0, slots, err).view(b, k_max).sum(1)
    usage = torch.zeros(b * k_max, dtype=torch.long, device=dev).index_add_(0, slots, counts).view(b, k_max)
    # All entries are opaque: _used_in_order's key is a constant minus the usage, so a
    # stable sort by descending usage gives its order; unused (and padding) entries go last.
    order = torch.argsort(-usage, dim=1, stable=True)
    used = (usage > 0).sum(1)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(k_max, device=dev).expand(b, k_max))
    palettes_sorted = flat_pal.view(b, k_max, 3).gather(1, order[..., None].expand(b, k_max, 3))
    return total, used, palettes_sorted, rank.reshape(-1)[slots]


def _pixel_indices(
    images: Sequence[torch.Tensor], sets: Sequence[ColorSet], values: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Every pixel's value (sum of H_i * W_i,) ``dtype``: the value (sum of M_i,) of its colour.

    One ``searchsorted`` over the sets' keys tagged with the image number (RGB keys are
    below 2**24, and each set's keys ascend, so the tagged keys ascend), then one gather.
    """
    tagged = torch.cat([cs.keys.long() + (i << 24) for i, cs in enumerate(sets)])
    pixel_keys = torch.cat([pack(t).reshape(-1).long() + (i << 24) for i, t in enumerate(images)])
    return values.to(dtype)[torch.searchsorted(tagged, pixel_keys, out_int32=tagged.shape[0] < 1 << 31)]


def _ssims(
    images: Sequence[torch.Tensor], palettes: torch.Tensor, indices: torch.Tensor, sizes: _Sizes, window: torch.Tensor
) -> torch.Tensor:
    """:func:`gpu_kquant.metrics.sampled_ssim` of every image (B,) float64, on the device, without syncs.

    Args:
        palettes: (B, k_max, 3) uint8 reordered; indices: (sum of H_i * W_i,) into them.
        window: :func:`gpu_kquant.metrics.ssim_window` (121,) float64 on the device.
    """
    out, start = [], 0
    for i, t in enumerate(images):
        idx = indices[start : start + sizes.pixels[i]].view(t.shape[0], t.shape[1])
        out.append(sampled_ssim_tensor(t, palettes[i], idx, window=window))
        start += sizes.pixels[i]
    return torch.stack(out)


def _download(parts: Sequence[torch.Tensor]) -> np.ndarray:
    """Tensors -> their bytes concatenated on the host (N,) uint8, in one copy (pinned on CUDA)."""
    flat = torch.cat([p.contiguous().view(torch.uint8).reshape(-1) for p in parts])
    if flat.device.type != "cuda":
        return flat.cpu().numpy()
    host = torch.empty(flat.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(flat, non_blocking=True)
    torch.cuda.current_stream(flat.device).synchronize()
    return host.numpy()


def finish_batch(
    images: Sequence[torch.Tensor],
    sets: Sequence[ColorSet],
    palettes: Sequence[torch.Tensor],
    space: ColorSpace,
    stop: threading.Event | None = None,
) -> list[Mapped]:
    """Map every image to its fitted palette, as ``_finish(..., fixed=False, dither="none")`` does image by image.

    Args:
        images: (H_i, W_i, 3) uint8 on one device; sets: their colour sets (channels 3);
        palettes: (k_i, 3) uint8 fitted palettes, k_i >= 1, on the same device.
        stop: checked once, before the mapping (:func:`gpu_kquant.stopping.check_stop`).
    """
    check_stop(stop)
    # The window's upload waits for the device: do it first, while little is queued.
    window = ssim_window(images[0].device)
    sizes = _sizes(images, sets, palettes)
    slots = _map_colours(sets, palettes, space, sizes)
    total, used, sorted_pal, new_index = _reorder(sets, palettes, slots, sizes)
    dtype = torch.uint8 if sizes.k_max <= 256 else torch.int32
    indices = _pixel_indices(images, sets, new_index, dtype)
    ssims = _ssims(images, sorted_pal, indices, sizes, window)
    # 8-byte fields first and the indices before the palettes keep every part aligned on the host.
    return _split(_download([total, used, ssims, indices, sorted_pal]), images, sizes, dtype)


def _split(host: np.ndarray, images: Sequence[torch.Tensor], sizes: _Sizes, dtype: torch.dtype) -> list[Mapped]:
    """The downloaded bytes (N,) uint8 of :func:`finish_batch`'s parts -> one result per image."""
    b, k_max, n_pixels = len(images), sizes.k_max, sum(sizes.pixels)
    total_h, used_h = host[: 8 * b].view(np.int64), host[8 * b : 16 * b].view(np.int64)
    ssim_h = host[16 * b : 24 * b].view(np.float64)
    itemsize = 1 if dtype == torch.uint8 else 4
    idx_h = host[24 * b : 24 * b + n_pixels * itemsize].view(np.uint8 if itemsize == 1 else np.int32)
    pal_h = host[24 * b + n_pixels * itemsize :].reshape(b, k_max, 3)
    out, start = [], 0
    for i, t in enumerate(images):
        h, w = int(t.shape[0]), int(t.shape[1])
        n = int(used_h[i])
        idx = idx_h[start : start + h * w].reshape(h, w).astype(np.uint8 if n <= 256 else np.uint16)
        # float(total) / pixels: the per-image path's exact-integer error, divided the same way.
        out.append(Mapped(pal_h[i, :n].copy(), idx, float(total_h[i]) / (3 * h * w), None, float(ssim_h[i])))
        start += h * w
    return out
