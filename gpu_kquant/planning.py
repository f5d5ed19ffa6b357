"""Planning a run: inputs walked into tasks, output names, shards, and the report's path.

Pure bookkeeping on paths: nothing here decodes an image or writes an output. Output
names follow :mod:`gpu_kquant.naming` (mirrored tree, unique names, length limits). A
task's ``key`` is stable across machines, so ``--shard`` and the split between devices
are the same everywhere.

Nothing is ever dropped without a word: a folder that cannot be read, a file symlink
loop, a name too long for the file system each become a task that carries its
``error`` and gets a ``failed`` row without being decoded. Where outputs go is checked
before anything starts (:func:`plan_job`): an output folder that is, is inside, or
contains an input folder, a report inside an input folder, an ``-o`` that is a file or
cannot be written in are usage errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .imagefiles import IMAGE_EXTENSIONS, TEMP_PREFIX
from .naming import display_path, fold, length_error, unique_outputs
from .options import RunOptions

__all__ = [
    "DEFAULT_REPORT",
    "MANIFEST_PREFIX",
    "Job",
    "JobError",
    "Task",
    "all_shards",
    "output_path_for",
    "plan_job",
    "plan_tasks",
    "remove_stale_temps",
    "shard_of",
    "split_tasks",
]

DEFAULT_REPORT = "gpu_kquant_report.jsonl"
MANIFEST_PREFIX = "gpu_kquant_manifest"
"""gpu_kquant.manifest's files (``gpu_kquant_manifest[.shard-I-of-N].jsonl``): the outputs a run wrote."""
_STALE_TEMP_SECONDS = 600
_MANIFEST_BYTES = 256 << 20  # a manifest line is ~200 bytes: a million outputs fit


class JobError(Exception):
    """A problem with the run as a whole (not with one file); the message is one line."""


@dataclass(frozen=True)
class Task:
    """One input and where its output goes; ``key`` is stable across machines.

    ``src`` is a file today; a sample inside a container (WebDataset, Parquet) will be
    another kind of task read by :func:`gpu_kquant.worker.read_task`, the one place
    that turns a task into pixels. ``error``: why the task cannot run (a folder that
    cannot be read, a symlink loop, a name too long); it then gets a ``failed`` row with
    that reason and is never decoded.
    """

    src: Path
    dst: Path
    key: str
    error: str | None = None


@dataclass
class Job:
    """A planned run: the tasks of this shard, where outputs and the report go.

    ``own_outputs``: image files left out because an earlier run wrote them (listed in
    a manifest beside them), over all shards.
    """

    tasks: list[Task]
    ignored: int
    roots: list[Path]
    report: Path
    out_dir: Path
    own_outputs: int = 0


@dataclass
class _Walked:
    """What walking every input gave, over all shards."""

    tasks: list[Task] = field(default_factory=list)
    ignored: int = 0
    own_outputs: int = 0


def shard_of(key: str, count: int) -> int:
    """Deterministic shard (0..count-1) of a task key, the same on every machine."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count


def split_tasks(tasks: list[Task], parts: int, sharded: bool = False) -> list[list[Task]]:
    """Deal tasks to ``parts`` workers with the deterministic split of ``--shard``.

    Inside a run that is itself one shard of several, the key is salted: all its
    tasks share one residue of the outer split, which would send them to one worker.
    """
    out: list[list[Task]] = [[] for _ in range(parts)]
    for task in tasks:
        out[shard_of(task.key + "#device" if sharded else task.key, parts)].append(task)
    return out


def output_path_for(src: Path, root: Path, out_root: Path, fmt: str) -> Path:
    """Mirror ``src`` (inside ``root``) under ``out_root`` with the format's extension."""
    return (out_root / src.relative_to(root)).with_suffix("." + fmt)


def _manifest_outputs(folder: str, names: list[str]) -> set[str]:
    """Folded paths of the outputs listed in the manifests among ``names`` (files of ``folder``)."""
    listed: set[str] = set()
    for name in names:
        if not (name.startswith(MANIFEST_PREFIX) and name.endswith(".jsonl")):
            continue
        with contextlib.suppress(OSError), open(os.path.join(folder, name), "rb") as f:
            for line in f.read(_MANIFEST_BYTES).splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                rel = entry.get("path", entry.get("claim")) if isinstance(entry, dict) else None
                if isinstance(rel, str):
                    listed.add(fold(os.path.join(folder, rel)))
    return listed


def _walk_dir(root: Path, exclude: set[str], errors: list[OSError], own: set[str]) -> Iterator[Path]:
    """Files under ``root`` in sorted order; symlinked folders followed once (no loops).

    Folders that cannot be listed go to ``errors``; the outputs named by manifests met on
    the way go to ``own`` (folded paths).
    """
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=errors.append, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or fold(real) in exclude:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if fold(os.path.realpath(os.path.join(dirpath, d))) not in exclude)
        own |= _manifest_outputs(dirpath, filenames)
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _default_root(folder: Path, k: int) -> Path:
    """``DIR_k<k>`` beside a folder; ``.``, ``..`` and ``x/..`` are resolved first, so it is beside, not inside."""
    base = folder.resolve() if folder.name in ("", "..") else folder
    return base.parent / f"{base.resolve().name}_k{k}"


def _output_roots(run: RunOptions) -> list[tuple[Path, Path, bool]]:
    """(input, output root, is a folder) per distinct input; an input given twice counts once."""
    out, k = run.output.out, run.fit.k
    inputs: dict[str, Path] = {}
    for inp in run.inputs:
        inputs.setdefault(os.path.abspath(inp), inp)  # not folded (a.png, A.png) nor resolved (a link is an input)
    roots: list[tuple[Path, Path, bool]] = []
    taken: set[str] = set()
    for inp in inputs.values():
        is_dir = inp.is_dir()
        if out is None:
            out_root = _default_root(inp, k) if is_dir else inp.parent
        elif len(inputs) == 1 or not is_dir:
            out_root = out
        else:  # one subfolder per input folder; the same name twice gets _2, _3 (checked like output names)
            name, n = Path(os.path.realpath(inp)).name, 1
            out_root = out / name
            while fold(out_root) in taken:
                n += 1
                out_root = out / f"{name}_{n}"
            taken.add(fold(out_root))
        roots.append((inp, out_root, is_dir))
    return roots


def _within(inner: str, outer: str) -> bool:
    return inner != outer and inner.startswith(outer.rstrip(os.sep) + os.sep)


def _check_locations(roots: list[tuple[Path, Path, bool]], report: Path) -> None:
    """Refuse output folders and a report that overlap the inputs (names compared case-insensitively).

    Raises:
        ValueError: one line naming both paths.
    """
    real = {inp: fold(os.path.realpath(inp)) for inp, _, _ in roots}
    folders = [inp for inp, _, is_dir in roots if is_dir]
    for inp, out_root, is_dir in roots:
        out = fold(os.path.realpath(out_root))
        what = f"the output folder {out_root}" if is_dir else f"the output of {inp} goes into {out_root}, which"
        for folder in folders:
            if out == real[folder]:
                raise ValueError(f"{what} is the input folder {folder}; choose another -o")
            if _within(out, real[folder]):
                raise ValueError(f"{what} is inside the input folder {folder}; choose an -o outside it")
            if is_dir and _within(real[folder], out):
                raise ValueError(f"the input folder {folder} is inside the output folder {out_root}; choose another -o")
    where = fold(os.path.realpath(report))
    for inp, _, is_dir in roots:
        if where == real[inp]:
            raise ValueError(f"the report {report} is the input {inp}; choose another --report")
        if is_dir and _within(where, real[inp]):
            raise ValueError(f"the report {report} is inside the input folder {inp}; choose another --report")


def _check_writable(folder: Path) -> None:
    """Refuse an output folder that is a file, lies under a file, or cannot be written in.

    Raises:
        ValueError: one line.
    """
    probe = folder
    while not os.path.lexists(probe) and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        if probe == folder:
            raise ValueError(f"the output folder {folder} is a file, not a folder; choose another -o")
        raise ValueError(f"cannot create the output folder {folder}: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write in the output folder {folder}: {probe} is read-only")


def _walk_error(exc: OSError, inp: Path, out_root: Path) -> Task:
    """The failed task of a folder that could not be listed."""
    path = Path(exc.filename if isinstance(exc.filename, str) else inp)
    rel = os.path.relpath(path, inp)
    key = display_path(f"{inp.resolve().name}/{rel}/")
    return Task(path, out_root / rel, key, f"cannot read folder: {exc.strerror or exc}")


_Found = tuple[Path, Path, str]  # (input file, its output by the mirroring rule, its key)


def _walk_input(inp: Path, out_root: Path, fmt: str, exclude: set[str], walked: _Walked) -> list[_Found]:
    """The image files of one input folder as (src, mirrored dst, key); walk errors become failed tasks.

    Outputs an earlier run listed in a manifest under ``inp`` are left out (counted in
    ``own_outputs``), unless every image under ``inp`` is one: then the folder is itself
    an output folder, given on purpose.
    """
    errors: list[OSError] = []
    own: set[str] = set()
    found: list[_Found] = []
    top = inp.resolve().name
    for src in _walk_dir(inp, exclude, errors, own):
        if src.suffix.lower() not in IMAGE_EXTENSIONS or src.name.startswith(TEMP_PREFIX):
            walked.ignored += 1
            continue
        rel = src.relative_to(inp).as_posix()
        found.append((src, output_path_for(src, inp, out_root, fmt), display_path(f"{top}/{rel}")))
    mine = [f for f in found if fold(f[0]) in own]
    if mine and len(mine) < len(found):
        walked.own_outputs += len(mine)
        found = [f for f in found if fold(f[0]) not in own]
    walked.tasks += [_walk_error(exc, inp, out_root) for exc in errors]
    return found


def _input_error(src: Path, dst: Path) -> str | None:
    """Why an input cannot be processed before it is even opened (its name's length, a symlink loop), or None."""
    reason = length_error(src, dst)
    if reason is not None:
        return reason
    try:
        os.stat(src)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop: the link never reaches a file"
        if exc.errno == errno.ENAMETOOLONG:
            return f"cannot read: {exc.strerror}"
    return None


def _walk(run: RunOptions, roots: list[tuple[Path, Path, bool]]) -> _Walked:
    """Every input of every shard as tasks, with unique output names."""
    fmt, k = run.output.format, run.fit.k
    walked = _Walked()
    exclude = {fold(os.path.realpath(r)) for _, r, is_dir in roots if is_dir or run.output.out is not None}
    found: list[_Found] = []
    for inp, out_root, is_dir in roots:
        if is_dir:
            found += _walk_input(inp, out_root, fmt, exclude, walked)
        else:
            stem = inp.stem if run.output.out is not None else f"{inp.stem}_k{k}"
            found.append((inp, out_root / f"{stem}.{fmt}", display_path(inp.name)))
    names = unique_outputs([src for src, _, _ in found], [dst for _, dst, _ in found], fmt)
    walked.tasks = [
        Task(src, dst, key, _input_error(src, dst)) for (src, _, key), dst in zip(found, names)
    ] + walked.tasks
    return walked


def plan_tasks(run: RunOptions) -> tuple[list[Task], int, list[Path]]:
    """Turn the inputs into tasks.

    Returns:
        The tasks of this shard, the number of non-image files ignored, and the output
        roots (folders written into).
    """
    roots = _output_roots(run)
    walked = _walk(run, roots)
    return _this_shard(walked.tasks, run), walked.ignored, [r for _, r, _ in roots]


def _this_shard(tasks: list[Task], run: RunOptions) -> list[Task]:
    """The tasks of ``--shard I/N`` (all of them without it)."""
    index, count = run.engine.shard
    return tasks if count == 1 else [t for t in tasks if shard_of(t.key, count) == index]


def plan_job(run: RunOptions) -> Job:
    """Check where outputs go, walk the inputs, and decide every output path and the report path.

    Raises:
        ValueError: an output folder or the report overlaps an input, or an output folder
            cannot be used (see :func:`_check_locations`, :func:`_check_writable`).
    """
    roots = _output_roots(run)
    out_dir = run.output.out or roots[0][1]
    report = run.output.report
    if report is None:
        index, count = run.engine.shard
        shard = "" if count == 1 else f".shard-{index}-of-{count}"
        report = out_dir / DEFAULT_REPORT.replace(".jsonl", f"{shard}.jsonl")
    _check_locations(roots, report)
    for out_root in dict.fromkeys(r for _, r, _ in roots):
        _check_writable(out_root)
    walked = _walk(run, roots)
    tasks = _this_shard(walked.tasks, run)
    return Job(tasks, walked.ignored, [r for _, r, _ in roots], report, out_dir, walked.own_outputs)


def all_shards(run: RunOptions) -> RunOptions:
    """The same run over every shard (a shared palette is fitted on all inputs)."""
    return dataclasses.replace(run, engine=dataclasses.replace(run.engine, shard=(0, 1)))


def remove_stale_temps(roots: list[Path]) -> None:
    """Delete temporary files a killed run left behind (old enough not to be in use)."""
    now = time.time()
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, _, filenames in os.walk(root):
            for name in filenames:
                if name.startswith(TEMP_PREFIX) and name.endswith(".tmp"):
                    path = os.path.join(dirpath, name)
                    with contextlib.suppress(OSError):
                        if now - os.path.getmtime(path) > _STALE_TEMP_SECONDS:
                            os.unlink(path)
