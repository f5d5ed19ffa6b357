"""Parquet in and out with pyarrow (the optional ``[datasets]`` extra), one record batch at a time.

The image column is named by ``--image-column`` or found among :data:`IMAGE_COLUMNS`;
it may hold plain binary or a Hugging Face ``Image`` struct ``{bytes, path}``. Every
other column travels through unchanged.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .samples import Member, Sample, ShardError
from .sources import Shard

__all__ = ["IMAGE_COLUMNS", "ParquetSink", "iter_parquet", "require_pyarrow"]

IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "bytes")
# Rows per record batch read and per row group written: small enough that a batch of
# 1-megapixel JPEGs stays near 64 MB, large enough that Parquet pages stay efficient.
BATCH_ROWS = 256
# ... and fewer when rows are large (big images, embeddings in a pass-through column): a batch
# holds about this many bytes at most, so memory does not grow with the size of a row either.
BATCH_BYTES = 64 << 20


def _batch_rows(metadata: Any) -> int:
    """Rows per record batch: BATCH_ROWS, fewer when the widest row group's rows would exceed BATCH_BYTES.

    Row sizes come from the file's metadata (uncompressed bytes per row group), so nothing
    is read to decide. pyarrow itself decodes one row group at a time under the batches.
    """
    widest = 0.0
    for i in range(metadata.num_row_groups):
        group = metadata.row_group(i)
        if group.num_rows:
            widest = max(widest, group.total_byte_size / group.num_rows)
    return max(1, min(BATCH_ROWS, int(BATCH_BYTES // widest))) if widest else BATCH_ROWS


def require_pyarrow() -> Any:
    """The pyarrow module, or an ImportError that says how to install it."""
    try:
        import pyarrow  # type: ignore[import-untyped]
        import pyarrow.parquet  # type: ignore[import-untyped]  # registers the submodule
    except ModuleNotFoundError:
        raise ImportError("Parquet needs pyarrow: pip install 'gpu_kquant[datasets]'") from None
    return pyarrow


def _image_column(schema: Any, wanted: str | None, path: Path) -> str:
    names = list(schema.names)
    if wanted is not None:
        if wanted not in names:
            raise ShardError(f"{path}: no column {wanted!r} (--image-column); columns are {', '.join(names)}")
        return wanted
    for name in IMAGE_COLUMNS:
        if name in names:
            return name
    raise ShardError(f"{path}: no image column among {', '.join(names)}; name it with --image-column")


def _image_value(value: object, key: str) -> Member | None:
    """A cell of the image column as a member: plain bytes or an HF ``{bytes, path}`` struct."""
    if isinstance(value, dict):
        data, name = value.get("bytes"), value.get("path")
    else:
        data, name = value, None
    if data is None:
        return None
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"image cell holds {type(data).__name__}, not bytes")
    return Member(str(name or key), Path(str(name or "")).suffix.lstrip(".").lower(), bytes(data))


def iter_parquet(shard: Shard, image_column: str | None) -> tuple[Any, Iterator[Sample]]:
    """The pass-through schema (every column but the image) and the samples, batch by batch.

    The key is the ``key`` column when there is one (as img2dataset writes), else the
    row number as nine digits.

    Raises:
        ShardError: unreadable or truncated file, or no image column (at open or mid-file).
    """
    pa = require_pyarrow()
    try:
        pf = pa.parquet.ParquetFile(shard.path)
    except (OSError, pa.ArrowException) as exc:
        raise ShardError(f"{shard.path}: truncated or corrupt Parquet: {exc}") from None
    schema = pf.schema_arrow
    column = _image_column(schema, image_column, shard.path)
    rest = schema.remove(schema.get_field_index(column))

    def samples() -> Iterator[Sample]:
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=_batch_rows(pf.metadata)):
                for record in batch.to_pylist():
                    key = str(record["key"]) if record.get("key") is not None else f"{row:09d}"
                    value = record.pop(column)
                    row += 1
                    try:
                        yield Sample(key, _image_value(value, key), fields=record)
                    except TypeError as exc:
                        yield Sample(key, None, fields=record, error=str(exc))
        except (OSError, pa.ArrowException) as exc:
            raise ShardError(f"{shard.path}: truncated or corrupt Parquet after {row} rows: {exc}") from None

    return rest, samples()


class ParquetSink:
    """Rows written to ``dst`` through a temporary file in its folder, renamed on :meth:`commit`.

    Columns: ``key``, ``image`` (encoded, binary), ``palette`` (binary, k x 3|4 uint8
    row-major), ``colors`` (k, so ``palette`` reshapes to (colors, -1)), ``width``,
    ``height``, ``psnr``, then the pass-through columns. An input
    column with one of those names is replaced by the output's value (the output's
    size, not the source's).
    """

    def __init__(self, dst: Path, passthrough: Any) -> None:
        pa = require_pyarrow()
        self._pa = pa
        ours = [
            pa.field("key", pa.string()),
            pa.field("image", pa.binary()),
            pa.field("palette", pa.binary()),
            pa.field("colors", pa.int32()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("psnr", pa.float64()),
        ]
        names = {f.name for f in ours}
        self.schema = pa.schema(ours + [f for f in passthrough if f.name not in names])
        self.dst = dst
        fd, tmp = tempfile.mkstemp(prefix=".gpu_kquant-", suffix=".tmp", dir=dst.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        self._writer = pa.parquet.ParquetWriter(self._tmp, self.schema)
        self._rows: list[dict[str, object]] = []
        self._bytes = 0

    def add(self, row: dict[str, object]) -> None:
        """Queue one output row (a dict of column values); written in row groups of BATCH_ROWS or BATCH_BYTES."""
        values = {name: row.get(name) for name in self.schema.names}
        self._rows.append(values)
        self._bytes += sum(len(v) for v in values.values() if isinstance(v, (bytes, bytearray, str)))
        if len(self._rows) >= BATCH_ROWS or self._bytes >= BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(self._pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows, self._bytes = [], 0

    def commit(self) -> None:
        """Finish the file and rename it into place."""
        self._flush()
        self._writer.close()
        os.chmod(self._tmp, 0o644)  # mkstemp makes 0600; datasets are shared read-only
        os.replace(self._tmp, self.dst)

    def abort(self) -> None:
        """Drop the partial file."""
        try:
            self._writer.close()
        finally:
            self._tmp.unlink(missing_ok=True)
