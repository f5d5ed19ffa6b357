"""Held-out check of ``--dither adaptive`` against pngquant (``python -m benchmarks.dither_heldout``).

Issue 15's adaptive dithering was tuned on ten cases (the bundled photos astronaut, chelsea,
coffee, china and flower at k = 16 and 64). This benchmark scores it the same way on RGB photos
that ship with scikit-image and were not used in that tuning. Per image and k: pngquant 2.17's
default (dithered) output against gpu_kquant ``fs`` and ``adaptive`` of this checkout and,
with ``--old PATH``, ``adaptive`` of another checkout (run in a subprocess with
``PYTHONPATH=PATH``). The scoring is :func:`benchmarks.quality.dither_rows`': SSIM ≥ pngquant's,
blurred PSNR (σ = 1) ≥ pngquant's + 0.3 dB, ``encode_png`` bytes ≤ 1.05x pngquant's own file.
Needs ``pngquant`` on PATH. Writes OUT/dither_heldout_<machine>_<date>.{csv,md}.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .harness import machine_info, machine_markdown, markdown_table, output_stem, write_csv, write_markdown
from .quality import (
    BLUR_DB_MARGIN,
    DITHER_BYTES_RATIO,
    RESULTS,
    SSIM_MARGIN,
    _scores,
    bundled_photos,
    ours,
    pngquant,
    pngquant_missing,
)

MAX_PIXELS, CROP = 2_000_000, (800, 1280)  # larger photos: a centre crop of 800 x 1280 (H x W)


def _skimage(name: str, index: int | None = None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        img = getattr(skimage.data, name)()
        return np.asarray(img[index] if index is not None else img)

    return load


# Every RGB photo in scikit-image 0.26's bundled data (no download) except astronaut, chelsea
# (= cat) and coffee, which the tuning used; colorwheel and logo are not photos.
HELDOUT: dict[str, Callable[[], np.ndarray]] = {
    "rocket": _skimage("rocket"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "retina": _skimage("retina"),
    "motorcycle_left": _skimage("stereo_motorcycle", 0),
    "motorcycle_right": _skimage("stereo_motorcycle", 1),
}

# Runs inside the other checkout (PYTHONPATH=PATH): its quantize and its encode_png.
_OLD_WORKER = """
import sys, numpy as np, gpu_kquant
from gpu_kquant import quantize
from gpu_kquant.imagefiles import encode_png
src, k, kind, dst, root = sys.argv[1:]
assert gpu_kquant.__file__.startswith(root), gpu_kquant.__file__
q = quantize(np.load(src), int(k), dither=kind, device="cpu")
np.savez(dst, out=q.to_array(), nbytes=len(encode_png(q.palette, q.indices)))
"""


def load_encoded(name: str, data: bytes) -> np.ndarray:
    """:func:`load` of an encoded image file's bytes (JPEG, PNG), decoded to RGB."""

    def decoded() -> np.ndarray:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))

    return load(name, decoded)


def load(name: str, loader: Callable[[], np.ndarray]) -> np.ndarray:
    """An (H, W, 3) uint8 photo, centre-cropped to CROP when over MAX_PIXELS."""
    img = np.ascontiguousarray(loader()[..., :3], dtype=np.uint8)
    h, w = img.shape[:2]
    if h * w > MAX_PIXELS:
        top, left = (h - CROP[0]) // 2, (w - CROP[1]) // 2
        img = np.ascontiguousarray(img[top : top + CROP[0], left : left + CROP[1]])
    return img


def old_checkout(root: Path, image: np.ndarray, k: int, kind: str) -> tuple[np.ndarray, int]:
    """``quantize`` and ``encode_png`` of the checkout at ``root``; returns (output pixels, PNG bytes)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.npy", Path(tmp) / "out.npz"
        np.save(src, image)
        env = {**os.environ, "PYTHONPATH": str(root)}
        argv = [sys.executable, "-c", _OLD_WORKER, str(src), str(k), kind, str(dst), str(root)]
        # cwd: `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH.
        subprocess.run(argv, check=True, env=env, cwd=tmp)
        with np.load(dst) as res:
            return res["out"], int(res["nbytes"])


def _versus(row: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    row["ssim_vs_ref"] = row["ssim"] - ref["ssim"]
    row["blur_db_vs_ref"] = row["blur_psnr"] - ref["blur_psnr"]
    row["bytes_vs_ref"] = row["bytes"] / ref["bytes"]
    row["met"] = (
        row["ssim_vs_ref"] >= SSIM_MARGIN
        and row["blur_db_vs_ref"] >= BLUR_DB_MARGIN
        and row["bytes_vs_ref"] <= DITHER_BYTES_RATIO
    )
    # The tuning files' shortfall score: 0 when both quality targets are met.
    row["score"] = min(100 * row["ssim_vs_ref"], 0.0) + min(row["blur_db_vs_ref"] - BLUR_DB_MARGIN, 0.0)
    return row


def rows(images: dict[str, np.ndarray], ks: Sequence[int], old: Path | None) -> list[dict[str, Any]]:
    """One row per image, k and method (pngquant first)."""
    out = []
    for name, img in images.items():
        for k in ks:
            ref = {"image": name, "k": k, "method": "pngquant", **_scores(img, *pngquant(img, k))}
            runs = {f"new-{kind}": ours(img, k, kind) for kind in ("fs", "adaptive")}
            if old is not None:
                runs["old-adaptive"] = old_checkout(old, img, k, "adaptive")
            case = [_versus({"image": name, "k": k, "method": m, **_scores(img, *r)}, ref) for m, r in runs.items()]
            out += [ref, *case]
            print(name, k, " ".join(f"{r['method']} {r['ssim_vs_ref']:+.4f}/{r['blur_db_vs_ref']:+.2f}" for r in case))
    return out


def totals(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: cases meeting each target and all three, mean deltas, summed score."""
    out = []
    for method in dict.fromkeys(r["method"] for r in table if r["method"] != "pngquant"):
        rs = [r for r in table if r["method"] == method]
        out.append(
            {
                "method": method,
                "met": f"{sum(r['met'] for r in rs)}/{len(rs)}",
                "ssim_ok": sum(r["ssim_vs_ref"] >= SSIM_MARGIN for r in rs),
                "blur_ok": sum(r["blur_db_vs_ref"] >= BLUR_DB_MARGIN for r in rs),
                "bytes_ok": sum(r["bytes_vs_ref"] <= DITHER_BYTES_RATIO for r in rs),
                "mean_dssim": float(np.mean([r["ssim_vs_ref"] for r in rs])),
                "mean_dblur": float(np.mean([r["blur_db_vs_ref"] for r in rs])),
                "bytes_range": f"{min(r['bytes_vs_ref'] for r in rs):.2f}-{max(r['bytes_vs_ref'] for r in rs):.2f}",
                "score": sum(r["score"] for r in rs),
            }
        )
    return out


def markdown(table: list[dict[str, Any]], images: dict[str, np.ndarray], info: dict[str, Any]) -> list[str]:
    """Image list, per-case table (one row per case, one column group per method) and totals."""
    methods = [m for m in dict.fromkeys(r["method"] for r in table) if m != "pngquant"]
    cases = []
    for name in images:
        for k in dict.fromkeys(r["k"] for r in table):
            case: dict[str, Any] = {"image": name, "k": k}
            for r in table:
                if r["image"] == name and r["k"] == k and r["method"] != "pngquant":
                    m = r["method"]
                    case[m] = f"{r['ssim_vs_ref']:+.4f} / {r['blur_db_vs_ref']:+.2f} / {r['bytes_vs_ref']:.3f}"
                    case[m] += " **met**" if r["met"] else ""
            cases.append(case)
    listing = ", ".join(f"{n} {img.shape[1]}x{img.shape[0]}" for n, img in images.items())
    tot_cols = [("method", "method", ""), ("met", "all 3 met", ""), ("ssim_ok", "SSIM ≥", "d")]
    tot_cols += [("blur_ok", "blur ≥ +0.3", "d"), ("bytes_ok", "bytes ≤ 1.05x", "d")]
    tot_cols += [("mean_dssim", "mean ΔSSIM", "+.4f"), ("mean_dblur", "mean Δblur dB", "+.2f")]
    tot_cols += [("bytes_range", "bytes ×", ""), ("score", "score", ".2f")]
    return [
        "# Held-out check of `--dither adaptive` against pngquant (issue 15)",
        machine_markdown(info),
        f"Images (W x H): {listing}.",
        "Each cell: ΔSSIM / Δ blurred PSNR dB / bytes × against pngquant's default dithering at the same k.",
        markdown_table(cases, [("image", "image", ""), ("k", "k", "d"), *[(m, m, "") for m in methods]]),
        markdown_table(totals(table), tot_cols),
    ]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dither_heldout", description=__doc__.split("\n\n")[0])
    p.add_argument("--set", choices=["heldout", "tuned"], default="heldout", help="tuned: the ten tuning cases")
    p.add_argument("--k", nargs="+", type=int, default=[16, 64])
    p.add_argument("--old", type=Path, help="another checkout (with built extensions) whose adaptive to compare")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if pngquant_missing():
        return 2
    started, info = time.time(), machine_info()
    images = {n: load(n, f) for n, f in HELDOUT.items()} if args.set == "heldout" else bundled_photos()
    table = rows(images, args.k, args.old.resolve() if args.old else None)
    stem = output_stem("dither_heldout" if args.set == "heldout" else "dither_tuned", info)
    write_csv(table, args.out / f"{stem}.csv")
    path = write_markdown(markdown(table, images, info), args.out, stem, started)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
