"""Small-image dataset throughput (``python -m benchmarks.crops``): photo crops, folder to folder.

``--count`` (300) square crops of ``--size`` (256) pixels, cut deterministically from the
ten photos bundled with scikit-learn and scikit-image (``benchmarks/images.py``; the
three photos in ``gpu_kquant/samples`` are pixel-identical copies of three of them),
an equal share from each, are written once as PNG to ``benchmarks/.cache/crops/``.
At each k the folder goes through the ``gpu_kquant`` command line (whole process
timed, default workers),
``gpu_kquant.engine_local.run_local`` in a fresh process (the decode / quantize / encode split),
the same pipeline with quantization replaced by a lookup (the decode + encode only
bound) and ``pngquant --nofs`` two processes at a time. Reported: images/s (median of
``--repeats`` runs), mean PSNR of each tool's files against the crops and mean output
bytes. Targets (issue 10): the CLI at least 2x pngquant's throughput at k=16 and
k=256, with mean PSNR at least pngquant's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import pipeline as pl
from .harness import (
    busy_warning,
    machine_info,
    machine_markdown,
    markdown_table,
    output_stem,
    write_csv,
    write_markdown,
)
from .images import PHOTOS, photo, save_png

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parent / ".cache" / "crops"
MIN_SPEEDUP = 2.0  # CLI throughput over pngquant --nofs, at every k (issue 10)
QUICK = {"count": 10, "repeats": 1}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.crops", description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=300, help="crops in the folder")
    p.add_argument("--size", type=int, default=256, help="crop width and height in pixels")
    p.add_argument("--k", nargs="+", type=int, default=[16, 256], help="palette sizes")
    p.add_argument("--repeats", type=int, default=3, help="runs per tool (fresh output folder each); median reported")
    p.add_argument("--workers", type=int, default=None, help="gpu_kquant decode/encode threads (default: its own)")
    p.add_argument("--batch-size", type=int, default=None, help="gpu_kquant images per batch (default: its own)")
    p.add_argument("--device", default="auto", help="gpu_kquant device: auto, cpu, cuda or cuda:N")
    p.add_argument("--pngquant-jobs", type=int, default=2, help="pngquant processes at a time")
    p.add_argument("--skip-stages", action="store_true", help="leave out the in-process pipeline.run (stage split)")
    p.add_argument("--skip-bound", action="store_true", help="leave out the decode + encode only bound")
    p.add_argument("--cache", type=Path, default=CACHE, help="where the crop folder is written once")
    p.add_argument("--quick", action="store_true", help="tiny smoke-test configuration (10 crops, one run)")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.count < 1 or args.repeats < 1 or args.pngquant_jobs < 1 or args.size < 8:
        p.error("--count, --repeats and --pngquant-jobs must be at least 1, --size at least 8")
    return args


# ----------------------------------------------------------------------------- the crops


def crop_plan(count: int, size: int) -> list[tuple[str, str, int, int]]:
    """``count`` crops as (file name, photo, top, left): crop ``i`` from photo ``i`` mod the photo count.

    Equal shares rather than shares by area: by area the two large scientific images
    (retina, hubble_deep_field) would make up 58 % of 300 crops. Crop ``i`` takes its
    position from its own seeded generator, so the plan depends only on ``count`` and
    ``size``; photos smaller than ``size`` are left out.
    """
    names = [n for n in PHOTOS if min(photo(n).shape[:2]) >= size]
    if not names:
        raise ValueError(f"no bundled photo is at least {size}x{size}")
    plan = []
    for i in range(count):
        name = names[i % len(names)]
        h, w = photo(name).shape[:2]
        rng = np.random.default_rng(20_000 + i)
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        plan.append((f"crop{i:03d}_{name}_{top}-{left}.png", name, top, left))
    return plan


def crop_folder(count: int, size: int, cache: Path) -> tuple[Path, list[pl.Photo]]:
    """The folder of crops, written once (into a temporary folder renamed into place), and its files."""
    plan = crop_plan(count, size)
    files = [pl.Photo(fname, size, size, i) for i, (fname, _, _, _) in enumerate(plan)]
    folder = cache / f"n{count}_s{size}"
    if folder.is_dir() and sorted(p.name for p in folder.iterdir()) == sorted(f.name for f in files):
        return folder, files
    print(f"writing {count} crops of {size}x{size} to {folder} (once)", flush=True)
    tmp = cache / f".n{count}_s{size}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for fname, name, top, left in plan:
        save_png(np.ascontiguousarray(photo(name)[top : top + size, left : left + size]), tmp / fname)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder, files


# ----------------------------------------------------------------------------- one k


def run_k(folder: Path, files: list[pl.Photo], k: int, work: Path, args: argparse.Namespace) -> list[pl.Measurement]:
    """Every tool on the crop folder at one k (``benchmarks.pipeline``'s runners with this k)."""
    kargs = argparse.Namespace(**{**vars(args), "k": k})
    work = work / f"k{k}"
    print(f"k={k}: gpu_kquant command line", flush=True)
    results = [pl.run_cli(folder, files, work, kargs)]
    ref = results[0].out_dir
    if not args.skip_stages:
        print(f"k={k}: gpu_kquant.pipeline.run", flush=True)
        results.append(pl.run_in_process(folder, files, work, kargs))
    if not args.skip_bound:
        print(f"k={k}: decode + encode only (quantization replaced by a lookup)", flush=True)
        results.append(pl.run_in_process(folder, files, work, kargs, bound_of=ref))
    if shutil.which("pngquant") is not None:
        print(f"k={k}: pngquant --nofs, {args.pngquant_jobs} at a time", flush=True)
        results.append(pl.run_pngquant(folder, files, work, kargs))
    return results


def k_rows(k: int, results: Sequence[pl.Measurement], images: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``benchmarks.pipeline``'s result rows with k and the mean output bytes per image."""
    rows = pl.result_rows(results, images)
    for row in rows:
        row["k"] = k
        row["mean_bytes"] = row["output_bytes"] / row["scored"] if row.get("scored") else None
    return rows


def check_targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per k: CLI ≥ 2x pngquant's images/s with mean PSNR ≥ pngquant's; mean bytes ≤ pngquant's (informative)."""
    out = []
    for k in sorted({r["k"] for r in rows}):
        by_tool = {r["tool"]: r for r in rows if r["k"] == k}
        ours, ref = by_tool.get("gpu_kquant CLI"), by_tool.get("pngquant --nofs")
        label = f"k={k}: ≥ {MIN_SPEEDUP:g}× pngquant --nofs throughput, mean PSNR ≥ pngquant's"
        bytes_label = f"k={k}: mean output bytes ≤ pngquant --nofs's"
        if not (ours and ref):
            out += [{"target": t, "measured": "–", "verdict": "not measured"} for t in (label, bytes_label)]
            continue
        ratio = ours["images_per_s"] / ref["images_per_s"]
        gain = ours["mean_psnr"] - ref["mean_psnr"]
        measured = (
            f"{ratio:.2f}× ({ours['images_per_s']:.1f} vs {ref['images_per_s']:.1f} images/s); "
            f"mean PSNR {ours['mean_psnr']:.2f} vs {ref['mean_psnr']:.2f} dB ({gain:+.2f})"
        )
        out.append({"target": label, "measured": measured, "verdict": _met(ratio >= MIN_SPEEDUP and gain >= 0)})
        size = ours["mean_bytes"] / ref["mean_bytes"]
        measured = f"{size:.3f}× ({ours['mean_bytes']:.0f} vs {ref['mean_bytes']:.0f} bytes)"
        out.append({"target": bytes_label, "measured": measured, "verdict": _met(size <= 1.0)})
    return out


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


COLUMNS = [("k", "k", "d"), *pl.RESULT_COLUMNS[:6], ("mean_bytes", "mean bytes", ".0f"), ("note", "note", "")]

HOW_MEASURED = """\
- Crops: `--count` squares of `--size` pixels from the ten bundled photos, crop `i` from photo
  `i mod 10` at a position drawn by its own seeded generator; written once as PNG (Pillow defaults)
  and read once before any timing so the page cache is warm.
- gpu_kquant CLI: wall clock of the whole `python -m gpu_kquant CROPS -k K -o OUT --quiet --overwrite
  --device auto` process (start-up included; default workers and batch size unless given). The
  targets use this figure.
- gpu_kquant pipeline.run: `Summary.seconds` of `gpu_kquant.engine_local.run_local` in a freshly spawned process
  (start-up and imports excluded); the stage split is `Summary.stage_seconds`, summed over threads.
- Decode + encode only: the same pipeline with `gpu_kquant.worker.quantize_items` replaced by a
  lookup of the palettes and indices the CLI wrote (`benchmarks.pipeline`'s bound): what the pipeline
  would cost if quantization were free.
- pngquant: one `pngquant --nofs --force --output OUT/x.png K -- IN/x.png` process per crop,
  `--pngquant-jobs` at a time from a thread pool; the whole batch is timed.
- Seconds are the median of `--repeats` runs, each into a fresh output folder. Quality: every output
  file is decoded with Pillow and compared with its crop (PSNR per channel on 0..255 RGB, mean of dB
  over crops); mean bytes are the output files' sizes as each tool wrote them.
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    info = machine_info()
    if warning := busy_warning(info):
        print(warning)
    folder, files = crop_folder(args.count, args.size, args.cache)
    input_bytes = sum(len((folder / f.name).read_bytes()) for f in files)  # warms the page cache
    print(f"{len(files)} crops of {args.size}x{args.size}, {input_bytes / 1e6:.1f} MB in {folder}", flush=True)
    rows: list[dict[str, Any]] = []
    image_rows: list[dict[str, Any]] = []
    stage_md: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gpu_kquant_crops_") as tmp:
        for k in args.k:
            results = run_k(folder, files, k, Path(tmp), args)
            images = pl.score(folder, files, results)
            rows += k_rows(k, results, images)
            image_rows += [{"k": k, **r} for r in images]
            inproc = next((m for m in results if m.tool == "gpu_kquant pipeline.run"), None)
            bound = next((m for m in results if m.tool == "decode + encode only"), None)
            if inproc is not None:
                stage_md += [f"### k = {k}", pl._stages_markdown(inproc, bound)]
    for row in rows:
        psnr_text = f"  PSNR {row['mean_psnr']:.2f} dB  {row['mean_bytes']:.0f} B" if "mean_psnr" in row else ""
        print(f"k={row['k']:<4} {row['tool']:<24} {row['images_per_s']:8.2f} images/s{psnr_text}")
    targets = check_targets(rows)
    for t in targets:
        print(f"target: {t['target']}: {t['verdict']} — {t['measured']}")
    notes = [] if shutil.which("pngquant") else ["pngquant is not on PATH: its rows and the targets are missing"]
    sources = sorted({name for _, name, _, _ in crop_plan(args.count, args.size)})
    stem = output_stem("crops" + ("-quick" if args.quick else ""), info)
    write_csv(rows, args.out / f"{stem}.csv")
    write_csv(image_rows, args.out / f"{stem}_images.csv")
    md = [
        f"# Small-image throughput: {len(files)} crops of {args.size}x{args.size}",
        f"Command: `python -m benchmarks.crops {' '.join(argv if argv is not None else sys.argv[1:])}`",
        machine_markdown(info),
        f"{len(files)} PNG crops, {input_bytes / 1e6:.1f} MB, from {', '.join(sources)}; written once to "
        f"`{pl._rel(folder)}`. Per-crop figures in `{stem}_images.csv`.",
        "## Results",
        markdown_table(rows, COLUMNS),
        *(f"- note: {n}" for n in notes),
        "## Targets",
        markdown_table(targets, [("target", "target", ""), ("measured", "measured", ""), ("verdict", "verdict", "")]),
        *(
            ["## Where gpu_kquant's time goes (pipeline.run stages, summed over threads)", *stage_md]
            if stage_md
            else []
        ),
        "## How measured",
        HOW_MEASURED,
    ]
    write_markdown(md, args.out, stem, started)
    print(f"wrote {args.out / stem}.* ({(time.time() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
