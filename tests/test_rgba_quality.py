"""RGBA quantization: alpha rules, and the colour budget against pngquant on a real icon."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gpu_kquant import quantize
from gpu_kquant.metrics import premultiplied

ICONS = sorted(Path("/usr/share/icons/Adwaita/512x512").glob("*/*.png"))


def icon_like(size: int = 96) -> np.ndarray:
    """An anti-aliased disc (opaque gradient inside, partial alpha on its rim) on transparency."""
    y, x = np.mgrid[:size, :size] + 0.5
    r = np.hypot(x - size / 2, y - size / 2)
    alpha = np.clip((size * 0.4 - r) * 128 + 128, 0, 255)  # a rim about 2 px wide
    rgb = np.stack([x * 255 / size, y * 255 / size, np.full_like(x, 90)], -1)
    return np.dstack([rgb, alpha]).round().astype(np.uint8)


@pytest.mark.parametrize("dither", ["none", "adaptive"])
def test_transparent_stays_transparent_and_opaque_stays_opaque(dither: str) -> None:
    img = icon_like()
    a = img[..., 3]
    assert ((a > 0) & (a < 255)).any()
    out = quantize(img, 16, dither=dither).to_array()
    assert (out[a == 0][:, 3] == 0).all()
    assert (out[a == 255][:, 3] == 255).all()
    assert (out[(a > 0) & (a < 255)][:, 3] > 0).all()


@pytest.mark.skipif(not ICONS or shutil.which("pngquant") is None, reason="needs Adwaita icons and pngquant")
def test_icon_set_premultiplied_mse_is_not_worse_than_pngquant(tmp_path: Path) -> None:
    # The first 12 Adwaita 512 px icons in sorted order, k=16: the old budget rule gave
    # 1.83x pngquant --nofs's summed MSE, the error-curve rule 0.85x (benchmarks/quality.py).
    ours_sum, ref_sum = 0.0, 0.0
    for path in ICONS[:12]:
        img = np.asarray(Image.open(path).convert("RGBA"))
        dst = tmp_path / "out.png"
        subprocess.run(["pngquant", "--nofs", "--force", "--output", str(dst), "16", str(path)], check=True)
        ref = np.asarray(Image.open(dst).convert("RGBA"))
        pre = premultiplied(img)
        ours_sum += float(np.square(premultiplied(quantize(img, 16).to_array()) - pre).mean())
        ref_sum += float(np.square(premultiplied(ref) - pre).mean())
    assert ours_sum <= ref_sum
