"""Triton kernels for the k-means kernel interface (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

Same signatures and results as :mod:`.reference`:

- a squared distance is ``((x0 - c0)^2 + (x1 - c1)^2) + ...`` in float32, summed in index
  order with no fused multiply-add (every launch passes ``enable_fp_fusion=False``) and
  no ``tl.dot``/TF32, so labels equal the reference's bit for bit;
- a point block keeps its running min, argmin and second min in registers while it loops
  over all k centroids (ties to the lowest index: only a strictly smaller distance
  replaces the best), so no (N, k) matrix is ever written and any k up to 65536 works;
- cluster sums are int64 fixed point added with integer atomics: exact and independent
  of the order the atomics run in; no float atomics anywhere;
- k-means++ potentials are float64 sums of float32 terms: fixed-size blocks write partial
  sums, then one kernel adds them in block order, so a result is deterministic and does
  not change when a problem is padded with zero-weight points in a larger batch.

Colour points (D <= 4) keep their coordinates in registers; larger D reloads the
coordinates beyond the fourth from L1 on every centroid (correct for any D, slower).

``TRITON_INTERPRET=1`` must be set before ``triton`` is first imported in the process:
``triton.jit`` decides between compiled and interpreted functions when it decorates them,
and Triton's own library (``tl.sum``, ...) is decorated when ``triton`` is imported.
``INTERPRET`` is true only when both this module and Triton's library were interpreted.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import triton
import triton.language as tl

__all__ = ["AVAILABLE", "INTERPRET", "kpp_potential", "lloyd_step", "map_pixels", "min_update", "nearest"]

_ENV_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Triton's own jit library was decorated when triton was first imported: both must agree.
INTERPRET = _ENV_INTERPRET and type(tl.sum).__name__ == "InterpretedFunction"
AVAILABLE = INTERPRET or (not _ENV_INTERPRET and torch.cuda.is_available())

# Points per program for nearest/lloyd_step. Results do not depend on it (no float
# reduction runs across points), so it may follow the problem size: 512 points on 4 warps
# give each thread 4 independent points to overlap the centroid loads; small batches use
# 128 so that there are still a few programs per SM (an H100 has 132 SMs).
_BLOCK_N_LARGE, _BLOCK_N_SMALL, _MIN_PROGRAMS = 512, 128, 4 * 132
# The interpreter pays per operation, not per element: one wide block per problem.
_BLOCK_N_INTERPRET = 1024
# Fixed (never size-dependent) blocks of the k-means++ partial sums: the float64 summation
# order depends on them, and batch-independence needs the same order alone or padded. A
# program sums 32 chunks of 128 points, so the in-order sum over blocks (one latency-bound
# load per block) is 4096x shorter than N; 16 candidates cover L = 2 + ln k for any k <= 65536.
_KPP_BLOCK_N, _KPP_CHUNKS, _KPP_BLOCK_L = 128, 32, 16
# Up to this k, lloyd_step pre-reduces each block's sums per cluster before the atomics:
# with few clusters, millions of atomics on k*D addresses would serialise in L2.
_PRE_REDUCE_MAX_K, _PRE_REDUCE_TILE = 32, 16
_UNROLL = 4
_NUM_WARPS = 4

# Triton ships no type information (no py.typed), so its decorator is typed here; a launch,
# kernel[grid](...), stays dynamic: Triton checks its arguments itself. Kernel parameters carry
# no Python types (hence the no-untyped-def ignores below): Triton reads a kernel's parameter
# annotations as its own signature (tl.constexpr, "i32", "*fp32") and specialises on them.
_jit: Callable[[Callable[..., object]], Any] = triton.jit


@contextlib.contextmanager
def _on(device: torch.device) -> Iterator[None]:
    """Launch on ``device`` (Triton launches on torch's current device and stream)."""
    if device.type == "cuda" and not INTERPRET:
        with torch.cuda.device(device):
            yield
    else:
        yield


@_jit
def _coord(p, offs, mask, d: tl.constexpr, D: tl.constexpr):  # type: ignore[no-untyped-def]
    # Coordinate d of each point; when d >= D, coordinate d % D stands in (and is never used).
    return tl.load(p + offs * D + d % D, mask=mask, other=0.0)


@_jit
def _dist(x0, x1, x2, x3, p, offs, mask, c, cidx, cmask, D: tl.constexpr):  # type: ignore[no-untyped-def]
    # Squared distance of points (x0..x3, or p[offs] beyond 4 coordinates) to centres
    # c[cidx], summed in index order. cidx is a scalar (one centre) or a row of centres.
    t = x0 - tl.load(c + cidx * D, mask=cmask, other=0.0)
    acc = t * t
    if D > 1:
        t = x1 - tl.load(c + cidx * D + 1, mask=cmask, other=0.0)
        acc = acc + t * t
    if D > 2:
        t = x2 - tl.load(c + cidx * D + 2, mask=cmask, other=0.0)
        acc = acc + t * t
    if D > 3:
        t = x3 - tl.load(c + cidx * D + 3, mask=cmask, other=0.0)
        acc = acc + t * t
    for d in tl.static_range(4, D):
        t = tl.load(p + offs * D + d, mask=mask, other=0.0) - tl.load(c + cidx * D + d, mask=cmask, other=0.0)
        acc = acc + t * t
    return acc


@_jit
def _add_sums(label, offs, mask, qx, qw, sums, mass, K, D: tl.constexpr, TILE_K: tl.constexpr):  # type: ignore[no-untyped-def]
    # Adds the block's fixed-point coordinates and weights to its clusters' int64 sums.
    w = tl.load(qw + offs, mask=mask, other=0)
    if TILE_K == 0:
        # Many clusters: one atomic per point and coordinate, little contention.
        tl.atomic_add(mass + label, w, mask=mask & (w != 0), sem="relaxed")
        for d in tl.static_range(D):
            v = tl.load(qx + offs * D + d, mask=mask, other=0)
            tl.atomic_add(sums + label * D + d, v, mask=mask & (v != 0), sem="relaxed")
    else:
        # Few clusters: sum the block one-hot per cluster tile, then one atomic per cluster.
        for c0 in range(0, K, TILE_K):
            cols = c0 + tl.arange(0, TILE_K)
            hit = label[:, None] == cols[None, :]
            part = tl.sum(tl.where(hit, w[:, None], 0), axis=0)
            tl.atomic_add(mass + cols, part, mask=(cols < K) & (part != 0), sem="relaxed")
            for d in tl.static_range(D):
                v = tl.load(qx + offs * D + d, mask=mask, other=0)
                part = tl.sum(tl.where(hit, v[:, None], 0), axis=0)
                tl.atomic_add(sums + cols * D + d, part, mask=(cols < K) & (part != 0), sem="relaxed")


@_jit
def _nearest_kernel(  # type: ignore[no-untyped-def]
    p_ptr, c_ptr, lab_ptr, d2_ptr, d2nd_ptr, qx_ptr, qw_ptr, sums_ptr, mass_ptr, N, K,
    D: tl.constexpr, SECOND: tl.constexpr, SUMS: tl.constexpr, TILE_K: tl.constexpr,
    BLOCK_N: tl.constexpr, UNROLL: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    p = p_ptr + b * N * D
    c = c_ptr + b * K * D
    x0 = _coord(p, offs, mask, 0, D)
    x1 = _coord(p, offs, mask, 1, D)
    x2 = _coord(p, offs, mask, 2, D)
    x3 = _coord(p, offs, mask, 3, D)
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    second = tl.full((BLOCK_N,), float("inf"), tl.float32)
    label = tl.zeros((BLOCK_N,), tl.int32)
    for j in tl.range(0, K, loop_unroll_factor=UNROLL):
        dj = _dist(x0, x1, x2, x3, p, offs, mask, c, j, True, D)
        closer = dj < best
        if SECOND:
            second = tl.where(closer, best, tl.minimum(second, dj))
        label = tl.where(closer, j, label)
        best = tl.where(closer, dj, best)
    tl.store(lab_ptr + b * N + offs, label.to(tl.int64), mask=mask)
    tl.store(d2_ptr + b * N + offs, best, mask=mask)
    if SECOND:
        tl.store(d2nd_ptr + b * N + offs, second, mask=mask)
    if SUMS:
        _add_sums(label, offs, mask, qx_ptr + b * N * D, qw_ptr + b * N, sums_ptr + b * K * D, mass_ptr + b * K, K, D,
                  TILE_K)  # fmt: skip


@_jit
def _kpp_partial_kernel(  # type: ignore[no-untyped-def]
    p_ptr, w_ptr, cl_ptr, cand_ptr, part_ptr, N, L, NB,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, CHUNKS: tl.constexpr,
):  # fmt: skip
    # part[b, blk, l] = float64 sum of f32(w * min(closest, d2)) over the CHUNKS * BLOCK_N points of
    # block blk: added element-wise chunk by chunk, then one tree sum. Padding adds exact zeros.
    b = tl.program_id(1).to(tl.int64)
    blk = tl.program_id(0)
    p = p_ptr + b * N * D
    cand = cand_ptr + b * L * D
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        lm = ls < L
        acc = tl.zeros((BLOCK_N, BLOCK_L), tl.float64)
        for i in range(0, CHUNKS):
            offs = (blk * CHUNKS + i) * BLOCK_N + tl.arange(0, BLOCK_N)
            mask = offs < N
            x0 = _coord(p, offs, mask, 0, D)[:, None]
            x1 = _coord(p, offs, mask, 1, D)[:, None]
            x2 = _coord(p, offs, mask, 2, D)[:, None]
            x3 = _coord(p, offs, mask, 3, D)[:, None]
            d2 = _dist(x0, x1, x2, x3, p, offs[:, None], mask[:, None], cand, ls[None, :], lm[None, :], D)
            w = tl.load(w_ptr + b * N + offs, mask=mask, other=0.0)[:, None]
            cl = tl.load(cl_ptr + b * N + offs, mask=mask, other=0.0)[:, None]
            acc += (w * tl.where(d2 < cl, d2, cl)).to(tl.float64)
        tl.store(part_ptr + (b * NB + blk) * L + ls, tl.sum(acc, axis=0), mask=lm)


@_jit
def _sum_blocks_kernel(part_ptr, out_ptr, L, NB, BLOCK_L: tl.constexpr):  # type: ignore[no-untyped-def]
    # out[b, l] = sum of part[b, :, l] in block order (sequential: trailing zero blocks change nothing).
    b = tl.program_id(1).to(tl.int64)
    ls = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    lm = ls < L
    acc = tl.zeros((BLOCK_L,), tl.float64)
    for i in range(0, NB):
        acc += tl.load(part_ptr + (b * NB + i) * L + ls, mask=lm, other=0.0)
    tl.store(out_ptr + b * L + ls, acc, mask=lm)


@_jit
def _min_update_kernel(p_ptr, c_ptr, cl_ptr, out_ptr, N, D: tl.constexpr, BLOCK_N: tl.constexpr):  # type: ignore[no-untyped-def]
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    p = p_ptr + b * N * D
    x0 = _coord(p, offs, mask, 0, D)
    x1 = _coord(p, offs, mask, 1, D)
    x2 = _coord(p, offs, mask, 2, D)
    x3 = _coord(p, offs, mask, 3, D)
    d2 = _dist(x0, x1, x2, x3, p, offs, mask, c_ptr + b * D, 0, True, D)
    cl = tl.load(cl_ptr + b * N + offs, mask=mask, other=0.0)
    tl.store(out_ptr + b * N + offs, tl.where(d2 < cl, d2, cl), mask=mask)


def _check(points: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous float32 (B, N, D) points and (B, m, D) centres on one device."""
    if points.dtype != torch.float32 or centres.dtype != torch.float32:
        raise TypeError(f"points and centres must be float32, got {points.dtype} and {centres.dtype}")
    if points.dim() != 3 or centres.dim() != 3 or centres.shape[0] != points.shape[0]:
        raise ValueError(f"expected (B, N, D) points and (B, m, D) centres, got {tuple(points.shape)}, "
                         f"{tuple(centres.shape)}")  # fmt: skip
    if centres.shape[2] != points.shape[2] or centres.shape[1] == 0:
        raise ValueError(f"centres {tuple(centres.shape)} do not fit points {tuple(points.shape)}")
    if max(points.shape[1], centres.shape[1]) * points.shape[2] >= 1 << 31:
        raise ValueError(f"one problem must hold under 2**31 coordinates, got {tuple(points.shape)}")  # int32 offsets
    return points.contiguous(), centres.contiguous()


def _block_n(b: int, n: int) -> int:
    if INTERPRET:
        return _BLOCK_N_INTERPRET
    return _BLOCK_N_LARGE if b * triton.cdiv(n, _BLOCK_N_LARGE) >= _MIN_PROGRAMS else _BLOCK_N_SMALL


def _assign(
    points: torch.Tensor, centroids: torch.Tensor, second: bool, sums: tuple[torch.Tensor, ...] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launches the fused assignment; ``sums`` = (qx, qw, sums_out, mass_out) adds the fixed-point update."""
    b, n, d = points.shape
    k = centroids.shape[1]
    labels = torch.empty((b, n), dtype=torch.long, device=points.device)
    d2 = torch.empty((b, n), dtype=torch.float32, device=points.device)
    d2nd = torch.empty((b, n), dtype=torch.float32, device=points.device) if second else None  # all written
    if b * n == 0:
        return labels, d2, d2nd
    qx, qw, s_out, m_out = sums if sums is not None else (labels, labels, labels, labels)
    tile = 0 if sums is None or k > _PRE_REDUCE_MAX_K else _PRE_REDUCE_TILE
    block = _block_n(b, n)
    with _on(points.device):
        _nearest_kernel[(triton.cdiv(n, block), b)](
            points, centroids, labels, d2, d2 if d2nd is None else d2nd, qx, qw, s_out, m_out, n, k,
            D=d, SECOND=second, SUMS=sums is not None, TILE_K=tile, BLOCK_N=block, UNROLL=_UNROLL,
            num_warps=_NUM_WARPS, enable_fp_fusion=False,
        )  # fmt: skip
    return labels, d2, d2nd


def nearest(
    points: torch.Tensor, centroids: torch.Tensor, second: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Nearest centroid of every point (see :func:`.reference.nearest`).

    Args:
        points: (B, N, D) float32.
        centroids: (B, k, D) float32 on the same device, k >= 1.
        second: also return the squared distance to the second-nearest centroid.

    Returns:
        labels (B, N) int64, squared distance to the nearest (B, N) float32, and to the
        second nearest (B, N) float32 (``inf`` when k = 1) or ``None``.
    """
    points, centroids = _check(points, centroids)
    return _assign(points, centroids, second, None)


def map_pixels(pixels: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Palette index (B, N) int64 of every pixel (B, N, D) float32 for palettes (B, k, D) float32."""
    return nearest(pixels, palette)[0]


def lloyd_step(
    points: torch.Tensor, qx: torch.Tensor, qw: torch.Tensor, centroids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fused Lloyd pass: assignment plus int64 fixed-point cluster sums (see :func:`.reference.lloyd_step`).

    Args:
        points: (B, N, D) float32.
        qx: (B, N, D) int64, fixed-point weighted coordinates.
        qw: (B, N) int64, fixed-point weights (0 marks padding).
        centroids: (B, k, D) float32.

    Returns:
        labels (B, N) int64, squared distances (B, N) float32, sums (B, k, D) int64 of
        ``qx`` and (B, k) int64 of ``qw`` per cluster.
    """
    points, centroids = _check(points, centroids)
    if qx.dtype != torch.long or qw.dtype != torch.long or qx.shape != points.shape or qw.shape != points.shape[:2]:
        raise ValueError(f"qx and qw must be int64 {tuple(points.shape)} and {tuple(points.shape[:2])}")
    b, _, d = points.shape
    k = centroids.shape[1]
    sums = torch.zeros((b, k, d), dtype=torch.long, device=points.device)
    mass = torch.zeros((b, k), dtype=torch.long, device=points.device)
    labels, d2, _ = _assign(points, centroids, False, (qx.contiguous(), qw.contiguous(), sums, mass))
    return labels, d2, sums, mass


def kpp_potential(
    points: torch.Tensor, weights: torch.Tensor, closest: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    """k-means++ potential of each candidate centre (see :func:`.reference.kpp_potential`).

    Args:
        points: (B, N, D) float32; weights, closest: (B, N) float32.
        candidates: (B, L, D) float32.

    Returns:
        (B, L) float64: sum over points of ``f32(weight * min(closest, d2(point, candidate)))``.
    """
    points, candidates = _check(points, candidates)
    b, n, d = points.shape
    n_cand = candidates.shape[1]
    nb = max(1, triton.cdiv(n, _KPP_BLOCK_N * _KPP_CHUNKS))
    part = torch.zeros((b, nb, n_cand), dtype=torch.float64, device=points.device)
    out = torch.empty((b, n_cand), dtype=torch.float64, device=points.device)
    if b == 0:
        return out
    w, cl = weights.float().contiguous(), closest.float().contiguous()
    with _on(points.device):
        if n > 0:
            _kpp_partial_kernel[(nb, b)](
                points, w, cl, candidates, part, n, n_cand, nb,
                D=d, BLOCK_N=_KPP_BLOCK_N, BLOCK_L=_KPP_BLOCK_L, CHUNKS=_KPP_CHUNKS, num_warps=_NUM_WARPS,
                enable_fp_fusion=False,
            )  # fmt: skip
        _sum_blocks_kernel[(triton.cdiv(n_cand, 32), b)](
            part, out, n_cand, nb, BLOCK_L=32, num_warps=1, enable_fp_fusion=False
        )
    return out


def min_update(points: torch.Tensor, centre: torch.Tensor, closest: torch.Tensor) -> torch.Tensor:
    """``min(closest, d2(point, centre))`` (B, N) float32 for points (B, N, D), centre (B, D), closest (B, N)."""
    points, c = _check(points, centre[:, None])
    b, n, d = points.shape
    out = torch.empty((b, n), dtype=torch.float32, device=points.device)
    if b * n == 0:
        return out
    block = _block_n(b, n)
    with _on(points.device):
        _min_update_kernel[(triton.cdiv(n, block), b)](
            points, c, closest.float().contiguous(), out, n, D=d, BLOCK_N=block, num_warps=_NUM_WARPS,
            enable_fp_fusion=False,
        )  # fmt: skip
    return out
