"""Dataset inputs: which paths are shards, brace patterns, and the shard list of a run.

A shard is one unit of work and of resume: a WebDataset/img2dataset ``.tar``, a
Parquet file, or (for ``--output-format`` other than ``files``) a folder of loose
images gathered into one virtual shard.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "PARQUET_SUFFIXES",
    "TAR_SUFFIXES",
    "Shard",
    "expand_braces",
    "find_shards",
    "folder_shard",
    "shard_kind",
]

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
PARQUET_SUFFIXES = (".parquet", ".pq")
# {00000..00099} (zero-padded width kept) or {a,b,c}; nested braces are expanded left to right.
_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)\}")
_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


@dataclass(frozen=True)
class Shard:
    """One input shard.

    Attributes:
        path: the .tar or .parquet file, or the folder of a ``files`` shard.
        kind: ``"tar"``, ``"parquet"`` or ``"files"``.
        name: output base name (the input's name without its container suffix), unique in a run.
        files: the image files of a ``files`` shard, sorted.
    """

    path: Path
    kind: str
    name: str
    files: tuple[Path, ...] = field(default=(), compare=False)


def shard_kind(path: Path) -> str | None:
    """``"tar"`` or ``"parquet"`` from the file name, else None."""
    name = path.name.lower()
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _base_name(path: Path) -> str:
    name = path.name
    for suffix in TAR_SUFFIXES + PARQUET_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces without a shell: ``a/{000..002}.tar`` -> 3 names.

    Ranges keep the zero padding of their first bound, as WebDataset and bash do;
    ``{x,y}`` lists are expanded too. A pattern without braces is returned as is.
    """
    matches = [m for m in (_RANGE.search(pattern), _LIST.search(pattern)) if m]
    if not matches:
        return [pattern]
    match = min(matches, key=lambda m: m.start())  # leftmost first, as bash does
    if match.re is _RANGE:
        lo, hi = match.group(1), match.group(2)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        step = 1 if int(hi) >= int(lo) else -1
        values = [str(v).zfill(width) for v in range(int(lo), int(hi) + step, step)]
    else:
        values = match.group(1).split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [name for value in values for name in expand_braces(head + value + tail)]


def _shards_in(folder: Path) -> list[Path]:
    """Shard files under ``folder``, sorted (temporary files of a running job left out)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".") and shard_kind(Path(f))]
    return found


def find_shards(inputs: Iterable[str]) -> tuple[list[Shard], list[str]]:
    """Split command-line inputs into shards and everything else.

    Brace patterns are expanded (every expanded name must exist); a folder holding at
    least one shard is a folder of shards. Returns the shards in input order and the
    inputs left for the image-file pipeline.

    Raises:
        ValueError: a named shard is missing, or two shards would share an output name.
    """
    shards: list[Shard] = []
    rest: list[str] = []
    for text in inputs:
        names = expand_braces(text)
        if len(names) > 1 or names[0] != text:
            missing = [n for n in names if not Path(n).exists()]
            if missing:
                raise ValueError(f"{len(missing)} of {len(names)} files of {text} do not exist, first {missing[0]}")
            paths = [Path(n) for n in names]
        else:
            path = Path(text)
            if shard_kind(path) and not path.exists():
                raise ValueError(f"input not found: {path}")
            paths = _shards_in(path) if path.is_dir() else [path]
            if not any(shard_kind(p) for p in paths):
                rest.append(text)
                continue
        shards += [Shard(p, kind, _base_name(p)) for p in paths if (kind := shard_kind(p))]
    seen: dict[str, Path] = {}
    for shard in shards:
        if shard.name in seen:
            raise ValueError(f"shards {seen[shard.name]} and {shard.path} would share the output name {shard.name}")
        seen[shard.name] = shard.path
    return shards, rest


def folder_shard(folder: Path, extensions: Iterable[str]) -> Shard:
    """A folder of loose images as one ``files`` shard (sorted, recursive, hidden entries left out)."""
    wanted = {e.lower() for e in extensions}
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [
            Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".") and Path(f).suffix.lower() in wanted
        ]
    return Shard(folder, "files", folder.resolve().name, tuple(files))
