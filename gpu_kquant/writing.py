"""After quantization: the quality and size guards, the atomic write, CIEDE2000, the preview, the row.

Each function does one of these; :func:`write_result` chains them for one image and
returns its report row: ``ok``, ``quality`` (below the minimum PSNR, not written),
``larger`` (bigger than the input with ``--skip-if-larger``, not written) or ``failed``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .imagefiles import Decoded, encode, write_atomic
from .manifest import content_hash
from .metrics import mean_ciede2000
from .planning import Task
from .preview import side_by_side, thumbnail_pair
from .quantize import Quantized
from .report import Row
from .rows import failed_row
from .runsetup import PreviewTarget, RunSetup, side_by_side_path

__all__ = ["Item", "add_preview", "quality_guard", "size_guard", "write_result"]


@dataclass
class Item:
    """A decoded input travelling through the worker.

    Attributes:
        seconds: time spent on it so far (decode, then its pixel share of the batch's quantization).
        staged: the pixels as a (H, W, C) uint8 CPU tensor to upload from (pinned on CUDA:
            :meth:`gpu_kquant.staging.Stager.stage`); ``None`` when not staged.
    """

    task: Task
    decoded: Decoded
    input_bytes: int
    seconds: float = 0.0
    pixels: int = field(init=False)
    staged: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.pixels = int(self.decoded.pixels.shape[0] * self.decoded.pixels.shape[1])


def _row(item: Item, result: Quantized, status: str, setup: RunSetup, **fields: Any) -> Row:
    """A row of a quantized image: the fields every outcome shares, plus ``fields``."""
    h, w = item.decoded.pixels.shape[:2]
    return Row(
        str(item.task.src),
        str(item.task.dst),
        status,
        width=w,
        height=h,
        k=setup.fit.k,
        colors=result.n_colors,
        input_bytes=item.input_bytes,
        psnr=round(result.psnr, 3),
        ssim=None if result.ssim is None else round(result.ssim, 4),
        space=setup.space,
        dither=setup.output.dither,
        **fields,
    )


def quality_guard(item: Item, result: Quantized, setup: RunSetup) -> Row | None:
    """The ``quality`` row when the result is below ``--quality``'s minimum PSNR, else None."""
    quality = setup.output.quality
    if quality is None or result.psnr >= quality[0]:
        return None
    reason = f"PSNR {result.psnr:.2f} dB is below the minimum of {quality[0]:g} dB"
    return _row(item, result, "quality", setup, reason=reason, mse=round(result.mse, 4))


def size_guard(item: Item, result: Quantized, size: int, setup: RunSetup) -> Row | None:
    """The ``larger`` row when ``--skip-if-larger`` refuses an output of ``size`` bytes, else None."""
    if not setup.output.skip_if_larger or size <= item.input_bytes:
        return None
    reason = f"output would be {size} bytes, larger than the input's {item.input_bytes}"
    return _row(item, result, "larger", setup, reason=reason, output_bytes=size)


def _ok_row(item: Item, result: Quantized, size: int, digest: str, notes: list[str], setup: RunSetup) -> Row:
    return _row(
        item,
        result,
        "ok",
        setup,
        output_bytes=size,
        output_hash=digest,
        mse=round(result.mse, 4),
        psnr_blur=None if result.blurred_psnr is None else round(result.blurred_psnr, 3),
        notes=item.decoded.notes + notes,
    )


def add_preview(item: Item, result: Quantized, target: PreviewTarget, row: Row) -> None:
    """Write this image's preview files and attach the gallery entry to its row."""
    pixels = item.decoded.pixels
    quantized = result.to_array() if pixels.shape[2] == 4 or result.has_alpha else result.to_rgb()
    if target.side_by_side:
        side_by_side(pixels, quantized, side_by_side_path(item.task.dst))
        return
    thumbs = thumbnail_pair(pixels, quantized, target.folder, os.fspath(item.task.dst))  # unique, unlike the key
    row.preview = {
        "input": row.input,
        "name": item.task.key,
        **thumbs,
        "palette": ["#" + bytes(c[:3]).hex() for c in result.palette.tolist()],
        "colors": row.colors,
        "psnr": row.psnr if row.psnr is None or math.isfinite(row.psnr) else "inf",
        "input_bytes": row.input_bytes,
        "output_bytes": row.output_bytes,
    }


def write_result(item: Item, result: Quantized | Exception, setup: RunSetup) -> Row:
    """Guard, encode and atomically write one quantized image; returns its report row."""
    task = item.task
    h, w = item.decoded.pixels.shape[:2]
    if isinstance(result, Exception):
        return failed_row(task, setup.fit.k, f"quantization failed: {result}", width=w, height=h)
    t0 = time.perf_counter()
    refused = quality_guard(item, result, setup)
    if refused is not None:
        return refused
    try:
        level = setup.output.compress_level
        data, notes = encode(setup.output.format, result.palette, result.indices, compress_level=level)
        refused = size_guard(item, result, len(data), setup)
        if refused is not None:
            return refused
        write_atomic(task.dst, data)
    except Exception as exc:
        return failed_row(task, setup.fit.k, f"cannot write output: {exc}", width=w, height=h)
    row = _ok_row(item, result, len(data), content_hash(data), notes, setup)
    if setup.output.ciede2000:
        row.ciede2000 = round(mean_ciede2000(item.decoded.pixels, result.palette, result.indices), 4)
    if setup.preview is not None:
        add_preview(item, result, setup.preview, row)
    row.seconds = round(item.seconds + time.perf_counter() - t0, 4)
    return row
