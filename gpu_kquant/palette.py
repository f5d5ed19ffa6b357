"""Shared palettes for datasets: exact streaming colour histograms, fitting, files.

One palette for many images (ImageGPT-style datasets, sprite sheets, a web page's
icons): sum every image's colour histogram, fit k-means once on the sum, then map
every image to the result. The histogram is exact and its memory does not grow with
the number of images: opaque colours count into a dense 2**24 table, translucent
ones into a sorted sparse table merged as images arrive.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .colors import ColorSet, color_set, pack, unpack
from .device import resolve_device
from .imagefiles import encode_png
from .quantize import Quantized, fit_palette, map_to_palette, to_tensor

__all__ = ["ColorHistogram", "Palette"]

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
    ) -> Palette:
        """Fit one palette of at most k colours to many images.

        Args:
            sources: a :class:`ColorHistogram`, or an iterable of images and/or
                histograms (summed exactly before fitting).
        """
        if isinstance(sources, ColorHistogram):
            hist = sources
        else:
            hist = ColorHistogram(device)
            for src in sources:  # type: ignore[attr-defined]
                hist.merge(src) if isinstance(src, ColorHistogram) else hist.add(src)
        if hist.pixels == 0:
            raise ValueError("no pixels to fit a palette on")
        colors = fit_palette(
            hist.color_set(),
            k,
            space=space,
            device=device,
            seed=seed,
            n_init=n_init,
            max_iter=max_iter,
            tol=tol,
            max_fit_points=max_fit_points,
        )
        return cls(colors, space)

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
        """Read a palette from ``.json``, ``.npy``, ``.gpl`` or a palette image.

        ``.npy`` may also be ImageGPT's ``kmeans_centers.npy`` (float centres in
        [-1, 1]), converted as ImageGPT does: ``rint(127.5 * (c + 1))``, order kept.
        ``space`` overrides the space stored in a ``.json`` file (default ``rgb``).
        """
        path = Path(path)
        suffix = path.suffix.lower()
        stored = "rgb"
        if suffix == ".json":
            doc = json.loads(path.read_text())
            colors = np.asarray(doc["colors"] if isinstance(doc, dict) else doc)
            stored = doc.get("space", "rgb") if isinstance(doc, dict) else "rgb"
        elif suffix == ".npy":
            colors = np.load(path)
            if colors.dtype.kind == "f":
                if colors.ndim != 2 or colors.shape[1] != 3 or np.abs(colors).max() > 1.0 + 1e-6:
                    raise ValueError(f"{path}: float centres must be (k, 3) in [-1, 1] (ImageGPT layout)")
                colors = np.rint(127.5 * (colors + 1.0))
        elif suffix == ".gpl":
            rows = []
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 3 and all(p.lstrip("-").isdigit() for p in parts[:3]):
                    rows.append([int(p) for p in parts[:3]])
            colors = np.asarray(rows)
        else:
            with Image.open(path) as img:
                if img.mode not in ("P", "PA"):
                    raise ValueError(f"{path}: image has no palette (mode {img.mode})")
                colors = np.asarray(img.getpalette("RGB"), dtype=np.uint8).reshape(-1, 3)
                transparency = img.info.get("transparency")
                if isinstance(transparency, bytes):
                    alpha = np.full(len(colors), 255, np.uint8)
                    alpha[: len(transparency)] = np.frombuffer(transparency, np.uint8)[: len(colors)]
                    colors = np.concatenate([colors, alpha[:, None]], 1)
                elif isinstance(transparency, int):
                    alpha = np.full(len(colors), 255, np.uint8)
                    alpha[transparency] = 0
                    colors = np.concatenate([colors, alpha[:, None]], 1)
        if colors.size == 0 or colors.min() < 0 or colors.max() > 255:
            raise ValueError(f"{path}: palette colours must be in 0..255")
        return cls(colors.astype(np.uint8), space or stored)
