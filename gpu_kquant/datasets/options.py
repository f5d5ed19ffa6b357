"""The typed options of a dataset run, passed whole to :func:`process_shard`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..options import FitOptions, ResizeOptions
from .sources import Shard

__all__ = ["DEFAULT_OUTPUT", "OUTPUT_FORMATS", "QUALITY_TOKENS", "DatasetOptions"]

OUTPUT_FORMATS = ("files", "webdataset", "parquet", "tokens")
# The output format that follows each input kind when --output-format is not given.
DEFAULT_OUTPUT = {"tar": "webdataset", "parquet": "parquet", "files": "files"}
QUALITY_TOKENS = (
    "--quality picks k per image, but --output-format tokens maps every image to one palette: "
    "choose its size with -k (and --palette shared) instead"
)


@dataclass(frozen=True)
class DatasetOptions:
    """How shards are turned into output shards.

    Attributes:
        out: output folder.
        output_format: one of :data:`OUTPUT_FORMATS`, or None to follow each input's kind.
        fit: how per-image palettes are fitted (ignored when ``palette`` is set).
        image_format: encoding of each output image (``--format``: png, gif, webp, npz).
        compress_level: zlib level for PNG (None: the encoder's measured default).
        dither: none, ordered or fs.
        palette: (k, 3|4) uint8 fixed palette every image maps to (``--palette``); tokens need it.
        palette_space: colour space the fixed palette maps in.
        device: torch device string.
        batch_size: images per batched quantization.
        workers: decode/encode threads inside one shard.
        max_pixels: larger images are failed rows.
        resize: ``--resize``: every image resized before quantization, or None.
        image_column: Parquet image column (None: detect).
        overwrite: redo shards whose output gpu_kquant wrote (a file it did not write is never replaced).
        quality: ``--quality`` (minimum, target) PSNR in dB: each image gets the smallest k up to
            ``fit.k`` reaching the target, and an image below the minimum is a ``quality`` row left
            out of the output. Needs a palette per image, so not with ``palette`` (nor tokens).
        run_id: the report's run id, written on the manifest's lines.
        run_shard: ``--shard`` (index, count), which names the manifest file the run appends to.
    """

    out: Path
    output_format: str | None = None
    fit: FitOptions = field(default_factory=FitOptions)
    image_format: str = "png"
    compress_level: int | None = None
    dither: str = "none"
    palette: np.ndarray | None = field(default=None, compare=False, repr=False)
    palette_space: str = "rgb"
    device: str = "cpu"
    batch_size: int = 4
    workers: int = 1
    max_pixels: int | None = None
    resize: ResizeOptions | None = None
    image_column: str | None = None
    overwrite: bool = False
    quality: tuple[float, float] | None = None
    run_id: str = field(default="", compare=False)
    run_shard: tuple[int, int] = field(default=(0, 1), compare=False)

    def __post_init__(self) -> None:
        if self.output_format is not None and self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {self.output_format!r}")
        if self.quality is not None and self.output_format == "tokens":
            raise ValueError(QUALITY_TOKENS)
        if self.quality is not None and self.palette is not None:
            raise ValueError("--quality picks k per image and --palette fixes the colours; use one of them")
        if self.output_format == "tokens" and self.palette is None:
            raise ValueError("--output-format tokens needs one palette for all images: --palette shared or FILE")

    def format_for(self, shard: Shard) -> str:
        """The output format of ``shard``."""
        return self.output_format or DEFAULT_OUTPUT[shard.kind]
