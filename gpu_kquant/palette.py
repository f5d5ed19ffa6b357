"""Shared palettes for datasets: exact streaming colour histograms, fitting, files.

One palette for many images (ImageGPT-style datasets, sprite sheets, a web page's
icons): sum every image's colour histogram, fit k-means once on the sum, then map
every image to the result. The histogram is exact and its memory does not grow with
the number of images: opaque colours count into a dense 2**24 table, translucent
ones into a sorted sparse table merged as images arrive.
"""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .colors import ColorSet, color_set, pack, unpack
from .device import resolve_device
from .imagefiles import encode_png
from .options import FitOptions
from .quantize import SPACES, Quantized, fit_palette, map_to_palette, to_tensor

__all__ = ["ColorHistogram", "Palette", "PaletteFileError"]

PALETTE_FORMAT = "gpu_kquant.palette"


class ColorHistogram:
    """An exact, mergeable histogram of RGB(A) colours over any number of images."""

    def __init__(self, device: str | torch.device | None = "cpu") -> None:
        self.device = resolve_device(device)
        self._opaque = torch.zeros(1 << 24, dtype=torch.int64, device=self.device)
        self._keys = torch.zeros(0, dtype=torch.int32, device=self.device)
        self._counts = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.images = 0

    def add(self, image: object) -> ColorHistogram:
        """Count the colours of one image (PIL, or (H, W, 3|4) uint8 array/tensor)."""
        pixels = to_tensor(image).to(self.device)
        return self.add_colors(color_set(pack(pixels), pixels.shape[2]))

    def add_colors(self, cs: ColorSet, images: int = 1) -> ColorHistogram:
        """Count a colour set (from :func:`gpu_kquant.colors.color_set`) of ``images`` images."""
        keys, counts = cs.keys.to(self.device), cs.counts.to(self.device)
        if cs.channels == 4:
            opaque = unpack(keys, 4)[:, 3] == 255
            self._merge(keys[~opaque], counts[~opaque])
            keys, counts = keys[opaque] & 0xFFFFFF, counts[opaque]
        self._opaque.index_add_(0, keys.long(), counts)
        self.images += images
        return self

    def _merge(self, keys: torch.Tensor, counts: torch.Tensor) -> None:
        if keys.numel() == 0:
            return
        all_keys = torch.cat([self._keys, keys])
        uniq, inverse = torch.unique(all_keys, return_inverse=True)
        summed = torch.zeros(uniq.shape[0], dtype=torch.int64, device=self.device)
        summed.index_add_(0, inverse, torch.cat([self._counts, counts]))
        self._keys, self._counts = uniq, summed

    def merge(self, other: ColorHistogram) -> ColorHistogram:
        """Add another histogram's counts (e.g. from another worker) into this one."""
        self._opaque += other._opaque.to(self.device)
        self._merge(other._keys.to(self.device), other._counts.to(self.device))
        self.images += other.images
        return self

    def color_set(self) -> ColorSet:
        """The summed histogram as one colour set (RGBA when any colour is translucent)."""
        present = self._opaque.nonzero().squeeze(1)
        keys, counts = present.to(torch.int32), self._opaque[present]
        if self._keys.numel() == 0:
            return ColorSet(keys, counts, 3)
        opaque_keys = (keys.long() | (255 << 24)).to(torch.int32)  # wraps like pack() does
        merged = torch.cat([opaque_keys, self._keys])
        order = torch.argsort(merged)
        return ColorSet(merged[order], torch.cat([counts, self._counts])[order], 4)

    @property
    def pixels(self) -> int:
        """Total pixels counted."""
        return int(self._opaque.sum()) + int(self._counts.sum())


class Palette:
    """A fixed palette: (k, 3) RGB or (k, 4) RGBA uint8 colours and the space it maps in.

    Create one with :meth:`fit` (on images or histograms) or :meth:`load`; apply it
    with :meth:`apply` or ``quantize(image, palette=...)``.
    """

    def __init__(self, colors: np.ndarray, space: str = "rgb") -> None:
        colors = np.asarray(colors)
        if colors.dtype != np.uint8 or colors.ndim != 2 or colors.shape[1] not in (3, 4) or len(colors) == 0:
            raise ValueError(f"palette colours must be a non-empty (k, 3) or (k, 4) uint8 array, got {colors.shape}")
        self.colors = colors
        self.space = space

    def __len__(self) -> int:
        return int(self.colors.shape[0])

    def __repr__(self) -> str:
        return f"Palette({len(self)} colours, {'RGBA' if self.colors.shape[1] == 4 else 'RGB'}, space={self.space!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Palette) and np.array_equal(self.colors, other.colors) and self.space == other.space

    @classmethod
    def fit(
        cls,
        sources: object,
        k: int = 256,
        *,
        space: str = "rgb",
        device: str | torch.device | None = None,
        seed: int = 0,
        n_init: int | None = None,
        max_iter: int = 300,
        tol: float = 1e-4,
        max_fit_points: int | None = None,
        options: FitOptions | None = None,
    ) -> Palette:
        """Fit one palette of at most k colours to many images.

        Args:
            sources: a :class:`ColorHistogram`, or an iterable of images and/or
                histograms (summed exactly before fitting).
            options: every fit setting as one :class:`FitOptions` (the keywords are then
                ignored).
        """
        if options is None:
            fields = {"n_init": n_init, "max_iter": max_iter, "tol": tol, "max_fit_points": max_fit_points}
            options = FitOptions(k=k, space=space, seed=seed, **fields)  # type: ignore[arg-type]
        if isinstance(sources, ColorHistogram):
            hist = sources
        else:
            hist = ColorHistogram(device)
            for src in sources:  # type: ignore[attr-defined]
                hist.merge(src) if isinstance(src, ColorHistogram) else hist.add(src)
        if hist.pixels == 0:
            raise ValueError("no pixels to fit a palette on")
        colors = fit_palette(hist.color_set(), options.k, device=device, options=options)
        return cls(colors, options.space)

    def apply(self, images: list[object], *, dither: str = "none", device: str | None = None) -> list[Quantized]:
        """Map images to this palette (see :func:`gpu_kquant.map_to_palette`)."""
        return map_to_palette(images, self.colors, space=self.space, dither=dither, device=device)

    # -- files -----------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write as ``.json``, ``.npy``, ``.gpl`` (GIMP) or ``.png`` (by extension)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            doc = {"format": PALETTE_FORMAT, "version": 1, "space": self.space, "colors": self.colors.tolist()}
            path.write_text(json.dumps(doc) + "\n")
        elif suffix == ".npy":
            np.save(path, self.colors)
        elif suffix == ".gpl":
            lines = ["GIMP Palette", f"Name: gpu_kquant {len(self)} colours", "Columns: 16", "#"]
            lines += [f"{c[0]:3d} {c[1]:3d} {c[2]:3d}\t#{c[0]:02x}{c[1]:02x}{c[2]:02x}" for c in self.colors.tolist()]
            path.write_text("\n".join(lines) + "\n")
        elif suffix == ".png":
            if len(self) > 256:
                raise ValueError(f"a PNG palette holds at most 256 colours, this one has {len(self)}")
            path.write_bytes(encode_png(self.colors, np.arange(len(self), dtype=np.uint8)[None]))
        else:
            raise ValueError(f"unknown palette file type {suffix!r}: use .json, .npy, .gpl or .png")
        return path

    @classmethod
    def load(cls, path: str | Path, *, space: str | None = None) -> Palette:
        """Read a palette from ``.json``, ``.npy``, ``.gpl`` or a palette image, strictly.

        ``.npy`` may also be ImageGPT's ``kmeans_centers.npy`` (float centres in
        [-1, 1]), converted as ImageGPT does: ``rint(127.5 * (c + 1))``, order kept.
        ``space`` overrides the space stored in a ``.json`` file (default ``rgb``).

        Only a regular file is read (a FIFO or a device would block or never end), and
        every value is checked: integers 0..255 (no bool, float, NaN, complex, string or
        structured values), 1..65536 colours of 3 or 4 channels.

        Raises:
            PaletteFileError: (a ValueError) with a one-line ``"PATH: cause"`` message.
        """
        path = Path(path)
        data = _read_regular(path)
        suffix = path.suffix.lower()
        stored = "rgb"
        if suffix == ".json":
            colors, stored = _parse_json(data, path)
        elif suffix == ".npy":
            colors = _parse_npy(data, path)
        elif suffix == ".gpl":
            colors = _parse_gpl(data, path)
        else:
            colors = _parse_image(data, path)
        if not 1 <= len(colors) <= MAX_COLORS:
            raise PaletteFileError(f"{path}: a palette holds 1..{MAX_COLORS} colours, this file has {len(colors)}")
        return cls(colors.astype(np.uint8), space or stored)


class PaletteFileError(ValueError):
    """A palette file that cannot be used; the message is one line: ``PATH: cause``."""


MAX_COLORS = 1 << 16
"""Most colours a palette file may hold (the npz output's limit)."""

MAX_FILE_BYTES = 64 << 20
"""Largest palette file read: 65536 RGBA colours take 2 MB as float64 .npy, ~1.3 MB as JSON."""


def _read_regular(path: Path) -> bytes:
    """The bytes of a regular file; anything else (FIFO, device, folder) is refused before opening.

    The file is opened non-blocking and checked again on the open descriptor, so a FIFO
    swapped in after the first check cannot block the read either.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise PaletteFileError(f"{path}: not a regular file")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise PaletteFileError(f"{path}: not a regular file")
            if st.st_size > MAX_FILE_BYTES:
                raise PaletteFileError(f"{path}: {st.st_size} bytes is too large for a palette file")
            return f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise PaletteFileError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _int_rows(rows: object, path: Path, what: str) -> np.ndarray:
    """(k, 3|4) int64 from a list of lists of Python ints in 0..255 (bool and float refused)."""
    if not isinstance(rows, list) or not rows:
        raise PaletteFileError(f"{path}: {what} must be a non-empty list of [r, g, b] or [r, g, b, a]")
    width = len(rows[0]) if isinstance(rows[0], list) else 0
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) not in (3, 4) or len(row) != width:
            raise PaletteFileError(f"{path}: colour {i} is not a list of {width or '3 or 4'} integers")
        for value in row:
            if type(value) is not int:  # bool is an int subclass: refused too
                raise PaletteFileError(f"{path}: colour {i} has a non-integer value {value!r}")
            if not 0 <= value <= 255:
                raise PaletteFileError(f"{path}: colour {i} has a value {value} outside 0..255")
    return np.asarray(rows, dtype=np.int64)


def _parse_json(data: bytes, path: Path) -> tuple[np.ndarray, str]:
    try:
        doc = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise PaletteFileError(f"{path}: JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise PaletteFileError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(doc, list):
        return _int_rows(doc, path, "the JSON list"), "rgb"
    if not isinstance(doc, dict) or "colors" not in doc:
        raise PaletteFileError(f"{path}: expected a list of colours or an object with a 'colors' list")
    if doc.get("format", PALETTE_FORMAT) != PALETTE_FORMAT:
        raise PaletteFileError(f"{path}: format is {doc['format']!r}, expected {PALETTE_FORMAT!r}")
    space = doc.get("space", "rgb")
    if not isinstance(space, str) or space not in SPACES:
        raise PaletteFileError(f"{path}: space must be one of {', '.join(SPACES)}, got {space!r}")
    return _int_rows(doc["colors"], path, "'colors'"), space


def _parse_npy(data: bytes, path: Path) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)  # never unpickle a file's objects
    except Exception as exc:  # numpy raises ValueError, OSError, EOFError or SyntaxError on bad headers
        raise PaletteFileError(f"{path}: not a readable .npy array ({_one_line(exc)})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "uif":
        kind = getattr(arr, "dtype", type(arr))
        raise PaletteFileError(f"{path}: palette values must be integers (or ImageGPT float centres), not {kind}")
    if arr.ndim != 2 or arr.shape[1] not in (3, 4) or arr.shape[0] == 0:
        raise PaletteFileError(f"{path}: expected a (k, 3) or (k, 4) array, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if arr.shape[1] != 3 or not np.isfinite(arr).all() or np.abs(arr).max() > 1.0 + 1e-6:
            raise PaletteFileError(f"{path}: float centres must be finite, (k, 3) and in [-1, 1] (ImageGPT layout)")
        return np.clip(np.rint(127.5 * (arr.astype(np.float64) + 1.0)), 0, 255).astype(np.int64)
    if arr.min() < 0 or arr.max() > 255:
        raise PaletteFileError(f"{path}: palette values must be in 0..255, got {arr.min()}..{arr.max()}")
    return arr.astype(np.int64)


def _parse_gpl(data: bytes, path: Path) -> np.ndarray:
    """GIMP palette: the ``GIMP Palette`` header, then ``R G B [name]`` lines (comments and headers allowed)."""
    lines = data.decode("utf-8", errors="replace").lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "GIMP Palette":
        raise PaletteFileError(f"{path}: not a GIMP palette (the first line must be 'GIMP Palette')")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        text = line.strip()
        if not text or text.startswith("#") or text.split(":")[0] in ("Name", "Columns"):
            continue
        parts = text.split()
        if len(parts) < 3 or not all(p.isascii() and p.isdigit() for p in parts[:3]):
            raise PaletteFileError(f"{path}: line {number} is not 'R G B [name]' with integers: {text[:40]!r}")
        values = [int(p) for p in parts[:3]]
        if max(values) > 255:
            raise PaletteFileError(f"{path}: line {number} has a value outside 0..255")
        rows.append(values)
    if not rows:
        raise PaletteFileError(f"{path}: the GIMP palette has no colours")
    return np.asarray(rows, dtype=np.int64)


def _parse_image(data: bytes, path: Path) -> np.ndarray:
    """The palette of a palette image (P or PA mode), with its tRNS alpha when present."""
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header and palette, no pixels
            if img.mode not in ("P", "PA"):
                raise PaletteFileError(f"{path}: image has no palette (mode {img.mode})")
            colors = np.asarray(img.getpalette("RGB"), dtype=np.uint8).reshape(-1, 3)
            transparency = img.info.get("transparency")
    except PaletteFileError:
        raise
    except Exception as exc:  # UnidentifiedImageError, DecompressionBombError, corrupt chunks
        raise PaletteFileError(f"{path}: not a readable palette image ({_one_line(exc)})") from None
    alpha = np.full(len(colors), 255, np.uint8)
    if isinstance(transparency, bytes):
        alpha[: len(transparency)] = np.frombuffer(transparency, np.uint8)[: len(colors)]
    elif isinstance(transparency, int) and 0 <= transparency < len(colors):
        alpha[transparency] = 0
    else:
        return colors.astype(np.int64)
    return np.concatenate([colors, alpha[:, None]], 1).astype(np.int64)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__
