"""Typed, frozen options that travel whole from the CLI to the engine.

``FitOptions`` says how a palette is fitted (it reaches :func:`gpu_kquant.kmeans.kmeans`
unchanged); ``OutputOptions`` (what is written) and ``EngineOptions`` (where it is
computed) travel beside it inside ``RunOptions``. ``None`` fields mean
"the measured default for this k" and are filled in by :meth:`FitOptions.resolved`.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "RESIZE_MODES",
    "SPACES",
    "EngineOptions",
    "FitOptions",
    "OutputOptions",
    "ResizeOptions",
    "RunOptions",
    "auto_fit_points",
    "auto_n_init",
    "default_workers",
]

SPACES = ("rgb", "oklab", "lab")
RESIZE_MODES = ("fit", "fill", "stretch")


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
        exact_finish: after a fit on a histogram, run Lloyd on the exact colours from its
            result (``None``: only for ``--dither adaptive``, whose dithering costs several
            times the fit; see :func:`gpu_kquant.fitplan.fit_palettes`).
        stop: a cooperative stop (a :class:`gpu_kquant.stopping.StopFlag`, or any
            :class:`threading.Event`): once set, k-means raises
            :class:`gpu_kquant.stopping.Stopped` between iterations. Not part of what the
            options mean: left out of ``==``, ``hash`` and ``repr``; the engines set it.
    """

    k: int = 16
    space: str = "rgb"
    seed: int = 0
    n_init: int | None = None
    max_iter: int = 300
    tol: float = 1e-4
    max_fit_points: int | None = None
    exact_finish: bool | None = None
    stop: threading.Event | None = field(default=None, compare=False, repr=False)

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


def default_workers() -> int:
    """Decode and write threads: one per core (Pillow and zlib release the GIL)."""
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ResizeOptions:
    """``--resize WxH --resize-mode MODE``: every image resized, antialiased, before quantization.

    Attributes:
        width: width of the target box in pixels.
        height: height of the target box in pixels.
        mode: ``fit`` (inside the box, aspect kept), ``fill`` (cover the box, crop the
            centre: exactly the box) or ``stretch`` (exactly the box, aspect ignored).
    """

    width: int
    height: int
    mode: str = "fit"

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ValueError(f"resize width and height must be >= 1, got {self.width}x{self.height}")
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {self.mode!r}")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as Pillow takes sizes."""
        return self.width, self.height


@dataclass(frozen=True)
class OutputOptions:
    """What a run writes, where, and the policies that decide whether it writes.

    Attributes:
        out: output folder (``None``: ``DIR_k<k>`` beside each input folder).
        format: output format, a key of :data:`gpu_kquant.imagefiles.ENCODERS`.
        compress_level: zlib level for PNG (``None``: the measured default).
        report: JSON-lines report (``None``: ``OUT/gpu_kquant_report.jsonl``).
        palette: ``"shared"`` (one palette fitted on every input), a palette file, or ``None``.
        dither: ``none``, ``fs``, ``adaptive`` or ``ordered`` (see :data:`gpu_kquant.dither.DITHERS`).
        quality: (minimum, target) PSNR in dB: the smallest k reaching the target, and no
            output below the minimum.
        overwrite: redo outputs gpu_kquant wrote with these options (default: skip them, so a
            rerun resumes); a file it did not write is never replaced (:mod:`gpu_kquant.manifest`).
        skip_if_larger: never write an output larger than its input.
        ciede2000: add the mean CIEDE2000 to every row.
        preview: write the HTML gallery (one input file: a side-by-side PNG).
        resize: resize every image before quantization (``None``: keep its size).
    """

    out: Path | None = None
    format: str = "png"
    compress_level: int | None = None
    report: Path | None = None
    palette: str | None = None
    dither: str = "none"
    quality: tuple[float, float] | None = None
    overwrite: bool = False
    skip_if_larger: bool = False
    ciede2000: bool = False
    preview: bool = False
    resize: ResizeOptions | None = None


@dataclass(frozen=True)
class EngineOptions:
    """Where and how a run computes; none of it changes what is written.

    Attributes:
        engine: ``local`` (threads on this machine) or ``ray`` (a Ray cluster).
        device: ``auto``/``None``, ``cpu``, ``cuda`` or ``cuda:N``.
        workers: decode threads and as many write threads.
        batch_size: images per batched k-means (``None``: :func:`gpu_kquant.control.default_batch_size`).
        batch_pixels: a k-means batch closes at this many pixels, whatever its image count.
        max_pixels: inputs above this many pixels fail with a clear reason (``None``: no limit).
        memory_budget: bytes of decoded pixels held at once, decode prefetch and batches
            together (``None``: :func:`gpu_kquant.budget.default_memory_budget`, from the
            RAM available when the run starts). An image larger than the whole budget runs alone.
        shard: ``(index, count)``: process only this deterministic part of the inputs.
        ray_address: Ray cluster to join (``None``: start a local Ray).
        ray_workers: quantize actors on Ray (``None``: one per GPU, or 1).
        processes: local engine: spawned processes per device (``None``: one per GPU when
            there are several, else none: the run's threads stay in this process).
    """

    engine: str = "local"
    device: str | None = None
    workers: int = field(default_factory=default_workers)
    batch_size: int | None = None
    batch_pixels: int = 64_000_000
    max_pixels: int | None = None
    memory_budget: int | None = None
    shard: tuple[int, int] = (0, 1)
    ray_address: str | None = None
    ray_workers: int | None = None
    processes: int | None = None

    def __post_init__(self) -> None:
        if self.processes is not None and self.processes < 1:
            raise ValueError(f"processes must be at least 1, got {self.processes}")
        if self.memory_budget is not None and self.memory_budget < 1:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {self.memory_budget}")


@dataclass(frozen=True)
class RunOptions:
    """One run: its inputs and the three option groups, built once (by the CLI) and never changed."""

    inputs: tuple[Path, ...]
    fit: FitOptions = FitOptions()
    output: OutputOptions = OutputOptions()
    engine: EngineOptions = EngineOptions()

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(Path(p) for p in self.inputs))
