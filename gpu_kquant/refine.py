"""Perceptual refinement of a dithered index map (issue 15): direct binary search under an eye model.

Error diffusion decides each pixel once, looking only at the error behind it. The refinement then
visits every pixel again and moves it to a neighbouring palette entry when that lowers

    J = ||G * E||^2 + sum_p lam_p penalty(E_p),    E = palette[labels] - image (zero outside the image),

where G is a Gaussian of EYE_SIGMA px, the blur of a viewer's eye (the error of local means, which
blurred PSNR measures), and the second term keeps each pixel near its own colour (less dither noise,
which SSIM punishes); penalty(E) is |E|^2 up to HUBER of the range, then linear in |E|. Only moves
that lower J are taken, so J never rises. The C kernel (``_refine.c``) visits pixels phase by
phase; :func:`_refine_torch` is the same search vectorised over each phase (pixels of a phase do not
interact), used where the kernel was not built.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = [
    "EYE_SIGMA",
    "HUBER",
    "LAMBDA",
    "NEIGHBOURS",
    "SWEEPS",
    "dead_zone",
    "eye_autocorrelation",
    "gradient",
    "palette_neighbours",
    "refine",
]

_refine_c: Callable[..., int] | None
try:
    from ._refine import refine as _refine_c
except ImportError:  # pragma: no cover - the extension is optional
    _refine_c = None

# The eye model: a Gaussian of sigma 1 px (the blur of the blurred PSNR), cut at 3 sigma.
EYE_SIGMA, EYE_RADIUS = 1.0, 3
# The own-error penalty is lam |E|^2 up to HUBER of the first channel's range (SSIM's own constant,
# K2 = 0.03: error below it is what SSIM tolerates), then grows linearly in |E| (a Huber penalty), so
# a coarse palette's large steps are not over-penalised. The blurred term's own weight at a pixel is
# a(0)^2 = 1 / (4 pi sigma^2) = 0.08. Measured on 22 photo cases (5 bundled + 6 scikit-image photos,
# k = 16 and 64) against pngquant's dithering (benchmarks/results/dither_refine_*): the squared
# penalty met all three targets on 15/22 at lam 0.3 (0.2: 14, 0.35: 16; the k = 16 cases fell short
# of blurred PSNR, the k = 64 ones of SSIM); Huber 0.03 with lam 0.8 meets 17/22 (lam 0.5: 11, 1.0:
# 14; Huber 0.06 with lam 0.4: 17, 0.6: 15). All 22 cases were seen when these were chosen.
LAMBDA = 0.8
HUBER = 0.03
SWEEPS = 2
# Candidates per pixel: the current entry's nearest palette entries.
NEIGHBOURS = 8


def dead_zone(lam: float, step: float, huber: float = 0.0, sigma: float = EYE_SIGMA) -> float:
    """The largest uniform error (a fraction of ``step``) that gets no dots of ``step``.

    On a uniform error e, moving one pixel by the step d lowers J by 2 d e and raises it by
    d^2 a(0)^2 (a(0)^2 = 1 / (4 pi sigma^2), the uncut Gaussian's) and by lam (penalty(d - e) -
    penalty(e)); ``huber`` is the penalty's threshold in the same units as ``step`` (0: squared).
    """

    def penalty(e: float) -> float:
        return float(_penalty(torch.tensor(e * e, dtype=torch.float64), huber))

    def gain(e: float) -> float:
        return 2 * step * e - step * step / (4 * np.pi * sigma**2) - lam * (penalty(step - e) - penalty(e))

    low, high = 0.0, step / 2  # the gain rises with e: bisect for its zero
    if gain(high) <= 0:
        return 0.5
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if gain(mid) <= 0 else (low, mid)
    return high / step


def eye_autocorrelation(sigma: float = EYE_SIGMA, radius: int = EYE_RADIUS) -> np.ndarray:
    """The 1-D autocorrelation a (4 radius + 1,) float32 of the eye's Gaussian; A = G^T G = a (x) a."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    return np.correlate(np.pad(k, 2 * radius), k, mode="valid").astype(np.float32)


def palette_neighbours(pal_points: np.ndarray, count: int = NEIGHBOURS) -> np.ndarray:
    """Each entry's ``count`` nearest other entries (P, count) int32, nearest first, -1 past the end.

    Args:
        pal_points: (P, D) float32 palette in the fitting space.
    """
    p = torch.from_numpy(np.ascontiguousarray(pal_points, np.float32)).double()
    d = torch.cdist(p, p)
    d.fill_diagonal_(float("inf"))
    n = min(count, p.shape[0] - 1)
    order = torch.sort(d, dim=1, stable=True).indices[:, :n].int()
    out = np.full((p.shape[0], count), -1, np.int32)
    out[:, :n] = order.numpy()
    return out


def gradient(
    points: np.ndarray, classes: np.ndarray, pal_points: np.ndarray, labels: np.ndarray, a: np.ndarray
) -> np.ndarray:
    """g = A E (H, W, D) float32 for the given labels (E zero on transparent pixels)."""
    err = torch.from_numpy(pal_points[labels] - points)
    err[torch.from_numpy(classes == 0)] = 0.0
    r = a.shape[0] // 2
    kernel = torch.from_numpy(a)
    x = err.permute(2, 0, 1)[:, None]  # (D, 1, H, W)
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (r, r, r, r)), kernel.view(1, 1, 1, -1))
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1))
    g = x[:, 0].permute(1, 2, 0)
    return np.ascontiguousarray(g.numpy(), np.float32)


def refine(
    points: np.ndarray,
    classes: np.ndarray,
    pal_points: np.ndarray,
    flags: np.ndarray,
    labels: np.ndarray,
    locked: np.ndarray | None = None,
    *,
    lam: np.ndarray | float = LAMBDA,
    sweeps: int | None = None,
    span: float = 255.0,
) -> np.ndarray:
    """Refine a dithered index map under the eye model; returns new (H, W) int32 labels.

    Args:
        points: (H, W, D) float32 pixels in the fitting space.
        classes: (H, W) uint8 pixel classes (0 transparent: never moved; 1 opaque; 2 translucent).
        pal_points: (P, D) float32 palette in the same space.
        flags: (P,) uint8 which classes may use each entry (:func:`gpu_kquant.dither.entry_flags`).
        labels: (H, W) int32 indices to start from (not modified).
        locked: (H, W) bool pixels that keep their label, or None.
        lam: the weight of each pixel's own error, (H, W) float32 or one for all.
        sweeps: passes over the image (SWEEPS when None).
        span: the first channel's range in the space's units (255 for sRGB), the scale of HUBER.
    """
    h, w, dims = points.shape
    a = eye_autocorrelation()
    lam = np.array(np.broadcast_to(np.asarray(lam, np.float32), (h, w)))  # a writable copy
    out = np.array(labels, np.int32, copy=True)
    pal = np.ascontiguousarray(pal_points, np.float32)
    neighbours = palette_neighbours(pal, NEIGHBOURS)
    sweeps = SWEEPS if sweeps is None else sweeps
    huber = HUBER * span
    lock = None if locked is None else np.ascontiguousarray(locked, np.uint8)
    # Moves that gain less than a millionth of a full-range step: float noise, not improvements.
    tol = 1e-6 * float(a[a.shape[0] // 2] ** 2) * span**2
    args = (np.ascontiguousarray(points, np.float32), np.ascontiguousarray(classes, np.uint8), pal, flags, neighbours)
    if _refine_c is not None:
        grad = np.empty(points.shape, np.float32)  # the kernel computes g = A E itself
        _refine_c(*args, lock, out, grad, a, lam, h, w, dims, pal.shape[0], neighbours.shape[1], tol, huber, sweeps)
    else:
        _refine_torch(*args, lock, out, a, lam, tol, huber, sweeps)
    return out


def _refine_torch(
    points: np.ndarray,
    classes: np.ndarray,
    pal: np.ndarray,
    flags: np.ndarray,
    neighbours: np.ndarray,
    locked: np.ndarray | None,
    labels: np.ndarray,
    a: np.ndarray,
    lam: np.ndarray,
    tol: float,
    huber: float,
    sweeps: int,
) -> None:
    """The C kernel's search with each phase updated at once (in place on ``labels``)."""
    period = a.shape[0] // 2 + 1
    p = torch.from_numpy(pal)
    nb = torch.from_numpy(neighbours).long()
    usable = torch.from_numpy(flags)[None, :] & torch.tensor([[0], [1], [2]], dtype=torch.uint8) > 0  # (class, P)
    movable = torch.from_numpy(classes != 0 if locked is None else (classes != 0) & (locked == 0))
    cls = torch.from_numpy(classes).long()
    lab = torch.from_numpy(labels)
    center = float(a[a.shape[0] // 2]) ** 2
    lam_t = torch.from_numpy(lam)
    x = torch.from_numpy(points)
    for _ in range(sweeps):
        for py in range(period):
            for px in range(period):
                g = torch.from_numpy(gradient(points, classes, pal, labels, a))[py::period, px::period]
                cur = lab[py::period, px::period].long()
                cand = nb[cur]  # (h, w, count)
                ok = (cand >= 0) & usable[cls[py::period, px::period][..., None], cand.clamp(min=0)]
                delta = p[cand.clamp(min=0)] - p[cur][..., None, :]
                xs = x[py::period, px::period]
                own = _penalty((p[cur] - xs).square().sum(-1), huber)[..., None]
                new = _penalty((p[cand.clamp(min=0)] - xs[..., None, :]).square().sum(-1), huber)
                pen = lam_t[py::period, px::period, None] * (new - own)
                dj = 2 * (delta * g[..., None, :]).sum(-1) + center * delta.square().sum(-1) + pen
                dj = torch.where(ok, dj, torch.inf)
                best = dj.argmin(-1, keepdim=True)
                take = (dj.gather(-1, best)[..., 0] < -tol) & movable[py::period, px::period]
                lab[py::period, px::period] = torch.where(take, cand.gather(-1, best)[..., 0], cur).int()


def _penalty(e2: torch.Tensor, huber: float) -> torch.Tensor:
    """The own-error penalty of squared lengths ``e2`` (the C kernel's ``penalty``)."""
    if huber <= 0:
        return e2
    return torch.where(e2 <= huber * huber, e2, 2 * huber * e2.sqrt() - huber * huber)
