"""Reading samples out of shards, one at a time: WebDataset tars and loose-image folders.

Samples are grouped as WebDataset groups them: consecutive members sharing a key, the
key being the member path up to the first dot of its base name
(``a/000000001.jpg`` and ``a/000000001.json`` form sample ``a/000000001``). The
reader streams (``tarfile`` mode ``r|*``), so a shard is never held in memory whole.
"""

from __future__ import annotations

import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .sources import Shard

__all__ = ["IMAGE_EXTS", "Member", "Sample", "ShardError", "check_tar_end", "iter_files", "iter_tar"]

# The image member of a sample: the first of these present, in this order (issue 14).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
# WebDataset's own rule (webdataset/tariterators.py, base_plus_ext).
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


class ShardError(Exception):
    """A shard that cannot be read to its end (truncated or corrupt container); one-line message."""


@dataclass
class Member:
    """One member of a sample: its name in the input, extension chain and bytes.

    ``info`` keeps the tar header of a pass-through member, so it is written back unchanged.
    """

    name: str
    ext: str
    data: bytes
    info: tarfile.TarInfo | None = None


@dataclass
class Sample:
    """One sample: the image member (None when the sample has none) and everything else.

    Attributes:
        key: the sample key (unique within the shard).
        image: the image member.
        extras: tar members other than the image, in input order.
        fields: Parquet columns other than the image column (Python values).
        error: why the sample could not be read (it becomes a failed row).
    """

    key: str
    image: Member | None
    extras: list[Member] = field(default_factory=list)
    fields: dict[str, object] = field(default_factory=dict)
    error: str | None = None


def split_key(name: str) -> tuple[str, str] | None:
    """``"dir/000001.seg.png"`` -> ``("dir/000001", "seg.png")``; None for a name with no extension."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2)) if match else None


def _sample(key: str, members: list[Member]) -> Sample:
    by_ext = {m.ext.lower(): m for m in members}
    image = next((by_ext[e] for e in IMAGE_EXTS if e in by_ext), None)
    return Sample(key, image, [m for m in members if m is not image])


def check_tar_end(path: Path) -> None:
    """Raise :class:`ShardError` when a plain tar lacks its end-of-archive blocks.

    ``tarfile`` accepts a file cut exactly between two members as a complete archive;
    a finished tar always ends with at least two zero blocks of 512 bytes (and is
    padded with zeros to its record size), so a cut file shows up here before any
    work is spent on it. Compressed tars are checked by their own stream trailer.
    """
    if not path.name.lower().endswith(".tar"):
        return
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 1024:
                raise ShardError(f"{path}: truncated tar ({size} bytes, no end-of-archive marker)")
            f.seek(size - 1024)
            tail = f.read(1024)
    except OSError as exc:
        raise ShardError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if tail.count(0) != len(tail):
        raise ShardError(f"{path}: truncated tar (no end-of-archive marker)")


def iter_tar(shard: Shard) -> Iterator[Sample]:
    """Samples of a tar shard in file order.

    Raises:
        ShardError: the tar is truncated or corrupt (possibly after some samples).
    """
    check_tar_end(shard.path)
    key: str | None = None
    members: list[Member] = []
    try:
        with tarfile.open(shard.path, mode="r|*") as tar:
            for info in tar:
                parts = split_key(info.name) if info.isfile() else None
                if parts is None:
                    continue  # folders, links and names without an extension: not part of a sample
                if parts[0] != key and members:
                    yield _sample(key, members)  # type: ignore[arg-type]
                    members = []
                key = parts[0]
                handle = tar.extractfile(info)
                data = handle.read() if handle is not None else b""
                members.append(Member(info.name, parts[1], data, info))
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ShardError(f"{shard.path}: truncated or corrupt tar: {exc}") from None
    except OSError as exc:
        raise ShardError(f"{shard.path}: cannot read: {exc.strerror or exc}") from None
    if members:
        yield _sample(key, members)  # type: ignore[arg-type]


def iter_files(shard: Shard) -> Iterator[Sample]:
    """Samples of a ``files`` shard: key = path relative to the folder, without its suffix."""
    for path in shard.files:
        rel = path.relative_to(shard.path)
        key = rel.with_suffix("").as_posix()
        member = Member(rel.as_posix(), path.suffix.lstrip(".").lower(), b"")
        try:
            member.data = path.read_bytes()
        except OSError as exc:  # a failed sample, not a failed shard
            yield Sample(key, member, error=f"cannot read file: {exc.strerror or exc}")
            continue
        yield Sample(key, member)
