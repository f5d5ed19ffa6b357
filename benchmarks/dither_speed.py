"""What dithering costs a folder run (``python -m benchmarks.dither_speed``).

The command line on the folder of photos of :mod:`benchmarks.pipeline` (whole process timed, median
of ``--repeats``) without dithering, with ``--dither fs`` and with ``--dither adaptive``, against
pngquant without (``--nofs``) and with its default dithering, two processes at a time. Issue 15 began
with a dithered run at 1.6x the time of an undithered one, its dithering then in the encode stage.
Writes OUT/dither_speed_<machine>_<date>.{csv,md}.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .harness import machine_info, machine_markdown, markdown_table, output_stem, write_csv, write_markdown
from .pipeline import (
    CACHE,
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
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpu_kquant_dither_speed_") as tmp:
        for kind in KINDS:
            work = Path(tmp) / kind
            args.dither = kind
            runs = [run_cli(folder, photos, work, args)]
            if kind != "adaptive" and shutil.which("pngquant"):  # pngquant has one dithering
                runs.append(run_pngquant(folder, photos, work, args))
            for m in runs:
                tool = m.tool if m.tool.startswith("pngquant") else f"gpu_kquant --dither {kind}"
                rows.append({"tool": tool, "seconds": m.timing.seconds, "images_per_s": m.images_per_s})
    base = {r["tool"]: r["seconds"] for r in rows}
    for r in rows:
        plain = base["pngquant --nofs"] if r["tool"].startswith("pngquant") else base["gpu_kquant --dither none"]
        r["vs_undithered"] = r["seconds"] / plain
    cols = [("tool", "tool", ""), ("seconds", "seconds", ".2f"), ("images_per_s", "images/s", ".2f"),
            ("vs_undithered", "time vs the same tool undithered", ".2f")]  # fmt: skip
    stem = output_stem("dither_speed", info)
    write_csv(rows, args.out / f"{stem}.csv")
    title = f"# What dithering costs a folder run: {len(photos)} photos, k = {args.k} (CPU)"
    md = [title, machine_markdown(info), markdown_table(rows, cols)]
    print(write_markdown(md, args.out, stem, started).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
