"""Reference kernels in plain torch: the definition every backend must reproduce.

A squared distance is summed coordinate by coordinate in index order,
``((x0 - c0)^2 + (x1 - c1)^2) + (x2 - c2)^2`` in float32 with no fused multiply-add,
so it never depends on how points were blocked or batched. Ties go to the lowest
centroid index. Cluster sums are int64 fixed point (see :mod:`gpu_kquant.reduce`), so
they are exact whatever the order of accumulation.
"""

from __future__ import annotations

import torch

__all__ = ["kpp_potential", "lloyd_step", "min_update", "nearest", "paired_sq_dists", "sq_dists"]

# Elements of one (B, chunk, k) distance block: small enough to stay in cache on a CPU,
# large enough to keep a GPU busy.
_BLOCK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 26}


def _chunk(points: torch.Tensor, width: int) -> int:
    budget = _BLOCK_ELEMENTS["cuda" if points.device.type == "cuda" else "cpu"]
    return max(1, budget // max(1, points.shape[0] * width))


def sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared distances (B, n, m) between x (B, n, D) and c (B, m, D), summed in index order."""
    out = (x[:, :, None, 0] - c[:, None, :, 0]).square_()
    for j in range(1, x.shape[2]):
        out += (x[:, :, None, j] - c[:, None, :, j]).square_()
    return out


def paired_sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared distances (...,) between matching rows of x and c (..., D), summed in index order."""
    out = (x[..., 0] - c[..., 0]).square_()
    for j in range(1, x.shape[-1]):
        out += (x[..., j] - c[..., j]).square_()
    return out


def nearest(
    points: torch.Tensor, centroids: torch.Tensor, second: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Nearest centroid of every point.

    Args:
        points: (B, N, D) float32.
        centroids: (B, k, D) float32 on the same device.
        second: also return the squared distance to the second-nearest centroid.

    Returns:
        labels (B, N) int64, squared distance to the nearest (B, N) float32, and the
        squared distance to the second nearest (B, N) float32 (``inf`` when k = 1) or
        ``None`` when not asked for.
    """
    b, n, _ = points.shape
    k = centroids.shape[1]
    labels = torch.empty((b, n), dtype=torch.long, device=points.device)
    d2 = torch.empty((b, n), dtype=torch.float32, device=points.device)
    d2nd = torch.full((b, n), float("inf"), dtype=torch.float32, device=points.device) if second else None
    step = _chunk(points, k)
    for s in range(0, n, step):
        block = sq_dists(points[:, s : s + step], centroids)
        best, idx = block.min(dim=2)
        d2[:, s : s + step], labels[:, s : s + step] = best, idx
        if d2nd is not None and k > 1:
            d2nd[:, s : s + step] = block.scatter_(2, idx[..., None], float("inf")).amin(2)
    return labels, d2, d2nd


def lloyd_step(
    points: torch.Tensor, qx: torch.Tensor, qw: torch.Tensor, centroids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fused Lloyd pass: assignment plus fixed-point cluster sums.

    Args:
        points: (B, N, D) float32.
        qx: (B, N, D) int64, fixed-point weighted coordinates of the points.
        qw: (B, N) int64, fixed-point weights (0 marks padding).
        centroids: (B, k, D) float32.

    Returns:
        labels (B, N) int64, squared distances to the nearest (B, N) float32, and the
        int64 sums (B, k, D) of ``qx`` and (B, k) of ``qw`` per cluster.
    """
    b, _, d = points.shape
    k = centroids.shape[1]
    labels, d2, _ = nearest(points, centroids)
    flat = (labels + torch.arange(b, device=labels.device)[:, None] * k).reshape(-1)
    sums = torch.zeros((b * k, d), dtype=torch.long, device=points.device).index_add_(0, flat, qx.reshape(-1, d))
    mass = torch.zeros(b * k, dtype=torch.long, device=points.device).index_add_(0, flat, qw.reshape(-1))
    return labels, d2, sums.view(b, k, d), mass.view(b, k)


def kpp_potential(
    points: torch.Tensor, weights: torch.Tensor, closest: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    """k-means++ potential of each candidate centre.

    Args:
        points: (B, N, D) float32.
        weights: (B, N) float32.
        closest: (B, N) float32, squared distance to the closest chosen centre.
        candidates: (B, L, D) float32.

    Returns:
        (B, L) float64: sum over points of ``weight * min(closest, d2(point, candidate))``,
        each term rounded to float32 before the float64 sum.
    """
    b, n, _ = points.shape
    potential = torch.zeros((b, candidates.shape[1]), dtype=torch.float64, device=points.device)
    step = _chunk(points, candidates.shape[1])
    for s in range(0, n, step):
        d2 = torch.minimum(sq_dists(points[:, s : s + step], candidates), closest[:, s : s + step, None])
        potential += (weights[:, s : s + step, None] * d2).double().sum(1)
    return potential


def min_update(points: torch.Tensor, centre: torch.Tensor, closest: torch.Tensor) -> torch.Tensor:
    """``min(closest, d2(point, centre))`` (B, N) float32 for centre (B, D)."""
    return torch.minimum(closest, sq_dists(points, centre[:, None])[..., 0])
