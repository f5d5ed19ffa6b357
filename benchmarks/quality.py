"""Quality against pngquant where it used to win: dithering, bytes, RGBA (``python -m benchmarks.quality``).

Three sections, each against pngquant on the same inputs:

* dither: gpu_kquant ``--dither fs`` and ``adaptive`` against pngquant's default
  (dithered) at k = 16 and 64: SSIM, blurred PSNR (Gaussian sigma 1) and PNG bytes.
* bytes: undithered output bytes against ``pngquant --nofs`` at k = 16, 64, 256.
* icons: premultiplied RGBA MSE against ``pngquant --nofs`` at k = 16 on Adwaita's
  512 px icons (``/usr/share/icons/Adwaita``; skipped where absent).

Writes CSV and Markdown to ``benchmarks/results/quality_<machine>_<date>.*``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gpu_kquant import quantize
from gpu_kquant.imagefiles import encode_png
from gpu_kquant.metrics import blurred_psnr, premultiplied, psnr, ssim

from .harness import machine_info, machine_markdown, markdown_table, output_stem, write_csv, write_markdown
from .images import photo

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLES = Path(__file__).resolve().parents[1] / "gpu_kquant" / "samples"
ICONS = Path("/usr/share/icons/Adwaita/512x512")
# Targets of issue 15.
SSIM_MARGIN, BLUR_DB_MARGIN, DITHER_BYTES_RATIO, ICON_MSE_RATIO = 0.0, 0.3, 1.05, 1.00


def bundled_photos() -> dict[str, np.ndarray]:
    """The photos shipped in gpu_kquant/samples plus scikit-learn's two sample photos."""
    out = {p.stem: np.asarray(Image.open(p).convert("RGB")) for p in sorted(SAMPLES.glob("*.png"))}
    out.update({name: photo(name) for name in ("china", "flower")})
    return out


def icons(limit: int) -> dict[str, np.ndarray]:
    """Up to ``limit`` Adwaita 512 px RGBA icons (sorted by path), or none when not installed."""
    paths = sorted(ICONS.glob("*/*.png"))[:limit]
    return {f"{p.parent.name}/{p.stem}": np.asarray(Image.open(p).convert("RGBA")) for p in paths}


def pngquant_missing() -> bool:
    """True (and says how to install it) when ``pngquant``, every dithering comparison's reference, is not on PATH."""
    if shutil.which("pngquant") is not None:
        return False
    print("pngquant is not installed (apt-get install pngquant)", file=sys.stderr)
    return True


def pngquant(image: np.ndarray, k: int, *extra: str) -> tuple[np.ndarray, int]:
    """Run the pngquant CLI (default speed) on an image; returns (decoded RGB(A) output, file bytes)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.png", Path(tmp) / "out.png"
        Image.fromarray(image).save(src)
        subprocess.run(["pngquant", "--force", "--output", str(dst), *extra, str(k), str(src)], check=True)
        mode = "RGBA" if image.shape[2] == 4 else "RGB"
        return np.asarray(Image.open(dst).convert(mode)), dst.stat().st_size


def ours(image: np.ndarray, k: int, dither: str) -> tuple[np.ndarray, int]:
    """gpu_kquant on the CPU with default options; returns (output pixels, PNG bytes)."""
    q = quantize(image, k, dither=dither, device="cpu")
    return q.to_array(), len(encode_png(q.palette, q.indices))


def _scores(image: np.ndarray, out: np.ndarray, size: int) -> dict[str, Any]:
    return {"ssim": ssim(image, out), "blur_psnr": blurred_psnr(image, out), "psnr": psnr(image, out), "bytes": size}


def dither_rows(images: dict[str, np.ndarray], ks: Sequence[int], kinds: Sequence[str]) -> list[dict[str, Any]]:
    """One row per image, k and method: ours per dither kind, and pngquant's default."""
    rows = []
    for name, img in images.items():
        for k in ks:
            ref = _scores(img, *pngquant(img, k))
            rows.append({"section": "dither", "image": name, "k": k, "method": "pngquant", **ref})
            for kind in kinds:
                s = _scores(img, *ours(img, k, kind))
                row = {"section": "dither", "image": name, "k": k, "method": f"ours-{kind}", **s}
                row["ssim_vs_ref"] = s["ssim"] - ref["ssim"]
                row["blur_db_vs_ref"] = s["blur_psnr"] - ref["blur_psnr"]
                row["bytes_vs_ref"] = s["bytes"] / ref["bytes"]
                row["met"] = (
                    row["ssim_vs_ref"] >= SSIM_MARGIN
                    and row["blur_db_vs_ref"] >= BLUR_DB_MARGIN
                    and row["bytes_vs_ref"] <= DITHER_BYTES_RATIO
                )
                rows.append(row)
    return rows


def bytes_rows(images: dict[str, np.ndarray], ks: Sequence[int]) -> list[dict[str, Any]]:
    """Undithered bytes and PSNR against pngquant --nofs."""
    rows = []
    for name, img in images.items():
        for k in ks:
            ref_out, ref_bytes = pngquant(img, k, "--nofs")
            out, size = ours(img, k, "none")
            rows.append(
                {
                    "section": "bytes",
                    "image": name,
                    "k": k,
                    "bytes": size,
                    "ref_bytes": ref_bytes,
                    "bytes_vs_ref": size / ref_bytes,
                    "psnr": psnr(img, out),
                    "ref_psnr": psnr(img, ref_out),
                    "met": size <= ref_bytes,
                }
            )
    return rows


def icon_rows(images: dict[str, np.ndarray], k: int) -> list[dict[str, Any]]:
    """Premultiplied RGBA MSE (per channel, 0..255 scale) against pngquant --nofs."""
    rows = []
    for name, img in images.items():
        ref_out, ref_bytes = pngquant(img, k, "--nofs")
        out, size = ours(img, k, "none")
        pre = premultiplied(img)
        mse = float(np.square(premultiplied(out) - pre).mean())
        ref_mse = float(np.square(premultiplied(ref_out) - pre).mean())
        alpha_kept = bool((out[..., 3][img[..., 3] == 0] == 0).all() and (out[..., 3][img[..., 3] == 255] == 255).all())
        rows.append(
            {
                "section": "icons",
                "image": name,
                "k": k,
                "mse": mse,
                "ref_mse": ref_mse,
                "mse_vs_ref": mse / max(ref_mse, 1e-12),
                "bytes": size,
                "ref_bytes": ref_bytes,
                "alpha_exact": alpha_kept,
            }
        )
    return rows


def _gmean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values)))) if values else float("nan")


def markdown(dither: list[dict], sizes: list[dict], icon: list[dict], info: dict[str, Any]) -> list[str]:
    """The report's sections, with the targets checked from the rows."""
    out = ["# Quality against pngquant (issue 15)", machine_markdown(info)]
    if dither:
        cols = [("image", "image", ""), ("k", "k", "d"), ("method", "method", ""), ("ssim", "SSIM", ".4f")]
        cols += [("blur_psnr", "blurred PSNR dB", ".2f"), ("psnr", "PSNR dB", ".2f"), ("bytes", "bytes", "d")]
        cols += [("ssim_vs_ref", "ΔSSIM", "+.4f"), ("blur_db_vs_ref", "Δblur dB", "+.2f")]
        cols += [("bytes_vs_ref", "bytes ×", ".3f"), ("met", "all 3 met", "")]
        met = {m: [r["met"] for r in dither if r["method"] == m] for m in {r["method"] for r in dither} - {"pngquant"}}
        summary = "; ".join(f"{m}: {sum(v)}/{len(v)} rows meet all three" for m, v in sorted(met.items()))
        out += [
            "## Dithering vs pngquant default (dithered), default speed",
            f"Targets: SSIM ≥ pngquant's, blurred PSNR (σ=1) ≥ pngquant's + {BLUR_DB_MARGIN} dB, "
            f"bytes ≤ {DITHER_BYTES_RATIO}× pngquant's. {summary}.",
            markdown_table(dither, cols),
        ]
    if sizes:
        cols = [("image", "image", ""), ("k", "k", "d"), ("bytes", "bytes", "d"), ("ref_bytes", "pngquant --nofs", "d")]
        cols += [("bytes_vs_ref", "×", ".3f"), ("psnr", "PSNR", ".2f"), ("ref_psnr", "pngquant PSNR", ".2f")]
        cols += [("met", "≤ pngquant", "")]
        ratio = _gmean([r["bytes_vs_ref"] for r in sizes])
        out += [
            "## Undithered bytes vs pngquant --nofs",
            f"Target: every image ≤ pngquant --nofs. Met on {sum(r['met'] for r in sizes)}/{len(sizes)}; "
            f"geometric mean ratio {ratio:.3f}.",
            markdown_table(sizes, cols),
        ]
    if icon:
        cols = [("image", "icon", ""), ("mse", "MSE", ".3f"), ("ref_mse", "pngquant MSE", ".3f")]
        cols += [("mse_vs_ref", "×", ".3f"), ("bytes", "bytes", "d"), ("ref_bytes", "pngquant bytes", "d")]
        cols += [("alpha_exact", "alpha 0/255 kept", "")]
        total = sum(r["mse"] for r in icon) / sum(r["ref_mse"] for r in icon)
        out += [
            f"## RGBA icons vs pngquant --nofs, k={icon[0]['k']}, premultiplied MSE",
            f"Target ≤ {ICON_MSE_RATIO:.2f}×. Mean-MSE ratio over {len(icon)} icons: {total:.3f}; "
            f"geometric mean of ratios {_gmean([r['mse_vs_ref'] for r in icon]):.3f}; "
            f"icons at or below pngquant: {sum(r['mse_vs_ref'] <= 1 for r in icon)}/{len(icon)}.",
            markdown_table(icon, cols),
        ]
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", nargs="+", choices=["dither", "bytes", "icons"], default=["dither", "bytes", "icons"])
    p.add_argument("--images", nargs="+", help="only these photos (default: bundled samples + china, flower)")
    p.add_argument("--dither-k", nargs="+", type=int, default=[16, 64])
    p.add_argument("--bytes-k", nargs="+", type=int, default=[16, 64, 256])
    p.add_argument("--kinds", nargs="+", default=["fs", "adaptive"], help="our dither kinds to compare")
    p.add_argument("--icons", type=int, default=24, help="how many Adwaita icons")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if pngquant_missing():
        return 2
    started = time.time()
    info = machine_info()
    photos = bundled_photos()
    if args.images:
        photos = {n: photos[n] if n in photos else photo(n) for n in args.images}
    dither = dither_rows(photos, args.dither_k, args.kinds) if "dither" in args.sections else []
    sizes = bytes_rows(photos, args.bytes_k) if "bytes" in args.sections else []
    icon = icon_rows(icons(args.icons), 16) if "icons" in args.sections else []
    stem = output_stem("quality", info)
    write_csv(dither + sizes + icon, args.out / f"{stem}.csv")
    path = write_markdown(markdown(dither, sizes, icon, info), args.out, stem, started)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
