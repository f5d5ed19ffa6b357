"""Aggregation, target checks, Markdown sections and plots for the peers benchmark."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .harness import fmt, markdown_table

__all__ = [
    "TARGETS",
    "Target",
    "aggregate",
    "check_targets",
    "growth_exponent",
    "plot_scaling",
    "plot_speed_quality",
    "results_markdown",
    "targets_markdown",
]

OK = "ok"


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (k, method): means over the images where the method succeeded.

    ``seconds`` is the mean per image, ``mp_per_s`` total megapixels over total seconds,
    ``png_bpp`` PNG bits per pixel, ``peak_mb`` the largest peak, ``x_sklearn`` the
    sklearn full fit's mean seconds over this method's.
    """
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["k"], row["method"]), []).append(row)
    out = []
    for group in groups.values():
        good = [r for r in group if r["status"] == OK]
        first = group[0]
        agg: dict[str, Any] = {key: first[key] for key in ("k", "method", "family", "device", "dither")}
        agg["images"] = f"{len(good)}/{len(group)}"
        failures = sorted({r["status"] for r in group if r["status"] != OK})
        agg["status"] = "; ".join(failures) if failures else OK
        if good:
            seconds = sum(r["seconds"] for r in good)
            agg["seconds"] = seconds / len(good)
            agg["mp_per_s"] = sum(r["megapixels"] for r in good) / seconds if seconds > 0 else math.inf
            for key in ("mse", "psnr", "ciede2000", "colors"):
                agg[key] = statistics.fmean(r[key] for r in good)
            agg["png_bpp"] = 8 * sum(r["png_bytes"] for r in good) / (1e6 * sum(r["megapixels"] for r in good))
            peaks = [r["peak_mb"] for r in good if r.get("peak_mb") is not None]
            agg["peak_mb"] = max(peaks) if peaks else None
            gpu = [r["gpu_peak_mb"] for r in good if r.get("gpu_peak_mb") is not None]
            agg["gpu_peak_mb"] = max(gpu) if gpu else None
        out.append(agg)
    by_key = {(a["k"], a["method"]): a for a in out}
    for agg in out:
        ref = by_key.get((agg["k"], "sklearn-full"))
        if ref and ref.get("seconds") and agg.get("seconds"):
            agg["x_sklearn"] = ref["seconds"] / agg["seconds"]
    return sorted(out, key=lambda a: (a["k"], a.get("seconds", math.inf)))


RESULT_COLUMNS = [
    ("method", "method", ""),
    ("seconds", "s / image", ".3f"),
    ("x_sklearn", "× sklearn-full", ".1f"),
    ("mp_per_s", "MP/s", ".2f"),
    ("mse", "MSE", ".2f"),
    ("psnr", "PSNR dB", ".2f"),
    ("ciede2000", "ΔE2000", ".2f"),
    ("colors", "colours", ".0f"),
    ("png_bpp", "PNG bits/px", ".3f"),
    ("peak_mb", "peak MiB", ".0f"),
    ("gpu_peak_mb", "GPU MiB", ".0f"),
    ("images", "images ok", ""),
]


def results_markdown(agg: Sequence[dict[str, Any]]) -> str:
    """One table per k, fastest first; failed or timed-out methods listed under each table."""
    parts = []
    for k in sorted({a["k"] for a in agg}):
        rows = [a for a in agg if a["k"] == k]
        parts.append(f"### k = {k}\n\n" + markdown_table([a for a in rows if "seconds" in a], RESULT_COLUMNS))
        bad = [a for a in rows if a["status"] != OK]
        if bad:
            parts.append("\n".join(f"- {a['method']}: {a['status']} ({a['images']} images ok)" for a in bad))
    return "\n\n".join(parts)


@dataclass(frozen=True)
class Target:
    """gpu_kquant must be ``min_speedup`` times faster than ``reference`` at ``k``, and as good.

    Quality is either an MSE no more than ``max_mse_ratio`` times the reference's, or
    a PSNR at least ``min_psnr_gain`` dB above it.
    """

    label: str
    k: int
    reference: str
    min_speedup: float
    max_mse_ratio: float | None = None
    min_psnr_gain: float | None = None


TARGETS = (
    Target("k=16: ≥ 30× faster than sklearn full fit, MSE within 1 %", 16, "sklearn-full", 30.0, max_mse_ratio=1.01),
    Target("k=16: ≥ 5× faster than pngquant, PSNR ≥ pngquant --nofs + 0.2 dB", 16, "pngquant-nofs", 5.0, None, 0.2),
    Target("k=256: as fast as pngquant, PSNR ≥ pngquant --nofs + 0.2 dB", 256, "pngquant-nofs", 1.0, None, 0.2),
)


def check_targets(rows: Sequence[dict[str, Any]], targets: Sequence[Target] = TARGETS) -> list[dict[str, Any]]:
    """Evaluate every target for every gpu_kquant rgb variant on every image.

    Returns one row per (target, variant, image) with the measured figures and
    whether each part was met; a missing or failed measurement is "not measured".
    """
    ok = {(r["image"], r["k"], r["method"]): r for r in rows if r["status"] == OK}
    variants = sorted({r["method"] for r in rows if r["family"] == "gpu_kquant" and r["method"].endswith("-rgb")})
    images = list(dict.fromkeys(r["image"] for r in rows))
    out = []
    for target in targets:
        for variant in variants:
            for image in images:
                ours, ref = ok.get((image, target.k, variant)), ok.get((image, target.k, target.reference))
                row: dict[str, Any] = {"target": target.label, "variant": variant, "image": image}
                if ours is None or ref is None:
                    row.update(verdict="not measured", measured="–")
                    out.append(row)
                    continue
                speedup = ref["seconds"] / ours["seconds"]
                parts = [f"{speedup:.1f}× ({ours['seconds']:.3f} s vs {ref['seconds']:.3f} s)"]
                met = speedup >= target.min_speedup
                if target.max_mse_ratio is not None:
                    ratio = ours["mse"] / ref["mse"]
                    parts.append(f"MSE ratio {ratio:.4f} ({ours['mse']:.2f} vs {ref['mse']:.2f})")
                    met &= ratio <= target.max_mse_ratio
                if target.min_psnr_gain is not None:
                    gain = ours["psnr"] - ref["psnr"]
                    parts.append(f"PSNR {gain:+.2f} dB ({ours['psnr']:.2f} vs {ref['psnr']:.2f})")
                    met &= gain >= target.min_psnr_gain
                row.update(verdict="met" if met else "missed", measured="; ".join(parts))
                out.append(row)
    return out


def targets_markdown(checks: Sequence[dict[str, Any]]) -> str:
    """Summary (met only when met on every image) and the per-image figures."""
    summary = []
    for (target, variant), group in _group(checks, ("target", "variant")).items():
        verdicts = {c["verdict"] for c in group}
        verdict = "met" if verdicts == {"met"} else "missed" if "missed" in verdicts else "not measured"
        summary.append({"target": target, "variant": variant, "verdict": verdict})
    cols = [("target", "target", ""), ("variant", "gpu_kquant", ""), ("verdict", "verdict", "")]
    detail_cols = [*cols[:2], ("image", "image", ""), ("measured", "measured", ""), ("verdict", "verdict", "")]
    return "\n\n".join(
        [
            markdown_table(summary, cols),
            "Per image (speed-up is the reference's seconds over gpu_kquant's; MSE and PSNR on 0..255 RGB):",
            markdown_table(checks, detail_cols),
        ]
    )


def _group(rows: Sequence[dict[str, Any]], keys: tuple[str, ...]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def growth_exponent(megapixels: Sequence[float], seconds: Sequence[float]) -> float:
    """Least-squares slope of log(seconds) against log(megapixels): 1 is linear growth."""
    return float(np.polyfit(np.log(megapixels), np.log(seconds), 1)[0])


# ----------------------------------------------------------------------------- plots

_FAMILY_COLOURS = {
    "gpu_kquant": "tab:red",
    "scikit-learn": "tab:blue",
    "faiss": "tab:purple",
    "opencv": "tab:brown",
    "pillow": "tab:green",
    "libimagequant": "tab:orange",
    "pngquant": "tab:olive",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label_points(ax: Any, points: Sequence[tuple[float, float, str]]) -> None:
    """Annotate points, pushing a label down while it would overlap one already placed."""
    ax.autoscale_view()
    scale = 72.0 / ax.figure.dpi  # display pixels -> points
    placed: list[tuple[float, float, float]] = []
    for x, y, text in sorted(points, key=lambda p: -p[1]):
        px, py = (v * scale for v in ax.transData.transform((x, y)))
        width = 4.2 * len(text)
        dy = 3.0
        while any(abs(px - qx) < max(width, qw) and abs(py + dy - qy) < 8 for qx, qy, qw in placed):
            dy -= 8
        placed.append((px, py + dy, width))
        leader = {"arrowstyle": "-", "lw": 0.4, "color": "gray"} if dy < 0 else None
        ax.annotate(text, (x, y), fontsize=7, xytext=(3, dy), textcoords="offset points", arrowprops=leader)


def plot_speed_quality(agg: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Seconds per image (log x) against PSNR, one labelled point per method, one panel per k."""
    plt = _pyplot()
    ks = sorted({a["k"] for a in agg if "seconds" in a})
    cols = min(2, max(1, len(ks)))
    rows = math.ceil(len(ks) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 5.5 * rows), squeeze=False)
    for ax, k in zip(axes.flat, ks):
        points = [a for a in agg if a["k"] == k and "seconds" in a and math.isfinite(a["psnr"])]
        for a in points:
            colour = _FAMILY_COLOURS.get(a["family"], "tab:gray")
            marker = "*" if a["family"] == "gpu_kquant" else ("x" if a["dither"] else "o")
            ax.scatter(a["seconds"], a["psnr"], color=colour, marker=marker, s=70 if marker == "*" else 30)
        ax.set_xscale("log")
        _label_points(ax, [(a["seconds"], a["psnr"], a["method"]) for a in points])
        families = sorted({a["family"] for a in points})
        handles = [plt.Line2D([], [], ls="", marker="o", color=_FAMILY_COLOURS.get(f, "tab:gray")) for f in families]
        ax.legend(handles, families, fontsize=7, loc="lower right")
        ax.set_xlabel("seconds per image (log)")
        ax.set_ylabel("PSNR (dB, higher is better)")
        ax.set_title(f"k = {k}")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(ks) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_scaling(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Log-log seconds against megapixels (with a linear reference) and against k."""
    plt = _pyplot()
    fig, (ax_mp, ax_k) = plt.subplots(1, 2, figsize=(13, 5))
    for (curve, method), group in _group([r for r in rows if r["status"] == OK], ("curve", "method")).items():
        ax = ax_mp if curve == "pixels" else ax_k
        x_key = "megapixels" if curve == "pixels" else "k"
        group = sorted(group, key=lambda r: r[x_key])
        xs, ys = [r[x_key] for r in group], [r["seconds"] for r in group]
        (line,) = ax.plot(xs, ys, marker="o", label=method)
        if curve == "pixels" and len(xs) > 1:
            ax.plot(xs, [ys[0] * x / xs[0] for x in xs], ls=":", color=line.get_color(), alpha=0.6)
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ok = [r for r in rows if r["status"] == OK]
    axes = ((ax_mp, "pixels", "megapixels", "megapixels"), (ax_k, "k", "k", "k (palette size)"))
    for ax, curve, key, label in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sorted({r[key] for r in ok if r["curve"] == curve}))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}" if v < 100 else f"{v:.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("seconds")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_mp.set_title("time against image size (dotted: linear from the smallest size)")
    ax_k.set_title("time against k")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def scaling_markdown(rows: Sequence[dict[str, Any]], tolerance: float = 0.05) -> str:
    """Tables of the two curves and, per method, the growth exponent in pixels with a verdict."""
    ok = [r for r in rows if r["status"] == OK]
    cols = [
        ("method", "method", ""),
        ("megapixels", "MP", ".2f"),
        ("k", "k", "d"),
        ("distinct", "distinct colours", "d"),
        ("seconds", "seconds", ".3f"),
        ("mp_per_s", "MP/s", ".2f"),
        ("psnr", "PSNR dB", ".2f"),
        ("peak_mb", "peak MiB", ".0f"),
    ]
    parts = []
    verdicts = []
    for (method,), group in _group([r for r in ok if r["curve"] == "pixels"], ("method",)).items():
        if len(group) < 2:
            continue
        slope = growth_exponent([r["megapixels"] for r in group], [r["seconds"] for r in group])
        linear = slope <= 1 + tolerance
        verdicts.append(
            {
                "method": method,
                "slope": slope,
                "verdict": "no faster than linear" if linear else "faster than linear",
            }
        )
    if verdicts:
        parts.append(
            f"Growth exponent b of seconds ∝ MP^b (least squares on log-log; ≤ 1 + {tolerance} counts as "
            "no faster than linear, the margin absorbing timing noise):\n\n"
            + markdown_table(verdicts, [("method", "method", ""), ("slope", "b", ".2f"), ("verdict", "verdict", "")])
        )
    for curve, heading in (("pixels", "Time against megapixels"), ("k", "Time against k")):
        sel = sorted((r for r in ok if r["curve"] == curve), key=lambda r: (r["method"], r["megapixels"], r["k"]))
        if sel:
            parts.append(f"#### {heading}\n\n" + markdown_table(sel, cols))
    failed = [r for r in rows if r["status"] != OK]
    if failed:
        parts.append(
            "\n".join(f"- {r['method']} at {fmt(r['megapixels'], '.2f')} MP, k={r['k']}: {r['status']}" for r in failed)
        )
    return "\n\n".join(parts)
