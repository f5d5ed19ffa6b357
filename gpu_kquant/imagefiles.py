"""Image files in and out: Pillow decoding to 8-bit sRGB(A), palette encoders, atomic writes.

Knows nothing about k-means: decoding gives an (H, W, 3|4) uint8 array plus notes on
what was done to it; encoding takes a palette and indices.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from .pngfile import default_compress_level, encode_png

__all__ = [
    "ENCODERS",
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "DecodeError",
    "Decoded",
    "default_compress_level",
    "encode",
    "encode_png",
    "estimated_decoded_bytes",
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


def _high_depth_to_uint8(img: Image.Image, notes: list[str], source: Image.Image) -> np.ndarray:
    """16-bit and 32-bit greyscale modes scaled (not clipped) to 8 bits, from their nominal range.

    Pillow decodes 32-bit integer TIFFs as mode ``I`` (int32), unsigned ones wrapped
    around, and 16-bit PGMs (any maxval, rescaled to 16 bits) as ``I`` too; the TIFF's
    BitsPerSample and SampleFormat tags (of ``source``, the file as opened) tell them apart.
    """
    arr = np.asarray(img)
    if img.mode == "F":
        notes.append("32-bit float greyscale clipped to 0..255")
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    elif img.mode == "I" and _is_32_bit(source, arr):
        if _tiff_tag(source, 339, 1) == 2:  # SampleFormat 2: signed, so -2**31 is black
            notes.append("32-bit signed integer greyscale scaled to 8-bit")
            wide = arr.astype(np.int64) + (1 << 31)
        else:  # unsigned (the TIFF default): undo Pillow's int32 wrap-around
            notes.append("32-bit integer greyscale scaled to 8-bit")
            wide = arr.astype(np.int32).view(np.uint32).astype(np.int64)
        gray = ((wide * 255 + (1 << 31)) // ((1 << 32) - 1)).astype(np.uint8)
    else:
        notes.append("16-bit reduced to 8-bit")
        gray = np.clip((arr.astype(np.int64) * 255 + 32767) // 65535, 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def _tiff_tag(img: Image.Image, tag: int, default: int) -> int:
    value = getattr(img, "tag_v2", {}).get(tag, default)
    return int(value[0] if isinstance(value, tuple) else value)


def _is_32_bit(img: Image.Image, arr: np.ndarray) -> bool:
    """Mode I holding 32-bit samples: a 32-bit TIFF, or values outside 16 bits from any other format."""
    if hasattr(img, "tag_v2"):
        return _tiff_tag(img, 258, 32) == 32
    return arr.size > 0 and (int(arr.min()) < 0 or int(arr.max()) > 65535)


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _damaged_format(p: Path) -> str | None:
    """For a file Pillow could not identify: a reason when its signature names a known format.

    Pillow hides the format plugin's own error (a bad IHDR checksum, say) behind "cannot
    identify image file"; asking that plugin again recovers it.
    """
    try:
        with open(p, "rb") as f:
            head = f.read(16)
            fmt = next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)
            if fmt is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
                fmt = "WEBP"
            if fmt is None:
                return None
            f.seek(0)
            try:
                Image.OPEN[fmt][0](f, str(p))  # the plugin's own open, which says what is wrong
                cause = "header cannot be parsed"
            except Exception as exc:
                cause = " ".join(str(exc).split())[:200] or type(exc).__name__
    except (OSError, KeyError):
        return None
    return f"corrupt or damaged {fmt} file: {cause}"


def _orientation_note(img: Image.Image) -> str | None:
    """What became of the EXIF orientation: applied (2..8), or ignored when it is invalid."""
    try:
        value = img.getexif().get(0x0112)
    except Exception:  # a malformed EXIF block: exif_transpose could not use it either
        return "EXIF data unreadable; orientation ignored"
    if value in (None, 1):
        return None
    if isinstance(value, int) and 2 <= value <= 8:
        return f"EXIF orientation {value} applied"
    return f"EXIF orientation {value!r} is invalid (not 1..8); ignored"


def _open(p: Path) -> Image.Image:
    """Open ``p`` and read its header only (no pixels), or raise :class:`DecodeError`.

    Pillow itself refuses sizes above ``2 * Image.MAX_IMAGE_PIXELS`` (its global, which
    only the CLI changes); callers check their own per-call limit on ``img.size``.
    """
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise DecodeError(f"cannot read file: {exc.strerror or exc}") from None
    if size == 0:
        raise DecodeError("empty file (0 bytes)")
    try:
        return Image.open(p)
    except UnidentifiedImageError:
        raise DecodeError(_damaged_format(p) or "not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"too many pixels: {exc}") from None
    except OSError as exc:
        if exc.errno is not None:  # the file system's error, not the decoder's
            raise DecodeError(f"cannot read file: {exc.strerror or exc}") from None
        raise DecodeError(f"truncated or corrupt image data: {exc}") from None
    except (SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError(f"truncated or corrupt image data: {exc}") from None


# Bytes per pixel of Pillow's own storage by mode (2-band modes are stored as 4 bytes).
_NATIVE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}


def estimated_decoded_bytes(path: str | os.PathLike[str], *, max_pixels: int | None = None) -> int:
    """Peak memory, in bytes, that :func:`load_image` will need for ``path``, from its header alone.

    Nothing is decoded: ``width * height * (native + 4 + channels)``, that is Pillow's
    decoded frame (1, 2 or 4 bytes a pixel by mode), its RGB(A) conversion (4) and the
    returned array (3, or 4 with transparency). A decode prefetch can be bounded by the
    sum of these instead of a count of files: a 79 KB PNG can hold 81 MP, about 1 GB
    here. 0 above ``max_pixels``: :func:`load_image` refuses those before decoding.

    Raises:
        DecodeError: when the header cannot be read (the same reasons as :func:`load_image`).
    """
    img = _open(Path(path))  # not `with ... as img`: Pillow's __enter__ returns typing.Self, Any to mypy for 3.10
    with img:
        w, h = img.size
        if max_pixels is not None and w * h > max_pixels:
            return 0
        native = _NATIVE_BYTES.get(img.mode, 4)
        channels = 4 if img.mode in _TRANSPARENT_MODES or "transparency" in img.info else 3
    return w * h * (native + 4 + channels)


def load_image(path: str | os.PathLike[str], *, max_pixels: int | None = None) -> Decoded:
    """Decode an image file to 8-bit sRGB(A).

    Applies the EXIF orientation, converts an embedded ICC profile to sRGB, takes the
    first frame of animations, scales 16-bit greyscale to 8 bits, and keeps alpha
    (RGBA output) whenever the file has transparency.

    Raises:
        DecodeError: with a one-line reason (empty, unreadable, not an image, too many
            pixels, truncated or corrupt data, unsupported mode).
    """
    p = Path(path)
    notes: list[str] = []
    img = _open(p)  # the header only: the size is checked before any pixel is decoded
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
        note = _orientation_note(img)
        if note is not None:
            notes.append(note)
        if oriented.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
            return Decoded(_high_depth_to_uint8(oriented, notes, img), notes)
        img = oriented
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
