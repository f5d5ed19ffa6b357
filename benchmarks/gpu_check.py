"""One-GPU check of the CUDA path (issue 11): transfers, kernels, fit+map, syncs, busy %, pipeline, tests.

    python -m benchmarks.gpu_check            # about 8 minutes on one GPU; Markdown to benchmarks/results/
    python -m benchmarks.gpu_check --dry-run  # every step at a tiny size on the CPU, under a minute

Targets (issue 11, H100/H200 class): fit+map including transfers >= 2000 MP/s on 4-MP photos at k=16 and
>= 500 MP/s on 0.25-MP images; O(1) host syncs per batch; the folder pipeline >= 90% of the decode+encode
bound. The report prints the measurements; it does not judge them. Measurements that need CUDA print
"skipped (no CUDA)". The dry run interprets the Triton kernels on CPU tensors (TRITON_INTERPRET=1, set
before triton is imported) and only collects the CUDA/Triton tests.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SKIP_CUDA = "skipped (no CUDA)"
# Runtime calls after which the host waits for the device (counted in the profiler trace).
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run (full on a GPU, tiny for --dry-run)."""

    transfer_mb: int
    kernel_points: int
    kernel_ks: tuple[int, ...]
    big_mp: float
    big_count: int
    small_mp: float
    small_count: int
    fit_ks: tuple[int, ...]
    folders: tuple[int, int]  # two folder sizes: their difference cancels process start-up
    crop: int  # side of the pipeline's square PNGs (500 -> 0.25 MP)
    reps: int
    warmup: bool  # one untimed call first (Triton compiles on first use)
    budget_s: float  # per timed measurement, after its warm-up call
    total_s: float  # whole run; later steps are skipped past it (the dry run runs every step)
    test_timeout_s: float


FULL = Sizes(256, 1 << 22, (16, 64, 256), 4.0, 8, 0.25, 64, (16, 64, 256), (200, 800), 500, 3, True, 15.0, 330.0, 120.0)
DRY = Sizes(1, 256, (16,), 0.02, 2, 0.01, 2, (16,), (2, 4), 48, 1, False, 1.0, 600.0, 60.0)


class Clock:
    """The run's time budget."""

    def __init__(self, total_s: float) -> None:
        self.start, self.total = time.perf_counter(), total_s

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.start)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, under a minute")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: benchmarks/results, dry: temp)")
    p.add_argument("--skip-tests", action="store_true", help="do not run the pytest step")
    return p.parse_args(argv)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: Any, reps: int, budget_s: float, warmup: bool = True) -> float:
    """Median seconds of ``fn`` over up to ``reps`` calls within ``budget_s`` (after a warm-up call)."""
    if warmup:
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max(1, reps) and (not times or time.perf_counter() - start < budget_s):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def transfer_rates(s: Sizes, device: Any) -> list[dict[str, Any]]:
    """H2D and D2H GB/s from pinned and pageable host memory, and the upload overlap (:func:`upload_overlap`)."""
    import torch

    if device.type != "cuda":
        return [{"memory": m, "note": SKIP_CUDA} for m in ("pinned", "pageable")]
    n = s.transfer_mb << 20
    gpu = torch.empty(n, dtype=torch.uint8, device=device)
    rows = []
    for pinned in (True, False):
        host = torch.ones(n, dtype=torch.uint8).pin_memory() if pinned else torch.ones(n, dtype=torch.uint8)
        h2d = timed(functools.partial(gpu.copy_, host, non_blocking=pinned), device, 5, 5.0)
        d2h = timed(functools.partial(host.copy_, gpu, non_blocking=pinned), device, 5, 5.0)
        rows.append({"memory": "pinned" if pinned else "pageable", "h2d_gbs": n / h2d / 1e9, "d2h_gbs": n / d2h / 1e9})
    return [*rows, upload_overlap(s, device)]


def _work(image: Any, passes: int) -> Any:
    """A stand-in for a batch's k-means: ``passes`` elementwise passes over it on the device."""
    x = image.float()
    for _ in range(passes):
        x = x * 1.0001 + 0.5
    return x.sum()


def upload_overlap(s: Sizes, device: Any) -> dict[str, Any]:
    """Four batches uploaded and worked on: one after the other, then overlapped as the worker does.

    The overlapped run queues batch i+1's upload on the Stager's copy stream before batch i's
    work (:mod:`gpu_kquant.staging`); the work is sized to take about as long as an upload.
    """
    from gpu_kquant.staging import Stager

    label = "pinned, copy stream (4 batches)"
    if device.type != "cuda":
        return {"memory": label, "note": SKIP_CUDA}
    stager = Stager(device)
    side = int(((s.transfer_mb << 20) // 4 // 3) ** 0.5)
    hosts = [stager.stage(np.full((side, side, 3), i, np.uint8)) for i in range(4)]
    upload = timed(functools.partial(hosts[0].to, device, non_blocking=True), device, 5, 5.0)
    first = hosts[0].to(device)
    passes = max(1, round(upload / timed(functools.partial(_work, first, 1), device, 5, 5.0)))

    def serial() -> None:
        for host in hosts:
            _work(host.to(device, non_blocking=True), passes)

    def overlapped() -> None:
        pending = stager.upload(hosts[:1])
        for i in range(len(hosts)):
            (image,) = pending.take()
            if i + 1 < len(hosts):
                pending = stager.upload(hosts[i + 1 : i + 2])
            _work(image, passes)

    one_by_one, both = timed(serial, device, 5, 5.0), timed(overlapped, device, 5, 5.0)
    hidden = 100 * (one_by_one - both) / (len(hosts) * upload)
    note = f"upload then work {one_by_one * 1e3:.1f} ms, overlapped {both * 1e3:.1f} ms"
    note += f": {hidden:.0f}% of the uploads hidden ({passes} work passes ~ one upload)"
    return {"memory": label, "h2d_gbs": len(hosts) * side * side * 3 / both / 1e9, "note": note}


def _triton_module(device: Any) -> tuple[Any, str]:
    """The Triton kernels when they can run on ``device``, else None and the reason."""
    try:
        from gpu_kquant.kernels import triton_kernels as tk
    except ImportError:
        return None, "skipped (triton not installed)"
    if not tk.AVAILABLE or (device.type == "cuda") == tk.INTERPRET:
        return None, SKIP_CUDA if device.type != "cuda" else "skipped (TRITON_INTERPRET is set)"
    return tk, ""


def kernel_rates(s: Sizes, device: Any) -> list[dict[str, Any]]:
    """G distances/s of nearest (D=3) for the Triton kernel and the torch reference; labels compared."""
    import torch

    from gpu_kquant.kernels import reference

    gen = torch.Generator().manual_seed(0)
    points = (torch.rand(1, s.kernel_points, 3, generator=gen) * 255).to(device)
    tk, why = _triton_module(device)
    rows = []
    for k in s.kernel_ks:
        centres = (torch.rand(1, k, 3, generator=gen) * 255).to(device)
        distances = s.kernel_points * k
        ref_t = timed(functools.partial(reference.nearest, points, centres), device, s.reps, s.budget_s, s.warmup)
        rows.append({"kernel": "torch reference nearest", "k": k, "gdist_s": distances / ref_t / 1e9})
        if tk is None:
            rows.append({"kernel": "triton nearest", "k": k, "note": why})
            continue
        for name, second in (("nearest", False), ("nearest+second", True)):
            t = timed(functools.partial(tk.nearest, points, centres, second), device, s.reps, s.budget_s, s.warmup)
            rows.append({"kernel": f"triton {name}", "k": k, "gdist_s": distances / t / 1e9})
        same = torch.equal(tk.nearest(points, centres)[0], reference.nearest(points, centres)[0])
        rows[-1]["note"] = "labels equal the reference" if same else "LABELS DIFFER from the reference"
    return rows


def image_sets(s: Sizes) -> dict[str, list[np.ndarray]]:
    """Mosaics of the bundled photos: the big and the small set."""
    from benchmarks.images import image_of_size

    return {
        f"{s.big_mp:g} MP": [image_of_size(s.big_mp, i) for i in range(s.big_count)],
        f"{s.small_mp:g} MP": [image_of_size(s.small_mp, i) for i in range(s.small_count)],
    }


def fit_map_rates(s: Sizes, device: Any, sets: dict[str, list[np.ndarray]], clock: Clock) -> list[dict[str, Any]]:
    """quantize_batch from host arrays to host results (transfers included): MP/s and images/s."""
    from gpu_kquant import quantize_batch

    rows = []
    for label, images in sets.items():
        mp = sum(img.shape[0] * img.shape[1] for img in images) / 1e6
        for k in s.fit_ks:
            row: dict[str, Any] = {"images": f"{len(images)} x {label}", "k": k}
            if clock.left() < 0:
                rows.append({**row, "note": "skipped (time budget)"})
                continue
            t = timed(
                functools.partial(quantize_batch, images, k=k, device=device), device, s.reps, s.budget_s, s.warmup
            )
            rows.append({**row, "seconds": t, "mp_s": mp / t, "images_s": len(images) / t})
    return rows


def _busy_fraction(prof: Any, wall_s: float) -> float:
    """Union of CUDA kernel/copy intervals in the trace over the wall time."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    return busy / 1e6 / wall_s


def syncs_and_busy(s: Sizes, device: Any, sets: dict[str, list[np.ndarray]], k: int = 16) -> list[dict[str, Any]]:
    """Host syncs per batch (sync-debug warnings and runtime calls in a profile) and GPU busy %."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from gpu_kquant import quantize_batch

    rows = []
    for label, images in sets.items():
        row: dict[str, Any] = {"batch": f"{len(images)} x {label}", "k": k}
        if s.warmup:
            quantize_batch(images, k=k, device=device)  # compilation and caches
        if device.type == "cuda":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    quantize_batch(images, k=k, device=device)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            row["sync_warnings"] = sum("synchroniz" in str(w.message) for w in caught)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            quantize_batch(images, k=k, device=device)
            _sync(device)
            wall = time.perf_counter() - start
        calls = Counter(e.name for e in prof.events() if e.name in SYNC_CALLS)
        row["sync_calls"] = ", ".join(f"{n} {c}" for n, c in sorted(calls.items())) or "none"
        row["busy_pct"] = 100 * _busy_fraction(prof, wall) if device.type == "cuda" else None
        row["note"] = "" if device.type == "cuda" else f"sync warnings and busy %: {SKIP_CUDA}"
        rows.append(row)
    return rows


def photo_folder(s: Sizes, count: int, root: Path) -> Path:
    """``count`` square PNG crops (side ``s.crop``) of 2560x1600 mosaics, written in a thread pool."""
    from benchmarks.images import MOSAIC_SIZE, mosaic, save_png

    folder = root / f"photos-{count}"
    width, height = MOSAIC_SIZE if s.crop >= 200 else (4 * s.crop, 3 * s.crop)
    sources = [mosaic(width, height, i) for i in range(4)]
    rng = np.random.default_rng(count)
    jobs = []
    for i in range(count):
        src = sources[i % len(sources)]
        y, x = rng.integers(0, src.shape[0] - s.crop + 1), rng.integers(0, src.shape[1] - s.crop + 1)
        jobs.append((src[y : y + s.crop, x : x + s.crop], folder / f"img{i:05d}.png"))
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(lambda job: save_png(*job), jobs))
    return folder


def _child_env() -> dict[str, str]:
    """The environment of child processes: this checkout first, no interpreted Triton."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_cli(folder: Path, out: Path, k: int, device: Any, extra: Sequence[str] = ()) -> float:
    """Wall seconds of ``python -m gpu_kquant FOLDER -k K -o OUT --quiet --overwrite --device DEV [EXTRA]``."""
    argv = [sys.executable, "-m", "gpu_kquant", str(folder), "-k", str(k), "-o", str(out), "--quiet", "--overwrite"]
    start = time.perf_counter()
    proc = subprocess.run([*argv, "--device", str(device), *extra], capture_output=True, text=True, cwd=ROOT,
                          env=_child_env(), check=False)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"gpu_kquant exited with {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return time.perf_counter() - start


def decode_encode_bound(folder: Path, done: Path, work: Path) -> float:
    """Seconds to decode every PNG of ``folder`` (Pillow) and encode its finished result, in a thread pool."""
    from PIL import Image

    from gpu_kquant.imagefiles import encode_png, load_image, write_atomic

    results = {}
    for path in sorted(done.glob("*.png")):
        with Image.open(path) as img:
            indices = np.asarray(img)
            palette = np.asarray(img.getpalette("RGB"), dtype=np.uint8).reshape(-1, 3)
        results[path.name] = (palette[: int(indices.max()) + 1], indices)
    work.mkdir(parents=True, exist_ok=True)

    def one(src: Path) -> None:
        load_image(src)
        write_atomic(work / src.name, encode_png(*results[src.name]))

    start = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(one, sorted(folder.glob("*.png"))))
    return time.perf_counter() - start


def pipeline_rates(s: Sizes, device: Any, root: Path, k: int = 16) -> list[dict[str, Any]]:
    """CLI images/s on two folder sizes (the marginal rate cancels start-up) against the decode+encode bound."""
    (n1, n2), rows = s.folders, []
    folders = {n: photo_folder(s, n, root) for n in (n1, n2)}
    secs = {n: run_cli(folders[n], root / f"out-{n}", k, device) for n in (n1, n2)}
    marginal = (n2 - n1) / max(1e-9, secs[n2] - secs[n1])
    for n in (n1, n2):
        rows.append({"what": f"python -m gpu_kquant, {n} images (whole process)", "seconds": secs[n],
                     "images_s": n / secs[n]})  # fmt: skip
    margin_row = {"what": f"python -m gpu_kquant, marginal ({n2} - {n1} images)", "images_s": marginal}
    rows.append(margin_row)
    # Whether two device processes on one GPU beat one process's two stream-owning threads.
    two = run_cli(folders[n2], root / f"out-{n2}-p2", k, device, ("--processes", "2"))
    rows.append({"what": f"python -m gpu_kquant --processes 2, {n2} images (whole process)", "seconds": two,
                 "images_s": n2 / two})  # fmt: skip
    bound = decode_encode_bound(folders[n2], root / f"out-{n2}", root / "bound")
    rows.append({"what": f"decode + encode only, {n2} images, {os.cpu_count()} threads", "seconds": bound,
                 "images_s": n2 / bound})  # fmt: skip
    margin_row["note"] = f"{100 * marginal * bound / n2:.0f}% of the bound"
    return rows


def run_tests(s: Sizes, dry: bool) -> list[dict[str, Any]]:
    """``pytest -m "needs_cuda or triton"``; its summary line. A dry run only collects the two GPU test files."""
    argv = [sys.executable, "-m", "pytest", "-m", "needs_cuda or triton", "-q", "-p", "no:cacheprovider"]
    argv += ["--collect-only", "tests/test_cuda.py", "tests/test_kernels_triton.py"] if dry else []
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=_child_env(),
                              timeout=s.test_timeout_s, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        return [{"command": " ".join(argv[2:]), "result": f"timed out after {s.test_timeout_s:.0f} s"}]
    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    return [{"command": " ".join(argv[2:]), "result": f"exit {proc.returncode}: {lines[-1] if lines else ''}"}]


TABLES: dict[str, list[tuple[str, str, str]]] = {
    "Transfers": [("memory", "host memory", ""), ("h2d_gbs", "H2D GB/s", ".1f"), ("d2h_gbs", "D2H GB/s", ".1f"),
                  ("note", "note", "")],
    "Distance kernel (D=3)": [("kernel", "kernel", ""), ("k", "k", "d"), ("gdist_s", "G distances/s", ".3g"),
                              ("note", "note", "")],
    "Fit+map (quantize_batch, host to host)": [("images", "batch", ""), ("k", "k", "d"), ("seconds", "s", ".3f"),
                                               ("mp_s", "MP/s", ".1f"), ("images_s", "images/s", ".1f"),
                                               ("note", "note", "")],
    "Host syncs and GPU busy (one batch)": [("batch", "batch", ""), ("k", "k", "d"),
                                            ("sync_warnings", "sync-debug warnings", "d"),
                                            ("sync_calls", "sync calls in the profile", ""),
                                            ("busy_pct", "GPU busy %", ".0f"), ("note", "note", "")],
    "Folder pipeline (k=16)": [("what", "run", ""), ("seconds", "s", ".2f"), ("images_s", "images/s", ".1f"),
                               ("note", "note", "")],
    "Tests": [("command", "command", ""), ("result", "result", "")],
}  # fmt: skip


def run_steps(s: Sizes, device: Any, dry: bool, skip_tests: bool, work: Path) -> dict[str, list[dict[str, Any]]]:
    """Every step in order, each printed as it finishes; steps past the time budget are skipped."""
    from benchmarks.harness import markdown_table

    clock, sets = Clock(s.total_s), image_sets(s)
    steps: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
        ("Transfers", lambda: transfer_rates(s, device)),
        ("Distance kernel (D=3)", lambda: kernel_rates(s, device)),
        ("Fit+map (quantize_batch, host to host)", lambda: fit_map_rates(s, device, sets, clock)),
        ("Host syncs and GPU busy (one batch)", lambda: syncs_and_busy(s, device, sets)),
        ("Folder pipeline (k=16)", lambda: pipeline_rates(s, device, work)),
        ("Tests", lambda: [{"result": "skipped (--skip-tests)"}] if skip_tests else run_tests(s, dry)),
    ]
    results = {}
    for title, step in steps:
        rows = step() if clock.left() > 0 or title == "Tests" else [{"note": "skipped (time budget)"}]
        results[title] = rows
        print(f"\n## {title}\n\n{markdown_table(rows, TABLES[title])}", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # the dry run interprets the Triton kernels on CPU tensors
    import torch

    if args.dry_run:
        # The dry run checks that every step runs, not speed. On a shared runner, torch's
        # OpenMP threads spin against other processes: measured 10x slower with 2 threads
        # than with 1 at a load average of 13 on 2 cores.
        torch.set_num_threads(1)

    from benchmarks.harness import machine_info, machine_markdown, markdown_table, write_markdown

    started = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    stem = f"gpu_check_{''.join(c if c.isalnum() else '-' for c in name.lower())}_{_dt.date.today().isoformat()}"
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu_check_")) if args.dry_run else ROOT / "benchmarks/results")
    print(f"# gpu_check on {name}{' (dry run)' if args.dry_run else ''}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_work_") as work:
        results = run_steps(DRY if args.dry_run else FULL, device, args.dry_run, args.skip_tests, Path(work))
    sections = [f"# gpu_check: {name}{' (dry run)' if args.dry_run else ''}", machine_markdown(machine_info())]
    sections += [f"## {title}\n\n{markdown_table(rows, TABLES[title])}" for title, rows in results.items()]
    path = write_markdown(sections, out, stem, started)
    print(f"\nwrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
