"""The indexed-PNG encoder: minimal bit depth, filter None, deflate by libdeflate where installed.

Written by hand because Pillow always applies adaptive row filters, which make palette
images 12-23% larger. What was measured on the bundled photos (gpu_kquant/samples plus
scikit-learn's china and flower, undithered, k = 16, 64, 256, against ``pngquant --nofs``;
``python -m benchmarks.png_bytes``, benchmarks/results/png_bytes_amd-epyc_2c_nogpu_2026-12-02.md):

* row filters: None is smallest; Sub, Up, Paeth and adaptive (libpng's heuristic) were
  16-19% larger with the fitted palette order, and still 6-9% larger with the palette
  sorted by luminance or chained nearest-neighbour first;
* palette order: with filter None deflate sees a permutation of the same symbols, so the
  order does not matter (luminance and chain orders within 0.03%); the fitted order is kept;
* zlib strategies: Z_FILTERED 7% and Z_RLE 22% larger than the default strategy; memLevel 9
  0.5% larger;
* deflate: zlib level 6 met pngquant on 14 of 15 (flower at k = 16: 1.016x); level 9 on 15 of
  15 but 2.3x the encode time. libdeflate (``pip install deflate``) at level 7 met it on 15 of
  15 (worst 0.998x, 0.5% smaller than zlib 6) in a third of zlib 6's time on a 4-MP photo
  (0.11 s against 0.30 s at k = 16), but is not smaller than zlib 6 on every image; at level
  10 it is 4.6% smaller than zlib 9 in two thirds of its time. So where libdeflate is
  installed both run and the smaller stream is kept (:func:`compress`); zlib otherwise.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

try:  # optional (the "png" extra): smaller and faster than zlib
    import deflate as _libdeflate
except ImportError:  # pragma: no cover - exercised where the package is not installed
    _libdeflate = None  # type: ignore[assignment]

__all__ = ["LIBDEFLATE_LEVEL", "compress", "default_compress_level", "encode_png"]

# zlib level -> libdeflate level: one higher from 6 up. Per image neither deflater always wins at
# levels 6-8 (libdeflate 7 against zlib 6: 0.982-1.0044x over the 15 photo cases, smaller on 9,
# larger by up to 0.44% on 6), so both run and the smaller stream is kept: never larger than
# zlib alone, at most pngquant --nofs's bytes on all 15, for 1.35x zlib 6's encode time
# (libdeflate 7 takes a third of it: 0.11 s against 0.30 s on a 4-MP photo at k = 16, 2-core
# EPYC, shared). At 9 (the smallest-file setting) libdeflate 10 alone: 4.9% smaller than zlib 9
# (geometric mean) in two thirds of its time (0.94 s against 1.50 s at 4 MP, k = 16).
LIBDEFLATE_LEVEL = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 7, 7: 8, 8: 9, 9: 10}


def compress(raw: bytes, level: int) -> bytes:
    """A zlib stream of ``raw`` at zlib ``level`` (0-9): with libdeflate installed, the smaller of
    zlib's and libdeflate's (libdeflate's alone at 9; see :data:`LIBDEFLATE_LEVEL`), else zlib's."""
    if _libdeflate is None or level == 0:
        return zlib.compress(raw, level)
    fast = bytes(_libdeflate.zlib_compress(raw, LIBDEFLATE_LEVEL[level]))
    if level >= 9:
        return fast
    plain = zlib.compress(raw, level)
    return plain if len(plain) < len(fast) else fast


def default_compress_level(n_colors: int) -> int:
    """zlib level for an indexed PNG of ``n_colors`` entries: 9 up to 8 colours, else 6.

    Level 9 (pngquant's) is 0.6-3.2% smaller than 6 on the bundled photos at k = 16..64,
    but on a 2560x1600 photo at k = 16 it took 1.04 s against 0.27 s, and with it a
    folder of such photos became encode-bound (decode + encode alone: 0.89 images/s on
    2 cores, below pngquant's 0.53 x 2). Level 9 is kept where it is cheap and gains
    most (up to 8 colours: up to 4%); ``--compress-level 9`` asks for the smallest files.
    (Those times are zlib's; with libdeflate installed, see :data:`LIBDEFLATE_LEVEL`.)
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
    packed: np.ndarray = np.bitwise_or.reduce(groups << shifts, axis=2).astype(np.uint8)
    return packed


def _idat(indices: np.ndarray, bits: int, level: int) -> bytes:
    """zlib stream of the rows packed at ``bits`` per pixel, each with filter type None."""
    rows = _pack_rows(indices, bits)
    raw = np.empty((rows.shape[0], rows.shape[1] + 1), np.uint8)
    raw[:, 0] = 0  # filter type None on every row
    raw[:, 1:] = rows
    return compress(raw.tobytes(), level)


def encode_png(palette: np.ndarray, indices: np.ndarray, compress_level: int | None = None) -> bytes:
    """Indexed PNG with filter type None and the bit depth (1, 2, 4 or 8) that compresses smallest.

    See the module docstring for the measurements behind filter None, the palette order
    and the deflate settings. At level 9, palettes of 5-16 colours are also tried at 8 bits per pixel, which
    lets deflate match runs at odd pixel offsets: 1-3% smaller on two of the five
    bundled photos at k=16. The tRNS chunk stops at the last entry with transparency.
    """
    n = palette.shape[0]
    bits = 1 if n <= 2 else 2 if n <= 4 else 4 if n <= 16 else 8
    h, w = indices.shape
    level = default_compress_level(n) if compress_level is None else compress_level
    idx = np.ascontiguousarray(indices, dtype=np.uint8)
    data = _idat(idx, bits, level)
    if bits == 4 and level >= 9:  # the smallest-file setting also tries 8 bits per pixel
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
