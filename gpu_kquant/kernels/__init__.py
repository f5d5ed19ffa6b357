"""The k-means kernel interface: four primitives, one implementation per backend.

Every backend implements, on batched tensors (shapes in :mod:`.reference`):

- ``nearest(points, centroids, second)``: labels, squared distance to the nearest and
  (optionally) to the second-nearest centroid;
- ``lloyd_step(points, qx, qw, centroids)``: assignment plus exact int64 fixed-point
  sums and weights per cluster in one pass, with no (N, k) distance matrix;
- ``kpp_potential(points, weights, closest, candidates)``: the k-means++ potential of
  each candidate centre;
- ``min_update(points, centre, closest)``: the k-means++ distance update.

Distances are summed coordinate by coordinate in index order in float32, so a
distance never depends on blocking or batching, and ties go to the lowest index:
every backend gives the reference's labels. Backends register per device type in
:data:`REGISTRY`, most preferred first; :func:`backend` picks the first available one.
``GPU_KQUANT_KERNELS=torch`` (or ``c``, ``triton``) forces a backend, for tests and
comparisons.

Per-image work (colour sets, histogram bins, the pixel -> palette lookup, the exact RGB
error) has its own, smaller interface, :class:`ImageKernels`: the torch code in
:mod:`gpu_kquant.colors` and :mod:`gpu_kquant.quantize` is its reference and runs
wherever :func:`image_backend` returns ``None`` (no compiled backend for the device, or
``GPU_KQUANT_KERNELS=torch``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol, cast

import torch

from . import reference

__all__ = [
    "IMAGE_REGISTRY",
    "REGISTRY",
    "Backend",
    "ImageKernels",
    "Kernels",
    "available_backends",
    "backend",
    "image_backend",
]

ENV_VAR = "GPU_KQUANT_KERNELS"


class Kernels(Protocol):
    """What every backend module provides (shapes and dtypes in :mod:`.reference`).

    A backend may also provide whole-fit kernels (``kmeans_pp``, ``lloyd``, as the C
    backend does); callers look for them with ``getattr``.
    """

    def nearest(
        self, points: torch.Tensor, centroids: torch.Tensor, second: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...

    def lloyd_step(
        self, points: torch.Tensor, qx: torch.Tensor, qw: torch.Tensor, centroids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def kpp_potential(
        self, points: torch.Tensor, weights: torch.Tensor, closest: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor: ...

    def min_update(self, points: torch.Tensor, centre: torch.Tensor, closest: torch.Tensor) -> torch.Tensor: ...


class ImageKernels(Protocol):
    """Per-image kernels of a compiled backend (shapes in :mod:`.cpu_images`)."""

    def color_set(self, pixels: torch.Tensor, buckets: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def lookup(
        self, pixels: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor | None
    ) -> torch.Tensor: ...

    def bin_colors(
        self, colors: torch.Tensor, counts: torch.Tensor, points: torch.Tensor, bits: int, scales: tuple[float, float]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def rgb_error(
        self, colors: torch.Tensor, counts: torch.Tensor, labels: torch.Tensor, palette: torch.Tensor
    ) -> tuple[int, torch.Tensor]: ...


@dataclass(frozen=True)
class Backend:
    """A named set of kernels and a check of whether it can run here."""

    name: str
    load: Callable[[], ModuleType | None]

    def module(self) -> ModuleType | None:
        return self.load()


def _load_c() -> ModuleType | None:
    from . import cpu

    return cpu if cpu.AVAILABLE else None


def _load_triton() -> ModuleType | None:
    try:
        from . import triton_kernels
    except ImportError:
        return None
    return triton_kernels if triton_kernels.AVAILABLE else None


def _load_c_images() -> ModuleType | None:
    from . import cpu_images

    return cpu_images if cpu_images.AVAILABLE else None


_TORCH = Backend("torch", lambda: reference)
_C = Backend("c", _load_c)
_TRITON = Backend("triton", _load_triton)

# Per device type, most preferred first; the torch reference runs everywhere.
REGISTRY: dict[str, tuple[Backend, ...]] = {
    "cpu": (_C, _TORCH),
    "cuda": (_TRITON, _TORCH),
}

# Compiled per-image kernels per device type, most preferred first; none means the torch code.
IMAGE_REGISTRY: dict[str, tuple[Backend, ...]] = {
    "cpu": (Backend("c", _load_c_images),),
}


def available_backends(device: torch.device) -> list[str]:
    """Names of the backends that can run on ``device``, most preferred first."""
    return [b.name for b in REGISTRY.get(device.type, (_TORCH,)) if b.module() is not None]


def backend(device: torch.device) -> Kernels:
    """The kernel module to use on ``device``: forced by ``GPU_KQUANT_KERNELS`` or the best available."""
    forced = os.environ.get(ENV_VAR, "auto")
    candidates = REGISTRY.get(device.type, (_TORCH,))
    for b in candidates:
        if forced in ("auto", b.name):
            module = b.module()
            if module is not None:
                return cast(Kernels, module)
    if forced not in ("auto", "torch"):
        raise ValueError(f"{ENV_VAR}={forced!r} is not available on {device.type}")
    return cast(Kernels, reference)


def image_backend(device: torch.device) -> ImageKernels | None:
    """The compiled per-image kernels for ``device``, or ``None`` to run the torch code.

    ``GPU_KQUANT_KERNELS`` forces a backend here too: ``torch`` (or a backend without
    per-image kernels, such as ``triton``) gives ``None``.
    """
    forced = os.environ.get(ENV_VAR, "auto")
    for b in IMAGE_REGISTRY.get(device.type, ()):
        if forced in ("auto", b.name):
            module = b.module()
            if module is not None:
                return cast(ImageKernels, module)
    return None
