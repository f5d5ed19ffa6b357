"""Image files in and out: Pillow decoding to 8-bit sRGB(A), palette encoders, atomic writes.

Knows nothing about k-means: decoding gives an (H, W, 3|4) uint8 array plus notes on
what was done to it; encoding takes a palette and indices.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

__all__ = [
    "ENCODERS",
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
TEMP_PREFIX = ".gpu_kquant-"
_TRANSPARENT_MODES = {"RGBA", "LA", "La", "PA", "RGBa"}


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
    """zlib level for an indexed PNG of ``n_colors`` entries: 9 up to 8 colours, else 6.

    Measured on 11 photo outputs (filter None): level 9 is 4.8% smaller than 6 at 4
    colours but only 1.9% at 16, 1.2% at 64 and 0.3% at 256, and takes about three
    times as long, so it is worth it only for very small palettes.
    """
    return 9 if n_colors <= 8 else 6


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


def encode_png(palette: np.ndarray, indices: np.ndarray, compress_level: int | None = None) -> bytes:
    """Indexed PNG with the smallest bit depth (1, 2, 4 or 8) and filter type None.

    Written by hand because Pillow always applies adaptive row filters, which make
    palette images 12-23% larger (the PNG spec recommends None for indexed colour).
    The tRNS chunk stops at the last entry with transparency.
    """
    n = palette.shape[0]
    bits = 1 if n <= 2 else 2 if n <= 4 else 4 if n <= 16 else 8
    h, w = indices.shape
    rows = _pack_rows(np.ascontiguousarray(indices, dtype=np.uint8), bits)
    raw = np.empty((h, rows.shape[1] + 1), np.uint8)
    raw[:, 0] = 0  # filter type None on every row
    raw[:, 1:] = rows
    level = default_compress_level(n) if compress_level is None else compress_level
    out = [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bits, 3, 0, 0, 0))]
    out.append(_png_chunk(b"PLTE", np.ascontiguousarray(palette[:, :3], np.uint8).tobytes()))
    if palette.shape[1] == 4:
        alpha = palette[:, 3]
        last = np.flatnonzero(alpha < 255)
        if last.size:
            out.append(_png_chunk(b"tRNS", alpha[: last[-1] + 1].astype(np.uint8).tobytes()))
    out.append(_png_chunk(b"IDAT", zlib.compress(raw.tobytes(), level)))
    out.append(_png_chunk(b"IEND", b""))
    return b"".join(out)


def _palette_image(palette: np.ndarray, indices: np.ndarray) -> Image.Image:
    img = Image.fromarray(np.ascontiguousarray(indices, dtype=np.uint8), "P")
    img.putpalette(np.ascontiguousarray(palette[:, :3], np.uint8).tobytes(), rawmode="RGB")
    return img


def _has_alpha(palette: np.ndarray) -> bool:
    return palette.shape[1] == 4 and bool((palette[:, 3] < 255).any())


def _encode_npz(palette: np.ndarray, indices: np.ndarray, compress_level: int | None, notes: list[str]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, indices=indices, palette=palette)
    return buf.getvalue()


def _encode_png(palette: np.ndarray, indices: np.ndarray, compress_level: int | None, notes: list[str]) -> bytes:
    return encode_png(palette, indices, compress_level)


def _encode_gif(palette: np.ndarray, indices: np.ndarray, compress_level: int | None, notes: list[str]) -> bytes:
    buf = io.BytesIO()
    img = _palette_image(palette, indices)
    if _has_alpha(palette):
        if bool(((palette[:, 3] > 0) & (palette[:, 3] < 255)).any()):
            notes.append("GIF keeps only full transparency: partial alpha became opaque")
        img.save(buf, "GIF", optimize=False, transparency=int(np.argmin(palette[:, 3])))
    else:
        img.save(buf, "GIF", optimize=False)
    return buf.getvalue()


def _encode_webp(palette: np.ndarray, indices: np.ndarray, compress_level: int | None, notes: list[str]) -> bytes:
    buf = io.BytesIO()
    has_alpha = _has_alpha(palette)
    img = _palette_image(palette, indices)
    img = img.convert("RGBA") if has_alpha else img.convert("RGB")
    if has_alpha:
        img.putalpha(Image.fromarray(palette[:, 3][indices]))
    img.save(buf, "WEBP", lossless=True, quality=100, method=4, exact=True)
    return buf.getvalue()


Encoder = Callable[[np.ndarray, np.ndarray, int | None, list[str]], bytes]
"""``encoder(palette, indices, compress_level, notes) -> file bytes``; appends what the format could not keep."""

ENCODERS: dict[str, Encoder] = {"png": _encode_png, "gif": _encode_gif, "webp": _encode_webp, "npz": _encode_npz}
"""Output formats (``--format``) and their encoders."""

FORMATS = tuple(ENCODERS)

_MAX_COLORS = {"npz": 1 << 16}  # every other format holds a 256-entry palette at most


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
    encoder = ENCODERS.get(fmt)
    if encoder is None:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if palette.shape[0] > _MAX_COLORS.get(fmt, 256):
        raise ValueError(f"{fmt} holds at most 256 colours, got {palette.shape[0]}")
    notes: list[str] = []
    return encoder(palette, indices, compress_level, notes), notes


def _create_temp(folder: Path) -> tuple[int, str]:
    """A new temporary file in ``folder``, created with mode 0o666 less the umask (as any new file)."""
    while True:
        path = os.path.join(folder, f"{TEMP_PREFIX}{secrets.token_hex(8)}.tmp")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:  # pragma: no cover - 64 random bits
            continue


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place.

    A reader (or a killed run) never sees a partly written file; the temporary file
    lives in the destination folder so the rename is atomic. The file gets the usual
    permissions (the kernel applies the umask), so the umask is never read or changed.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
