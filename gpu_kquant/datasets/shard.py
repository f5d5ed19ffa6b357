"""``process_shard``: one input shard in, one output shard out, a report row per sample.

Engine-agnostic: it needs only a :class:`Shard` and :class:`DatasetOptions`, so the
local engine and a Ray task call it alike. Samples stream through in chunks of
``batch_size``: decoded (and resized) on a small thread pool, quantized as one batch,
encoded on the pool, and written in input order, so memory stays flat with shard size.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from ..manifest import CURRENT, Manifest, content_hash
from ..quantize import Quantized
from ..report import Row
from ..resize import resize_decoded
from .codec import DecodeError, decode_bytes, encode_image, quantize_images
from .options import DatasetOptions
from .resume import open_dataset_manifest
from .samples import Sample, ShardError, iter_files, iter_tar
from .sinks import FilesSink, ParquetRows, TarSink
from .sources import Shard
from .tokens import TOKENS_FILES, TokensSink, part_done

__all__ = ["output_path", "process_shard", "read_shard"]

_SUFFIX = {"webdataset": ".tar", "parquet": ".parquet", "tokens": "", "files": ""}


def output_path(shard: Shard, options: DatasetOptions) -> Path:
    """Where ``shard``'s output goes (for tokens, the part's commit marker)."""
    fmt = options.format_for(shard)
    if fmt == "tokens":
        from .tokens import PARTS_DIR

        return options.out / PARTS_DIR / f"{shard.name}.json"
    return options.out / f"{shard.name}{_SUFFIX[fmt]}"


def read_shard(shard: Shard, options: DatasetOptions) -> tuple[Any, Iterator[Sample]]:
    """The Parquet pass-through schema (None for tars and folders) and the samples of ``shard``."""
    if shard.kind == "parquet":
        from .parquet import iter_parquet

        return iter_parquet(shard, options.image_column)
    return None, iter_tar(shard) if shard.kind == "tar" else iter_files(shard)


def _open_sink(shard: Shard, options: DatasetOptions, schema: Any, first: Sample) -> Any:
    fmt, dst = options.format_for(shard), output_path(shard, options)
    if fmt == "webdataset":
        return TarSink(dst, options.image_format)
    if fmt == "parquet":
        return ParquetRows(dst, schema, first)
    if fmt == "tokens":
        return TokensSink(options.out, shard.name)
    return FilesSink(dst, options.image_format)


def _done(shard: Shard, options: DatasetOptions, manifest: Manifest) -> bool:
    """Whether the shard's output is gpu_kquant's, intact and made with these options (loose files: per file)."""
    fmt = options.format_for(shard)
    if fmt == "tokens":
        return part_done(options.out, shard.name, manifest)
    return fmt != "files" and manifest.verdict(output_path(shard, options)) == CURRENT


def _precheck(where: _Where, options: DatasetOptions, manifest: Manifest) -> Row | None:
    """The one row of a shard that must not run (a file there is not gpu_kquant's) or need not; else None."""
    paths = [] if where.fmt == "files" else [where.dst]
    if where.fmt == "tokens":  # the assembled layout is shared by every tokens shard
        paths += [options.out / name for name in TOKENS_FILES]
    for path in paths:
        reason = manifest.foreign_reason(path)
        if reason is not None:
            return Row(str(where.shard.path), str(where.dst), "failed", reason=reason, k=where.k)
    if not options.overwrite and _done(where.shard, options, manifest):
        return Row(str(where.shard.path), str(where.dst), "skipped", reason="output exists", k=where.k)
    return None


@dataclass
class _Decoded:
    sample: Sample
    pixels: np.ndarray | None
    notes: list[str]
    error: str | None
    seconds: float


def _decode(sample: Sample, options: DatasetOptions) -> _Decoded:
    t0 = time.perf_counter()
    if sample.error is not None or sample.image is None:
        reason = sample.error or "no image member (jpg, jpeg, png, webp, bmp, tif, tiff or gif)"
        return _Decoded(sample, None, [], reason, 0.0)
    try:
        decoded = resize_decoded(decode_bytes(sample.image.data, max_pixels=options.max_pixels), options.resize)
    except DecodeError as exc:
        return _Decoded(sample, None, [], str(exc), 0.0)
    except Exception as exc:  # a decoder bug must not end the shard
        return _Decoded(sample, None, [], f"cannot decode: {type(exc).__name__}: {exc}", 0.0)
    return _Decoded(sample, decoded.pixels, decoded.notes, None, time.perf_counter() - t0)


def _quantize(items: list[_Decoded], options: DatasetOptions) -> list[Quantized | Exception | None]:
    good = [item for item in items if item.pixels is not None]
    results = (
        quantize_images(
            [item.pixels for item in good],  # type: ignore[misc]
            options.fit,
            palette=options.palette,
            palette_space=options.palette_space,
            dither=options.dither,
            device=options.device,
            target=None if options.quality is None else options.quality[1],
        )
        if good
        else []
    )
    by_id = {id(item): r for item, r in zip(good, results)}
    return [by_id.get(id(item)) for item in items]


def _encode(result: Quantized, options: DatasetOptions, fmt: str) -> tuple[bytes, list[str]]:
    if fmt == "tokens":
        return b"", []  # tokens keep the indices, no image file
    return encode_image(options.image_format, result, options.compress_level)


def _below_minimum(result: Quantized, options: DatasetOptions) -> bool:
    """Whether ``--quality`` refuses ``result``: its PSNR is below the minimum."""
    return options.quality is not None and result.psnr < options.quality[0]


def _encode_safely(result: Quantized | Exception | None, options: DatasetOptions, fmt: str) -> Any:
    if not isinstance(result, Quantized) or _below_minimum(result, options):
        return None
    try:
        return _encode(result, options, fmt)
    except Exception as exc:
        return exc


@dataclass(frozen=True)
class _Where:
    """Names for the rows of one shard, and ``--quality``'s minimum PSNR."""

    shard: Shard
    dst: Path
    fmt: str
    k: int
    space: str
    dither: str
    min_psnr: float | None = None
    manifest: Manifest | None = None


def _row(where: _Where, item: _Decoded, result: Any, encoded: Any, sink: Any, seconds: float) -> Row:
    """Write one sample through ``sink`` and return its row (a failed one leaves the sample out)."""
    sample, options_k = item.sample, where.k
    src = f"{where.shard.path}#{sample.key}"
    dst = str(sink.path(sample.key)) if isinstance(sink, FilesSink) else f"{where.dst}#{sample.key}"
    size = len(sample.image.data) if sample.image is not None else None
    if item.error is not None:
        return Row(src, dst, "failed", reason=item.error, k=options_k, input_bytes=size)
    h, w = item.pixels.shape[:2]  # type: ignore[union-attr]
    reason, output_hash = None, None
    if isinstance(result, Exception):
        reason = f"quantization failed: {result}"
    elif where.min_psnr is not None and result.psnr < where.min_psnr:  # refused, left out of the output
        reason = f"PSNR {result.psnr:.2f} dB is below the minimum of {where.min_psnr:g} dB"
        fields = {"colors": result.n_colors, "psnr": round(result.psnr, 3), "mse": round(result.mse, 4)}
        return Row(src, dst, "quality", reason=reason, k=options_k, width=w, height=h, input_bytes=size, **fields)
    elif isinstance(encoded, Exception):
        reason = f"cannot encode: {encoded}"
    else:
        data, notes = encoded
        try:
            notes = notes + sink.add(sample, result, data)
        except ValueError as exc:
            reason = str(exc)
        else:
            output_hash = _record(where, sink, sample.key, data)
    if reason is not None:
        return Row(src, dst, "failed", reason=reason, k=options_k, width=w, height=h, input_bytes=size)
    return Row(
        src,
        dst,
        "ok",
        width=w,
        height=h,
        k=options_k,
        colors=result.n_colors,
        input_bytes=size,
        output_bytes=len(data) if where.fmt != "tokens" else int(result.indices.nbytes),
        mse=round(result.mse, 4),
        psnr=round(result.psnr, 3),
        seconds=round(item.seconds + seconds, 4),
        space=where.space,
        dither=where.dither,
        notes=item.notes + notes,
        output_hash=output_hash,
    )


def _record(where: _Where, sink: Any, key: str, data: bytes) -> str | None:
    """A loose output file's hash, recorded in the manifest now that it is in place (None for shards)."""
    if not isinstance(sink, FilesSink):
        return None
    digest = content_hash(data)
    if where.manifest is not None:
        where.manifest.record(sink.path(key), len(data), digest)
    return digest


def _process_chunk(
    chunk: list[Sample], sink: Any, pool: ThreadPoolExecutor, options: DatasetOptions, where: _Where
) -> list[Row]:
    """Decode, quantize, encode and write one chunk; rows in input order."""
    skip = _file_verdicts(chunk, sink, options, where) if isinstance(sink, FilesSink) else {}
    todo = [s for i, s in enumerate(chunk) if i not in skip]
    items = list(pool.map(lambda s: _decode(s, options), todo))
    t0 = time.perf_counter()
    results = _quantize(items, options)
    encoded = list(pool.map(lambda r: _encode_safely(r, options, where.fmt), results))
    total = sum(i.pixels.shape[0] * i.pixels.shape[1] for i in items if i.pixels is not None) or 1
    seconds = time.perf_counter() - t0
    done = iter(zip(items, results, encoded))
    rows = []
    for i in range(len(chunk)):
        if i in skip:
            rows.append(skip[i])
            continue
        item, result, enc = next(done)
        share = 0.0 if item.pixels is None else seconds * item.pixels.shape[0] * item.pixels.shape[1] / total
        rows.append(_row(where, item, result, enc, sink, share))
    return rows


def _file_verdicts(chunk: list[Sample], sink: FilesSink, options: DatasetOptions, where: _Where) -> dict[int, Row]:
    """Loose files resume file by file: the rows of samples not to write; the others' paths are claimed."""
    skip: dict[int, Row] = {}
    claims = []
    for i, sample in enumerate(chunk):
        path, src = sink.path(sample.key), f"{where.shard.path}#{sample.key}"
        reason = where.manifest.foreign_reason(path) if where.manifest is not None else None
        if reason is not None:
            skip[i] = Row(src, str(path), "failed", reason=reason, k=where.k)
        elif not options.overwrite and where.manifest is not None and where.manifest.verdict(path) == CURRENT:
            skip[i] = Row(src, str(path), "skipped", reason="output exists", k=where.k)
        else:
            claims.append(path)
    if where.manifest is not None:
        where.manifest.claim(claims)  # before the writes: a file renamed into place is known as ours
    return skip


def _chunks(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    while chunk := list(islice(samples, size)):
        yield chunk


def process_shard(shard: Shard, options: DatasetOptions) -> list[Row]:
    """Quantize every sample of ``shard`` into its output shard; one report row per sample.

    The manifest of ``options.out`` (:mod:`gpu_kquant.datasets.resume`) decides: a file
    at the output path that it does not list is never written over (one ``failed`` row
    for the shard, or per loose file); a listed, intact output made with these options
    is skipped (``skipped`` row) unless ``options.overwrite``; anything else is redone.
    The output is claimed before it is written and recorded once in place. A
    sample that cannot be decoded, quantized or encoded is a ``failed`` row and is left
    out of the output; the rest is written. A shard that cannot be read to its end
    (truncated or corrupt tar or Parquet) gives one ``failed`` row for the shard and
    no output at all: a partial output would look finished to the next run, which
    would then never retry it.
    """
    space = options.palette_space if options.palette is not None else options.fit.space
    minimum = None if options.quality is None else options.quality[0]
    fmt = options.format_for(shard)
    manifest = open_dataset_manifest(options)
    where = _Where(shard, output_path(shard, options), fmt, _k(options), space, options.dither, minimum, manifest)
    try:
        first = _precheck(where, options, manifest)
        if first is not None:
            return [first]
        options.out.mkdir(parents=True, exist_ok=True)
        if fmt != "files":
            manifest.claim([where.dst])  # before the rename: a shard renamed into place is known as ours
        return _write_shard(shard, options, where)
    finally:
        manifest.close()


def _write_shard(shard: Shard, options: DatasetOptions, where: _Where) -> list[Row]:
    """Stream ``shard`` through its sink; the rows (one failed row when the shard cannot be read)."""
    rows: list[Row] = []
    sink = None
    try:
        schema, samples = read_shard(shard, options)
        with ThreadPoolExecutor(options.workers, thread_name_prefix="shard") as pool:
            for chunk in _chunks(samples, options.batch_size):
                if sink is None:
                    sink = _open_sink(shard, options, schema, chunk[0])
                rows += _process_chunk(chunk, sink, pool, options, where)
        if sink is None:  # an empty shard gives an empty output shard
            sink = _open_sink(shard, options, schema, Sample("", None))
        sink.commit()
        if where.fmt != "files" and where.manifest is not None:
            where.manifest.record_file(where.dst)
    except ShardError as exc:
        if sink is not None:
            sink.abort()
        reason = f"{exc} ({len(rows)} samples read before; nothing written for this shard)"
        return [Row(str(shard.path), None, "failed", reason=reason, k=where.k)]
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    return rows


def _k(options: DatasetOptions) -> int:
    return len(options.palette) if options.palette is not None else options.fit.k
