"""Typed, frozen options that travel whole from the CLI to the engine.

``FitOptions`` says how a palette is fitted (it reaches :func:`gpu_kquant.kmeans.kmeans`
unchanged); the pipeline adds its own option objects beside it. ``None`` fields mean
"the measured default for this k" and are filled in by :meth:`FitOptions.resolved`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["SPACES", "FitOptions", "auto_fit_points", "auto_n_init"]

SPACES = ("rgb", "oklab", "lab")


def auto_n_init(k: int) -> int:
    """Default k-means++ restarts: 8 up to k = 64, 1 above.

    Small palettes land in local optima several percent apart. Restarts run on the
    coarse seed set, where they are cheap, and only the best two go on to the fine set:
    measured on six photos and two 4-megapixel mosaics at k = 16, eight restarts bring
    the worst case from 2.8% above scikit-learn's full fit to 0.5%. At k = 256 restarts
    change MSE by under 1% and would double the fit time.
    """
    return 8 if k <= 64 else 1


def auto_fit_points(k: int) -> int:
    """Default ``max_fit_points``: exact colour sets up to 32768 colours for k <= 64, 65536 above.

    Larger sets merge into 6-bit bins (4x4x4 sRGB cubes). Measured on four 0.25-megapixel
    photos (china, flower, astronaut, coffee) with the C kernels: at k = 64, 32768 instead
    of fitting every colour costs 0.05 dB of PSNR for a 1.75x faster quantize; at k = 256,
    65536 costs 0.11 dB for 1.4x (32768 would cost 0.16 dB, too close to the +0.2 dB margin
    over pngquant that the quality bar asks for).
    """
    return 1 << 15 if k <= 64 else 1 << 16


@dataclass(frozen=True)
class FitOptions:
    """How palettes are fitted.

    Attributes:
        k: palette size, 1..65536.
        space: colour space of the fit and of the mapping (one of :data:`SPACES`).
        seed: seed of each problem's own random stream.
        n_init: k-means++ restarts per image (``None``: :func:`auto_n_init`).
        max_iter: maximum Lloyd iterations.
        tol: Lloyd tolerance, relative to the data's variance (scikit-learn's rule).
        max_fit_points: colour sets above this are fitted on a histogram
            (``None``: :func:`auto_fit_points`).
    """

    k: int = 16
    space: str = "rgb"
    seed: int = 0
    n_init: int | None = None
    max_iter: int = 300
    tol: float = 1e-4
    max_fit_points: int | None = None

    def __post_init__(self) -> None:
        k = self.k
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 1 << 16:
            raise ValueError(f"k must be an integer in 1..65536, got {k!r}")
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {', '.join(SPACES)}, got {self.space!r}")
        if self.n_init is not None and self.n_init < 1:
            raise ValueError(f"n_init must be >= 1, got {self.n_init}")
        if self.max_iter < 0:
            raise ValueError(f"max_iter must be >= 0, got {self.max_iter}")
        if self.max_fit_points is not None and self.max_fit_points < 1:
            raise ValueError(f"max_fit_points must be >= 1, got {self.max_fit_points}")

    def resolved(self) -> FitOptions:
        """A copy with every ``None`` default filled in for this k."""
        return dataclasses.replace(
            self,
            n_init=auto_n_init(self.k) if self.n_init is None else self.n_init,
            max_fit_points=auto_fit_points(self.k) if self.max_fit_points is None else self.max_fit_points,
        )

    def with_k(self, k: int) -> FitOptions:
        """The same options for another palette size (``--quality`` searches over k)."""
        return dataclasses.replace(self, k=k)
