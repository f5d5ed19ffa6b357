"""Planning a run: inputs walked into tasks, output names, shards, and the report's path.

Pure bookkeeping on paths: nothing here decodes an image or writes an output. The
naming rule: a folder's tree is mirrored under its output root with the format's
extension; inputs that would share an output name (``a.jpg``, ``a.png``) keep their own
extension (``a.jpg.png``). A task's ``key`` is stable across machines, so ``--shard``
and the split between devices are the same everywhere.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .imagefiles import IMAGE_EXTENSIONS, TEMP_PREFIX
from .options import RunOptions

__all__ = [
    "DEFAULT_REPORT",
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
_STALE_TEMP_SECONDS = 600


class JobError(Exception):
    """A problem with the run as a whole (not with one file); the message is one line."""


@dataclass(frozen=True)
class Task:
    """One input and where its output goes; ``key`` is stable across machines.

    ``src`` is a file today; a sample inside a container (WebDataset, Parquet) will be
    another kind of task read by :func:`gpu_kquant.worker.read_task`, the one place
    that turns a task into pixels.
    """

    src: Path
    dst: Path
    key: str


@dataclass
class Job:
    """A planned run: the tasks of this shard, where outputs and the report go."""

    tasks: list[Task]
    ignored: int
    roots: list[Path]
    report: Path
    out_dir: Path


def shard_of(key: str, count: int) -> int:
    """Deterministic shard (0..count-1) of a task key, the same on every machine."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
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


def _walk_dir(root: Path, exclude: set[Path]) -> Iterator[Path]:
    """Files under ``root`` in sorted order; symlinked folders followed once (no loops)."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or Path(real) in exclude:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if Path(os.path.realpath(os.path.join(dirpath, d))) not in exclude)
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _output_roots(run: RunOptions) -> list[tuple[Path, Path, bool]]:
    """(input, output root, is a folder) per input.

    Raises:
        ValueError: when an output folder is an input folder.
    """
    out, k = run.output.out, run.fit.k
    roots: list[tuple[Path, Path, bool]] = []
    names: collections.Counter[str] = collections.Counter()
    for inp in run.inputs:
        is_dir = inp.is_dir()
        base = inp if is_dir else inp.parent
        if out is None:
            out_root = base.parent / f"{base.resolve().name}_k{k}" if is_dir else base
        elif len(run.inputs) == 1 or not is_dir:
            out_root = out
        else:
            names[inp.name] += 1
            suffix = "" if names[inp.name] == 1 else f"_{names[inp.name]}"
            out_root = out / f"{inp.resolve().name}{suffix}"
        if is_dir and out_root.resolve() == inp.resolve():
            raise ValueError(f"the output folder is the input folder {inp}; choose another -o")
        roots.append((inp, out_root, is_dir))
    return roots


def plan_tasks(run: RunOptions) -> tuple[list[Task], int, list[Path]]:
    """Turn the inputs into tasks.

    Raises:
        ValueError: when an output folder is an input folder.

    Returns:
        The tasks of this shard, the number of non-image files ignored, and the output
        roots (folders written into).
    """
    fmt, k = run.output.format, run.fit.k
    roots = _output_roots(run)
    tasks: list[Task] = []
    ignored = 0
    exclude = {Path(os.path.realpath(r)) for _, r, is_dir in roots if is_dir or run.output.out is not None}
    for inp, out_root, is_dir in roots:
        if not is_dir:
            stem = inp.stem if run.output.out is not None else f"{inp.stem}_k{k}"
            tasks.append(Task(inp, out_root / f"{stem}.{fmt}", inp.name))
            continue
        for src in _walk_dir(inp, exclude):
            if src.suffix.lower() not in IMAGE_EXTENSIONS or src.name.startswith(TEMP_PREFIX):
                ignored += 1
                continue
            rel = src.relative_to(inp).as_posix()
            tasks.append(Task(src, output_path_for(src, inp, out_root, fmt), f"{inp.resolve().name}/{rel}"))
    tasks = _resolve_collisions(tasks, fmt)
    index, count = run.engine.shard
    if count > 1:
        tasks = [t for t in tasks if shard_of(t.key, count) == index]
    return tasks, ignored, [r for _, r, _ in roots]


def _resolve_collisions(tasks: list[Task], fmt: str) -> list[Task]:
    """Inputs that would share an output name (a.jpg and a.png) keep their extension."""
    by_dst = collections.Counter(t.dst for t in tasks)
    return [Task(t.src, t.dst.with_name(f"{t.src.name}.{fmt}"), t.key) if by_dst[t.dst] > 1 else t for t in tasks]


def plan_job(run: RunOptions) -> Job:
    """Walk the inputs and decide every output path and the report path.

    Raises:
        ValueError: when an output folder is an input folder.
    """
    tasks, ignored, roots = plan_tasks(run)
    out_dir = run.output.out or roots[0]
    report = run.output.report
    if report is None:
        index, count = run.engine.shard
        shard = "" if count == 1 else f".shard-{index}-of-{count}"
        report = out_dir / DEFAULT_REPORT.replace(".jsonl", f"{shard}.jsonl")
    return Job(tasks, ignored, roots, report, out_dir)


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
