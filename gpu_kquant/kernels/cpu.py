"""CPU kernels: the compiled C extension ``gpu_kquant._kernels``, single-threaded per call.

Same signatures and results as :mod:`.reference` (labels identical, sums exact); the
GIL is released while a kernel runs, so one quantizer thread per core scales.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch

try:  # built at install time; the torch reference stands in without it
    _kernels: Any = importlib.import_module("gpu_kquant._kernels")
except ImportError:  # pragma: no cover - exercised only where the extension did not build
    _kernels = None

__all__ = ["AVAILABLE", "kmeans_pp", "kpp_potential", "lloyd", "lloyd_step", "min_update", "nearest"]

AVAILABLE = _kernels is not None


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def _np(t: torch.Tensor) -> object:
    return t.numpy()


def nearest(
    points: torch.Tensor, centroids: torch.Tensor, second: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """See :func:`gpu_kquant.kernels.reference.nearest`."""
    b, n, d = points.shape
    k = centroids.shape[1]
    pts, cen = _f32(points), _f32(centroids)
    labels = torch.empty((b, n), dtype=torch.long)
    d2 = torch.empty((b, n), dtype=torch.float32)
    d2nd = torch.empty((b, n), dtype=torch.float32) if second else None
    _kernels.nearest(_np(pts), _np(cen), _np(labels), _np(d2), None if d2nd is None else _np(d2nd), b, n, k, d)
    return labels, d2, d2nd


def lloyd_step(
    points: torch.Tensor, qx: torch.Tensor, qw: torch.Tensor, centroids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :func:`gpu_kquant.kernels.reference.lloyd_step`."""
    b, n, d = points.shape
    k = centroids.shape[1]
    labels = torch.empty((b, n), dtype=torch.long)
    d2 = torch.empty((b, n), dtype=torch.float32)
    sums = torch.zeros((b, k, d), dtype=torch.long)
    mass = torch.zeros((b, k), dtype=torch.long)
    _kernels.lloyd_step(
        _np(_f32(points)), _np(qx.contiguous()), _np(qw.contiguous()), _np(_f32(centroids)),
        _np(labels), _np(d2), _np(sums), _np(mass), b, n, k, d,
    )  # fmt: skip
    return labels, d2, sums, mass


def kpp_potential(
    points: torch.Tensor, weights: torch.Tensor, closest: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    """See :func:`gpu_kquant.kernels.reference.kpp_potential`."""
    b, n, d = points.shape
    n_cand = candidates.shape[1]
    potential = torch.zeros((b, n_cand), dtype=torch.float64)
    _kernels.kpp_potential(
        _np(_f32(points)), _np(_f32(weights)), _np(_f32(closest)), _np(_f32(candidates)), _np(potential),
        b, n, n_cand, d,
    )  # fmt: skip
    return potential


def min_update(points: torch.Tensor, centre: torch.Tensor, closest: torch.Tensor) -> torch.Tensor:
    """See :func:`gpu_kquant.kernels.reference.min_update`."""
    b, n, d = points.shape
    out = _f32(closest).clone()
    _kernels.min_update(_np(_f32(points)), _np(_f32(centre)), _np(out), b, n, d)
    return out


def kmeans_pp(
    points: torch.Tensor, weights: torch.Tensor, uniforms: torch.Tensor, stop: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole weighted greedy k-means++ per problem; see :func:`gpu_kquant.kmeans.kmeans_plusplus`.

    Args:
        points: (B, N, D) float32; weights: (B, N) float32; uniforms: (B, k, L) float64.
        stop: as in :func:`lloyd`, polled before every centre.

    Returns:
        centres (B, k, D) float32 and the effective k (B,) int64.
    """
    b, n, d = points.shape
    k, n_cand = uniforms.shape[1:]
    centres = torch.empty((b, k, d), dtype=torch.float32)
    n_eff = torch.empty(b, dtype=torch.long)
    _kernels.kmeans_pp(
        _np(_f32(points)), _np(_f32(weights)), _np(uniforms.double().contiguous()), _np(centres), _np(n_eff),
        b, n, k, n_cand, d, stop,
    )  # fmt: skip
    return centres, n_eff


def lloyd(
    points: torch.Tensor,
    weights: torch.Tensor,
    qx: torch.Tensor,
    qw: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor],
    centroids: torch.Tensor,
    n_eff: torch.Tensor,
    tol_abs: torch.Tensor,
    max_iter: int,
    stop: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole Lloyd loop per problem, as :func:`gpu_kquant.kmeans._lloyd` runs it step by step.

    Args:
        points: (B, N, D) float32; weights: (B, N) float32; qx (B, N, D) and qw (B, N) int64
        fixed-point data with their float64 scales (B,) each; centroids (B, k, D) float32
        starting centroids; n_eff (B,) int64 effective k; tol_abs (B,) float64.
        stop: a (1,) uint8 array (:attr:`gpu_kquant.stopping.StopFlag.buffer`), polled between
            iterations: once it holds 1 the call returns early and its results are meaningless.

    Returns:
        centroids (B, k, D), labels (B, N) int64, squared distances (B, N) float32,
        iterations run (B,) int64 and converged (B,) bool.
    """
    b, n, d = points.shape
    k = centroids.shape[1]
    cen = _f32(centroids).clone()
    labels = torch.empty((b, n), dtype=torch.long)
    d2 = torch.empty((b, n), dtype=torch.float32)
    n_iter = torch.empty(b, dtype=torch.long)
    converged = torch.empty(b, dtype=torch.bool)
    _kernels.lloyd(
        _np(_f32(points)), _np(_f32(weights)), _np(qx.contiguous()), _np(qw.contiguous()), _np(cen),
        _np(n_eff.long().contiguous()), _np(tol_abs.double().contiguous()), _np(scales[0].double().contiguous()),
        _np(scales[1].double().contiguous()), _np(labels), _np(d2), _np(n_iter), _np(converged),
        b, n, k, d, max_iter, stop,
    )  # fmt: skip
    return cen, labels, d2, n_iter, converged
