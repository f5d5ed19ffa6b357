"""Micro-benchmark of the k-means kernel interface (``python -m benchmarks.kernels``).

Times every available backend of :mod:`gpu_kquant.kernels` (``nearest``, ``nearest``
with the second distance, ``lloyd_step``, ``kpp_potential``) and the old engine's
baseline, exact-mode ``torch.cdist`` plus ``min``, on about 50k real colour points (a
seeded sample of a bundled photo's pixels) against k centroids, and reports G
distances/s per core (``torch.set_num_threads(1)`` by default). Target from issue 10:
at least 2 G distances/s per core at D=3, k=16. Writes a CSV and a Markdown report
to ``benchmarks/results/`` under a name with the machine and the date.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .harness import (
    busy_warning,
    machine_info,
    machine_markdown,
    markdown_table,
    output_stem,
    time_call,
    write_csv,
    write_markdown,
)

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLES = Path(__file__).resolve().parents[1] / "gpu_kquant" / "samples"
TARGET_GPS = 2.0  # G distances/s per core at D=3, k=16 (issue 10)
TARGET_K = 16
KERNELS = ("nearest", "nearest+2nd", "lloyd_step", "kpp_potential")
BASELINE = "torch.cdist exact + min"
QUICK = {"points": 5_000, "k": [16, 64], "repeats": 1, "min_time": 0.02}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--photo", default="astronaut", help="bundled photo in gpu_kquant/samples the points come from")
    p.add_argument("--points", type=int, default=50_000, help="colour points (a seeded sample of the photo's pixels)")
    p.add_argument("--k", nargs="+", type=int, default=[16, 64, 256], help="centroid counts")
    p.add_argument("--d", nargs="+", type=int, default=[3], choices=(3, 4), help="dimensions (4 adds alpha = 255)")
    p.add_argument("--batch", type=int, default=1, help="problems per call (B)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for this process (1 = per core)")
    p.add_argument("--device", nargs="+", help="devices (default: cpu, plus cuda when available)")
    p.add_argument("--backends", nargs="+", help="only these backends (default: every available one)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs after a warm-up; the median is reported")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds each timed run lasts at least (calls looped)")
    p.add_argument("--quick", action="store_true", help="tiny smoke-test configuration (5k points, k = 16 64)")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Problem:
    """One benchmark problem on one device: points, centroids and the lloyd / k-means++ inputs."""

    points: torch.Tensor  # (B, N, D) float32
    centroids: torch.Tensor  # (B, k, D) float32
    qx: torch.Tensor  # (B, N, D) int64 fixed-point weighted coordinates
    qw: torch.Tensor  # (B, N) int64 fixed-point weights
    weights: torch.Tensor  # (B, N) float32
    closest: torch.Tensor  # (B, N) float32, squared distance to one chosen centre
    candidates: torch.Tensor  # (B, L, D) float32, L = 2 + floor(ln k) as the fit draws


def colour_points(photo: str, n: int, d: int, seed: int = 0) -> np.ndarray:
    """(n, d) float32 pixels of a bundled photo, a seeded sample without replacement (alpha 255 when d = 4)."""
    with Image.open(SAMPLES / f"{photo}.png") as img:
        rgb = np.asarray(img.convert("RGB")).reshape(-1, 3)
    rng = np.random.default_rng(seed)
    pick = rng.choice(rgb.shape[0], min(n, rgb.shape[0]), replace=False)
    pts = rgb[np.sort(pick)].astype(np.float32)
    if d == 4:
        pts = np.concatenate([pts, np.full((pts.shape[0], 1), 255, np.float32)], axis=1)
    return pts


def make_problem(points: np.ndarray, k: int, batch: int, device: torch.device, seed: int = 0) -> Problem:
    """Centroids are k distinct colours of the points (seeded), repeated over the batch."""
    from gpu_kquant.reduce import FixedPointSums

    rng = np.random.default_rng(seed + k)
    distinct = np.unique(points, axis=0)
    cents = distinct[np.sort(rng.choice(distinct.shape[0], min(k, distinct.shape[0]), replace=False))]
    n_cand = 2 + int(math.log(k))
    cands = distinct[np.sort(rng.choice(distinct.shape[0], min(n_cand, distinct.shape[0]), replace=False))]
    pts = torch.from_numpy(points).to(device)[None].repeat(batch, 1, 1)
    c = torch.from_numpy(cents).to(device)[None].repeat(batch, 1, 1)
    weights = torch.ones(pts.shape[:2], dtype=torch.float32, device=device)
    sums = FixedPointSums(pts, weights)
    closest = (pts - c[:, :1]).square().sum(2)
    cand = torch.from_numpy(cands).to(device)[None].repeat(batch, 1, 1)
    return Problem(pts, c, sums.qx, sums.qw, weights, closest, cand)


# ----------------------------------------------------------------------------- kernels


def kernel_backends(device: torch.device, wanted: Sequence[str] | None) -> dict[str, Any]:
    """{name: kernel module} for every backend available on ``device``, chosen through ``GPU_KQUANT_KERNELS``."""
    from gpu_kquant import kernels

    out = {}
    saved = os.environ.get(kernels.ENV_VAR)
    try:
        for name in kernels.available_backends(device):
            if wanted is None or name in wanted:
                os.environ[kernels.ENV_VAR] = name
                out[name] = kernels.backend(device)
    finally:
        if saved is None:
            os.environ.pop(kernels.ENV_VAR, None)
        else:
            os.environ[kernels.ENV_VAR] = saved
    return out


def calls(module: Any, p: Problem) -> dict[str, tuple[Callable[[], Any], int]]:
    """Kernel name -> (a call on ``p``, distances it computes)."""
    b, n, _ = p.points.shape
    k, n_cand = p.centroids.shape[1], p.candidates.shape[1]
    return {
        "nearest": (lambda: module.nearest(p.points, p.centroids), b * n * k),
        "nearest+2nd": (lambda: module.nearest(p.points, p.centroids, True), b * n * k),
        "lloyd_step": (lambda: module.lloyd_step(p.points, p.qx, p.qw, p.centroids), b * n * k),
        "kpp_potential": (lambda: module.kpp_potential(p.points, p.weights, p.closest, p.candidates), b * n * n_cand),
    }


def cdist_min(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """The old engine's assignment: exact-mode ``torch.cdist`` (no matmul expansion) and ``min``."""
    dist = torch.cdist(p.points, p.centroids, compute_mode="donot_use_mm_for_euclid_dist")
    best, labels = dist.min(dim=2)
    return labels, best


def measure(fn: Callable[[], Any], distances: int, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """G distances/s of ``fn``: each timed run loops it until ``--min-time`` seconds; median of ``--repeats``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    _, first = time_call(fn, 0, sync=sync)  # warm-up, also the calibration
    loops = max(1, math.ceil(args.min_time / max(first.seconds, 1e-9)))

    def run() -> None:
        for _ in range(loops):
            fn()

    _, timing = time_call(run, args.repeats, single_run_above=math.inf, sync=sync)
    per_call = timing.seconds / loops
    return {"calls": loops, "runs": len(timing.runs), "ms_per_call": 1e3 * per_call, "gps": distances / per_call / 1e9}


def label_mismatches(labels: torch.Tensor, ref: torch.Tensor) -> int:
    """Points whose label differs from the torch reference's."""
    return int((labels.reshape(-1).cpu() != ref.reshape(-1).cpu()).sum())


def bench_problem(
    device: torch.device, backends: dict[str, Any], p: Problem, base: dict[str, Any], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Every backend's kernels and the cdist baseline on one problem; one row each."""
    from gpu_kquant.kernels import reference

    ref_labels = reference.nearest(p.points, p.centroids)[0]
    rows = []
    for name, module in backends.items():
        for kernel, (fn, distances) in calls(module, p).items():
            row = {
                **base,
                "backend": name,
                "kernel": kernel,
                "distances": distances,
                **measure(fn, distances, device, args),
            }
            if kernel in ("nearest", "lloyd_step"):
                row["label_mismatches"] = label_mismatches(fn()[0], ref_labels)
            rows.append(row)
            _print(row)
    distances = p.points.shape[0] * p.points.shape[1] * p.centroids.shape[1]
    row = {**base, "backend": BASELINE, "kernel": "nearest", "distances": distances}
    row.update(measure(lambda: cdist_min(p), distances, device, args))
    row["label_mismatches"] = label_mismatches(cdist_min(p)[0], ref_labels)
    rows.append(row)
    _print(row)
    return rows


def _print(row: dict[str, Any]) -> None:
    mism = f"  label mismatches {row['label_mismatches']}" if "label_mismatches" in row else ""
    print(
        f"{row['device']:>6} D={row['d']} k={row['k']:<4} {row['backend']:<24} {row['kernel']:<14} "
        f"{row['ms_per_call']:9.3f} ms/call {row['gps']:7.3f} G dist/s{mism}",
        flush=True,
    )


# ----------------------------------------------------------------------------- report


def check_targets(rows: Sequence[dict[str, Any]], threads: int) -> list[dict[str, Any]]:
    """Target rows: every backend's ``nearest`` and ``lloyd_step`` on the CPU at D=3, k=16 (per core)."""
    out = []
    for r in rows:
        if r["device"] != "cpu" or r["d"] != 3 or r["k"] != TARGET_K or r["kernel"] not in ("nearest", "lloyd_step"):
            continue
        per_core = r["gps"] / threads
        out.append(
            {
                "target": f"≥ {TARGET_GPS:g} G distances/s per core, D=3, k={TARGET_K}",
                "what": f"{r['backend']} {r['kernel']}",
                "measured": f"{per_core:.3f} G/s per core ({threads} thread{'s' if threads > 1 else ''})",
                "verdict": "met" if per_core >= TARGET_GPS else "missed",
            }
        )
    return out


COLUMNS = [
    ("device", "device", ""),
    ("d", "D", "d"),
    ("k", "k", "d"),
    ("backend", "backend", ""),
    ("kernel", "kernel", ""),
    ("ms_per_call", "ms / call", ".3f"),
    ("gps", "G distances/s", ".3f"),
    ("x_baseline", "× cdist baseline", ".1f"),
    ("label_mismatches", "labels ≠ torch reference", "d"),
]

HOW_MEASURED = """\
- Points: a seeded sample (without replacement) of the photo's pixels as float32 0..255 RGB (a fourth
  column of 255 for D=4), the same for every backend; centroids: k distinct colours of those points
  (seeded). `kpp_potential` scores 2 + floor(ln k) candidates (what the fit draws per step), so its
  distances per call are N x candidates; every other row computes N x k distances.
- Backends: every name in `gpu_kquant.kernels.available_backends(device)`, each selected through
  `GPU_KQUANT_KERNELS` and `gpu_kquant.kernels.backend(device)`. Baseline: the old engine's assignment,
  `torch.cdist(points, centroids, compute_mode="donot_use_mm_for_euclid_dist").min(2)`.
- Time: one warm-up call (which also sets how many calls make a timed run last at least `--min-time`
  seconds), then `--repeats` timed runs; the median per call is reported. G distances/s = distances per
  call / seconds per call / 1e9. On CUDA `torch.cuda.synchronize()` brackets each run.
- Labels: points whose `nearest` / `lloyd_step` label differs from the torch reference's (ties within
  float32 rounding may differ by design; anything else is a bug).
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.threads)  # the benchmark's own process; per-core figures at 1 thread
    info = machine_info()
    if warning := busy_warning(info):
        print(warning)
    devices = [torch.device(d) for d in (args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]))]
    rows: list[dict[str, Any]] = []
    for device in devices:
        backends = kernel_backends(device, args.backends)
        print(f"{device}: backends {', '.join(backends) or 'none'}", flush=True)
        for d in args.d:
            points = colour_points(args.photo, args.points, d)
            for k in args.k:
                base = {"device": device.type, "d": d, "k": k, "n": points.shape[0], "batch": args.batch}
                rows.extend(bench_problem(device, backends, make_problem(points, k, args.batch, device), base, args))
    ref = {(r["device"], r["d"], r["k"]): r["gps"] for r in rows if r["backend"] == BASELINE}
    for r in rows:
        if r["kernel"] in ("nearest", "nearest+2nd", "lloyd_step"):
            r["x_baseline"] = r["gps"] / ref[(r["device"], r["d"], r["k"])]
    targets = check_targets(rows, args.threads)
    for t in targets:
        print(f"target {t['target']}: {t['what']}: {t['verdict']} ({t['measured']})")
    stem = output_stem("kernels" + ("-quick" if args.quick else ""), info)
    write_csv(rows, args.out / f"{stem}.csv")
    md = [
        "# Kernel micro-benchmark",
        f"Command: `python -m benchmarks.kernels {' '.join(argv if argv is not None else sys.argv[1:])}`",
        machine_markdown(info),
        f"{rows[0]['n'] if rows else 0} colour points of `gpu_kquant/samples/{args.photo}.png`, batch {args.batch}, "
        f"`torch.set_num_threads({args.threads})`.",
        "## Results",
        markdown_table(rows, COLUMNS),
        "## Targets",
        markdown_table(
            targets,
            [
                ("target", "target", ""),
                ("what", "kernel", ""),
                ("measured", "measured", ""),
                ("verdict", "verdict", ""),
            ],
        ),
        "## How measured",
        HOW_MEASURED,
    ]
    write_markdown(md, args.out, stem, started)
    print(f"wrote {args.out / stem}.csv and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
