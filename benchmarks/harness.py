"""Shared benchmark machinery: timing, quality metrics, isolated runs, machine info and output files.

Every benchmark script times through :func:`time_call` and scores through
:class:`Scorer`, so all methods are measured the same way.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib.metadata
import io
import math
import multiprocessing as mp
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

__all__ = [
    "Outcome",
    "Quality",
    "Scorer",
    "Timing",
    "busy_warning",
    "canonical",
    "machine_info",
    "markdown_table",
    "nearest_palette",
    "output_stem",
    "psnr",
    "run_method",
    "time_call",
    "write_csv",
]

T = TypeVar("T")

# ----------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of the timed runs (warm-up excluded unless it was the only run)."""

    runs: tuple[float, ...]

    @property
    def seconds(self) -> float:
        """Median of the timed runs."""
        return statistics.median(self.runs)


def time_call(
    fn: Callable[[], T],
    repeats: int = 3,
    *,
    single_run_above: float = 10.0,
    sync: Callable[[], None] | None = None,
) -> tuple[T, Timing]:
    """Run ``fn`` once as a warm-up, then ``repeats`` timed times; return the last result and the timings.

    A warm-up slower than ``single_run_above`` seconds counts as the only measurement
    (one-time costs are then negligible and a second run would only cost time).
    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before starting and before
    stopping each clock.
    """

    def once() -> tuple[T, float]:
        if sync:
            sync()
        start = time.perf_counter()
        out = fn()
        if sync:
            sync()
        return out, time.perf_counter() - start

    result, first = once()
    if first > single_run_above or repeats < 1:
        return result, Timing((first,))
    runs = []
    for _ in range(repeats):
        result, seconds = once()
        runs.append(seconds)
    return result, Timing(tuple(runs))


# ----------------------------------------------------------------------------- quality


def canonical(palette: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop unused palette entries (keeping order) and renumber the indices to match.

    Every method's output goes through this before it is scored or written, so a
    padded palette never changes the PNG bit depth or size.
    """
    palette = np.asarray(palette)[:, :3].astype(np.uint8)
    if int(indices.max()) >= palette.shape[0]:
        raise ValueError(f"index {int(indices.max())} is outside a palette of {palette.shape[0]} entries")
    used = np.flatnonzero(np.bincount(indices.ravel(), minlength=palette.shape[0]))
    lut = np.zeros(palette.shape[0], dtype=np.uint16)
    lut[used] = np.arange(used.size)
    dtype = np.uint8 if used.size <= 256 else np.uint16
    return palette[used], lut[indices].astype(dtype)


def mse(image: np.ndarray, recon: np.ndarray) -> float:
    """Mean squared error per channel on the 0..255 scale."""
    diff = image.astype(np.int32) - recon.astype(np.int32)
    return float((diff * diff).sum(dtype=np.int64)) / diff.size


def psnr(error: float) -> float:
    """PSNR in dB for a per-channel MSE on the 0..255 scale (inf when lossless)."""
    return math.inf if error == 0 else 10.0 * math.log10(255.0**2 / error)


def indexed_png_bytes(palette: np.ndarray, indices: np.ndarray) -> int:
    """Size of the indexed PNG Pillow writes for this result (same call for every method)."""
    if palette.shape[0] > 256:
        img = Image.fromarray(palette[indices], "RGB")
    else:
        img = Image.fromarray(indices.astype(np.uint8), "P")
        img.putpalette(palette.reshape(-1).tolist(), rawmode="RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.tell()


def nearest_palette(image: np.ndarray, palette: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """Exact nearest palette entry (squared RGB distance) of every pixel, (H, W) int64."""
    pixels = image.reshape(-1, 3).astype(np.float64)
    pal = palette.astype(np.float64)
    pal_sq = (pal * pal).sum(1)
    out = np.empty(pixels.shape[0], dtype=np.int64)
    for start in range(0, pixels.shape[0], chunk):
        block = pixels[start : start + chunk]
        out[start : start + chunk] = np.argmin(pal_sq[None, :] - 2.0 * block @ pal.T, axis=1)
    return out.reshape(image.shape[:2])


@dataclass(frozen=True)
class Quality:
    """Quality and size of one quantized image."""

    mse: float
    psnr: float
    ciede2000: float
    colors: int
    png_bytes: int


class Scorer:
    """Scores quantized versions of one image.

    CIEDE2000 is averaged over a fixed subsample of ``de_samples`` pixels (the same
    pixels for every method; all pixels when the image is smaller), because
    ``skimage.color.deltaE_ciede2000`` is slow on whole 4-MP images. MSE and PSNR
    use every pixel.
    """

    def __init__(self, image: np.ndarray, de_samples: int = 200_000) -> None:
        from skimage.color import rgb2lab

        self.image = image
        n = image.shape[0] * image.shape[1]
        rng = np.random.default_rng(0)
        self.sample = np.sort(rng.choice(n, de_samples, replace=False)) if n > de_samples else np.arange(n)
        self._lab = rgb2lab(image.reshape(-1, 3)[self.sample])

    def delta_e(self, recon: np.ndarray) -> float:
        """Mean CIEDE2000 between the original and ``recon`` over the fixed subsample."""
        from skimage.color import deltaE_ciede2000, rgb2lab

        return float(deltaE_ciede2000(self._lab, rgb2lab(recon.reshape(-1, 3)[self.sample])).mean())

    def score(self, palette: np.ndarray, indices: np.ndarray, png_bytes: int | None = None) -> Quality:
        """Metrics of ``palette[indices]``; ``png_bytes`` overrides the Pillow-written size."""
        palette, indices = canonical(palette, indices)
        recon = palette[indices]
        error = mse(self.image, recon)
        size = indexed_png_bytes(palette, indices) if png_bytes is None else png_bytes
        return Quality(error, psnr(error), self.delta_e(recon), int(palette.shape[0]), size)


# ----------------------------------------------------------------------------- memory


def _status_kb(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not supported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# ----------------------------------------------------------------------------- isolated runs


@dataclass
class Outcome:
    """What one method produced on one image at one k."""

    palette: np.ndarray
    indices: np.ndarray
    timing: Timing
    peak_mb: float | None = None  # host MiB above the loaded state (CLI: its own peak above the launcher's)
    gpu_peak_mb: float | None = None
    png_bytes: int | None = None  # the tool's own file, for CLI methods


def _measure(method_name: str, image: np.ndarray, k: int, png_path: str | None, opts: dict[str, Any]) -> Outcome:
    """Import a method, reset the peak-memory marks, time it, read the peaks (runs inside a worker)."""
    from . import methods

    method = methods.get(method_name)
    method.prepare()
    sync = None
    if method.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        sync = torch.cuda.synchronize
    reset = _reset_peak_rss()
    base_kb = _status_kb("VmRSS") or 0
    if method.cli is not None:
        assert png_path is not None, "CLI methods need the image as a PNG file"
        outcome = _measure_cli(method, png_path, k, opts)
    else:
        (palette, indices), timing = time_call(
            lambda: method.run(image, k), opts["repeats"], single_run_above=opts["single_run_above"], sync=sync
        )
        outcome = Outcome(np.asarray(palette), np.asarray(indices), timing)
        peak_kb = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if peak_kb is not None:
            outcome.peak_mb = max(0, peak_kb - base_kb) / 1024
    if method.device == "cuda":
        import torch

        outcome.gpu_peak_mb = torch.cuda.max_memory_allocated() / 2**20
    return outcome


def _measure_cli(method: Any, png_path: str, k: int, opts: dict[str, Any]) -> Outcome:
    """Time a whole CLI process (decode, quantize, encode) and read back its own output file."""
    out_path = Path(opts["workdir"]) / f"{Path(png_path).stem}-{method.name}-{k}.png"
    argv = method.cli(Path(png_path), k, out_path)
    _, timing = time_call(
        lambda: subprocess.run(argv, check=True, capture_output=True),
        opts["repeats"],
        single_run_above=opts["single_run_above"],
    )
    with Image.open(out_path) as img:
        if img.mode != "P":
            raise RuntimeError(f"{method.name} wrote a {img.mode} image, expected an indexed PNG")
        palette = np.asarray(img.getpalette("RGB"), dtype=np.uint8).reshape(-1, 3)
        indices = np.asarray(img)
    return Outcome(palette, indices, timing, peak_mb=_cli_peak_mb(argv), png_bytes=out_path.stat().st_size)


# A child forked from a big process inherits that process's peak RSS in its rusage, so
# the CLI is started from a small launcher: GNU time where installed (about 1 MiB),
# else a fresh interpreter without site packages (about 9 MiB) that reads wait4.
_LAUNCHER = """
import os, sys
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _cli_peak_mb(argv: list[str]) -> float:
    """Peak RSS of one more run of ``argv`` minus the launcher's floor (a run of ``true``), in MiB."""
    gnu_time = Path("/usr/bin/time")

    def peak_kb(cmd: list[str]) -> int:
        if gnu_time.exists():
            out = subprocess.run([str(gnu_time), "-f", "%M", *cmd], capture_output=True, text=True, check=True)
            return int(out.stderr.split()[-1])
        out = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, *cmd], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    return max(0, peak_kb(argv) - peak_kb(["true"])) / 1024


def run_method(
    method_name: str,
    image: np.ndarray,
    k: int,
    *,
    repeats: int,
    single_run_above: float = 10.0,
    png_path: Path | None = None,
    workdir: Path | None = None,
    isolate: bool = True,
    timeout: float | None = None,
) -> Outcome:
    """Run one method on one image at one k; with ``isolate`` in a fresh spawned process.

    A fresh process per measurement keeps one method's caches, allocator pools and
    thread pools from affecting the next, and gives a clean peak-memory reading.
    Raises ``TimeoutError`` when the run takes longer than ``timeout`` seconds.
    """
    opts = {"repeats": repeats, "single_run_above": single_run_above, "workdir": str(workdir or Path.cwd())}
    args = (method_name, image, k, str(png_path) if png_path else None, opts)
    if not isolate:
        return _measure(*args)
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(1, maxtasksperchild=1)
    try:
        return pool.apply_async(_measure, args).get(timeout)
    except mp.TimeoutError:
        raise TimeoutError(f"{method_name} took longer than {timeout:g} s") from None
    finally:
        pool.terminate()
        pool.join()


# ----------------------------------------------------------------------------- machine and files


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _pngquant_version() -> str | None:
    exe = shutil.which("pngquant")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).strip().split(" ")[0] or None


def machine_info() -> dict[str, Any]:
    """CPU model, core count, GPU name (or None) and versions of every package involved."""
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    versions = {
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "torch": _version("torch"),
        "scikit-learn": _version("scikit-learn"),
        "scikit-image": _version("scikit-image"),
        "faiss": _version("faiss-cpu", "faiss-gpu", "faiss"),
        "opencv": _version("opencv-python-headless", "opencv-python", "opencv-contrib-python"),
        "pillow": _version("pillow"),
        "imagequant": _version("imagequant"),
        "pngquant": _pngquant_version(),
    }
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 1,
        "gpu": gpu,
        "os": platform.platform(terse=True),
        "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "versions": {name: v for name, v in versions.items() if v},
    }


def busy_warning(info: dict[str, Any]) -> str | None:
    """A warning when other work was running at the start (1-minute load above a quarter of the cores)."""
    load = info.get("load")
    if load is None or load <= 0.25 * info["cores"]:
        return None
    return (
        f"warning: the 1-minute load average was {load:.2f} on {info['cores']} cores when the benchmark started; "
        "other processes compete for the CPU and timings (multi-threaded ones most) will be slower and noisier"
    )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def output_stem(prefix: str, info: dict[str, Any], date: _dt.date | None = None) -> str:
    """File name stem with the machine (CPU, cores, GPU) and the date, e.g. ``peers_amd-epyc_2c_nogpu_2025-11-25``."""
    gpu = _slug(info["gpu"]) if info.get("gpu") else "nogpu"
    cpu = _slug(re.sub(r"\(R\)|\(TM\)|CPU|Processor|@.*", "", info["cpu"]))[:40].strip("-")
    return f"{prefix}_{cpu}_{info['cores']}c_{gpu}_{(date or _dt.date.today()).isoformat()}"


def machine_markdown(info: dict[str, Any]) -> str:
    """One Markdown paragraph describing the machine and package versions."""
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    load = "" if info.get("load") is None else f" Load average at start: {info['load']:.2f}."
    text = f"CPU: {info['cpu']} ({info['cores']} cores); GPU: {info['gpu'] or 'none'}; {info['os']}.{load}"
    warning = busy_warning(info)
    return f"{text}\n\n{versions}." + (f"\n\n**{warning}.**" if warning else "")


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write dict rows (union of keys, first-seen order) as CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: dict[str, None] = {}
    for row in rows:
        fields.update(dict.fromkeys(row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    return path


def fmt(value: Any, spec: str = "") -> str:
    """Format a table cell; None and NaN become an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def markdown_table(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table; ``columns`` are (key, header, format spec)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |"]
    lines.append("|" + "|".join("---" if s == "" else "---:" for _, _, s in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(key), spec) for key, _, spec in columns) + " |")
    return "\n".join(lines)


def add_image_args(p: argparse.ArgumentParser) -> None:
    """The ``--images`` and ``--mosaics`` options shared by the benchmarks."""
    p.add_argument("--images", nargs="+", default=["2"], help="a count, or names: photo names, mosaic<i>, <mp>mp")
    p.add_argument(
        "--mosaics",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a count means that many 2560x1600 mosaics (default) or, with --no-mosaics, source photos",
    )


def write_markdown(sections: Sequence[str], out: Path, stem: str, started: float) -> Path:
    """Write the report's sections, ending with the total wall time since ``started``, to OUT/STEM.md."""
    minutes = (time.time() - started) / 60
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.md"
    path.write_text("\n\n".join([*sections, f"Total benchmark wall time: {minutes:.1f} min."]) + "\n")
    return path
