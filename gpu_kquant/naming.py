"""Output names: unique names for every input, the file system's length limits, and paths as shown.

The naming rule (also in the README, "Your own folder"):

1. An input's output is its path mirrored under the output folder with the format's
   extension (``in/sub/a.jpg`` -> ``OUT/sub/a.png``); a file given directly becomes
   ``STEM_k<k>.FMT`` beside it, or ``STEM.FMT`` in ``-o``.
2. Inputs whose outputs would share a name all keep their own extension before the
   format's: ``a.jpg`` -> ``a.jpg.png``, ``a.png`` -> ``a.png.png``.
3. A name still shared after that (or now shared with another input's name) stays with
   one input: the one whose name was not changed in step 2, else the first in input
   order (the command line's order, then sorted folder order). Each other one gets the
   first free ``_2``, ``_3``, ... before the extension (``a.jpg_2.png``). Every new name is
   checked against every name taken so far, so no two inputs ever share an output.

Names are compared case-insensitively after Unicode NFC normalization (as macOS and
Windows file systems compare them), so two names that differ only in case never share a
file, on any file system. Names are decided over all inputs before ``--shard`` picks its
part, so every shard names alike. An output name over :data:`NAME_MAX` bytes, or a path
over :data:`PATH_MAX`, cannot be created: that input gets a ``failed`` row.
"""

from __future__ import annotations

import collections
import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path

__all__ = ["NAME_MAX", "PATH_MAX", "display_path", "fold", "length_error", "unique_outputs"]

NAME_MAX = 255
"""Bytes in one file name: ext4, XFS, btrfs, ZFS and APFS all stop at 255."""
PATH_MAX = 4096
"""Bytes in a path handed to the kernel, the final NUL included (Linux)."""


def display_path(path: str | os.PathLike[str]) -> str:
    """``path`` as text that can always be written: bytes that are not UTF-8 shown as ``\\xNN``.

    File names are bytes on POSIX; Python keeps undecodable ones as lone surrogates, which
    a UTF-8 report or terminal cannot encode.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def fold(path: str | os.PathLike[str]) -> str:
    """The comparison key of a path: absolute, NFC-normalized, case-folded."""
    return unicodedata.normalize("NFC", os.path.abspath(path)).casefold()


def unique_outputs(srcs: Sequence[Path], dsts: Sequence[Path], fmt: str) -> list[Path]:
    """One distinct output per input, by the module's naming rule (steps 2 and 3).

    Args:
        srcs: the inputs, in input order.
        dsts: their outputs by step 1 (same length).
        fmt: the output format (its extension).
    """
    shared = collections.Counter(fold(d) for d in dsts)
    renamed = [shared[fold(d)] > 1 for d in dsts]
    names = [d.with_name(f"{d.stem}{s.suffix}.{fmt}") if r else d for s, d, r in zip(srcs, dsts, renamed)]
    taken: set[str] = set()
    losers: list[int] = []
    for i in sorted(range(len(names)), key=lambda j: (renamed[j], j)):
        key = fold(names[i])
        if key in taken:
            losers.append(i)
        else:
            taken.add(key)
    for i in losers:
        stem, suffix = names[i].stem, names[i].suffix
        n = 2
        while fold(names[i].with_name(f"{stem}_{n}{suffix}")) in taken:
            n += 1
        names[i] = names[i].with_name(f"{stem}_{n}{suffix}")
        taken.add(fold(names[i]))
    return names


def length_error(src: Path, dst: Path) -> str | None:
    """Why ``src`` cannot be read or ``dst`` cannot be created for their length, or None."""
    for path, what in ((src, "input"), (dst, "output")):
        size = len(os.fsencode(path))
        if size >= PATH_MAX:
            return f"the {what} path is {size} bytes long; the file system allows {PATH_MAX - 1}"
    for part in dst.parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            name = display_path(part)
            short = name if len(name) <= 40 else f"{name[:20]}...{name[-16:]}"
            return (
                f"the output name {short} would be {size} bytes; the file system allows {NAME_MAX} "
                "(rename the input or choose a shorter -o)"
            )
    return None
