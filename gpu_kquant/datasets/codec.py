"""The dataset layer's only links to the image and quantization code: one adapter each.

Kept in one place because ``gpu_kquant/io.py`` and the option plumbing are being
reshaped; when they move, only these functions change.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence

import numpy as np
import torch

from ..fitting import reach_quality
from ..imagefiles import Decoded, DecodeError, encode, load_image
from ..options import FitOptions
from ..quantize import Quantized, map_to_palette, quantize_batch

__all__ = ["DecodeError", "Decoded", "decode_bytes", "encode_image", "quantize_images"]


def decode_bytes(data: bytes, *, max_pixels: int | None = None) -> Decoded:
    """Decode an in-memory image with the project's decoder (:func:`gpu_kquant.imagefiles.load_image`).

    ``load_image`` takes a path, so the bytes go into an anonymous in-memory file
    (``memfd`` on Linux; a temporary file elsewhere) and it reads that; the decode
    rules (EXIF orientation, ICC to sRGB, first frame, 16-bit, alpha) stay the
    project's one definition. Returns (H, W, 3|4) uint8 pixels with notes.

    Raises:
        DecodeError: with a one-line reason.
    """
    if not data:
        raise DecodeError("empty image (0 bytes)")
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("gpu_kquant-sample", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            return load_image(f"/proc/self/fd/{fd}", max_pixels=max_pixels)
        finally:
            os.close(fd)
    with tempfile.NamedTemporaryFile(prefix=".gpu_kquant-", suffix=".tmp", delete=False) as f:
        f.write(data)
    try:
        return load_image(f.name, max_pixels=max_pixels)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(f.name)


def quantize_images(
    images: Sequence[np.ndarray],
    fit: FitOptions,
    *,
    palette: np.ndarray | None,
    palette_space: str,
    dither: str,
    device: str,
    target: float | None = None,
) -> list[Quantized | Exception]:
    """Quantize (H, W, 3|4) uint8 images in one batch; a failing batch is retried image by image.

    With ``palette`` ((k, 3|4) uint8) every image maps to it whole and in order (tokens);
    with ``target`` (``--quality``'s PSNR in dB) each image gets the smallest k up to
    ``fit.k`` that reaches it, as image files do (:func:`gpu_kquant.fitting.reach_quality`);
    otherwise each image gets its own k-colour palette.
    """

    def run(batch: Sequence[np.ndarray]) -> list[Quantized]:
        if palette is not None:
            return map_to_palette(batch, palette, space=palette_space, dither=dither, device=device)
        if target is not None:
            return [reach_quality(px, fit, target, dither=dither, device=torch.device(device)) for px in batch]
        return quantize_batch(batch, dither=dither, device=device, options=fit)  # the options whole

    try:
        return list(run(images))
    except Exception:
        out: list[Quantized | Exception] = []
        for image in images:
            try:
                out.append(run([image])[0])
            except Exception as exc:
                out.append(exc)
        return out


def encode_image(fmt: str, result: Quantized, compress_level: int | None) -> tuple[bytes, list[str]]:
    """Encode a quantized image with the project's encoder (indexed PNG, GIF, WebP or npz)."""
    return encode(fmt, result.palette, result.indices, compress_level=compress_level)
