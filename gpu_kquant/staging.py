"""Decoded pixels into pinned host memory, and each batch's upload on a copy stream (issue 11, item 4).

On CUDA, a decode thread calls :meth:`Stager.stage` right after decoding: the (H, W, C)
uint8 pixels are copied once into page-locked (pinned) host memory there, on the io
thread, so the quantize thread never copies pixels on the host (``to_tensor`` copied every
read-only decoded array, then the driver copied pageable memory once more into its own
staging buffer, both on the quantize thread). When the worker forms a batch it calls
:meth:`Stager.upload`: the batch's copies are queued ``non_blocking`` on the stager's own
copy stream, followed by an event. The thread that quantizes the batch calls
:meth:`Uploaded.take`, which makes its stream wait for that event on the device (the host
does not wait), so batch i+1 uploads while batch i computes.

On the CPU both steps pass the pixels through: :meth:`Stager.stage` returns a tensor that
shares the array's memory and :meth:`Stager.upload` returns the tensors it was given.

Pinned memory comes from PyTorch's caching host allocator (``pin_memory=True``), not from
a pool of our own: that allocator already is a pool keyed by size (power-of-two bins,
blocks reused, never freed during a run, so the slow ``cudaHostAlloc`` and the
device-synchronizing ``cudaFreeHost`` only happen while the pool warms up), and it already
does what a pool of ours would have to do with events: a non-blocking copy records an event
on the block (``CachingHostAllocator_recordEvent`` in ATen's Copy.cu), and a freed block
returns to the free list only once those events completed. The cost is the rounding:
pinned bytes are up to 2x the pixels (a 12-MP RGB photo, 36 MB, takes a 64 MB block; an
8-MP one 24 of 32 MB). Not yet measured on a GPU: benchmarks/gpu_check.py times the
overlap; ``torch.cuda.host_memory_stats()`` would show the pinned peak.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.dlpack import from_dlpack

from .quantize import to_tensor

__all__ = ["Allocator", "Stager", "Uploaded", "host_view", "pinned_empty"]

Allocator = Callable[[tuple[int, ...]], torch.Tensor]
"""``alloc(shape)``: an empty contiguous uint8 CPU tensor of that shape to stage pixels in."""


def pinned_empty(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty pinned uint8 tensor from PyTorch's caching host allocator (CUDA only: it raises without a driver)."""
    return torch.empty(shape, dtype=torch.uint8, pin_memory=True)


def host_view(pixels: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing ``pixels``' memory, also for a read-only array (decoded arrays are read-only).

    ``torch.from_numpy`` warns on read-only arrays; DLPack (numpy >= 2.1) exports them
    without a copy. Nothing in gpu_kquant writes to an input image. Older numpy refuses to
    export a read-only array: then a copy (what ``to_tensor`` does).
    """
    if pixels.flags.writeable:
        return torch.from_numpy(pixels)
    try:
        return from_dlpack(pixels)
    except BufferError:
        return torch.from_numpy(pixels.copy())


@dataclass(frozen=True)
class Uploaded:
    """One batch's images on their way to the device.

    Attributes:
        images: (H, W, C) uint8 per image: on the device once :meth:`take` returned them
            (the CPU device: the host tensors themselves).
        event: recorded on the copy stream after the batch's copies; ``None`` when nothing
            was copied.
        sources: the host tensors copied from, kept referenced until the batch is done.
    """

    images: list[torch.Tensor]
    event: torch.cuda.Event | None = None
    sources: list[torch.Tensor] = field(default_factory=list)

    def take(self) -> list[torch.Tensor]:
        """The images, safe to use in work queued afterwards on this thread's current stream."""
        if self.event is None or not self.images:
            return self.images
        stream = torch.cuda.current_stream(self.images[0].device)
        # The device, not the host, waits: work queued on ``stream`` after this starts once the copies are done.
        stream.wait_event(self.event)
        for image in self.images:
            # The images were allocated on the copy stream; without this, freeing one would let
            # the copy stream reuse its memory while kernels on ``stream`` still read it.
            image.record_stream(stream)
        return self.images


class Stager:
    """Stages decoded pixels (pinned on CUDA) and uploads batches on a copy stream; thread-safe.

    Args:
        device: the quantize device; only CUDA stages or uploads anything.
        alloc: where :meth:`stage` copies pixels to. Default: :func:`pinned_empty` on CUDA,
            nothing (a view, no copy) elsewhere. Given on the CPU (tests), stage copies into
            it and upload still passes through.
    """

    def __init__(self, device: torch.device | str, alloc: Allocator | None = None) -> None:
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self._alloc = alloc if alloc is not None else (pinned_empty if cuda else None)
        # One copy stream per stager: PyTorch's streams do not synchronize with the default stream
        # (cudaStreamNonBlocking), so copies on it overlap kernels queued on the quantize thread's stream.
        self._stream = torch.cuda.Stream(self.device) if cuda else None  # type: ignore[no-untyped-call]

    @property
    def copy_stream(self) -> torch.cuda.Stream | None:
        """The stream uploads are queued on (``None`` off CUDA)."""
        return self._stream

    def stage(self, pixels: np.ndarray) -> torch.Tensor:
        """(H, W, C) uint8 decoded pixels -> (H, W, C) uint8 CPU tensor, equal to them.

        A copy into a buffer from ``alloc`` (pinned on CUDA), else a view of ``pixels``. Call
        it on the decoding thread: the copy (numpy, GIL released) happens there. When no
        pinned memory can be had, a view (the upload is then from pageable memory: slower, same result).
        """
        if pixels.dtype != np.uint8 or pixels.ndim != 3:
            raise ValueError(f"expected (H, W, C) uint8 pixels, got {pixels.dtype} {pixels.shape}")
        if self._alloc is None:
            return host_view(pixels)
        try:
            host = self._alloc(tuple(pixels.shape))
        except RuntimeError:  # page-locked memory exhausted (cudaHostAlloc failed)
            return host_view(pixels)
        np.copyto(host.numpy(), pixels)
        return host

    def upload(self, images: Sequence[torch.Tensor]) -> Uploaded:
        """Queue the copies of (H, W, C) uint8 CPU tensors to the device; returns at once.

        Each image is first reduced as ``quantize.to_tensor`` would (RGBA with opaque alpha
        -> RGB, checked here on the host), so the device tensors equal what
        ``to_tensor(image).to(device)`` gives, layout included. If the device is out of
        memory, the batch goes as host tensors (quantize_batch then uploads it itself).
        """
        if self._stream is None:
            return Uploaded(list(images))
        hosts = [to_tensor(image) for image in images]
        try:
            with torch.cuda.stream(self._stream):
                # Allocated on the copy stream, written by DMA from pinned memory without the host waiting.
                # Each copy records an event on its pinned block too, so the block is not reused
                # before the copy read it, even once every reference to it is gone.
                on_device = [host.to(self.device, non_blocking=True) for host in hosts]
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(self._stream)
        except torch.cuda.OutOfMemoryError:
            return Uploaded(list(images))
        return Uploaded(on_device, event, hosts)
