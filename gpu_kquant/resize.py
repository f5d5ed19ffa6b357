"""``--resize WxH`` with ``--resize-mode fit|fill|stretch``: antialiased Pillow resampling before quantization.

One implementation for every input kind: the image-file worker's decode step
(:func:`gpu_kquant.worker.read_task`) and the dataset shards' (``gpu_kquant.datasets``)
both call :func:`resize_decoded`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from .imagefiles import Decoded
from .options import RESIZE_MODES, ResizeOptions

__all__ = ["RESIZE_MODES", "ResizeOptions", "parse_size", "resize", "resize_decoded"]

# Lanczos (a = 3) is Pillow's sharpest antialiased filter; its support widens with the
# scale factor when shrinking, so downscaling does not alias.
_FILTER = Image.Resampling.LANCZOS


def parse_size(text: str) -> tuple[int, int]:
    """``"256x256"`` -> (256, 256) as (width, height); ValueError with the reason otherwise."""
    try:
        w, h = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"expected WxH such as 256x256, got {text!r}") from None
    if w < 1 or h < 1:
        raise ValueError(f"width and height must be >= 1, got {text!r}")
    return w, h


def resize(pixels: np.ndarray, size: tuple[int, int], mode: str = "fit") -> np.ndarray:
    """Resize one image.

    Args:
        pixels: (H, W, 3) RGB or (H, W, 4) RGBA uint8.
        size: (width, height) of the target box.
        mode: ``fit``: the largest size inside the box with the aspect ratio kept (one
            side equals the box); ``fill``: cover the box with the aspect ratio kept, then
            crop the centre, so the result is exactly the box; ``stretch``: exactly the
            box, aspect ratio ignored.

    Returns:
        (H', W', C) uint8 with the same C. RGBA is resampled premultiplied (Pillow does
        this itself), so transparent pixels do not bleed their colour.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    h, w = pixels.shape[:2]
    if (w, h) == tuple(size) or (mode == "fit" and _fits(w, h, size)):
        return pixels
    img = Image.fromarray(np.ascontiguousarray(pixels), "RGBA" if pixels.shape[2] == 4 else "RGB")
    if mode == "stretch":
        out = img.resize(size, _FILTER)
    elif mode == "fill":
        out = ImageOps.fit(img, size, _FILTER, centering=(0.5, 0.5))
    else:
        out = ImageOps.contain(img, size, _FILTER)
    return np.ascontiguousarray(np.asarray(out))


def resize_decoded(decoded: Decoded, options: ResizeOptions | None) -> Decoded:
    """``decoded`` resized as ``options`` say, with a note of the change (unchanged when None or already that size)."""
    if options is None:
        return decoded
    h, w = decoded.pixels.shape[:2]
    pixels = resize(decoded.pixels, options.size, options.mode)
    if pixels is decoded.pixels:
        return decoded
    note = f"resized from {w}x{h} to {pixels.shape[1]}x{pixels.shape[0]} ({options.mode})"
    return Decoded(pixels, [*decoded.notes, note])


def _fits(w: int, h: int, size: tuple[int, int]) -> bool:
    """Whether (w, h) already touches the box on one side and fits inside it (no-op for fit)."""
    return w <= size[0] and h <= size[1] and (w == size[0] or h == size[1])
