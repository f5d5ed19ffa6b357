"""Issue 10's quality bars on the four 0.25-MP photos (``python -m benchmarks.quality_bars``).

PSNR and PNG bytes of ``quantize`` (default settings, default encoder) against
``pngquant --nofs`` at k = 16, 64 and 256; prints one line per k.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image
from sklearn.datasets import load_sample_image

from gpu_kquant import quantize
from gpu_kquant.imagefiles import encode_png


def photos() -> dict[str, np.ndarray]:
    """The four bundled photos, (H, W, 3) uint8."""
    return {
        "china": load_sample_image("china.jpg"),
        "flower": load_sample_image("flower.jpg"),
        "astronaut": skimage.data.astronaut()[..., :3],
        "coffee": skimage.data.coffee(),
    }


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB over all channels."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255**2 / mse)


def compare(k: int, images: dict[str, np.ndarray], folder: Path) -> str:
    """One line: mean PSNR of both, the difference, and bytes ratios (mean and per photo)."""
    ours, theirs, our_bytes, their_bytes = [], [], [], []
    for name, im in images.items():
        im = np.ascontiguousarray(im)
        src, out = folder / f"{name}.png", folder / f"{name}-{k}.png"
        Image.fromarray(im).save(src)
        q = quantize(im, k, device="cpu")
        ours.append(q.psnr)
        our_bytes.append(len(encode_png(q.palette, q.indices)))
        subprocess.run(["pngquant", "--nofs", "--force", "--output", str(out), str(k), str(src)], check=True)
        theirs.append(psnr(im, np.asarray(Image.open(out).convert("RGB"))))
        their_bytes.append(out.stat().st_size)
    per_photo = [round(a / b, 3) for a, b in zip(our_bytes, their_bytes)]
    return (
        f"k={k}: gpu_kquant {np.mean(ours):.2f} dB, pngquant --nofs {np.mean(theirs):.2f} dB, "
        f"diff {np.mean(ours) - np.mean(theirs):+.2f} dB; bytes ratio of means "
        f"{np.mean(our_bytes) / np.mean(their_bytes):.3f}, per photo {per_photo} ({', '.join(images)})"
    )


def main() -> None:
    images = photos()
    with tempfile.TemporaryDirectory() as tmp:
        for k in (16, 64, 256):
            print(compare(k, images, Path(tmp)))


if __name__ == "__main__":
    main()
