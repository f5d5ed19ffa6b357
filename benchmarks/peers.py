"""gpu_kquant against every peer, speed and quality side by side (``python -m benchmarks.peers``).

Runs every available method (see :mod:`benchmarks.methods`) on every image at every
k, each measurement in a fresh process, and writes a CSV, a Markdown report with
the targets checked from the data, and a speed-versus-quality plot to
``benchmarks/results/`` under a name with the machine and the date. ``--scaling``
adds time-against-megapixels and time-against-k curves; on a CUDA machine a GPU
throughput section (``quantize_batch`` on batches of 2560x1600 mosaics) is added.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import methods as methods_mod
from . import report
from .harness import (
    Outcome,
    Scorer,
    add_image_args,
    busy_warning,
    canonical,
    machine_info,
    machine_markdown,
    markdown_table,
    mse,
    output_stem,
    psnr,
    run_method,
    time_call,
    write_csv,
    write_markdown,
)
from .images import MOSAIC_SIZE, distinct_colors, image_of_size, load_images, mosaic, save_png
from .methods import Method

RESULTS = Path(__file__).resolve().parent / "results"

QUICK = {
    "images": ["0.1mp"],
    "k": [16, 256],
    "repeats": 1,
    "de_samples": 20_000,
    "timeout": 300.0,
    "scaling_mp": [0.05, 0.1, 0.2],
    "scaling_k": [8, 16, 64],
    "scaling_k_mp": 0.1,
    "throughput_batches": [1, 2],
    "throughput_k": [16],
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0])
    add_image_args(p)
    p.add_argument("--k", nargs="+", type=int, default=[8, 16, 64, 256], help="palette sizes")
    p.add_argument("--include", nargs="+", help="only these methods (names, shell patterns or families)")
    p.add_argument("--exclude", nargs="+", default=[], help="leave out these methods (names, patterns or families)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; the median is reported")
    p.add_argument(
        "--single-run-above",
        type=float,
        default=10.0,
        help="a warm-up slower than this many seconds is the only (reported) run",
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per method, image and k")
    p.add_argument("--de-samples", type=int, default=200_000, help="pixels in the fixed CIEDE2000 subsample")
    p.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run each measurement in a fresh spawned process (needed for peak memory)",
    )
    p.add_argument("--scaling", action="store_true", help="also measure time against megapixels and against k")
    p.add_argument("--scaling-only", action="store_true", help="only the scaling curves (implies --scaling)")
    p.add_argument("--scaling-mp", nargs="+", type=float, default=[0.25, 1.0, 4.0, 16.0])
    p.add_argument("--scaling-k", nargs="+", type=int, default=[8, 16, 64, 256])
    p.add_argument("--scaling-k-mp", type=float, default=4.096, help="image size of the time-against-k curve")
    p.add_argument(
        "--scaling-peers",
        nargs="+",
        help="peers on the scaling curves (default: the two fastest peers at k=16 of the main run)",
    )
    p.add_argument(
        "--throughput",
        choices=["auto", "on", "off"],
        default="auto",
        help="quantize_batch megapixels/s section: auto = only when CUDA is available; on = also on CPU",
    )
    p.add_argument("--throughput-batches", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--throughput-k", nargs="+", type=int, default=[16, 256])
    p.add_argument("--quick", action="store_true", help="tiny configuration for smoke tests (overrides sizes)")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    p.add_argument("--list", action="store_true", help="list the methods and whether they can run, then exit")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    args.scaling = args.scaling or args.scaling_only
    return args


def available_methods(include: Sequence[str] | None, exclude: Sequence[str]) -> list[Method]:
    """Selected methods that can run here; prints a note for each one skipped."""
    out = []
    for method in methods_mod.select(include, exclude):
        reason = method.missing()
        if reason:
            print(f"note: skipping {method.name}: {reason}")
        else:
            out.append(method)
    return out


def _status(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"timeout ({exc})"
    text = f"error: {type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return text[:200]


def measure(
    method: Method, name: str, image: Any, k: int, args: argparse.Namespace, workdir: Path
) -> tuple[Outcome | None, str]:
    """Run one measurement; (outcome, "ok") or (None, why it failed)."""
    png = workdir / f"{name}.png"
    if method.cli is not None and not png.exists():
        save_png(image, png)
    try:
        outcome = run_method(
            method.name,
            image,
            k,
            repeats=args.repeats,
            single_run_above=args.single_run_above,
            png_path=png,
            workdir=workdir,
            isolate=args.isolate,
            timeout=args.timeout,
        )
    except Exception as exc:
        return None, _status(exc)
    return outcome, report.OK


def _base_row(method: Method, name: str, image: Any, k: int) -> dict[str, Any]:
    h, w = image.shape[:2]
    return {
        "image": name,
        "width": w,
        "height": h,
        "megapixels": w * h / 1e6,
        "k": k,
        "method": method.name,
        "family": method.family,
        "device": method.device,
        "dither": method.dither,
    }


def run_grid(
    images: dict[str, Any], ks: Sequence[int], methods: Sequence[Method], args: argparse.Namespace, workdir: Path
) -> list[dict[str, Any]]:
    """Every method on every image at every k it supports; one result row each."""
    rows = []
    for name, image in images.items():
        scorer = Scorer(image, args.de_samples)
        for k in ks:
            for method in (m for m in methods if m.supports(k)):
                row = _base_row(method, name, image, k)
                outcome, row["status"] = measure(method, name, image, k, args, workdir)
                if outcome is not None:
                    try:
                        quality = scorer.score(outcome.palette, outcome.indices, outcome.png_bytes)
                    except Exception as exc:
                        row["status"] = _status(exc)
                    else:
                        row.update(
                            seconds=outcome.timing.seconds,
                            runs=len(outcome.timing.runs),
                            mse=quality.mse,
                            psnr=quality.psnr,
                            ciede2000=quality.ciede2000,
                            colors=quality.colors,
                            png_bytes=quality.png_bytes,
                            own_png_bytes=own_png_bytes(method, outcome),
                            peak_mb=outcome.peak_mb,
                            gpu_peak_mb=outcome.gpu_peak_mb,
                        )
                _print_row(row)
                rows.append(row)
    return rows


def own_png_bytes(method: Method, outcome: Outcome) -> int | None:
    """Size of the file the tool itself writes (gpu_kquant rows), or None when it has no own writer."""
    if method.own_png is None or outcome.palette.shape[0] > 256:
        return None
    return len(method.own_png(outcome.palette, outcome.indices))


BYTES_TARGET_K = (16, 64, 256)


def check_bytes_targets(rows: Sequence[dict[str, Any]], ks: Sequence[int] = BYTES_TARGET_K) -> list[dict[str, Any]]:
    """Target "output bytes no larger than pngquant --nofs": gpu_kquant's own PNG against pngquant's own file.

    Rows in the shape of :func:`report.check_targets` (one per k, rgb variant and image).
    """
    ok = {(r["image"], r["k"], r["method"]): r for r in rows if r["status"] == report.OK}
    variants = sorted({r["method"] for r in rows if r["family"] == "gpu_kquant" and r["method"].endswith("-rgb")})
    images = list(dict.fromkeys(r["image"] for r in rows))
    out = []
    for k in ks:
        label = f"k={k}: output bytes ≤ pngquant --nofs (each tool's own file)"
        for variant in variants:
            for image in images:
                ours, ref = ok.get((image, k, variant)), ok.get((image, k, "pngquant-nofs"))
                row: dict[str, Any] = {"target": label, "variant": variant, "image": image}
                if ours is None or ref is None or ours.get("own_png_bytes") is None:
                    row.update(verdict="not measured", measured="–")
                else:
                    size, ref_size = ours["own_png_bytes"], ref["png_bytes"]
                    row.update(
                        verdict="met" if size <= ref_size else "missed",
                        measured=f"{size / ref_size:.3f}× ({size / 1024:.1f} KiB vs {ref_size / 1024:.1f} KiB)",
                    )
                out.append(row)
    return out


def own_bytes_markdown(agg: Sequence[dict[str, Any]]) -> str:
    """Per k: PNG bits/px of gpu_kquant's own writer and of the common Pillow call, next to pngquant's own file."""
    rows = []
    for a in agg:
        if a.get("own_png_bpp") is None:
            continue
        ref = next((b for b in agg if b["k"] == a["k"] and b["method"] == "pngquant-nofs" and "png_bpp" in b), None)
        rows.append(
            {
                "k": a["k"],
                "method": a["method"],
                "own": a["own_png_bpp"],
                "pillow": a["png_bpp"],
                "pngquant": ref["png_bpp"] if ref else None,
                "ratio": a["own_png_bpp"] / ref["png_bpp"] if ref else None,
            }
        )
    cols = [
        ("k", "k", "d"),
        ("method", "method", ""),
        ("own", "own PNG bits/px", ".3f"),
        ("pillow", "Pillow PNG bits/px", ".3f"),
        ("pngquant", "pngquant --nofs bits/px", ".3f"),
        ("ratio", "own / pngquant", ".3f"),
    ]
    return markdown_table(sorted(rows, key=lambda r: (r["k"], r["method"])), cols)


def add_own_png_bpp(agg: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> None:
    """Add ``own_png_bpp`` (bits/px of the tool's own PNG, over the images that have it) to the aggregates."""
    for a in agg:
        good = [
            r
            for r in rows
            if (r["k"], r["method"]) == (a["k"], a["method"])
            and r["status"] == report.OK
            and r.get("own_png_bytes") is not None
        ]
        if good:
            a["own_png_bpp"] = 8 * sum(r["own_png_bytes"] for r in good) / (1e6 * sum(r["megapixels"] for r in good))


def _print_row(row: dict[str, Any]) -> None:
    head = f"{row['image']:>10} {row['megapixels']:5.2f} MP k={row['k']:<4} {row['method']:<26}"
    if row["status"] != report.OK:
        print(f"{head} {row['status']}", flush=True)
        return
    parts = [f"{row['seconds']:9.4f} s", f"PSNR {row['psnr']:6.2f}"]
    if "ciede2000" in row:
        parts += [f"ΔE {row['ciede2000']:5.2f}", f"{row['png_bytes'] / 1024:8.1f} KiB"]
    if row.get("own_png_bytes") is not None:
        parts.append(f"own {row['own_png_bytes'] / 1024:8.1f} KiB")
    if row.get("peak_mb") is not None:
        parts.append(f"peak {row['peak_mb']:7.1f} MiB")
    print(head, "  ".join(parts), flush=True)


def fastest_peers(agg: Sequence[dict[str, Any]], n: int = 2, k: int = 16) -> list[str]:
    """The ``n`` fastest non-gpu_kquant methods at ``k`` (or the smallest k measured)."""
    ok = [a for a in agg if a["family"] != "gpu_kquant" and a["status"] == report.OK]
    if not ok:
        return []
    at = k if any(a["k"] == k for a in ok) else min(a["k"] for a in ok)
    return [a["method"] for a in sorted((a for a in ok if a["k"] == at), key=lambda a: a["seconds"])[:n]]


def run_scaling(
    args: argparse.Namespace, methods: Sequence[Method], agg: Sequence[dict[str, Any]], workdir: Path
) -> tuple[list[dict[str, Any]], list[str]]:
    """Time against megapixels (k=16) and against k; returns rows and the methods' names."""
    ours = [m.name for m in methods if m.family == "gpu_kquant" and m.name.endswith("-rgb")] or ["gpu_kquant-cpu-rgb"]
    peers = args.scaling_peers or fastest_peers(agg) or ["pillow-fastoctree", "imagequant"]
    names = []
    for name in [*ours, *peers]:
        method = methods_mod.get(name)
        reason = method.missing()
        if reason:
            print(f"note: scaling: skipping {name}: {reason}")
        else:
            names.append(name)
    print(f"scaling curves for {', '.join(names)}")
    plan = [("pixels", mp, 16) for mp in args.scaling_mp] + [("k", args.scaling_k_mp, k) for k in args.scaling_k]
    rows = []
    cache: dict[float, tuple[Any, int]] = {}
    for curve, mp, k in plan:
        if mp not in cache:
            img = image_of_size(mp)
            cache[mp] = (img, distinct_colors(img))
        image, distinct = cache[mp]
        for name in names:
            method = methods_mod.get(name)
            if not method.supports(k):
                continue
            row = {"curve": curve, **_base_row(method, f"{mp:g}mp", image, k), "distinct": distinct}
            outcome, row["status"] = measure(method, f"{mp:g}mp", image, k, args, workdir)
            if outcome is not None:
                palette, indices = canonical(outcome.palette, outcome.indices)
                seconds = outcome.timing.seconds
                row.update(
                    seconds=seconds,
                    runs=len(outcome.timing.runs),
                    mp_per_s=row["megapixels"] / seconds,
                    psnr=psnr(mse(image, palette[indices])),
                    peak_mb=outcome.peak_mb,
                    gpu_peak_mb=outcome.gpu_peak_mb,
                )
            _print_row(row)
            rows.append(row)
    return rows, names


def run_throughput(device: str, batches: Sequence[int], ks: Sequence[int], args: argparse.Namespace) -> list[dict]:
    """Megapixels per second of ``quantize_batch`` (fit + map) on batches of 2560x1600 mosaics."""
    import torch

    from gpu_kquant import quantize_batch

    images = [mosaic(*MOSAIC_SIZE, index=i) for i in range(max(batches))]
    sync = torch.cuda.synchronize if device == "cuda" else None
    rows = []
    for k in ks:
        for b in batches:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            fn = functools.partial(quantize_batch, images[:b], k, device=device)
            _, timing = time_call(fn, args.repeats, single_run_above=args.single_run_above, sync=sync)
            megapixels = b * MOSAIC_SIZE[0] * MOSAIC_SIZE[1] / 1e6
            row = {
                "device": device,
                "k": k,
                "batch": b,
                "megapixels": megapixels,
                "seconds": timing.seconds,
                "runs": len(timing.runs),
                "mp_per_s": megapixels / timing.seconds,
                "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
            }
            print(f"throughput {device} k={k:<4} batch={b:<3} {row['seconds']:.3f} s  {row['mp_per_s']:.1f} MP/s")
            rows.append(row)
    return rows


def _methods_markdown(methods: Sequence[Method], skipped: Sequence[tuple[str, str]]) -> str:
    table = markdown_table(
        [{"name": m.name, "what": m.description} for m in methods], [("name", "method", ""), ("what", "what", "")]
    )
    notes = "\n".join(f"- skipped {name}: {why}" for name, why in skipped)
    return table + ("\n\n" + notes if notes else "")


def _images_markdown(images: dict[str, Any]) -> str:
    rows = [
        {"name": n, "size": f"{im.shape[1]}x{im.shape[0]}", "mp": im.size / 3e6, "distinct": distinct_colors(im)}
        for n, im in images.items()
    ]
    return markdown_table(
        rows, [("name", "image", ""), ("size", "size", ""), ("mp", "MP", ".2f"), ("distinct", "distinct colours", "d")]
    )


HOW_MEASURED = """\
- Time: wall clock, median of `--repeats` runs after one warm-up run, each (method, image, k) in a
  fresh spawned process; a warm-up slower than `--single-run-above` seconds is the only run. Library
  methods are timed from the (H, W, 3) uint8 array in memory to palette + indices in memory (fit and
  mapping of every pixel). pngquant is timed as the whole CLI process (PNG decode, quantize, PNG encode).
- Quality: MSE per channel and PSNR on 0..255 RGB over all pixels; mean CIEDE2000
  (`skimage.color.deltaE_ciede2000` of `rgb2lab`) over a fixed subsample of {de} pixels (the same
  pixels for every method). Unused palette entries are dropped first.
- PNG size: the indexed image written by Pillow (`save(format="PNG", optimize=False,
  compress_level=9)`, same call for every method); pngquant's own output file for pngquant. gpu_kquant
  rows also give the file the tool itself writes (`own_png_bytes`: `gpu_kquant.imagefiles.encode("png", palette,
  indices)`, indexed with filter None, zlib level 9 up to 8 colours else 6); the bytes target compares
  that with pngquant --nofs's own file.
- Peak memory: peak RSS (kernel VmHWM, reset just before the measurement) minus the RSS after loading
  the image and importing the method's packages, over the warm-up and timed runs; pngquant: the peak RSS
  of one extra run of the CLI started from a small launcher (GNU time, else a bare interpreter), minus
  the launcher's floor. GPU MiB: `torch.cuda.max_memory_allocated`.
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for m in methods_mod.METHODS.values():
            print(f"{m.name:28} {m.missing() or 'available'}")
        return 0
    started = time.time()
    info = machine_info()
    if warning := busy_warning(info):
        print(warning)
    selected = methods_mod.select(args.include, args.exclude)
    methods = available_methods(args.include, args.exclude)
    skipped = [(m.name, m.missing() or "") for m in selected if m not in methods]
    stem = output_stem("peers" + ("-quick" if args.quick else ""), info)
    title = f"{info['cpu']} ({info['cores']} cores), GPU {info['gpu'] or 'none'}"
    md = [
        "# gpu_kquant against its peers",
        f"Command: `python -m benchmarks.peers {' '.join(argv if argv is not None else sys.argv[1:])}`",
        machine_markdown(info),
    ]
    csv_rows: list[dict[str, Any]] = []
    agg: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpu_kquant_bench_") as tmp:
        workdir = Path(tmp)
        if not args.scaling_only:
            images = load_images(args.images, args.mosaics)
            csv_rows = run_grid(images, args.k, methods, args, workdir)
            agg = report.aggregate(csv_rows)
            add_own_png_bpp(agg, csv_rows)
            write_csv(csv_rows, args.out / f"{stem}.csv")
            plot = report.plot_speed_quality(agg, args.out / f"{stem}_speed_quality.png", title)
            md += [
                "## Images",
                _images_markdown(images),
                "## Methods",
                _methods_markdown(methods, skipped),
                "## Results",
                f"Means over images; full per-image data in `{stem}.csv`.",
                report.results_markdown(agg),
                f"![speed against quality]({plot.name})",
                "### Output bytes, each tool's own writer",
                "gpu_kquant's file as the tool writes it (`gpu_kquant.imagefiles.encode`), the same result through the "
                "common Pillow call, and pngquant's own output file; means over images.",
                own_bytes_markdown(agg),
                "## Targets",
                report.targets_markdown([*report.check_targets(csv_rows), *check_bytes_targets(csv_rows)]),
            ]
        if args.scaling:
            scaling_rows, names = run_scaling(args, methods, agg, workdir)
            write_csv(scaling_rows, args.out / f"{stem}_scaling.csv")
            plot = report.plot_scaling(scaling_rows, args.out / f"{stem}_scaling.png", title)
            md += [
                "## Scaling",
                f"Methods: {', '.join(names)}. Images from `image_of_size` (one mosaic layout at every size); "
                f"time against MP at k=16, time against k at {args.scaling_k_mp:g} MP.",
                report.scaling_markdown(scaling_rows),
                f"![scaling]({plot.name})",
            ]
    cuda = bool(info["gpu"])
    if args.throughput == "on" or (args.throughput == "auto" and cuda):
        device = "cuda" if cuda else "cpu"
        rows = run_throughput(device, args.throughput_batches, args.throughput_k, args)
        write_csv(rows, args.out / f"{stem}_throughput.csv")
        cols = [
            ("device", "device", ""),
            ("k", "k", "d"),
            ("batch", "images", "d"),
            ("seconds", "seconds", ".3f"),
            ("mp_per_s", "MP/s (fit + map)", ".1f"),
            ("gpu_peak_mb", "GPU MiB", ".0f"),
        ]
        md += [
            f"## {'GPU' if cuda else 'CPU'} throughput",
            "`quantize_batch` on batches of 2560x1600 mosaics, fit and mapping of every image.",
            markdown_table(rows, cols),
        ]
    md += ["## How measured", HOW_MEASURED.format(de=args.de_samples)]
    write_markdown(md, args.out, stem, started)
    print(f"wrote {args.out / stem}.* ({(time.time() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
