"""The local engine for shards: shards on a thread pool, rows as each shard finishes.

Kept thin on purpose: the per-shard work is :func:`process_shard`, which a Ray task
can call the same way; this module adds what a run decides once (the shared
palette) and finishes once (assembling tokens).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import numpy as np

from ..manifest import Manifest
from ..palette import ColorHistogram, Palette
from ..report import Row
from ..resize import resize_decoded
from ..sharedpalette import reusable_palette, save_palette
from .codec import DecodeError, decode_bytes
from .options import DatasetOptions
from .resume import open_dataset_manifest
from .samples import ShardError
from .shard import process_shard, read_shard
from .sources import Shard
from .tokens import assemble

__all__ = ["assemble_run", "run_shards", "shared_palette"]


def shared_palette(shards: list[Shard], options: DatasetOptions) -> Palette:
    """The one palette of ``--palette shared``: reused from ``OUT/palette.json`` (intact, same fit), else fitted.

    The palette files are gpu_kquant's only when the manifest of ``OUT`` lists them: a file
    of that name it did not write is neither reused nor replaced (a ValueError, the CLI's
    usage error); the files written are claimed and recorded there.

    The fit sees the exact colour histogram of every decodable (and resized) image of
    every shard, one image at a time, so memory stays flat; unreadable samples and
    shards are left out here and get their failed rows in the main pass.

    Raises:
        ValueError: no image could be decoded, or a palette file in OUT is not gpu_kquant's.
    """
    manifest = open_dataset_manifest(options)
    try:
        saved = reusable_palette(manifest, options.out, options.overwrite)
        if saved is not None:
            return saved
        return _fit_shared(shards, options, manifest)
    finally:
        manifest.close()


def _fit_shared(shards: list[Shard], options: DatasetOptions, manifest: Manifest) -> Palette:
    """Fit the shared palette on every image of ``shards`` and save its files in OUT."""
    hist = ColorHistogram(options.device)
    for shard in shards:
        try:
            for sample in read_shard(shard, options)[1]:
                if sample.image is None or sample.error is not None:
                    continue
                try:
                    decoded = decode_bytes(sample.image.data, max_pixels=options.max_pixels)
                except DecodeError:
                    continue
                hist.add(resize_decoded(decoded, options.resize).pixels)
        except ShardError:
            continue
    if hist.pixels == 0:
        raise ValueError("no decodable image to fit a shared palette on")
    palette = Palette.fit(hist, options.fit.k, device=options.device, options=options.fit)
    save_palette(palette, options.out, manifest)
    return palette


def run_shards(
    shards: list[Shard],
    options: DatasetOptions,
    emit: Callable[[Row], None],
    *,
    parallel: int = 1,
    assemble_tokens: bool = True,
    stop: threading.Event | None = None,
) -> None:
    """Process ``shards``, ``parallel`` at a time, calling ``emit`` for every row as shards finish.

    With tokens output, the parts are assembled into ``OUT/indices.npy`` at the end
    when ``assemble_tokens`` (a run over part of the shards, ``--shard I/N``, leaves
    that to a final run over all of them). ``stop`` set (e.g. on Ctrl-C) lets running
    shards finish and starts no more.
    """
    stop = stop or threading.Event()
    with ThreadPoolExecutor(max(1, parallel), thread_name_prefix="shards") as pool:
        pending: set[Future[list[Row]]] = set()
        queue = list(reversed(shards))
        while queue or pending:
            while queue and len(pending) < max(1, parallel) and not stop.is_set():
                pending.add(pool.submit(process_shard, queue.pop(), options))
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                for row in future.result():
                    emit(row)
    tokens = [s.name for s in shards if options.format_for(s) == "tokens"]
    if tokens and assemble_tokens and not stop.is_set():
        for row in assemble_run(tokens, options):
            emit(row)


def assemble_run(tokens: list[str], options: DatasetOptions) -> list[Row]:
    """:func:`assemble` the token parts of the shards ``tokens``, under the manifest of OUT."""
    assert options.palette is not None
    manifest = open_dataset_manifest(options)
    try:
        return assemble(options.out, tokens, np.asarray(options.palette), manifest)
    finally:
        manifest.close()


def default_parallel(device: str) -> int:
    """Shards at a time: one per core on the CPU (each quantizes with one torch thread), 2 on a GPU."""
    return 2 if device.startswith("cuda") else max(1, os.cpu_count() or 1)
