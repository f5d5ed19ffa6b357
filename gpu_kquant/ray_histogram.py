"""The ``--palette shared`` histogram pass on Ray: CPU tasks count colours, the driver sums them.

Needs the ``ray`` extra; imported only by :mod:`gpu_kquant.engine_ray`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from . import ray_session
from .colors import ColorSet, color_set, pack
from .options import ResizeOptions, RunOptions
from .palette import ColorHistogram
from .planning import JobError, Task
from .process import configure_process
from .ray_session import Stalled, batches_within, from_items, task_from_item, task_item
from .staging import host_view
from .worker import read_task

__all__ = ["FILES_PER_TASK", "histogram_files", "ray_histogram"]

FILES_PER_TASK = 4
"""Files per histogram task: enough to amortise a task's overhead, few enough to spread them."""

_MAX_BLOCKS = 10_000


def _column(values: list[Any]) -> np.ndarray:
    """A 1-D object column (arrays of different shapes must not be stacked by numpy)."""
    out = np.empty(len(values), dtype=object)
    for j, value in enumerate(values):
        out[j] = value
    return out


def _merge(keys: list[torch.Tensor], counts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour keys and counts of several images summed into one (unique keys, int64 counts)."""
    if not keys:
        return torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int64)
    merged, inverse = torch.unique(torch.cat(keys), return_inverse=True)
    summed = torch.zeros(merged.shape[0], dtype=torch.int64).index_add_(0, inverse, torch.cat(counts))
    return merged, summed


def histogram_files(
    batch: dict[str, np.ndarray], max_pixels: int | None, resize: ResizeOptions | None = None
) -> dict[str, Any]:
    """The colour histogram of a few files, merged (a Ray task, so it is its process's entry).

    Returns one row: the block's opaque (packed RGB) and translucent (packed RGBA) colour
    counts and how many images they came from. Undecodable files are left out; the
    mapping pass gives them their failed row.
    """
    configure_process(max_pixels=max_pixels)
    hist: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {3: ([], []), 4: ([], [])}
    images = 0
    for src, dst, key in zip(batch["src"], batch["dst"], batch["key"]):
        try:
            task = task_from_item(src, dst, key)
            pixels = read_task(task, max_pixels, resize).decoded.pixels
        except Exception:
            continue
        cs = color_set(pack(host_view(pixels)), pixels.shape[2])  # decoded arrays are read-only: no copy, no warning
        hist[cs.channels][0].append(cs.keys)
        hist[cs.channels][1].append(cs.counts)
        images += 1
    out: dict[str, Any] = {"images": np.asarray([images], dtype=np.int64)}
    for channels, (keys, counts) in hist.items():
        merged_keys, merged_counts = _merge(keys, counts)
        out[f"keys{channels}"] = _column([merged_keys.numpy()])
        out[f"counts{channels}"] = _column([merged_counts.numpy()])
    return out


def ray_histogram(tasks: list[Task], run: RunOptions, device: torch.device) -> ColorHistogram:
    """The exact histogram of every input: summed counts equal the local pass's, so the palette is the same.

    Needs a connected Ray (see :func:`gpu_kquant.engine_ray.run_on_ray`).
    """
    items = [task_item(t) for t in tasks]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Ray's remote args without named parameters
        ds = from_items(items, max(1, min(_MAX_BLOCKS, math.ceil(len(items) / FILES_PER_TASK))))
        count: Any = histogram_files  # Ray's annotation of map_batches has no room for fn_kwargs
        ds = ds.map_batches(
            count,
            batch_size=FILES_PER_TASK,
            batch_format="numpy",
            fn_kwargs={"max_pixels": run.engine.max_pixels, "resize": run.output.resize},
            num_cpus=1,
            max_retries=3,
        )
    hist = ColorHistogram(device)
    batches = ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)
    seconds = ray_session.STALL_SECONDS
    try:
        for batch in batches_within(batches, seconds):
            _add_histogram_batch(hist, batch)
    except Stalled:
        raise JobError(f"the shared palette's histogram pass on Ray made no progress for {seconds:g} s") from None
    return hist


def _add_histogram_batch(hist: ColorHistogram, batch: dict[str, Any]) -> None:
    """Add one block's counts (a row of :func:`histogram_files` per block) to ``hist``."""
    for j in range(len(batch["images"])):
        images = int(batch["images"][j])
        for channels in (3, 4):
            keys = torch.from_numpy(np.array(batch[f"keys{channels}"][j]))
            counts = torch.from_numpy(np.array(batch[f"counts{channels}"][j]))
            hist.add_colors(ColorSet(keys, counts, channels), images=images if channels == 3 else 0)
