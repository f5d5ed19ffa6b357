"""Write the deterministic benchmark images as PNG files.

2560x1600 mosaics (the classic tutorial's size) tiled from the photos bundled with
scikit-learn and scikit-image, optionally images of given megapixel sizes for
scaling curves and the source photos themselves. Nothing is downloaded. The
image code lives in :mod:`benchmarks.images` (re-exported here), so benchmarks
build the same pixels in memory without these files.

    python scripts/make_mosaics.py --count 4 --megapixels 0.25 1 4 16 --out benchmarks/.cache
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.images import MOSAIC_SIZE, PHOTOS, image_of_size, mosaic, photo, save_png  # noqa: E402

__all__ = ["MOSAIC_SIZE", "PHOTOS", "image_of_size", "main", "mosaic", "photo", "write_images"]

DEFAULT_OUT = ROOT / "benchmarks" / ".cache"


def write_images(out: Path, count: int, megapixels: Sequence[float] = (), photos: bool = False) -> list[Path]:
    """Write ``mosaic<i>.png`` for i < count, ``<mp>mp.png`` per size and, with ``photos``, the sources."""
    paths = [save_png(mosaic(*MOSAIC_SIZE, index=i), out / f"mosaic{i}.png") for i in range(count)]
    paths += [save_png(image_of_size(mp), out / f"{mp:g}mp.png") for mp in megapixels]
    if photos:
        paths += [save_png(photo(name), out / f"{name}.png") for name in PHOTOS]
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=2, help="number of 2560x1600 mosaics (default 2)")
    p.add_argument("--megapixels", nargs="*", type=float, default=[], help="also write 16:10 images of these sizes")
    p.add_argument("--photos", action="store_true", help="also write the ten source photos")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    for path in write_images(args.out, args.count, args.megapixels, args.photos):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
