"""The manifest: the outputs gpu_kquant wrote, their bytes and the options that made them.

It decides what a run may write and what a resumed run may trust. One append-only
JSON-lines file per output root, ``gpu_kquant_manifest.jsonl`` (``gpu_kquant_manifest.shard-I-of-N.jsonl``
with ``--shard``, so runs side by side never share a file), with three kinds of line:

- a run header: ``{"run": ID, "options": FP, "settings": {...}, "version": V}``;
- a claim, written before a task goes to a worker: ``{"claim": PATH, "run": ID}``;
- an entry, written when the output is in place:
  ``{"path": PATH, "size": N, "mtime_ns": T, "blake2b": H, "options": FP, "run": ID}``.

``PATH`` is relative to the root (POSIX form), so a copied or moved output folder keeps its
manifest. The rule (:meth:`Manifest.verdict`): a path that no line names is not
gpu_kquant's and is never written over; a path with an entry matching the file's size and
bytes (the modification time spares the hash when it is unchanged) and this run's options
is up to date; any other path named in the manifest is redone. The claim comes before the
worker's rename, so an output renamed into place by a run killed before its entry is
still known as ours (and redone). Lines are appended under the run's lock, each in one
``write`` to a file opened ``O_APPEND``; a last line torn by a kill is ended on the next
open and unreadable lines are skipped; the file is fsync'd at close.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .options import RunOptions
from .planning import Job

if TYPE_CHECKING:  # runsetup records the shared palette's files here: no import cycle at run time
    from .runsetup import RunSetup

__all__ = [
    "ABSENT",
    "CURRENT",
    "FOREIGN",
    "MANIFEST",
    "STALE",
    "Entry",
    "Manifest",
    "content_hash",
    "file_hash",
    "fingerprint",
    "fingerprint_id",
    "manifest_name",
    "open_manifest",
]

MANIFEST = "gpu_kquant_manifest.jsonl"

ABSENT = "absent"
"""No file at the path: write it."""
CURRENT = "current"
"""gpu_kquant's output, intact, made with this run's options: skip it (unless --overwrite)."""
STALE = "stale"
"""gpu_kquant's path, but the file is missing its entry, changed, or made with other options: redo it."""
FOREIGN = "foreign"
"""A file gpu_kquant did not write (or not a regular file): never written over."""

_HASH_BYTES = 16  # blake2b-128: a content check, not a security boundary
_CHUNK = 1 << 20


def content_hash(data: bytes) -> str:
    """The manifest's hash of an output's bytes: blake2b-128, hex."""
    return hashlib.blake2b(data, digest_size=_HASH_BYTES).hexdigest()


def file_hash(path: Path) -> str:
    """:func:`content_hash` of a file, read in 1 MB chunks."""
    h = hashlib.blake2b(digest_size=_HASH_BYTES)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(setup: RunSetup) -> dict[str, Any]:
    """The options that determine an output's bytes, as a JSON-ready dict.

    The fit options (k, space, seed, restarts, iterations, tolerance, fit points, and the
    exact finish when set), or with a
    fixed palette a hash of its colours and its space (fit options do not matter then);
    the format, compress level, dither, ``--quality`` and ``--resize`` (only when given, so
    runs without it keep the ids they had). The device, threads, batch sizes
    and the policies that decide only whether a file is written are left out: a resumed
    run on another machine keeps its outputs.
    """
    out = setup.output
    settings: dict[str, Any] = {
        "format": out.format,
        "compress_level": out.compress_level,
        "dither": out.dither,
        "quality": None if out.quality is None else list(out.quality),
    }
    if out.resize is not None:
        settings["resize"] = dataclasses.asdict(out.resize)
    if setup.palette is None:
        settings["fit"] = fit = dataclasses.asdict(setup.fit)
        if fit["exact_finish"] is None:  # its default: runs without it keep the ids they had
            del fit["exact_finish"]
    else:
        colors = setup.palette.colors
        digest = hashlib.blake2b(f"{colors.shape}".encode() + colors.tobytes(), digest_size=_HASH_BYTES)
        settings["palette"] = {"blake2b": digest.hexdigest(), "colors": len(colors), "space": setup.palette.space}
    return settings


def fingerprint_id(settings: dict[str, Any]) -> str:
    """A short stable id of :func:`fingerprint`'s dict (blake2b-64 of its canonical JSON)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def manifest_name(shard: tuple[int, int]) -> str:
    """The manifest file a run writes: one per ``--shard`` part, like the report."""
    index, count = shard
    return MANIFEST if count == 1 else MANIFEST.replace(".jsonl", f".shard-{index}-of-{count}.jsonl")


@dataclass(frozen=True, slots=True)
class Entry:
    """One written output: its size, modification time, hash and options id."""

    size: int
    mtime_ns: int | None
    blake2b: str
    options: str


def _read_manifests(folder: Path) -> dict[str, list[Entry]]:
    """Every path named by the manifests in ``folder`` (all shards' files); unreadable lines are skipped."""
    known: dict[str, list[Entry]] = {}
    try:
        files = sorted(folder.glob(MANIFEST.replace(".jsonl", "*.jsonl")))
    except OSError:
        return known
    for path in files:
        # an unreadable manifest vouches for nothing: its outputs are refused, never overwritten
        with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                _read_line(line, known)
    return known


def _read_line(line: str, known: dict[str, list[Entry]]) -> None:
    try:
        data = json.loads(line)
    except ValueError:  # a line torn by a kill
        return
    if not isinstance(data, dict):
        return
    claim = data.get("claim")
    if isinstance(claim, str):
        known.setdefault(claim, [])
        return
    path, size, digest, options = (data.get(k) for k in ("path", "size", "blake2b", "options"))
    if not (isinstance(path, str) and isinstance(size, int) and isinstance(digest, str) and isinstance(options, str)):
        return
    mtime = data.get("mtime_ns")
    entry = Entry(size, mtime if isinstance(mtime, int) else None, digest, options)
    known.setdefault(path, []).append(entry)


class _Appender:
    """One manifest file opened for appending; each call is one ``write`` of whole lines."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        size = os.fstat(self.fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":  # a line torn by a killed run: end it so ours stay whole
                    self.write([])

    def write(self, lines: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(line) + "\n" for line in lines).encode("ascii") or b"\n"
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def close(self) -> None:
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)


class Manifest:
    """The manifests of a run's output roots: verdicts on existing outputs, and new lines.

    Args:
        roots: the folders whose manifests cover the outputs (``-o``, or each input's output root).
        settings: what determines the bytes of this run's outputs (:func:`fingerprint` of its setup);
            outputs are compared against its :func:`fingerprint_id`.
        run_id: the run's id (the report's), written on every line.
        shard: the ``--shard`` of the run, which names the manifest file it writes.

    Thread-safe. Files are read on first use of a root and opened for writing on the first
    line for it; :meth:`close` fsyncs and closes them.
    """

    def __init__(
        self, roots: Iterable[Path], settings: dict[str, Any], run_id: str, shard: tuple[int, int] = (0, 1)
    ) -> None:
        # deepest first, so a task belongs to the innermost root that holds it
        self.roots = sorted({Path(r) for r in roots}, key=lambda r: len(r.parts), reverse=True)
        self.settings = settings
        self.options = fingerprint_id(self.settings)
        self.run_id = run_id
        self.name = manifest_name(shard)
        self._known: dict[Path, dict[str, list[Entry]]] = {}
        self._files: dict[Path, _Appender] = {}
        self._lock = threading.Lock()

    def locate(self, dst: Path) -> tuple[Path, str]:
        """The root whose manifest covers ``dst`` and the path relative to it (POSIX)."""
        for root in self.roots:
            try:
                return root, dst.relative_to(root).as_posix()
            except ValueError:
                continue
        return dst.parent, dst.name

    def _paths(self, root: Path) -> dict[str, list[Entry]]:
        with self._lock:
            if root not in self._known:
                self._known[root] = _read_manifests(root)
            return self._known[root]

    def verdict(self, dst: Path) -> str:
        """:data:`ABSENT`, :data:`CURRENT`, :data:`STALE` or :data:`FOREIGN` for the output path ``dst``."""
        try:
            st = os.lstat(dst)
        except FileNotFoundError:
            return ABSENT
        except OSError:  # an unusable path: the write will fail with the reason
            return ABSENT
        if not stat.S_ISREG(st.st_mode):
            return FOREIGN
        root, rel = self.locate(dst)
        known = self._paths(root).get(rel)
        if known is None:
            return FOREIGN
        same = [e for e in known if e.size == st.st_size]
        if not same:
            return STALE
        intact = [e for e in same if e.mtime_ns == st.st_mtime_ns]
        if not intact:
            try:
                digest = file_hash(dst)
            except OSError:
                return STALE
            intact = [e for e in same if e.blake2b == digest]
        return CURRENT if any(e.options == self.options for e in intact) else STALE

    def claim(self, paths: Iterable[Path]) -> None:
        """Name ``paths`` as gpu_kquant's before any worker writes them."""
        by_root: dict[Path, list[dict[str, Any]]] = {}
        for dst in paths:
            root, rel = self.locate(dst)
            by_root.setdefault(root, []).append({"claim": rel, "run": self.run_id})
        for root, lines in by_root.items():
            for start in range(0, len(lines), 4096):  # writes of a few hundred KB
                self._append(root, lines[start : start + 4096])

    def record(self, dst: Path, size: int, digest: str) -> None:
        """Add the entry of an output now in place at ``dst`` (``size`` bytes, :func:`content_hash` ``digest``)."""
        root, rel = self.locate(dst)
        try:
            mtime: int | None = os.stat(dst).st_mtime_ns
        except OSError:
            mtime = None
        line = {"path": rel, "size": size, "mtime_ns": mtime, "blake2b": digest, "options": self.options}
        self._append(root, [{**line, "run": self.run_id}])

    def record_file(self, dst: Path) -> None:
        """:meth:`record` a file now in place at ``dst``, hashing it (a shard, a palette file)."""
        self.record(dst, os.stat(dst).st_size, file_hash(dst))

    def foreign_reason(self, dst: Path) -> str | None:
        """The one-line reason ``dst`` must not be written (:data:`FOREIGN`), or None."""
        if self.verdict(dst) != FOREIGN:
            return None
        return f"output {dst} exists and was not written by gpu_kquant; move it or choose another -o"

    def _append(self, root: Path, lines: list[dict[str, Any]]) -> None:
        with self._lock:
            appender = self._files.get(root)
            if appender is None:
                appender = _Appender(root / self.name)
                header = {"run": self.run_id, "options": self.options, "settings": self.settings}
                appender.write([{**header, "version": __version__, "time": round(time.time(), 3)}])
                self._files[root] = appender
            appender.write(lines)

    def close(self) -> None:
        """Fsync and close every manifest file this run wrote."""
        with self._lock:
            files, self._files = list(self._files.values()), {}
        for appender in files:
            appender.close()


def open_manifest(job: Job, run: RunOptions, setup: RunSetup, run_id: str) -> Manifest:
    """The manifest of a planned run: in ``-o``, else in each input's output root."""
    roots = [job.out_dir] if run.output.out is not None else job.roots
    return Manifest(roots, fingerprint(setup), run_id, run.engine.shard)
