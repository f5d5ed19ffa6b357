"""Exact nearest-centroid queries on batched tensors, through the kernel interface.

:func:`assign` and :func:`nearest_two` run the device's fused kernel;
:func:`assign_with_bounds` starts from a guessed label and searches only the points
whose guess the triangle inequality cannot confirm (the quantizer guesses from each
colour's histogram bin).
"""

from __future__ import annotations

import math

import torch

from .kernels import Kernels, backend
from .kernels.reference import paired_sq_dists, sq_dists

__all__ = ["assign", "assign_with_bounds", "gather_rows", "nearest_two"]


def _kernels(device: torch.device) -> Kernels:
    return backend(device)


def assign(points: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every point.

    Args:
        points: (B, N, D) float32.
        centroids: (B, k, D) float32, on the same device.

    Returns:
        labels (B, N) int64 and squared distances to the nearest centroid (B, N) float32,
        from the device's fused kernel (no (B, N, k) matrix is built).
    """
    labels, d2, _ = _kernels(points.device).nearest(points, centroids)
    return labels, d2


def nearest_two(points: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid and distance to the second nearest.

    Args:
        points: (B, N, D) float32.
        centroids: (B, k, D) float32.

    Returns:
        labels (B, N) int64 and the distance (not squared) to the second-nearest
        centroid (B, N) float32, ``inf`` when k = 1.
    """
    labels, _, d2nd = _kernels(points.device).nearest(points, centroids, second=True)
    assert d2nd is not None  # asked for
    return labels, d2nd.sqrt_()


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), idx (B, L) -> (B, L, D)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _half_separation(centroids: torch.Tensor) -> torch.Tensor:
    """Half the distance from each centroid to its nearest other centroid (B, k)."""
    sep = sq_dists(centroids, centroids)
    sep.diagonal(dim1=1, dim2=2).fill_(math.inf)
    return 0.5 * sep.amin(2).sqrt_()


def _dist_to_assigned(points: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Exact distance (B, N) of every point to its assigned centroid."""
    assigned = gather_rows(centroids, labels)
    return paired_sq_dists(points, assigned).sqrt_()


def assign_with_bounds(
    points: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, lower: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest centroids, starting from a guess and a bound.

    Only points whose guessed centroid is not provably nearest get a full search, so a
    good guess (for example the label of a histogram bin the point falls in) makes this
    much cheaper than :func:`assign`.

    Args:
        points: (B, N, D) float32.
        centroids: (B, k, D) float32.
        labels: (B, N) int64 guessed nearest centroid.
        lower: (B, N) float32, a lower bound on the distance from each point to every
            centroid other than its guess (``-inf`` when unknown).

    Returns:
        labels (B, N) int64 and the distance to the nearest centroid (B, N) float32.
    """
    upper = _dist_to_assigned(points, centroids, labels)
    bound = torch.maximum(_half_separation(centroids).gather(1, labels), lower)
    # A margin of a few float32 ulps keeps the skip conservative under rounding.
    need = upper * (1 + 1e-5) + 1e-6 >= bound
    labels = labels.clone()
    b = points.shape[0]
    for row in range(b):  # rows are few (one per palette); the flagged points are packed
        idx = need[row].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        lab, d2 = assign(points[row, idx][None], centroids[row : row + 1])
        labels[row, idx] = lab[0]
        upper[row, idx] = d2[0].sqrt()
    return labels, upper
