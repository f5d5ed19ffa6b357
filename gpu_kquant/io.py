"""Image files in and out: Pillow decoding to 8-bit sRGB(A), palette encoders, atomic writes.

Knows nothing about k-means: decoding gives an (H, W, 3|4) uint8 array plus notes on
what was done to it; encoding takes a palette and indices.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "DecodeError",
    "Decoded",
    "default_compress_level",
    "encode",
    "load_image",
    "write_atomic",
]

IMAGE_EXTENSIONS = frozenset(
    {
        ".png",
        ".apng",
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".gif",
        ".webp",
        ".bmp",
        ".dib",
        ".tif",
        ".tiff",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".tga",
        ".ico",
        ".jp2",
        ".qoi",
    }
)
FORMATS = ("png", "gif", "webp", "npz")
TEMP_PREFIX = ".gpu_kquant-"
_TRANSPARENT_MODES = {"RGBA", "LA", "La", "PA", "RGBa"}


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


class DecodeError(Exception):
    """An input that cannot be turned into pixels; the message is a one-line reason."""


@dataclass
class Decoded:
    """Pixels of one input file.

    Attributes:
        pixels: (H, W, 3) RGB or (H, W, 4) RGBA uint8 in sRGB.
        notes: what was done on the way (orientation, colour profile, frames, depth).
    """

    pixels: np.ndarray
    notes: list[str] = field(default_factory=list)


def _to_srgb(img: Image.Image, notes: list[str]) -> Image.Image:
    """Convert through an embedded ICC profile to sRGB (skipped when it is sRGB)."""
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in ("RGB", "RGBA", "CMYK", "L", "LA"):
        return img
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        description = (ImageCms.getProfileDescription(src) or "").strip().lower()
        if description.startswith("srgb") and "linear" not in description:
            return img  # already sRGB: skip an identity transform
        has_alpha = img.mode in ("RGBA", "LA")
        alpha = img.getchannel("A") if has_alpha else None
        base = img.convert("L" if img.mode == "LA" else "RGB") if has_alpha else img
        out = ImageCms.profileToProfile(base, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        if out is None:  # pragma: no cover - only when inPlace=True
            return img
        if alpha is not None:
            out.putalpha(alpha)
        notes.append("ICC profile converted to sRGB")
        return out
    except (ImageCms.PyCMSError, OSError, ValueError) as exc:
        notes.append(f"ICC profile ignored ({exc})")
        return img


def _high_depth_to_uint8(img: Image.Image, notes: list[str]) -> np.ndarray:
    """16-bit and 32-bit greyscale modes scaled (not clipped) to 8 bits."""
    arr = np.asarray(img)
    if img.mode == "F":
        notes.append("32-bit float greyscale clipped to 0..255")
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    else:
        notes.append("16-bit reduced to 8-bit")
        gray = np.clip((arr.astype(np.int64) * 255 + 32767) // 65535, 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def load_image(path: str | os.PathLike, *, max_pixels: int | None = None) -> Decoded:
    """Decode an image file to 8-bit sRGB(A).

    Applies the EXIF orientation, converts an embedded ICC profile to sRGB, takes the
    first frame of animations, scales 16-bit greyscale to 8 bits, and keeps alpha
    (RGBA output) whenever the file has transparency.

    Raises:
        DecodeError: with a one-line reason (empty, unreadable, not an image, too many
            pixels, truncated or corrupt data, unsupported mode).
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise DecodeError(f"cannot read file: {exc.strerror or exc}") from None
    if size == 0:
        raise DecodeError("empty file (0 bytes)")
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(p)
    except UnidentifiedImageError:
        raise DecodeError("not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"too many pixels: {exc}") from None
    except OSError as exc:
        if exc.errno is not None:  # the file system's error, not the decoder's
            raise DecodeError(f"cannot read file: {exc.strerror or exc}") from None
        raise DecodeError(f"truncated or corrupt image data: {exc}") from None
    except (SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError(f"truncated or corrupt image data: {exc}") from None
    with img:
        w, h = img.size
        if max_pixels is not None and w * h > max_pixels:
            raise DecodeError(f"{w}x{h} = {w * h} pixels is above the limit of {max_pixels} (--max-pixels)")
        ext_format = Image.registered_extensions().get(p.suffix.lower())
        if ext_format and img.format and ext_format != img.format and p.suffix.lower() not in (".apng",):
            notes.append(f"content is {img.format}, extension says {ext_format}")
        n_frames = getattr(img, "n_frames", 1)
        if n_frames > 1:
            notes.append(f"first frame only (of {n_frames})")
        try:
            img.load()
            oriented = ImageOps.exif_transpose(img)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise DecodeError(f"truncated or corrupt image data: {exc}") from None
        if oriented is not img and img.getexif().get(0x0112, 1) not in (1, None):
            notes.append(f"EXIF orientation {img.getexif().get(0x0112)} applied")
        img = oriented
        if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
            return Decoded(_high_depth_to_uint8(img, notes), notes)
        if img.mode == "CMYK" and not img.info.get("icc_profile"):
            notes.append("CMYK converted to RGB without a profile")
        img = _to_srgb(img, notes)
        transparent = img.mode in _TRANSPARENT_MODES or "transparency" in img.info
        try:
            pixels = np.asarray(img.convert("RGBA" if transparent else "RGB"))
        except (OSError, ValueError) as exc:
            raise DecodeError(f"unsupported image mode {img.mode}: {exc}") from None
    if transparent and bool((pixels[..., 3] == 255).all()):
        pixels = pixels[..., :3]
    return Decoded(np.ascontiguousarray(pixels), notes)


def default_compress_level(n_colors: int) -> int:
    """zlib level for an indexed PNG of ``n_colors`` entries: 9, as pngquant uses.

    Measured on the bundled photos (filter None): level 9 is 3.2% smaller than 6 on
    flower at k=16 and 0.6-1.8% at k=16..64 on the others, which is what it takes to
    stay at or below pngquant --nofs's bytes; it costs about three times the
    compression time of level 6.
    """
    del n_colors  # kept for callers; every palette size gains from level 9
    return 9


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _pack_rows(indices: np.ndarray, bits: int) -> np.ndarray:
    """(H, W) uint8 indices -> (H, ceil(W*bits/8)) bytes, most significant bits first."""
    if bits == 8:
        return indices
    per_byte = 8 // bits
    h, w = indices.shape
    padded = np.zeros((h, -(-w // per_byte) * per_byte), np.uint8)
    padded[:, :w] = indices
    groups = padded.reshape(h, -1, per_byte)
    shifts = np.arange(per_byte - 1, -1, -1, dtype=np.uint8) * bits
    return np.bitwise_or.reduce(groups << shifts, axis=2).astype(np.uint8)


def _idat(indices: np.ndarray, bits: int, level: int) -> bytes:
    """zlib stream of the rows packed at ``bits`` per pixel, each with filter type None."""
    rows = _pack_rows(indices, bits)
    raw = np.empty((rows.shape[0], rows.shape[1] + 1), np.uint8)
    raw[:, 0] = 0  # filter type None on every row
    raw[:, 1:] = rows
    return zlib.compress(raw.tobytes(), level)


def encode_png(palette: np.ndarray, indices: np.ndarray, compress_level: int | None = None) -> bytes:
    """Indexed PNG with filter type None and the bit depth (1, 2, 4 or 8) that compresses smallest.

    Written by hand because Pillow always applies adaptive row filters, which make
    palette images 12-23% larger (the PNG spec recommends None for indexed colour);
    Sub, Up and Paeth on a luminance-sorted palette were also 5-15% larger than None
    on the bundled photos at k=16 and 64, and zlib's Z_FILTERED and Z_RLE strategies
    1-30% larger than the default. With filter None, deflate sees a permutation of the
    same symbols whatever the palette order, so the order does not matter (measured
    within 0.1%). Palettes of 5-16 colours are also tried at 8 bits per pixel, which
    lets deflate match runs at odd pixel offsets: 1-3% smaller on two of the five
    bundled photos at k=16. The tRNS chunk stops at the last entry with transparency.
    """
    n = palette.shape[0]
    bits = 1 if n <= 2 else 2 if n <= 4 else 4 if n <= 16 else 8
    h, w = indices.shape
    level = default_compress_level(n) if compress_level is None else compress_level
    idx = np.ascontiguousarray(indices, dtype=np.uint8)
    data = _idat(idx, bits, level)
    if bits == 4:
        wide = _idat(idx, 8, level)
        if len(wide) < len(data):
            bits, data = 8, wide
    out = [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bits, 3, 0, 0, 0))]
    out.append(_png_chunk(b"PLTE", np.ascontiguousarray(palette[:, :3], np.uint8).tobytes()))
    if palette.shape[1] == 4:
        alpha = palette[:, 3]
        last = np.flatnonzero(alpha < 255)
        if last.size:
            out.append(_png_chunk(b"tRNS", alpha[: last[-1] + 1].astype(np.uint8).tobytes()))
    out.append(_png_chunk(b"IDAT", data))
    out.append(_png_chunk(b"IEND", b""))
    return b"".join(out)


def _palette_image(palette: np.ndarray, indices: np.ndarray) -> Image.Image:
    img = Image.fromarray(np.ascontiguousarray(indices, dtype=np.uint8), "P")
    img.putpalette(np.ascontiguousarray(palette[:, :3], np.uint8).tobytes(), rawmode="RGB")
    return img


def encode(
    fmt: str, palette: np.ndarray, indices: np.ndarray, *, compress_level: int | None = None
) -> tuple[bytes, list[str]]:
    """Encode a palette image as ``png``, ``gif``, ``webp`` (lossless) or ``npz``.

    Args:
        palette: (k, 3) RGB or (k, 4) RGBA uint8 (k <= 256 except for npz).
        indices: (H, W) uint8 or uint16.

    Returns:
        The file bytes and notes about anything the format could not keep.
    """
    notes: list[str] = []
    if fmt == "npz":
        buf = io.BytesIO()
        np.savez_compressed(buf, indices=indices, palette=palette)
        return buf.getvalue(), notes
    if palette.shape[0] > 256:
        raise ValueError(f"{fmt} holds at most 256 colours, got {palette.shape[0]}")
    if fmt == "png":
        return encode_png(palette, indices, compress_level), notes
    buf = io.BytesIO()
    has_alpha = palette.shape[1] == 4 and bool((palette[:, 3] < 255).any())
    if fmt == "gif":
        img = _palette_image(palette, indices)
        options = {}
        if has_alpha:
            clear = int(np.argmin(palette[:, 3]))
            options["transparency"] = clear
            if bool(((palette[:, 3] > 0) & (palette[:, 3] < 255)).any()):
                notes.append("GIF keeps only full transparency: partial alpha became opaque")
        img.save(buf, "GIF", optimize=False, **options)
    elif fmt == "webp":
        img = _palette_image(palette, indices)
        img = img.convert("RGBA") if has_alpha else img.convert("RGB")
        if has_alpha:
            img.putalpha(Image.fromarray(palette[:, 3][indices]))
        img.save(buf, "WEBP", lossless=True, quality=100, method=4, exact=True)
    else:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    return buf.getvalue(), notes


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place.

    A reader (or a killed run) never sees a partly written file; the temporary file
    lives in the destination folder so the rename is atomic.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
