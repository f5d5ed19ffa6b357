"""What k-means sees of an image, and the batched fit of many images' palettes.

An image's colour set splits into opaque and translucent groups that share the palette
budget (:func:`_share_k`); each group becomes a plan with a coarse seed set and a fine
set (:func:`_plan`), and every plan of a batch is fitted in one two-stage k-means
(:func:`fit_palettes`). This module knows colour sets and spaces, not pixels or files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .colors import Binned, ColorSet, bin_colors_many
from .kmeans import best_restarts, kmeans
from .options import FitOptions
from .spaces import ColorSpace
from .stopping import check_stop

__all__ = ["FINE_BITS", "as_rgba", "fit_palettes"]

# k-means++ and the first Lloyd run use a set of at most this many points, with a looser
# tolerance; Lloyd on the fine set then starts close to convergence. Measured on 12
# 256x256 photo crops (CPU time, C kernels): 4096 instead of 16384 costs 0.01 dB at
# k = 16 (1.6x faster), 0.07 dB at k = 64 (2.6x) and 0.02 dB at k = 256 (1.4x).
_SEED_POINTS = 1 << 12
_SEED_TOL_FACTOR = 10.0
# Restarts carried on from the coarse to the fine set (see _fit).
_REFINED = 2


# Colour sets above the fit budget are merged into 6-bit-per-channel bins (4x4x4 sRGB
# cubes). Measured on a 4-megapixel photo mosaic at k=256, 7-bit bins gain 0.08 dB of
# PSNR for twice the fit time; at k=16 the difference is under 0.5% of MSE.
FINE_BITS = 6


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
    ``exact`` is the exact colour set (points, counts), for :attr:`FitOptions.exact_finish`.
    """

    seed: tuple[torch.Tensor, torch.Tensor]
    fine: tuple[torch.Tensor, torch.Tensor]
    bins: tuple[torch.Tensor, torch.Tensor] | None
    exact: tuple[torch.Tensor, torch.Tensor]


class _Binning:
    """A group on its way to a plan: the seed and fine sets chosen so far, and its current (coarsest) bins."""

    def __init__(self, group: _Group, max_points: int) -> None:
        self.exact = exact = (group.points, group.counts.float())
        n = group.colors.shape[0]
        self.channels = group.colors.shape[1]
        self.fine = exact if n <= max_points else None
        self.seed = exact if n <= min(max_points, _SEED_POINTS) else None
        self.bins: tuple[torch.Tensor, torch.Tensor] | None = None
        self.bin_of: torch.Tensor | None = None  # the current bin of every colour of the group
        self.current = (group.colors, group.counts, group.points)  # (colors, counts, points) to coarsen next

    def take(self, binned: Binned, bits: int, max_points: int) -> None:
        """Coarsen to ``binned`` (``bits`` per channel); keep it as the fine or seed set once small enough."""
        points, counts, inverse, colors = binned
        self.bin_of = inverse if self.bin_of is None else inverse[self.bin_of]
        self.current = (colors, counts, points)
        if self.fine is None and (points.shape[0] <= 4 * max_points or bits == 1):
            self.fine, self.bins = (points, counts.float()), (points, self.bin_of)
        if self.seed is None and (points.shape[0] <= min(max_points, _SEED_POINTS) or bits == 1):
            self.seed = (points, counts.float())

    def plan(self) -> _Plan:
        assert self.fine is not None and self.seed is not None
        return _Plan(self.seed, self.fine, self.bins, self.exact)


def _plans(groups: list[_Group], max_points: int) -> list[_Plan]:
    """Per group, the exact colours (at most ``max_points``) or a fine histogram, and a seed set.

    Larger colour sets are merged into ``FINE_BITS`` bins, coarser only if those still
    number more than four times ``max_points``; the seed set has at most 4096 points.
    Coarser histograms are built from the finer bins. Each level bins every group that
    still needs it at once (:func:`~gpu_kquant.colors.bin_colors_many`: on CUDA the host
    waits per level, not per image), groups of one channel count together.
    """
    states = [_Binning(group, max_points) for group in groups]
    for bits in range(FINE_BITS, 0, -1):
        for channels in (3, 4):
            todo = [s for s in states if (s.fine is None or s.seed is None) and s.channels == channels]
            for state, binned in zip(todo, bin_colors_many([s.current for s in todo], bits)):
                state.take(binned, bits, max_points)
    return [state.plan() for state in states]


def _split(cs: ColorSet, space: ColorSpace) -> tuple[bool, _Group, _Group]:
    """Split a colour set into (has fully transparent pixels, opaque, translucent)."""
    colors = cs.colors
    if cs.channels == 3:
        everything = torch.arange(len(cs), device=colors.device)
        opaque = _Group(everything, colors, cs.counts, space.points(colors))
        none = everything[:0]
        return False, opaque, _Group(none, colors[:0], cs.counts[:0], space.points(colors[:0]))
    alpha = colors[:, 3]

    def group(mask: torch.Tensor, channels: int) -> _Group:
        idx = mask.nonzero().squeeze(1)
        sub = colors[idx, :channels]
        return _Group(idx, sub, cs.counts[idx], space.points(sub))

    return bool((alpha == 0).any()), group(alpha == 255, 3), group((alpha > 0) & (alpha < 255), 4)


# _share_k estimates each group's error curve on at most this many of its colours.
_SHARE_POINTS = 4096


def _error_curve(group: _Group, most: int) -> torch.Tensor:
    """Estimated squared error (most,) float64 of the group with 1..most entries.

    Greedy farthest-point centres on the group's colours (a deterministic stride of at
    most ``_SHARE_POINTS``, counts scaled to the whole group): the first centre is the
    weighted mean, each next one the colour with the largest weighted error. An upper
    bound of what k-means reaches, with the right shape at small k, where the
    high-resolution rule N sigma^2 k^(-2/3) fails.
    """
    points, counts = group.points.double(), group.counts.double()
    if points.shape[0] > _SHARE_POINTS:
        idx = torch.linspace(0, points.shape[0] - 1, _SHARE_POINTS, device=points.device).long()
        points, counts = points[idx], counts[idx] * (counts.sum() / counts[idx].sum())
    mean = (counts[:, None] * points).sum(0) / counts.sum()
    d2 = (points - mean).square().sum(1)
    curve = torch.empty(most, dtype=torch.float64)
    for m in range(most):
        curve[m] = (counts * d2).sum()
        far = int(torch.argmax(counts * d2))
        d2 = torch.minimum(d2, (points - points[far]).square().sum(1))
    return curve


def _share_k(k: int, groups: list[_Group]) -> list[int]:
    """Split k entries between groups (opaque, translucent) to minimise their estimated total error.

    Every non-empty group gets one entry, then each further entry goes to the group whose
    estimated error (:func:`_error_curve`) it lowers most; never more than a group's
    distinct colours. The previous rule, shares in proportion to (pixels x variance)^0.6,
    gave the few hundred translucent edge colours of an icon one or two entries and
    measured 1.8x pngquant --nofs's premultiplied MSE on 12 Adwaita icons at k=16.
    """
    sizes = [g.colors.shape[0] for g in groups]
    live = [i for i, n in enumerate(sizes) if n]
    share = [0] * len(groups)
    if len(live) == 1:
        share[live[0]] = min(k, sizes[live[0]])
        return share
    curves = {i: _error_curve(groups[i], min(k, sizes[i])) for i in live}
    for i in live:
        share[i] = 1
    for _ in range(k - sum(share)):
        gains = {i: float(curves[i][share[i] - 1] - curves[i][share[i]]) for i in live if share[i] < len(curves[i])}
        if not gains:
            break
        best = max(gains, key=lambda i: (gains[i], -i))
        share[best] += 1
    return share


def _pad(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stack (N_i, ...) tensors into (B, max N_i, ...), zero-padded."""
    longest = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros((len(rows), longest, *rows[0].shape[1:]))
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def as_rgba(colors: torch.Tensor) -> torch.Tensor:
    return colors if colors.shape[-1] == 4 else torch.nn.functional.pad(colors, (0, 1), value=255)


def _fit(jobs: list[_Plan], k: int, options: FitOptions, device: torch.device) -> torch.Tensor:
    """Batched two-stage k-means over plans of one dimensionality; centroids (B, k, D).

    All ``n_init`` restarts run on the coarse set (cheap); the ``_REFINED`` with the
    lowest coarse inertia go on to the fine set, where the lowest inertia wins. Coarse
    inertia ranks restarts well but not perfectly, hence more than one goes on. With
    ``options.exact_finish`` a binned fine set's winner is finished on the exact colours.
    """
    n_init, max_iter, tol = options.n_init or 1, options.max_iter, options.tol
    coarse = kmeans(
        _pad([p.seed[0] for p in jobs]),
        k,
        weights=_pad([p.seed[1] for p in jobs]),
        n_init=n_init,
        max_iter=max_iter,
        tol=tol * _SEED_TOL_FACTOR,
        seed=options.seed,
        device=device,
        keep_restarts=True,
        stop=options.stop,
    )
    refine = [row for row, p in enumerate(jobs) if p.fine is not p.seed]
    best = best_restarts(coarse, n_init).centroids
    if not refine:
        return best
    m = min(n_init, _REFINED)
    dev = coarse.centroids.device
    ranked = coarse.inertia.view(len(jobs), n_init).argsort(dim=1, stable=True)[:, :m]
    rows = (ranked + torch.arange(len(jobs), device=dev)[:, None] * n_init)[torch.tensor(refine, device=dev)]
    fine = kmeans(
        _pad([jobs[r].fine[0] for r in refine]).repeat_interleave(m, 0),
        k,
        weights=_pad([jobs[r].fine[1] for r in refine]).repeat_interleave(m, 0),
        init=coarse.centroids[rows.reshape(-1)],
        max_iter=max_iter,
        tol=tol,
        device=device,
        stop=options.stop,
    )
    best[torch.tensor(refine, device=dev)] = best_restarts(fine, m).centroids
    if options.exact_finish:
        _finish_exact(jobs, best, options, device)
    return best


def _finish_exact(jobs: list[_Plan], best: torch.Tensor, options: FitOptions, device: torch.device) -> None:
    """Lloyd on the exact colours from the centroids (B, k, D) fitted on a histogram, in place.

    Bin means stand in for up to 64 colours each; where an image's colours crowd into few
    bins (the dark sky of hubble_deep_field: 81% of its pixels are noise within 20 levels of
    black) the fit on them misplaces the entries. Measured undithered on 11 photos
    (benchmarks/results/dither_fit_intel-xeon_2c_nogpu_2026-12-02.md): hubble_deep_field at
    k = 64 +0.47 dB PSNR and +0.012 SSIM, the others +0.00 to +0.11 dB; the quantize takes
    1.0-2.5x as long, so it is on only where dithering dominates (an adaptive quantize: 1.00-1.28x
    on 0.25 MP, 1.48x on a 4 MP mosaic at k = 256, where it adds 0.1 dB). Lloyd runs to
    convergence: capped at 20 iterations it gave hubble half of its gain.
    """
    # Rows batched by size within a factor of two: padding costs at most as much as the colours.
    buckets: dict[int, list[int]] = {}
    for row, plan in enumerate(jobs):
        if plan.bins is not None:
            buckets.setdefault(plan.exact[0].shape[0].bit_length(), []).append(row)
    for rows in buckets.values():
        index = torch.tensor(rows, device=best.device)
        exact = kmeans(
            _pad([jobs[r].exact[0] for r in rows]),
            best.shape[1],
            weights=_pad([jobs[r].exact[1] for r in rows]),
            init=best[index],
            max_iter=options.max_iter,
            tol=options.tol,
            device=device,
            stop=options.stop,
        )
        best[index] = exact.centroids


def fit_palettes(
    sets: list[ColorSet], options: FitOptions, device: torch.device
) -> list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]]:
    """Fit one palette per colour set, all k-means problems of a kind in one batch.

    Sets binned into a histogram end with Lloyd on their exact colours when
    ``options.exact_finish`` is set (:func:`_finish_exact`).

    Returns (palette uint8 (P, C), bins of the opaque fit or None) per set, where
    P <= k and C is the set's channel count.
    """
    options = options.resolved()
    space, k, max_fit_points = ColorSpace(options.space), options.k, options.max_fit_points or 1
    # parts[i]: palette pieces of set i; a None piece is filled by the batched fit of
    # the job that points at it.
    parts: list[list[torch.Tensor | None]] = []
    bins: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    jobs: dict[tuple[int, int], list[tuple[int, int, _Plan]]] = {}
    to_plan: list[tuple[int, int, _Group, int]] = []  # (set, slot, group, its k) of every fit
    for i, cs in enumerate(sets):
        check_stop(options.stop)  # preparing a set of 65,536 colours takes a second or so
        transparent, opaque, translucent = _split(cs, space)
        pieces: list[torch.Tensor | None] = []
        if transparent:
            pieces.append(torch.zeros((1, 4), dtype=torch.uint8, device=device))
        shares = _share_k(max(1, k - len(pieces)), [opaque, translucent])
        bins.append(None)
        for group, k_group in zip((opaque, translucent), shares):
            if k_group == 0:
                continue
            if group.colors.shape[0] <= k_group:
                pieces.append(group.colors)
                continue
            to_plan.append((i, len(pieces), group, k_group))
            pieces.append(None)
        parts.append(pieces)
    for (i, slot, group, k_group), plan in zip(to_plan, _plans([g for _, _, g, _ in to_plan], max_fit_points)):
        if group.colors.shape[1] == 3:  # the opaque group's bins guess each colour's entry
            bins[i] = plan.bins
        jobs.setdefault((group.points.shape[1], k_group), []).append((i, slot, plan))

    for (_, k_group), batch in jobs.items():
        check_stop(options.stop)
        plans = [plan for _, _, plan in batch]
        centroids = _fit(plans, k_group, options, device)
        for row, (i, slot, _) in enumerate(batch):
            parts[i][slot] = space.colors(centroids[row])

    out = []
    for cs, pieces, b in zip(sets, parts, bins):
        done = [p for p in pieces if p is not None]
        if cs.channels == 4:
            done = [as_rgba(p) for p in done]
        out.append((torch.cat(done), b))
    return out
