"""Dataset throughput (``python -m benchmarks.datasets``): shard to shard against loose files.

The same N JPEGs (crops of the benchmark mosaics, img2dataset-like sizes) are laid
out three ways: loose files in a folder, WebDataset tar shards (``<key>.jpg`` +
``<key>.txt``) and one Parquet file per shard; each layout goes through the
``gpu_kquant`` command line in a fresh process (same k, device and threads), whole
process timed, output written in the input's own layout. A process that only
imports the command line is timed too, so start-up can be told apart. The point:
unpacking a dataset into files must not be needed to be fast.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .harness import machine_info, machine_markdown, markdown_table, output_stem, write_csv, write_markdown
from .images import mosaic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _jpegs(n: int, size: int) -> list[bytes]:
    """n JPEGs of size x size cut from the mosaics (deterministic)."""
    out: list[bytes] = []
    index = 0
    while len(out) < n:
        big = mosaic(1280, 800, index)
        for y in range(0, 800 - size + 1, size):
            for x in range(0, 1280 - size + 1, size):
                buf = io.BytesIO()
                Image.fromarray(np.ascontiguousarray(big[y : y + size, x : x + size])).save(buf, "JPEG", quality=90)
                out.append(buf.getvalue())
        index += 1
    return out[:n]


def _layouts(root: Path, jpegs: list[bytes], per_shard: int) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files, shards, parquet = root / "files", root / "shards", root / "parquet"
    for folder in (files, shards, parquet):
        folder.mkdir(parents=True)
    for i, data in enumerate(jpegs):
        (files / f"{i:09d}.jpg").write_bytes(data)
    for s in range(0, len(jpegs), per_shard):
        part = jpegs[s : s + per_shard]
        keys = [f"{s + i:09d}" for i in range(len(part))]
        with tarfile.open(shards / f"{s // per_shard:05d}.tar", "w") as tar:
            for key, data in zip(keys, part):
                for ext, payload in (("jpg", data), ("txt", f"caption {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        table = pa.table({"key": keys, "jpg": pa.array(part, pa.binary()), "caption": [f"caption {k}" for k in keys]})
        pq.write_table(table, parquet / f"{s // per_shard:05d}.parquet")
    return {"loose files -> files": files, "webdataset -> webdataset": shards, "parquet -> parquet": parquet}


def _run(argv: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "gpu_kquant", *argv], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(f"gpu_kquant {' '.join(argv)} failed:\n{result.stderr}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=240)
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--per-shard", type=int, default=60)
    p.add_argument("-k", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    started = time.time()
    info = machine_info()
    jpegs = _jpegs(args.images, args.size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_kquant_bench_") as tmp:
        layouts = _layouts(Path(tmp), jpegs, args.per_shard)
        startup = statistics.median(_run(["--version"]) for _ in range(3))
        for name, src in layouts.items():
            times = []
            for r in range(args.repeats):
                out = Path(tmp) / f"out-{name.split()[0]}-{r}"
                times.append(_run([str(src), "-o", str(out), "-k", str(args.k), "--device", args.device, "--quiet"]))
            best = min(times)
            rows.append(
                {
                    "layout": name,
                    "images": args.images,
                    "seconds": round(best, 2),
                    "images_per_s": round(args.images / best, 1),
                    "images_per_s_after_startup": round(args.images / max(best - startup, 1e-9), 1),
                }
            )
            print(rows[-1], flush=True)
    stem = output_stem("datasets", info)
    write_csv(rows, args.out / f"{stem}.csv")
    columns = [
        ("layout", "layout", ""),
        ("seconds", "wall s", ".2f"),
        ("images_per_s", "images/s", ".1f"),
        ("images_per_s_after_startup", "images/s after start-up", ".1f"),
    ]
    intro = (
        f"# Dataset throughput\n\n{args.images} JPEGs of {args.size}x{args.size}, {args.per_shard} per shard, "
        f"k={args.k}, device {args.device}, best of {args.repeats}; process start-up (import) {startup:.2f} s.\n\n"
        + machine_markdown(info)
    )
    print(write_markdown([intro, markdown_table(rows, columns)], args.out, stem, started))


if __name__ == "__main__":
    main()
