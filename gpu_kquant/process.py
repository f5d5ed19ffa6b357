"""Process-wide settings, made once at a process's entry: the CLI, or a Ray worker process.

Library code never changes them on its own; everything that does is here, so a
program embedding gpu_kquant decides for itself whether to call it.
"""

from __future__ import annotations

import warnings

import torch
from PIL import Image

__all__ = ["configure_process"]


def configure_process(*, max_pixels: int | None = None, single_threaded_torch: bool = False) -> None:
    """Make this process ready for gpu_kquant's engines.

    Args:
        max_pixels: the run's per-image pixel limit. Pillow's own decompression-bomb
            limit is raised to at least this, so that the decoder's clear per-file reason
            (not Pillow's) reports larger images, and Pillow's warning is silenced.
        single_threaded_torch: one torch thread, for CPU quantizer threads that each run
            their own batch (multi-threaded torch ops wait at a barrier for every thread,
            so one busy thread would stall them all).
    """
    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max(max_pixels, Image.MAX_IMAGE_PIXELS or 0)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    if single_threaded_torch and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
