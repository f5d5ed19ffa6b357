"""A fitted palette spread outward for adaptive dithering (issue 15).

k-means puts each entry at its cluster's mean, so the palette's hull shrinks toward the
image's mean colour, and error diffusion can only reproduce colours inside the hull:
saturated and extreme areas lose their local mean (blurred PSNR). When a fitted palette is
dithered adaptively, each opaque entry moves SPREAD of the way toward the mean of its
cluster's most outlying SPREAD_TOP (by pixel count) along the direction from the image's
mean colour to the entry. The undithered mapping keeps the k-means palette.

Measured on the five bundled photos at k = 16 and 64 against pngquant's default dithering
(benchmarks/results/dither_palette_intel-xeon_2c_nogpu_2026-12-02.md): spreading by 0.1 of the
top quarter raises blurred PSNR by 0.1-0.4 dB on every case and costs up to 0.008 SSIM, which
the stronger hysteresis FITTED_HYSTERESIS (1.5 instead of 1.375) buys back; together they meet
all three targets on 7/10 cases (6/10 before, none lost). Spreading by 0.25 or more, or the
whole palette scaled about the mean, costs more SSIM than hysteresis recovers (4/10 or less).
"""

from __future__ import annotations

import torch

from .colors import ColorSet

__all__ = ["FITTED_HYSTERESIS", "SPREAD", "SPREAD_TOP", "spread_palette"]

SPREAD, SPREAD_TOP = 0.1, 0.25
FITTED_HYSTERESIS = 1.5


def spread_palette(cs: ColorSet, labels: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """The palette with its opaque entries moved outward, for adaptive dithering.

    Args:
        cs: the image's distinct colours (M, C) and pixel counts (M,).
        labels: (M,) int64 nearest palette entry of each colour (the undithered mapping).
        palette: (k, C') uint8 fitted palette.

    Returns:
        (k, C') uint8; entries with transparency, and entries without opaque pixels, unchanged.
    """
    rgb, w, lab = cs.colors[:, :3], cs.counts, labels
    if cs.channels == 4:
        opaque = cs.colors[:, 3] == 255
        rgb, w, lab = rgb[opaque], w[opaque], lab[opaque]
    k = palette.shape[0]
    if rgb.shape[0] == 0:
        return palette
    # Pixel-weighted sums in int64: exact, so the same on every device and in any order.
    entries, x = palette[:, :3].float(), rgb.float()
    away = entries - (rgb.long() * w[:, None]).sum(0).float() / float(w.sum())  # (k, 3): image mean to entry
    length = away.norm(dim=1, keepdim=True)
    # index_select, not [lab]: 2.5 against 6.1 ms for 0.36 M colours (one thread, 2026-12-03).
    along = ((x - entries.index_select(0, lab)) * (away / length.clamp_min(1e-9)).index_select(0, lab)).sum(1)
    # Colours grouped by entry, the most outlying first: one stable sort of integer keys (|along|
    # <= 255 * sqrt(3), so 256 * along fits in 2**17; integer keys sort 5x faster than floats, and
    # int32 ones, where k < 2**13 lets them fit, in 25 against 44 ms for 0.36 M colours).
    key = lab * (1 << 18) - (along * 256).round().long()
    order = torch.argsort(key.int() if k < 1 << 13 else key, stable=True)
    lab, w, rgb = lab.index_select(0, order), w.index_select(0, order), rgb.index_select(0, order)
    total = torch.zeros(k, dtype=torch.long, device=w.device).index_add_(0, lab, w)
    before = torch.cumsum(total, 0) - total  # pixels of the entries ahead of each entry
    ahead = torch.cumsum(w, 0) - w - before.index_select(0, lab)  # the entry's pixels before each colour
    top = ahead < SPREAD_TOP * total.index_select(0, lab)
    lab, w, rgb = lab[top], w[top], rgb[top]
    sums = torch.zeros(k, 3, dtype=torch.long, device=w.device).index_add_(0, lab, rgb.long() * w[:, None])
    weight = torch.zeros(k, dtype=torch.long, device=w.device).index_add_(0, lab, w)
    extreme = (sums.double() / weight.clamp_min(1)[:, None]).float()
    movable = (weight > 0) & (length[:, 0] > 1e-6) & (palette[:, 3] == 255 if palette.shape[1] == 4 else True)
    moved = torch.where(movable[:, None], entries + SPREAD * (extreme - entries), entries)
    out = palette.clone()
    out[:, :3] = moved.round().clamp(0, 255).to(torch.uint8)
    return out
