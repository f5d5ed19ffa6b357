"""Indexed-PNG size: palette order, row filter and deflate settings (``python -m benchmarks.png_bytes``).

For the bundled photos (gpu_kquant/samples plus scikit-learn's china and flower),
undithered, at k = 16, 64 and 256: the IDAT size of the same indices under

* palette orders: as fitted (transparent first, then pixel count), by luminance, and a
  nearest-neighbour chain (each entry followed by the nearest unused one, from the darkest),
  which makes neighbouring indices close colours;
* row filters: None, Sub, Up, Paeth, and adaptive (per row the filter with the least sum
  of absolute signed bytes, libpng's heuristic);
* zlib: level 6 (the default) and 9, memLevel 8 and 9, strategies default / filtered / RLE,
  and libdeflate (``pip install deflate``) when installed;

against ``pngquant --nofs`` (default speed) file bytes. Encode times are per call.
Writes ``benchmarks/results/png_bytes_<machine>_<date>.{csv,md}``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gpu_kquant import quantize
from gpu_kquant.pngfile import _pack_rows, encode_png

from .harness import machine_info, machine_markdown, markdown_table, output_stem, write_csv, write_markdown
from .quality import RESULTS, bundled_photos, pngquant

try:
    import deflate
except ImportError:  # optional: only measured where installed
    deflate = None  # type: ignore[assignment]

# The PNG file around an IDAT (signature, IHDR, PLTE 3k, IEND, chunk overheads), to compare whole files.
OVERHEAD = 8 + 25 + 12 + 12 + 12


def luminance_order(palette: np.ndarray) -> np.ndarray:
    """Entries sorted by Rec. 601 luma."""
    return np.argsort(palette[:, :3].astype(np.float64) @ [0.299, 0.587, 0.114], kind="stable")


def chain_order(palette: np.ndarray) -> np.ndarray:
    """Nearest-neighbour chain from the darkest entry: neighbouring indices are close colours."""
    p = palette[:, :3].astype(np.float64)
    left = list(range(len(p)))
    cur = int(np.argmin(p @ [0.299, 0.587, 0.114]))
    order = [cur]
    left.remove(cur)
    while left:
        d = ((p[left] - p[cur]) ** 2).sum(1)
        cur = left[int(np.argmin(d))]
        order.append(cur)
        left.remove(cur)
    return np.array(order)


def filtered(rows: np.ndarray, kind: str) -> np.ndarray:
    """(H, B) packed rows -> (H, B + 1) with the filter byte; bpp = 1 (indexed colour)."""
    x = rows.astype(np.int16)
    left = np.zeros_like(x)
    left[:, 1:] = x[:, :-1]
    up = np.zeros_like(x)
    up[1:] = x[:-1]
    upleft = np.zeros_like(x)
    upleft[1:, 1:] = x[:-1, :-1]
    p = left + up - upleft
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    preds = {"none": np.zeros_like(x), "sub": left, "up": up, "paeth": paeth}
    codes = {"none": 0, "sub": 1, "up": 2, "paeth": 4}
    if kind == "adaptive":
        outs = {k: ((x - v) & 255).astype(np.uint8) for k, v in preds.items()}
        cost = np.stack([np.abs(outs[k].view(np.int8).astype(np.int32)).sum(1) for k in preds])
        pick = cost.argmin(0)
        names = list(preds)
        body = np.stack([outs[names[c]][i] for i, c in enumerate(pick)])
        flag = np.array([codes[names[c]] for c in pick], np.uint8)
    else:
        body = ((x - preds[kind]) & 255).astype(np.uint8)
        flag = np.full(x.shape[0], codes[kind], np.uint8)
    return np.concatenate([flag[:, None], body], 1)


def zlib_size(raw: bytes, level: int = 6, mem: int = 8, strategy: int = zlib.Z_DEFAULT_STRATEGY) -> int:
    c = zlib.compressobj(level, zlib.DEFLATED, 15, mem, strategy)
    return len(c.compress(raw) + c.flush())


def variants() -> dict[str, Callable[[np.ndarray, int], tuple[bytes, int]]]:
    """name -> (indices, bits) -> (raw filtered data, compressed size) under that setting."""

    def make(order: str, filt: str, comp: Callable[[bytes], int]) -> Callable[[np.ndarray, int], tuple[bytes, int]]:
        def run(idx: np.ndarray, bits: int) -> tuple[bytes, int]:
            raw = filtered(_pack_rows(idx, bits), filt).tobytes()
            return raw, comp(raw)

        return run

    out = {}
    for filt in ("none", "sub", "up", "paeth", "adaptive"):
        out[f"filter {filt}, level 6"] = make("as fitted", filt, zlib_size)
    out["filter none, level 6, memLevel 9"] = make("", "none", lambda r: zlib_size(r, 6, 9))
    out["filter none, level 6, Z_FILTERED"] = make("", "none", lambda r: zlib_size(r, 6, 8, zlib.Z_FILTERED))
    out["filter none, level 6, Z_RLE"] = make("", "none", lambda r: zlib_size(r, 6, 8, zlib.Z_RLE))
    out["filter none, level 9"] = make("", "none", lambda r: zlib_size(r, 9))
    out["filter none, level 9, memLevel 9"] = make("", "none", lambda r: zlib_size(r, 9, 9))
    if deflate is not None:
        for lv in (6, 9, 12):
            out[f"filter none, libdeflate {lv}"] = make("", "none", lambda r, lv=lv: len(deflate.zlib_compress(r, lv)))
    return out


def rows_for(name: str, img: np.ndarray, k: int, orders: Sequence[str], reps: int) -> list[dict[str, Any]]:
    q = quantize(img, k, device="cpu")
    _, ref_bytes = pngquant(img, k, "--nofs")
    n = q.palette.shape[0]
    bits = 1 if n <= 2 else 2 if n <= 4 else 4 if n <= 16 else 8
    current = len(encode_png(q.palette, q.indices))
    base = {"image": name, "k": k, "colors": n, "pngquant_nofs": ref_bytes, "current": current}
    perms = {"as fitted": np.arange(n), "luminance": luminance_order(q.palette), "chain": chain_order(q.palette)}
    out = []
    for order in orders:
        inverse = np.empty(n, np.int64)
        inverse[perms[order]] = np.arange(n)
        idx = inverse[q.indices].astype(np.uint8)
        for vname, fn in variants().items():
            if order != "as fitted" and not vname.endswith(", level 6"):
                continue  # orders only with the plain level-6 filters
            t0 = time.perf_counter()
            for _ in range(reps):
                _, size = fn(idx, bits)
            seconds = (time.perf_counter() - t0) / reps
            total = size + OVERHEAD + 3 * n
            out.append(
                {
                    **base,
                    "order": order,
                    "variant": vname,
                    "bytes": total,
                    "vs_current": total / current,
                    "vs_pngquant": total / ref_bytes,
                    "encode_ms": 1000 * seconds,
                }
            )
    return out


def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> list[str]:
    keys = sorted({(r["order"], r["variant"]) for r in rows}, key=lambda t: (t[0] != "as fitted", t))
    summary = []
    for order, variant in keys:
        sel = [r for r in rows if r["order"] == order and r["variant"] == variant]
        gm = float(np.exp(np.mean(np.log([r["vs_current"] for r in sel]))))
        summary.append(
            {
                "order": order,
                "variant": variant,
                "gmean_vs_current": gm,
                "gmean_vs_pngquant": float(np.exp(np.mean(np.log([r["vs_pngquant"] for r in sel])))),
                "at_or_below_pngquant": f"{sum(r['vs_pngquant'] <= 1 for r in sel)}/{len(sel)}",
                "worst_vs_pngquant": max(r["vs_pngquant"] for r in sel),
                "encode_ms": float(np.mean([r["encode_ms"] for r in sel])),
            }
        )
    cols = [("order", "palette order", ""), ("variant", "filter / deflate", "")]
    cols += [("gmean_vs_current", "× current (gmean)", ".4f"), ("gmean_vs_pngquant", "× pngquant (gmean)", ".4f")]
    cols += [("at_or_below_pngquant", "≤ pngquant", ""), ("worst_vs_pngquant", "worst × pngquant", ".4f")]
    cols += [("encode_ms", "encode ms (mean)", ".1f")]
    per = [r for r in rows if r["order"] == "as fitted"]
    pcols = [("image", "image", ""), ("k", "k", "d"), ("variant", "variant", ""), ("bytes", "bytes", "d")]
    pcols += [("pngquant_nofs", "pngquant --nofs", "d"), ("vs_pngquant", "× pngquant", ".4f")]
    return [
        "# Indexed PNG bytes: palette order, filters, deflate (issue 15)",
        machine_markdown(info),
        "Undithered `quantize` output (default options) of the bundled photos; `current` is `encode_png` "
        "as it was (filter None, level 6 at k > 8, 8-bit packing tried at level 9 only). Bytes are whole files.",
        "## Summary over images and k",
        markdown_table(summary, cols),
        "## Per image (palette as fitted)",
        markdown_table(per, pcols),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.png_bytes", description=__doc__.split("\n\n")[0])
    p.add_argument("--k", nargs="+", type=int, default=[16, 64, 256])
    p.add_argument("--orders", nargs="+", default=["as fitted", "luminance", "chain"])
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if shutil.which("pngquant") is None:
        print("pngquant is not installed (apt-get install pngquant)", file=sys.stderr)
        return 2
    started = time.time()
    info = machine_info()
    rows = []
    for name, img in bundled_photos().items():
        for k in args.k:
            rows += rows_for(name, img, k, args.orders, args.reps)
            print(name, k, flush=True)
    stem = output_stem("png_bytes", info)
    write_csv(rows, args.out / f"{stem}.csv")
    path = write_markdown(markdown(rows, info), args.out, stem, started)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
