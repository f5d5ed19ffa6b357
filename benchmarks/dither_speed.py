"""What dithering costs a folder run (``python -m benchmarks.dither_speed``).

The command line on the folder of photos of :mod:`benchmarks.pipeline` (whole process timed, median
of ``--repeats``) without dithering, with ``--dither fs`` and with ``--dither adaptive``, against
pngquant without (``--nofs``) and with its default dithering, two processes at a time. Issue 15 began
with a dithered run at 1.6x the time of an undithered one, its dithering then in the encode stage.
The five tools run in turn, round after round, so a slow spell of a shared VM falls on all of them
(one tool's repeats back to back put it on one tool); the CPU seconds of the child processes
(user + system) are reported beside the wall time, as they are unaffected by waiting for a CPU.
Writes OUT/dither_speed-<photos>_<machine>_<date>.{csv,md}.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .harness import machine_info, machine_markdown, markdown_table, output_stem, write_csv, write_markdown
from .pipeline import (
    CACHE,
    Measurement,
    _warm_page_cache,
    folder_plan,
    photo_folder,
    run_cli,
    run_pngquant,
)
from .quality import RESULTS

KINDS = ("none", "fs", "adaptive")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dither_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=12, help="photos in the folder")
    p.add_argument("--megapixels", type=float, nargs="+", default=[0.25, 1.0], help="photo sizes, cycled")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--pngquant-jobs", type=int, default=2)
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.device, args.workers, args.batch_size = "cpu", None, None  # what run_cli reads
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started, info = time.time(), machine_info()
    photos = folder_plan(args.images, args.megapixels)
    folder = photo_folder(photos, args.cache, f"n{args.images}_mp{'-'.join(f'{m:g}' for m in args.megapixels)}")
    _warm_page_cache(folder, photos)
    times: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_kquant_dither_speed_") as tmp:
        for round_ in range(args.repeats):
            for tool, run in _tools(args):
                work = Path(tmp) / f"{tool.replace(' ', '_')}-{round_}"
                cpu = _child_cpu()
                m = run(folder, photos, work, args)
                times.setdefault(tool, []).append((m.timing.seconds, _child_cpu() - cpu))
    rows: list[dict[str, Any]] = []
    for tool, runs in times.items():
        seconds = statistics.median(t for t, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        rows.append({"tool": tool, "seconds": seconds, "images_per_s": len(photos) / seconds, "cpu_seconds": cpu})
    base = {r["tool"]: r["seconds"] for r in rows}
    for r in rows:
        plain = base["pngquant --nofs"] if r["tool"].startswith("pngquant") else base["gpu_kquant --dither none"]
        r["vs_undithered"] = r["seconds"] / plain
    cols = [("tool", "tool", ""), ("seconds", "seconds", ".2f"), ("images_per_s", "images/s", ".2f"),
            ("cpu_seconds", "CPU seconds", ".2f"),
            ("vs_undithered", "time vs the same tool undithered", ".2f")]  # fmt: skip
    stem = output_stem(f"dither_speed-{len(photos)}", info)  # the folder size in the name
    write_csv(rows, args.out / f"{stem}.csv")
    title = f"# What dithering costs a folder run: {len(photos)} photos, k = {args.k} (CPU)"
    md = [title, machine_markdown(info), markdown_table(rows, cols)]
    print(write_markdown(md, args.out, stem, started).read_text())
    return 0


def _tools(args: argparse.Namespace) -> list[tuple[str, Callable[..., Measurement]]]:
    """(tool name, one timed run) in the order of a round; pngquant where it is installed."""
    tools: list[tuple[str, Callable[..., Measurement]]] = []
    for kind in KINDS:
        tools.append((f"gpu_kquant --dither {kind}", _once(run_cli, kind)))
        if kind != "adaptive" and shutil.which("pngquant"):  # pngquant has one dithering
            tools.append(("pngquant (dithered)" if kind == "fs" else "pngquant --nofs", _once(run_pngquant, kind)))
    return tools


def _once(run: Callable[..., Measurement], kind: str) -> Callable[..., Measurement]:
    """``run`` for one repeat with ``--dither kind``."""

    def call(folder: Path, photos: Sequence[Any], work: Path, args: argparse.Namespace) -> Measurement:
        return run(folder, photos, work, argparse.Namespace(**{**vars(args), "dither": kind, "repeats": 1}))

    return call


def _child_cpu() -> float:
    """User + system CPU seconds of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    raise SystemExit(main())
