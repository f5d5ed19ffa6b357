"""Batched, weighted Lloyd k-means on tensors of shape (B, N, D).

This module knows nothing about images. Every problem in a batch is independent:
it draws from its own random stream, converges on its own and is then frozen, so
a problem's result never depends on which other problems share its batch.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

import torch

from .device import resolve_device
from .reduce import FixedPointSums

__all__ = [
    "IterationStats",
    "KMeansResult",
    "assign",
    "assign_with_bounds",
    "best_restarts",
    "kmeans",
    "kmeans_plusplus",
    "nearest_two",
]

# Elements of one (batch, chunk, k) distance block: small enough to stay in cache on a
# CPU, large enough to keep a GPU busy.
_BLOCK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 26}
# Smallest k for which Lloyd iterations use Hamerly's bounds.
_BOUNDS_MIN_K = 24


@dataclass(frozen=True)
class IterationStats:
    """What one Lloyd iteration did, over the problems still running."""

    iteration: int
    active: int
    inertia: float
    reseeded: int
    seconds: float


@dataclass(frozen=True)
class KMeansResult:
    """Result of :func:`kmeans`; every tensor lives on the device the fit ran on.

    Attributes:
        centroids: (B, k, D) float32. Rows at or beyond ``n_clusters[b]`` are copies of
            a real centroid and receive no labels (see ``n_clusters``).
        labels: (B, N) int64, index of the nearest centroid of every point.
        inertia: (B,) float64, weighted sum of squared distances to the nearest centroid.
        n_iter: (B,) int64, Lloyd iterations run.
        converged: (B,) bool, whether the tolerance (or unchanged labels) was reached
            before ``max_iter``.
        n_clusters: (B,) int64, effective k: smaller than k when a problem has fewer
            distinct points (with positive weight) than k.
        stats: per-iteration statistics of the whole batch.
    """

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor
    n_clusters: torch.Tensor
    stats: tuple[IterationStats, ...] = ()


def _stream_seed(seed: int, stream: int) -> int:
    digest = hashlib.blake2b(f"gpu_kquant:{seed}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _uniforms(seed: int, streams: list[int], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One independent float64 uniform table per stream, drawn on the CPU.

    CPU generation makes the numbers identical whatever the compute device.
    """
    tables = []
    for stream in streams:
        gen = torch.Generator().manual_seed(_stream_seed(seed, stream))
        tables.append(torch.rand(shape, generator=gen, dtype=torch.float64))
    return torch.stack(tables).to(device)


def _chunk(batch: int, width: int, device: torch.device) -> int:
    budget = _BLOCK_ELEMENTS["cuda" if device.type == "cuda" else "cpu"]
    return max(1, budget // max(1, batch * width))


# cdist's matrix-multiply form (|x|^2 - 2xc + |c|^2) is chosen by block size, and its
# rounding then depends on which other points share the block (the batch, the chunk),
# so near-ties could flip between a batched run and a run alone. Differences computed
# directly give every distance the same bits whatever the block, and coincident points
# are exactly zero apart (which init relies on to count distinct points).
_CDIST_MODE = "donot_use_mm_for_euclid_dist"


def _cdist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Distances (B, n, m) between x (B, n, D) and c (B, m, D), independent of blocking."""
    return torch.cdist(x, c, compute_mode=_CDIST_MODE)


def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared distances (B, n, m) between x (B, n, D) and c (B, m, D)."""
    return _cdist(x, c).square_()


def assign(points: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every point, chunked along N.

    Args:
        points: (B, N, D) float32.
        centroids: (B, k, D) float32, on the same device.

    Returns:
        labels (B, N) int64 and squared distances to the nearest centroid (B, N) float32.
        The (B, chunk, k) distance block stays under a fixed element budget.
    """
    b, n, _ = points.shape
    labels = torch.empty((b, n), dtype=torch.long, device=points.device)
    min_d2 = torch.empty((b, n), dtype=points.dtype, device=points.device)
    step = _chunk(b, centroids.shape[1], points.device)
    for s in range(0, n, step):
        dist, idx = _cdist(points[:, s : s + step], centroids).min(dim=2)
        min_d2[:, s : s + step] = dist
        labels[:, s : s + step] = idx
    return labels, min_d2.square_()


def _sample(cum: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Indices drawn with probability proportional to the increments of ``cum``.

    cum: (B, N) float64 cumulative weights; u: (B, L) uniforms in [0, 1). Zero-weight
    points are never drawn.
    """
    total = cum[:, -1:]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cum, target, right=True).clamp_(max=cum.shape[1] - 1)


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), idx (B, L) -> (B, L, D)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def kmeans_plusplus(
    points: torch.Tensor, weights: torch.Tensor, k: int, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted greedy k-means++ seeding, batched over B.

    Each step draws ``L = uniforms.shape[2]`` candidates with probability proportional
    to weight times squared distance to the closest chosen centre, and keeps the one
    that lowers the potential most (scikit-learn uses L = 2 + floor(ln k)).

    Args:
        points: (B, N, D) float32.
        weights: (B, N) float32, non-negative; each row has a positive entry.
        k: number of centres.
        uniforms: (B, k, L) float64 in [0, 1), one table per problem.

    Returns:
        centres (B, k, D) and the effective k per problem (B,) int64. When a problem runs
        out of distinct points, its remaining centres repeat the last real one.
    """
    b, n, d = points.shape
    n_cand = uniforms.shape[2]
    rows = torch.arange(b, device=points.device)
    centres = points.new_empty((b, k, d))
    first = _sample(weights.double().cumsum(1), uniforms[:, 0, :1])
    centres[:, 0] = points[rows, first[:, 0]]
    closest = _sq_dists(points, centres[:, :1])[..., 0]
    n_eff = torch.ones(b, dtype=torch.long, device=points.device)
    step = _chunk(b, n_cand, points.device)
    for c in range(1, k):
        cum = (weights * closest).double().cumsum(1)
        alive = cum[:, -1] > 0
        cand_x = _gather_rows(points, _sample(cum, uniforms[:, c, :]))
        potential = torch.zeros((b, n_cand), dtype=torch.float64, device=points.device)
        for s in range(0, n, step):
            d2 = _sq_dists(points[:, s : s + step], cand_x)
            d2 = torch.minimum(d2, closest[:, s : s + step, None])
            potential += (weights[:, s : s + step, None] * d2).sum(1, dtype=torch.float64)
        best = cand_x[rows, potential.argmin(1)]
        centres[:, c] = torch.where(alive[:, None], best, centres[:, c - 1])
        closest = torch.minimum(closest, _sq_dists(points, best[:, None])[..., 0])
        n_eff += alive
    return centres, n_eff


def _reseed_empty(
    points: torch.Tensor,
    weights: torch.Tensor,
    min_d2: torch.Tensor,
    centroids: torch.Tensor,
    empty: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each empty centroid onto a distinct worst-fit point of its problem.

    The worst-fit points are the farthest from their centroid among points with
    positive weight (scikit-learn's rule; it does not depend on the weights, so integer
    weights and repeated points behave alike). An empty centroid with no badly fit point
    left keeps its position (never NaN, never zero). Returns the new centroids and the
    number re-seeded per problem.
    """
    n_empty = empty.sum(1)
    most = int(n_empty.max())
    score = torch.where(weights > 0, min_d2, torch.full_like(min_d2, -1.0))
    top_score, top_idx = score.topk(min(most, score.shape[1]), dim=1)
    rank = (empty.cumsum(1) - 1).clamp_(0, top_idx.shape[1] - 1)
    src = top_idx.gather(1, rank)
    usable = empty & (top_score.gather(1, rank) > 0)
    moved = torch.where(usable[..., None], _gather_rows(points, src), centroids)
    return moved, usable.sum(1)


def _validate(points: torch.Tensor, weights: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    points = torch.as_tensor(points)
    if points.ndim == 2:
        points = points.unsqueeze(0)
        if weights is not None:
            weights = torch.as_tensor(weights).reshape(1, -1)
    if points.ndim != 3 or points.shape[1] == 0 or points.shape[2] == 0:
        raise ValueError(f"points must have shape (B, N, D) or (N, D) with N, D >= 1, got {tuple(points.shape)}")
    if not points.is_floating_point():
        points = points.float()
    if weights is None:
        weights = torch.ones(points.shape[:2], dtype=torch.float32, device=points.device)
    weights = torch.as_tensor(weights, device=points.device)
    if weights.shape != points.shape[:2]:
        raise ValueError(f"weights must have shape {tuple(points.shape[:2])}, got {tuple(weights.shape)}")
    if not torch.isfinite(points).all():
        raise ValueError("points contain NaN or infinity")
    weights = weights.float()
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("weights must be finite and non-negative")
    empty_rows = (weights.sum(1) <= 0).nonzero().flatten().tolist()
    if empty_rows:
        raise ValueError(f"problem(s) {empty_rows[:5]} have no point with positive weight")
    return points.float(), weights


def kmeans(
    points: torch.Tensor,
    k: int,
    *,
    weights: torch.Tensor | None = None,
    init: str | torch.Tensor = "k-means++",
    n_init: int = 1,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    device: str | torch.device | None = None,
    keep_restarts: bool = False,
) -> KMeansResult:
    """Weighted Lloyd k-means on a batch of independent problems.

    Args:
        points: (B, N, D) or (N, D) float tensor (B = 1). Any real values.
        k: number of clusters, >= 1.
        weights: (B, N) or (N,) non-negative weights, default 1. Weight 0 marks padding,
            so problems with different numbers of points share one tensor.
        init: ``"k-means++"`` (weighted greedy, 2 + floor(ln k) candidates per step) or
            initial centroids (B, k, D) / (k, D).
        n_init: independent k-means++ restarts, run as extra batch rows in one pass; the
            lowest-inertia result of each problem is kept.
        max_iter: maximum Lloyd iterations per problem.
        tol: a problem converges when the summed squared centroid shift is at most
            ``tol`` times the mean per-dimension weighted variance of its points, or when
            its labels stop changing (scikit-learn's rule).
        seed: seed of the per-problem random streams (stream ``r`` serves restart ``r``).
        device: where to compute; ``None`` picks CUDA when available.
        keep_restarts: return every restart as its own row (B * n_init rows; restart
            r of problem b is row b * n_init + r) instead of each problem's best.

    Returns:
        A :class:`KMeansResult` whose tensors live on the compute device.
    """
    dev = resolve_device(device)
    points, weights = _validate(points, weights, k)
    points, weights = points.to(dev), weights.to(dev)
    b, _, d = points.shape
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")

    if isinstance(init, str):
        if init != "k-means++":
            raise ValueError(f"init must be 'k-means++' or a tensor of centroids, got {init!r}")
        reps = n_init
        x = points.repeat_interleave(reps, 0)
        w = weights.repeat_interleave(reps, 0)
        n_cand = 2 + int(math.log(k))
        u = _uniforms(seed, list(range(reps)) * b, (k, n_cand), dev)
        centroids, n_eff = kmeans_plusplus(x, w, k, u)
    else:
        if n_init != 1:
            raise ValueError("n_init must be 1 when init is an array of centroids")
        reps, x, w = 1, points, weights
        centroids = torch.as_tensor(init, device=dev).float()
        if centroids.ndim == 2:
            centroids = centroids.expand(b, -1, -1)
        if centroids.shape != (b, k, d):
            raise ValueError(f"init must have shape {(b, k, d)} or {(k, d)}, got {tuple(centroids.shape)}")
        centroids = centroids.clone()
        n_eff = torch.full((b,), k, dtype=torch.long, device=dev)

    fit = _lloyd(x, w, centroids, n_eff, max_iter, tol)
    return fit if reps == 1 or keep_restarts else best_restarts(fit, reps)


def best_restarts(fit: KMeansResult, n_init: int) -> KMeansResult:
    """Keep each problem's lowest-inertia row of a result with ``n_init`` rows per problem."""
    if n_init == 1:
        return fit
    b = fit.inertia.shape[0] // n_init
    best = fit.inertia.view(b, n_init).argmin(1) + torch.arange(b, device=fit.inertia.device) * n_init
    return KMeansResult(
        centroids=fit.centroids[best],
        labels=fit.labels[best],
        inertia=fit.inertia[best],
        n_iter=fit.n_iter[best],
        converged=fit.converged[best],
        n_clusters=fit.n_clusters[best],
        stats=fit.stats,
    )


def nearest_two(points: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid and distance to the second nearest, chunked along N.

    Args:
        points: (B, N, D) float32.
        centroids: (B, k, D) float32.

    Returns:
        labels (B, N) int64 and the distance (not squared) to the second-nearest
        centroid (B, N) float32, ``inf`` when k = 1.
    """
    b, n, _ = points.shape
    k = centroids.shape[1]
    labels = torch.empty((b, n), dtype=torch.long, device=points.device)
    second = torch.full((b, n), math.inf, dtype=points.dtype, device=points.device)
    step = _chunk(b, k, points.device)
    for s in range(0, n, step):
        dist = _cdist(points[:, s : s + step], centroids)
        idx = dist.argmin(2)
        labels[:, s : s + step] = idx
        if k > 1:
            second[:, s : s + step] = dist.scatter_(2, idx[..., None], math.inf).amin(2)
    return labels, second


def _sq_norm(v: torch.Tensor) -> torch.Tensor:
    """Squared norm over the last dimension; a matmul, much faster than ``sum(-1)`` at D=3."""
    return (v * v) @ torch.ones(v.shape[-1], dtype=v.dtype, device=v.device)


def _dist_to_assigned(points: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Exact distance (B, N) of every point to its assigned centroid."""
    b, k, d = centroids.shape
    flat = labels + torch.arange(b, device=labels.device)[:, None] * k
    assigned = centroids.reshape(b * k, d).index_select(0, flat.reshape(-1)).view(points.shape)
    return _sq_norm(points - assigned).sqrt_()


def _half_separation(centroids: torch.Tensor, in_range: torch.Tensor) -> torch.Tensor:
    """Half the distance from each centroid to its nearest other real centroid (B, k)."""
    sep = _cdist(centroids, centroids)
    k = centroids.shape[1]
    eye = torch.eye(k, dtype=torch.bool, device=centroids.device)
    sep.masked_fill_(eye | ~in_range[:, None, :], math.inf)
    return 0.5 * sep.amin(2)


def _reassign(
    points: torch.Tensor,
    centroids: torch.Tensor,
    labels: torch.Tensor,
    upper: torch.Tensor,
    lower: torch.Tensor,
    need: torch.Tensor,
) -> None:
    """Recompute labels and lower bounds in place for the points flagged in ``need``.

    The flagged points of each problem are packed into a padded (B, P, D) block so
    that every problem still goes through one batched ``cdist``.
    """
    counts = need.sum(1)
    most = int(counts.max())
    if most == 0:
        return
    if 2 * most > points.shape[1]:
        lab, sec = nearest_two(points, centroids)
        labels.copy_(torch.where(need, lab, labels))
        lower.copy_(torch.where(need, sec, lower))
    else:
        rows, cols = need.nonzero(as_tuple=True)
        rank = (need.cumsum(1) - 1)[rows, cols]
        block = points.new_zeros((points.shape[0], most, points.shape[2]))
        block[rows, rank] = points[rows, cols]
        lab, sec = nearest_two(block, centroids)
        labels[rows, cols] = lab[rows, rank]
        lower[rows, cols] = sec[rows, rank]
    upper.copy_(torch.where(need, _dist_to_assigned(points, centroids, labels), upper))


def assign_with_bounds(
    points: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, lower: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest centroids, starting from a guess and a bound.

    Only points whose guessed centroid is not provably nearest get a full distance
    computation, so a good guess (for example the label of a histogram bin the point
    falls in) makes this much cheaper than :func:`assign`.

    Args:
        points: (B, N, D) float32.
        centroids: (B, k, D) float32.
        labels: (B, N) int64 guessed nearest centroid.
        lower: (B, N) float32, a lower bound on the distance from each point to every
            centroid other than its guess (``-inf`` when unknown).

    Returns:
        labels (B, N) int64 and the distance to the nearest centroid (B, N) float32.
    """
    labels = labels.clone()
    lower = lower.clone()
    in_range = torch.ones(centroids.shape[:2], dtype=torch.bool, device=centroids.device)
    upper = _dist_to_assigned(points, centroids, labels)
    bound = torch.maximum(_half_separation(centroids, in_range).gather(1, labels), lower)
    _reassign(points, centroids, labels, upper, lower, upper >= bound)
    return labels, upper


def _lloyd(
    x: torch.Tensor,
    w: torch.Tensor,
    centroids: torch.Tensor,
    n_eff: torch.Tensor,
    max_iter: int,
    tol: float,
) -> KMeansResult:
    """Lloyd iterations with Hamerly's bounds; converged problems leave the work set.

    The bounds only skip distance computations that cannot change a label: a point
    keeps its centroid while its distance to it is below both half the distance from
    that centroid to the next one and a lower bound on its distance to any other.
    """
    b, _, _ = x.shape
    k = centroids.shape[1]
    dev = x.device
    sums = FixedPointSums(x, w)
    w64, x64 = w.double(), x.double()
    total = w64.sum(1)[:, None]
    mean_x = (w64[..., None] * x64).sum(1) / total
    var = (w64[..., None] * (x64 - mean_x[:, None]).square()).sum(1) / total
    tol_abs = tol * var.mean(1)
    del w64, x64
    in_range = torch.arange(k, device=dev)[None, :] < n_eff[:, None]

    out_c = centroids.clone()
    out_labels = torch.empty(x.shape[:2], dtype=torch.long, device=dev)
    out_inertia = torch.empty(b, dtype=torch.float64, device=dev)
    n_iter = torch.zeros(b, dtype=torch.long, device=dev)
    converged = torch.zeros(b, dtype=torch.bool, device=dev)
    act = torch.arange(b, device=dev)
    xa, wa, ca, tola, rng, pos = x, w, centroids, tol_abs, in_range, w > 0
    # Bounds cost a few passes over the points; they pay off once k is large.
    use_bounds = k >= _BOUNDS_MIN_K
    upper = lower = None
    if use_bounds:
        labels, lower = nearest_two(xa, ca)
        upper = _dist_to_assigned(xa, ca, labels)
        d2 = upper.square()
    else:
        labels, d2 = assign(xa, ca)
    stats: list[IterationStats] = []
    for it in range(1, max_iter + 1):
        t0 = time.perf_counter()
        means, mass = sums.means(labels, k)
        new_c = torch.where((mass > 0)[..., None], means.float(), ca)
        empty = (mass == 0) & rng
        reseeded = torch.zeros(act.shape[0], dtype=torch.long, device=dev)
        if bool(empty.any()):
            new_c, reseeded = _reseed_empty(xa, wa, d2, new_c, empty)
        shift = (new_c - ca).square().sum(-1)
        ca = new_c
        old = labels
        if use_bounds:
            labels = labels.clone()
            lower = lower - shift.amax(1, keepdim=True).sqrt()
            upper = _dist_to_assigned(xa, ca, labels)
            bound = torch.maximum(_half_separation(ca, rng).gather(1, labels), lower)
            _reassign(xa, ca, labels, upper, lower, upper >= bound)
            d2 = upper.square()
        else:
            labels, d2 = assign(xa, ca)
        changed = ((labels != old) & pos).any(1)
        done = ((shift.sum(1, dtype=torch.float64) <= tola) | ~changed) & (reseeded == 0)
        n_iter[act] = it
        inertia = (wa * d2).sum(1, dtype=torch.float64)
        n_done, n_reseeded, inertia_f = torch.stack(
            [done.sum().double(), reseeded.sum().double(), inertia.sum()]
        ).tolist()
        stats.append(IterationStats(it, int(act.shape[0]), inertia_f, int(n_reseeded), time.perf_counter() - t0))
        if n_done:
            fin = act[done]
            out_c[fin], out_labels[fin], out_inertia[fin], converged[fin] = ca[done], labels[done], inertia[done], True
            keep = ~done
            act, xa, wa, ca, tola, rng, pos = act[keep], xa[keep], wa[keep], ca[keep], tola[keep], rng[keep], pos[keep]
            labels, d2 = labels[keep], d2[keep]
            if use_bounds:
                upper, lower = upper[keep], lower[keep]
            sums.select(keep)
            if act.numel() == 0:
                break
    if act.numel():
        out_c[act], out_labels[act] = ca, labels
        out_inertia[act] = (wa * d2).sum(1, dtype=torch.float64)
    return KMeansResult(out_c, out_labels, out_inertia, n_iter, converged, n_eff, tuple(stats))
