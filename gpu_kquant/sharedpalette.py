"""The ``--palette shared`` files in an output folder: whose they are, when to reuse them, saving them.

One rule for image runs (:mod:`gpu_kquant.runsetup`) and dataset runs
(:mod:`gpu_kquant.datasets.run`), each passing the manifest of its output folder: a
palette file the manifest does not list is neither read nor replaced; the saved
``palette.json`` is reused only when the manifest says it is intact and was written
with the caller's options (so a rerun with another ``-k`` fits again).
"""

from __future__ import annotations

import os
from pathlib import Path

from .imagefiles import TEMP_PREFIX
from .manifest import CURRENT, Manifest
from .palette import Palette

__all__ = ["PALETTE_FILES", "foreign_palette_file", "reusable_palette", "save_palette"]

PALETTE_FILES = ("palette.json", "palette.npy", "palette.gpl")


def foreign_palette_file(manifest: Manifest, out_dir: Path) -> str | None:
    """Why the shared palette's files in ``out_dir`` cannot be used (one is not gpu_kquant's), else None."""
    for name in PALETTE_FILES:
        if manifest.foreign_reason(out_dir / name) is not None:
            return (
                f"{out_dir / name} exists and was not written by gpu_kquant (--palette shared writes "
                f"{', '.join(PALETTE_FILES)} there); move it or choose another -o"
            )
    return None


def reusable_palette(manifest: Manifest, out_dir: Path, overwrite: bool) -> Palette | None:
    """The saved palette to reuse, or None when one must be fitted (``--overwrite``, absent, stale).

    Raises:
        ValueError: a palette file in ``out_dir`` is not gpu_kquant's (:func:`foreign_palette_file`).
    """
    reason = foreign_palette_file(manifest, out_dir)
    if reason is not None:
        raise ValueError(reason)
    saved = out_dir / PALETTE_FILES[0]
    if overwrite or manifest.verdict(saved) != CURRENT:  # reused only intact and made with these options
        return None
    return Palette.load(saved)


def save_palette(palette: Palette, out_dir: Path, manifest: Manifest) -> None:
    """Write palette.json, .npy and .gpl atomically (a temporary name renamed into place), each in the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in PALETTE_FILES:
        tmp = (out_dir / f"{TEMP_PREFIX}{os.getpid()}-{name}").with_suffix(
            Path(name).suffix
        )  # the suffix names the format
        palette.save(tmp)
        manifest.claim([out_dir / name])  # before the rename: a kill right after leaves it known as ours
        os.replace(tmp, out_dir / name)
        manifest.record_file(out_dir / name)
