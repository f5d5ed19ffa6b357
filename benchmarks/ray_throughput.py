"""Throughput of the Ray engine against the local engine on one folder of images.

Run: ``python -m benchmarks.ray_throughput`` (needs the ``ray`` extra).

Writes ``--images`` PNG mosaics of ``--min-mp``..``--max-mp`` megapixels (sizes spread
evenly, :func:`benchmarks.images.image_of_size`) into a folder, then quantizes the folder
with the local engine and with Ray at each ``--workers`` count (CPU actors, or one per GPU
up to that count), each run into a fresh output folder. Ray is started once before the
runs (its start-up time is reported apart); each Ray run includes starting its actors.
Reports seconds, images/s and megapixels/s (median of ``--repeats`` runs, engines taking
turns), the ratio to the local engine, and whether the outputs are byte-identical to the
local engine's. Target: Ray with 1 worker within 20% of the local engine's images/s.

Every Ray run pays a fixed cost the local engine does not: its quantize actors are new
processes that import PyTorch (about 3-6 s on 2 busy cores). On 2 cores Ray's own
processes (raylet, object store, decode workers) also take CPU from quantizing: measured
0.72x the local engine on 60 images and 0.75x on 180 (2026-11-25).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .harness import (
    busy_warning,
    machine_info,
    machine_markdown,
    markdown_table,
    output_stem,
    write_csv,
    write_markdown,
)
from .images import image_of_size, save_png

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.8  # Ray with one worker: at least this fraction of the local engine's images/s
REPORT = "gpu_kquant_report.jsonl"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ray_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=60, help="number of images in the folder")
    p.add_argument("--min-mp", type=float, default=0.25, help="smallest image, megapixels")
    p.add_argument("--max-mp", type=float, default=1.0, help="largest image, megapixels")
    p.add_argument("-k", type=int, default=16, help="palette size")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray quantize actor counts to run")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per engine (after one small warm-up each)")
    p.add_argument("--device", default=None, help="device for both engines (default: auto)")
    p.add_argument("--folder", type=Path, default=None, help="keep the images here (default: a temporary folder)")
    p.add_argument("--quick", action="store_true", help="smoke test: 6 images of 0.05-0.1 MP, one Ray worker")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the CSV and Markdown results")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.min_mp, args.max_mp, args.workers = 6, 0.05, 0.1, [1]
    if args.images < 1 or not 0.01 <= args.min_mp <= args.max_mp:
        p.error("need --images >= 1 and 0.01 <= --min-mp <= --max-mp")
    return args


def make_folder(folder: Path, count: int, min_mp: float, max_mp: float) -> tuple[int, float]:
    """Write ``count`` mosaics (sizes spread evenly over the range); returns (images, megapixels)."""
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(count):
        mp = min_mp + (max_mp - min_mp) * i / max(1, count - 1)
        path = folder / f"img{i:03d}.png"
        if not path.exists():
            save_png(image_of_size(mp, index=i), path)
        with open(path, "rb") as f:  # the size from the PNG header, without decoding
            header = f.read(24)
        total += int.from_bytes(header[16:20], "big") * int.from_bytes(header[20:24], "big")
    return count, total / 1e6


def digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != REPORT
    }


def timed_run(engine: Callable[[Any, Any], Any], folder: Path, out: Path, args: argparse.Namespace) -> dict:
    """One run of ``engine(job, run)`` into a fresh ``out``; wall time around the call."""
    from gpu_kquant.options import EngineOptions, FitOptions, OutputOptions, RunOptions
    from gpu_kquant.planning import plan_job

    shutil.rmtree(out, ignore_errors=True)
    run = RunOptions((folder,), FitOptions(k=args.k), OutputOptions(out=out), EngineOptions(device=args.device))
    job = plan_job(run)
    start = time.perf_counter()
    summary = engine(job, run)
    seconds = time.perf_counter() - start
    if summary.failed or summary.interrupted:
        raise RuntimeError(f"run into {out} did not finish cleanly: {dict(summary.counts)}")
    return {"seconds": seconds, "ok": summary.counts.get("ok", 0), "pixels": summary.pixels}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import ray
    except ImportError:
        print("this benchmark needs Ray: pip install -e '.[ray]'", file=sys.stderr)
        return 2
    from gpu_kquant.engine_local import run_local
    from gpu_kquant.engine_ray import run_on_ray
    from gpu_kquant.process import configure_process

    # The process entry, as the CLI's: single-threaded torch for the local engine's CPU quantizers
    # (the Ray driver only plans and collects rows; its actors set their own).
    configure_process(single_threaded_torch=True)

    started = time.time()
    info = machine_info()
    if warning := busy_warning(info):
        print(warning)
    work = Path(tempfile.mkdtemp(prefix="ray_throughput-"))
    folder = args.folder or work / "images"
    n_images, megapixels = make_folder(folder, args.images, args.min_mp, args.max_mp)
    warm = work / "warm"
    make_folder(warm, 2, 0.05, 0.05)
    print(f"{n_images} images, {megapixels:.1f} MP in {folder}", flush=True)

    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
    ray_start = time.perf_counter() - t0

    def on_ray(workers: int) -> Callable[[Any, Any], Any]:
        def engine(job: Any, run: Any) -> Any:
            return run_on_ray(
                job, dataclasses.replace(run, engine=dataclasses.replace(run.engine, ray_workers=workers))
            )

        return engine

    engines: dict[str, Callable[[Any, Any], Any]] = {"local": run_local}
    for n in args.workers:
        engines[f"ray, {n} worker{'s' if n > 1 else ''}"] = on_ray(n)
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    try:
        for engine in engines.values():  # warm-up: imports, first calls, Ray's task workers
            timed_run(engine, warm, work / "warm_out", args)
        for repeat in range(args.repeats):
            for j, (name, engine) in enumerate(engines.items()):
                out = work / f"out{j}"
                runs[name].append({**timed_run(engine, folder, out, args), "digest": digest(out)})
                print(f"run {repeat + 1}, {name}: {runs[name][-1]['seconds']:.2f} s", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    local = statistics.median(r["seconds"] for r in runs["local"])
    reference = runs["local"][-1]["digest"]
    for name, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        rows.append(
            {
                "engine": name,
                "images": results[-1]["ok"],
                "megapixels": round(results[-1]["pixels"] / 1e6, 2),
                "seconds": round(seconds, 3),
                "runs": " ".join(f"{r['seconds']:.2f}" for r in results),
                "images_per_s": round(results[-1]["ok"] / seconds, 3),
                "mp_per_s": round(results[-1]["pixels"] / 1e6 / seconds, 3),
                "vs_local": round(local / seconds, 3),
                "identical_to_local": all(r["digest"] == reference for r in results),
            }
        )
    one = next((r for r in rows if r["engine"] == "ray, 1 worker"), None)
    verdict = "not run" if one is None else "met" if one["vs_local"] >= TARGET else "missed"
    stem = output_stem("ray_throughput" + ("-quick" if args.quick else ""), info)
    write_csv([{**r, "ray_start_s": round(ray_start, 2), "k": args.k} for r in rows], args.out / f"{stem}.csv")
    columns = [
        ("engine", "engine", ""),
        ("images", "images", "d"),
        ("megapixels", "MP", ".1f"),
        ("seconds", "seconds", ".2f"),
        ("images_per_s", "images/s", ".2f"),
        ("mp_per_s", "MP/s", ".2f"),
        ("vs_local", "× local", ".2f"),
        ("identical_to_local", "same bytes as local", ""),
    ]
    md = [
        "# Ray engine throughput against the local engine",
        f"Command: `python -m benchmarks.ray_throughput {' '.join(argv if argv is not None else sys.argv[1:])}`",
        machine_markdown(info),
        f"Target: Ray with 1 worker at least {TARGET:.0%} of the local engine's images/s: **{verdict}**.",
        markdown_table(rows, columns),
        f"{n_images} PNG mosaics of {args.min_mp:g}-{args.max_mp:g} MP ({megapixels:.1f} MP in all), k={args.k}, "
        f"default options, each run into a fresh output folder; median of {args.repeats} run(s), engines taking "
        f"turns, after one 2-image warm-up run each. Ray was started once before the runs ({ray_start:.1f} s, not "
        "counted); every Ray run includes starting its quantize actors (a new process importing PyTorch). "
        "Seconds are wall time around `run_local` / `run_on_ray`.",
    ]
    write_markdown(md, args.out, stem, started)
    print(markdown_table(rows, columns))
    print(f"target {verdict}; wrote {args.out / stem}.csv and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
