"""Report rows that need no image: skipped, failed, and the decode failure of one task.

One definition each, used by every engine and by the worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .imagefiles import DecodeError
from .manifest import CURRENT, FOREIGN, Manifest
from .options import OutputOptions
from .planning import Task
from .report import Row

__all__ = ["decode_failure_row", "failed_row", "precheck"]


def failed_row(task: Task, k: int, reason: str, **extra: Any) -> Row:
    """A failed row with a one-line reason."""
    return Row(str(task.src), str(task.dst), "failed", reason=reason, k=k, **extra)


def decode_failure_row(task: Task, k: int, exc: Exception) -> Row:
    """The failed row of an input that could not be decoded (a :class:`DecodeError` carries its reason)."""
    if isinstance(exc, DecodeError):
        return failed_row(task, k, str(exc))
    return failed_row(task, k, f"cannot decode: {type(exc).__name__}: {exc}")


def precheck(task: Task, output: OutputOptions, k: int, inputs: set[Path], manifest: Manifest) -> Row | None:
    """The row of a task that needs no work or must not run, else None.

    ``inputs`` are the resolved paths of every input of the run: an output never replaces
    one. ``manifest`` says whether an existing output is gpu_kquant's: a file it did not
    write is never replaced (a ``failed`` row, even with ``--overwrite``); one it wrote with
    these options and intact is ``skipped`` unless ``--overwrite``; any other is redone.
    A task planning found unusable (``task.error``) fails here, never decoded.
    """
    if task.error is not None:
        return failed_row(task, k, task.error)
    if task.dst.resolve() in inputs:
        return failed_row(task, k, "output path is an input file; choose another -o or --format")
    verdict = manifest.verdict(task.dst)
    if verdict == FOREIGN:
        reason = f"output {task.dst} exists and was not written by gpu_kquant; move it or choose another -o"
        return failed_row(task, k, reason)
    if verdict == CURRENT and not output.overwrite:
        return Row(str(task.src), str(task.dst), "skipped", reason="output exists", k=k)
    return None
