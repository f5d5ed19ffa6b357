"""``--output-format tokens``: one (N, H, W) array of palette indices for training.

Each shard writes its own part (``OUT/.gpu_kquant-tokens/<shard>.bin`` raw indices
plus ``<shard>.json``, the commit marker with its keys and shape), so tokens resume
at shard granularity like every other output and work from any engine. Once every
shard is done, :func:`assemble` copies the parts in shard order into
``OUT/indices.npy`` (a ``numpy.lib.format.open_memmap``, so memory stays flat),
writes ``OUT/keys.txt`` and ``OUT/palette.npy``, records what it holds in
``OUT/tokens.json`` and deletes the parts. A later run (say, after a truncated shard
was replaced) reuses the assembled rows and adds the new parts, when the manifest of
``OUT`` vouches for them (:mod:`gpu_kquant.manifest`: written by gpu_kquant, intact, with
these options). None of these files is written over when the manifest does not list it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..manifest import CURRENT, Manifest
from ..quantize import Quantized
from ..report import Row
from .samples import Sample
from .sinks import finish, open_temp

__all__ = ["PARTS_DIR", "TOKENS_FILES", "TokensSink", "assemble", "part_done"]

PARTS_DIR = ".gpu_kquant-tokens"
MANIFEST = "tokens.json"
TOKENS_FILES = ("indices.npy", "keys.txt", "palette.npy", MANIFEST)
"""The assembled layout in ``OUT``, shared by every tokens shard."""
_COPY_ROWS = 1024  # rows copied at a time when assembling: 64 MB at 256x256 uint8


def _manifest(out: Path) -> dict[str, Any]:
    path = out / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {"shards": {}}


def _assembled_current(out: Path, manifest: Manifest | None) -> bool:
    """Whether the assembled ``indices.npy`` and ``tokens.json`` may be reused (the manifest vouches for both)."""
    if manifest is None:
        return True
    return all(manifest.verdict(out / name) == CURRENT for name in ("indices.npy", MANIFEST))


def part_done(out: Path, name: str, manifest: Manifest) -> bool:
    """Whether shard ``name`` has a committed part or is in the assembled array, made with these options."""
    if manifest.verdict(out / PARTS_DIR / f"{name}.json") == CURRENT:
        return True
    return _assembled_current(out, manifest) and name in _manifest(out)["shards"]


class TokensSink:
    """One shard's token part. Every image must have the shard's first image's size."""

    def __init__(self, out: Path, name: str) -> None:
        self.folder = out / PARTS_DIR
        self.name = name
        self.dst = self.folder / f"{name}.json"
        self._file, self._tmp = open_temp(self.folder)
        self.keys: list[str] = []
        self.shape: tuple[int, int] | None = None
        self.dtype: str | None = None

    def add(self, sample: Sample, result: Quantized, data: bytes) -> list[str]:
        """Append one image's (H, W) indices.

        Raises:
            ValueError: its size differs from the shard's first image's.
        """
        shape = result.indices.shape
        if self.shape is None:
            self.shape, self.dtype = (shape[0], shape[1]), result.indices.dtype.str
        elif shape != self.shape:
            raise ValueError(
                f"size {shape[1]}x{shape[0]} differs from {self.shape[1]}x{self.shape[0]}: tokens need one size "
                "(use --resize WxH --resize-mode fill)"
            )
        self._file.write(np.ascontiguousarray(result.indices).astype(self.dtype, copy=False).tobytes())
        self.keys.append(sample.key)
        return []

    def commit(self) -> None:
        """Rename the raw part into place, then write its JSON marker (the part counts only then)."""
        self._file.close()
        finish(self._tmp, self.folder / f"{self.name}.bin")
        meta = {"keys": self.keys, "shape": self.shape, "dtype": self.dtype}
        f, tmp = open_temp(self.folder)
        with f:
            f.write(json.dumps(meta).encode())
        finish(tmp, self.dst)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def _sources(out: Path, names: list[str], reuse: bool) -> tuple[list[tuple[str, dict[str, Any]]], list[Row]]:
    """Each shard's part or (``reuse``) assembled slice, in order; a row per shard with neither or a bad size."""
    manifest = _manifest(out) if reuse else {"shards": {}}
    found: list[tuple[str, dict[str, Any]]] = []
    rows: list[Row] = []
    for name in names:
        marker = out / PARTS_DIR / f"{name}.json"
        if marker.exists():
            found.append((name, {**json.loads(marker.read_text()), "part": True}))
        elif name in manifest["shards"]:
            found.append((name, {**manifest["shards"][name], "part": False}))
        else:
            rows.append(Row(name, None, "failed", reason="no tokens for this shard: it failed, see its row"))
    sized = [(n, m) for n, m in found if m["shape"] is not None]
    if sized:
        shape, dtype = sized[0][1]["shape"], sized[0][1]["dtype"]
        for name, meta in sized[1:]:
            if meta["shape"] != shape or meta["dtype"] != dtype:
                found.remove((name, meta))
                h, w = meta["shape"]
                reason = f"images are {w}x{h} {meta['dtype']}, not {shape[1]}x{shape[0]} {dtype}: left out of tokens"
                rows.append(Row(name, None, "failed", reason=reason))
    return found, rows


def assemble(out: Path, names: list[str], palette: np.ndarray, manifest: Manifest | None = None) -> list[Row]:
    """Build ``indices.npy``, ``keys.txt`` and ``palette.npy`` from the shards ``names``, in order.

    Returns failed rows for shards left out. Nothing is done when no new part exists.
    With ``manifest``, a file of :data:`TOKENS_FILES` it does not list is never written
    over (a failed row per shard, nothing written), the assembled rows are reused only
    when it vouches for them, and every file written is claimed and recorded.
    """
    if manifest is not None:
        for name in TOKENS_FILES:
            reason = manifest.foreign_reason(out / name)
            if reason is not None:
                return [Row(shard, None, "failed", reason=reason) for shard in names]
    found, rows = _sources(out, names, _assembled_current(out, manifest))
    if not any(meta["part"] for _, meta in found):
        return rows
    sized = [meta for _, meta in found if meta["shape"] is not None]
    shape = tuple(sized[0]["shape"]) if sized else (0, 0)
    dtype = np.dtype(sized[0]["dtype"] if sized else np.uint8)
    total = sum(len(meta["keys"]) if meta["part"] else meta["count"] for _, meta in found)
    reused = any(not meta["part"] for _, meta in found)
    old = np.load(out / "indices.npy", mmap_mode="r") if reused and (out / "indices.npy").exists() else None
    old_keys = (out / "keys.txt").read_text().splitlines() if old is not None else []
    f, tmp = open_temp(out)
    f.close()
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(total, *shape))
    keys: list[str] = []
    layout: dict[str, Any] = {"shards": {}}
    for name, meta in found:
        if meta["part"]:
            n = len(meta["keys"])
            src = np.memmap(out / PARTS_DIR / f"{name}.bin", dtype=dtype, mode="r", shape=(n, *shape)) if n else None
            shard_keys = meta["keys"]
        else:
            n, start = meta["count"], meta["start"]
            src = old[start : start + n] if old is not None else None
            shard_keys = old_keys[start : start + n]
        for i in range(0, n, _COPY_ROWS):
            array[len(keys) + i : len(keys) + min(i + _COPY_ROWS, n)] = src[i : i + _COPY_ROWS]  # type: ignore[index]
        layout["shards"][name] = {"start": len(keys), "count": n, "shape": meta["shape"], "dtype": meta["dtype"]}
        keys += shard_keys
    array.flush()
    del array, old
    _write(out, "keys.txt", "".join(k + "\n" for k in keys).encode(), manifest)
    _place(tmp, out / "indices.npy", manifest)
    buf_f, buf_tmp = open_temp(out)
    with buf_f:
        np.save(buf_f, np.ascontiguousarray(palette, np.uint8))
    _place(buf_tmp, out / "palette.npy", manifest)
    _write(out, MANIFEST, json.dumps(layout).encode(), manifest)
    for name, meta in found:
        if meta["part"]:
            (out / PARTS_DIR / f"{name}.bin").unlink(missing_ok=True)
            (out / PARTS_DIR / f"{name}.json").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (out / PARTS_DIR).rmdir()  # only when empty: another run's parts stay
    return rows


def _place(tmp: Path, dst: Path, manifest: Manifest | None) -> None:
    """Rename ``tmp`` to ``dst``, claimed in the manifest before and recorded after."""
    if manifest is not None:
        manifest.claim([dst])
    finish(tmp, dst)
    if manifest is not None:
        manifest.record_file(dst)


def _write(out: Path, name: str, data: bytes, manifest: Manifest | None) -> None:
    f, tmp = open_temp(out)
    with f:
        f.write(data)
    _place(tmp, out / name, manifest)
