"""The manifest rule for dataset outputs: what a shard may write and what a resumed run may trust.

The same rule as for image files (:mod:`gpu_kquant.manifest`): a file at an output path that
the manifest of ``OUT`` does not list is never written over (a ``failed`` row); a listed,
intact output made with these options is skipped; anything else is redone. Every
:func:`gpu_kquant.datasets.process_shard` call opens its own :class:`Manifest` on ``OUT``
(a Ray task runs in another process): each line is one ``O_APPEND`` write, so tasks and
threads append side by side without mixing lines.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np

from ..manifest import Manifest
from .options import DatasetOptions

__all__ = ["dataset_fingerprint", "open_dataset_manifest"]

_HASH_BYTES = 16


def dataset_fingerprint(options: DatasetOptions) -> dict[str, Any]:
    """What determines the bytes of a dataset run's outputs, as a JSON-ready dict.

    ``--output-format``, ``--image-column``, ``--format``, ``--compress-level``, ``--dither``,
    ``--quality``, ``--resize`` and the fit options, or with a fixed palette a hash of its
    colours and its space. Device, batch sizes and threads are left out, as for image files.
    """
    settings: dict[str, Any] = {
        "output_format": options.output_format,
        "image_column": options.image_column,
        "format": options.image_format,
        "compress_level": options.compress_level,
        "dither": options.dither,
        "quality": None if options.quality is None else list(options.quality),
        "resize": None if options.resize is None else dataclasses.asdict(options.resize),
    }
    if options.palette is None:
        settings["fit"] = dataclasses.asdict(options.fit)
    else:
        colors = np.ascontiguousarray(options.palette, np.uint8)
        digest = hashlib.blake2b(f"{colors.shape}".encode() + colors.tobytes(), digest_size=_HASH_BYTES)
        settings["palette"] = {"blake2b": digest.hexdigest(), "colors": len(colors), "space": options.palette_space}
    return settings


def open_dataset_manifest(options: DatasetOptions) -> Manifest:
    """The manifest of ``options.out`` for this run's options, run id and ``--shard``."""
    return Manifest([options.out], dataset_fingerprint(options), options.run_id, options.run_shard)
