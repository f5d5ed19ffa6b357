"""Argument types of the command line: each turns text into a value or raises argparse's usage error.

Also :func:`fit_options`, the fit flags read as one :class:`~gpu_kquant.options.FitOptions`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from .options import FitOptions

__all__ = ["argument_type", "fit_options", "glue_negative_values", "positive", "quality", "shard"]


def shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 0/4, got {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"the shard count N must be at least 1, got {text!r}")
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"the shard index I must be in 0..{count - 1} (0-based), got {text!r}")
    return index, count


def glue_negative_values(argv: list[str]) -> list[str]:
    """``--shard -1/2`` as ``--shard=-1/2``: argparse takes a value starting with '-' for a flag."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--shard" and arg[:1] == "-" and arg[1:2].isdigit():
            out[-1] = f"--shard={arg}"
        else:
            out.append(arg)
    return out


def bare_flag_value(argv: list[str], flag: str, values: Sequence[str], value: str) -> list[str]:
    """``flag`` given without one of its ``values`` (last, or before an input or another flag) as ``flag value``.

    So ``--dither photos/`` dithers ``photos/`` with the default kind instead of failing on
    the kind "photos/"; a misspelt kind still fails, as an input that does not exist.
    """
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == flag and (i + 1 == len(argv) or argv[i + 1] not in values):
            out.append(value)
    return out


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its ValueError becomes argparse's one-line usage error."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__  # argparse names the type in its message
    return convert


def quality(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX in PSNR dB such as 30-40, got {text!r}") from None
    if not 0 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected 0 <= MIN <= MAX, got {text!r}")
    return low, high


def fit_options(args: argparse.Namespace) -> FitOptions:
    """-k, --space, --seed, --n-init, --max-iter and --exact-fit as one FitOptions (files and datasets alike)."""
    exact = True if args.exact_fit else None  # None: the default, on under --dither adaptive
    return FitOptions(
        k=args.k, space=args.space, seed=args.seed, n_init=args.n_init, max_iter=args.max_iter, exact_finish=exact
    )
