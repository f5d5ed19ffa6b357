"""Where a shard's results go: a tar, a Parquet file, token parts or loose files.

Every sink writes into a temporary file in the output folder and renames it on
:meth:`commit`, so an output shard is either absent or complete; :meth:`abort`
removes the partial file. Tar outputs are byte-deterministic: pass-through members
keep their headers, new members take the image member's header fields.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..quantize import Quantized
from .samples import Sample

__all__ = ["META_EXT", "FilesSink", "ParquetRows", "TarSink", "finish", "meta_json", "open_temp"]

# Our per-sample metadata member, <key>.kquant.json: the key (up to the first dot) stays the
# sample's, and img2dataset's own <key>.json passes through untouched beside it.
META_EXT = "kquant.json"


def open_temp(folder: Path) -> tuple[Any, Path]:
    """A binary file in ``folder`` named like the project's other temporary files."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gpu_kquant-", suffix=".tmp", dir=folder)
    return os.fdopen(fd, "wb"), Path(tmp)


def finish(tmp: Path, dst: Path) -> None:
    """Rename a finished temporary file into place with the usual read permissions."""
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; datasets are shared read-only
    os.replace(tmp, dst)


def meta_json(sample: Sample, result: Quantized) -> bytes:
    """The ``<key>.kquant.json`` member: palette, PSNR, size and the source member's name."""
    psnr = result.psnr
    h, w = result.indices.shape
    meta = {
        "palette": result.palette.tolist(),
        "psnr": round(psnr, 3) if math.isfinite(psnr) else "inf",
        "width": w,
        "height": h,
        "source": sample.image.name if sample.image is not None else None,
    }
    return json.dumps(meta, separators=(",", ":")).encode()


def _as_bytes(value: object) -> bytes:
    """A Parquet cell as a tar member: bytes as they are, text as UTF-8, anything else as JSON."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value, default=str).encode()


class TarSink:
    """``OUT/<name>.tar``: per sample ``<key>.<fmt>``, ``<key>.kquant.json``, then every other member."""

    def __init__(self, dst: Path, fmt: str) -> None:
        self.dst = dst
        self.fmt = fmt
        self._file, self._tmp = open_temp(dst.parent)
        # GNU format: no PAX headers with float mtimes, so equal inputs give equal bytes.
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)  # noqa: SIM115 - closed in commit

    def _put(self, template: tarfile.TarInfo | None, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        if template is not None:
            info.mtime, info.mode = int(template.mtime), template.mode
            info.uid, info.gid, info.uname, info.gname = template.uid, template.gid, template.uname, template.gname
        else:
            info.mode = 0o644
        info.size = len(data)
        self._tar.addfile(info, io.BytesIO(data))

    def add(self, sample: Sample, result: Quantized, data: bytes) -> list[str]:
        """Write one sample (the pass-through members byte for byte); returns notes (none)."""
        template = sample.image.info if sample.image is not None else None
        self._put(template, f"{sample.key}.{self.fmt}", data)
        self._put(template, f"{sample.key}.{META_EXT}", meta_json(sample, result))
        for member in sample.extras:
            if member.ext.lower() not in (self.fmt, META_EXT):  # replaced by ours
                self._put(member.info or template, member.name, member.data)
        for column, value in sample.fields.items():
            if value is not None and column not in ("key", self.fmt, META_EXT):
                self._put(template, f"{sample.key}.{column}", _as_bytes(value))
        return []

    def commit(self) -> None:
        self._tar.close()
        self._file.close()
        finish(self._tmp, self.dst)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


class ParquetRows:
    """Adapts samples to :class:`gpu_kquant.datasets.parquet.ParquetSink` rows.

    A tar input's other members become binary columns named by their extension, the
    set taken from the shard's first sample (img2dataset shards are uniform); a later
    sample's extra member outside that set is left out, with a note.
    """

    def __init__(self, dst: Path, passthrough: Any, first: Sample) -> None:
        from .parquet import ParquetSink, require_pyarrow

        pa = require_pyarrow()
        if passthrough is None:  # a tar or files shard
            passthrough = pa.schema([pa.field(m.ext, pa.binary()) for m in first.extras])
        self.sink = ParquetSink(dst, passthrough)
        self.dst = dst

    def add(self, sample: Sample, result: Quantized, data: bytes) -> list[str]:
        h, w = result.indices.shape
        row: dict[str, object] = dict(sample.fields)
        row.update({m.ext: m.data for m in sample.extras})
        dropped = sorted(set(row) - set(self.sink.schema.names))
        psnr = result.psnr
        row.update(
            key=sample.key,
            image=data,
            palette=np.ascontiguousarray(result.palette, np.uint8).tobytes(),
            colors=result.n_colors,
            width=w,
            height=h,
            psnr=psnr if math.isfinite(psnr) else math.inf,
        )
        self.sink.add(row)
        return [f"left out of the Parquet schema: {', '.join(dropped)}"] if dropped else []

    def commit(self) -> None:
        self.sink.commit()

    def abort(self) -> None:
        self.sink.abort()


class FilesSink:
    """``OUT/<name>/<key>.<fmt>``: one file per sample, each written atomically."""

    def __init__(self, folder: Path, fmt: str) -> None:
        self.dst = folder
        self.fmt = fmt

    def path(self, key: str) -> Path:
        return self.dst / f"{key}.{self.fmt}"

    def add(self, sample: Sample, result: Quantized, data: bytes) -> list[str]:
        path = self.path(sample.key)
        f, tmp = open_temp(path.parent)
        with f:
            f.write(data)
        finish(tmp, path)
        return []

    def commit(self) -> None:
        """Nothing to do: each file was renamed into place as it was written."""

    def abort(self) -> None:
        """Files already written are complete; they stay."""
