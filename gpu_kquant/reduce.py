"""Deterministic weighted segment sums and means, identical on every device."""

from __future__ import annotations

import torch

__all__ = ["FixedPointSums", "fixed_point_scales"]


def fixed_point_scales(points: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Power-of-two fixed-point scales (B,) float64 of weighted points and of weights.

    Args:
        points: (B, N, D) float; weights: (B, N) float.

    The scales keep every cluster sum below 2**61 (no int64 overflow). The bound of
    point i is max_d |x_id| |w_i|, which equals max_d |x_id w_i| exactly (rounding is
    monotone), without a (B, N, D) float64 product.
    """
    w64 = weights.double()
    bound_x = (points.abs().amax(-1).double() * w64.abs()).sum(1).clamp_min(1e-300)
    bound_w = w64.sum(1).clamp_min(1e-300)
    scale_x = torch.exp2(torch.floor(61 - torch.log2(bound_x)).clamp(-1000, 1000))
    scale_w = torch.exp2(torch.floor(61 - torch.log2(bound_w)).clamp(-1000, 1000))
    return scale_x, scale_w


class FixedPointSums:
    """Order-independent weighted cluster sums.

    Weighted coordinates are converted once to int64 fixed point with a per-problem
    power-of-two scale chosen so no sum can overflow. Integer ``index_add_`` is exact
    and associative, so the update is bit-identical whatever order CUDA's atomics run
    in, and identical between devices.
    """

    def __init__(self, points: torch.Tensor, weights: torch.Tensor) -> None:
        w64 = weights.double()
        xw = points.double() * w64[..., None]
        self.scale_x, self.scale_w = fixed_point_scales(points, weights)
        self.qx = torch.round(xw * self.scale_x[:, None, None]).long()
        self.qw = torch.round(w64 * self.scale_w[:, None]).long()

    def repeat_rows(self, times: int) -> FixedPointSums:
        """The same sums with every problem repeated ``times`` times in a row (restarts)."""
        out = object.__new__(FixedPointSums)
        out.qx, out.qw = self.qx.repeat_interleave(times, 0), self.qw.repeat_interleave(times, 0)
        out.scale_x, out.scale_w = self.scale_x.repeat_interleave(times), self.scale_w.repeat_interleave(times)
        return out

    def select(self, keep: torch.Tensor) -> None:
        self.qx, self.qw = self.qx[keep], self.qw[keep]
        self.scale_x, self.scale_w = self.scale_x[keep], self.scale_w[keep]

    def means(self, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted means (B, k, D) float64 (NaN for empty clusters) and weights (B, k)."""
        b, _, d = self.qx.shape
        flat = (labels + torch.arange(b, device=labels.device)[:, None] * k).reshape(-1)
        sums = torch.zeros((b * k, d), dtype=torch.long, device=labels.device)
        sums.index_add_(0, flat, self.qx.reshape(-1, d))
        mass = torch.zeros(b * k, dtype=torch.long, device=labels.device)
        mass.index_add_(0, flat, self.qw.reshape(-1))
        return self.to_means(sums.view(b, k, d), mass.view(b, k))

    def to_means(self, sums: torch.Tensor, mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Means (B, k, D) float64 (NaN when empty) and weights (B, k) from int64 cluster sums.

        ``sums`` (B, k, D) and ``mass`` (B, k) are sums of :attr:`qx` and :attr:`qw`, as a
        fused Lloyd kernel returns them.
        """
        sums_f = sums.double() / self.scale_x[:, None, None]
        mass_f = mass.double() / self.scale_w[:, None]
        return sums_f / mass_f[..., None], mass_f
