"""Tests of shared palettes: exact histograms, fitting, files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from common_utils import photo

from gpu_kquant import ColorHistogram, Palette, quantize
from gpu_kquant.colors import color_set, pack


def test_histogram_sum_equals_histogram_of_concatenation() -> None:
    a, b = photo("chelsea"), photo("coffee")[:, :451]
    hist = ColorHistogram().add(a).add(b)
    together = color_set(pack(torch.from_numpy(np.concatenate([a, b]))))
    summed = hist.color_set()
    assert torch.equal(summed.keys, together.keys) and torch.equal(summed.counts, together.counts)
    assert hist.images == 2 and hist.pixels == a.shape[0] * a.shape[1] + b.shape[0] * b.shape[1]


def test_histograms_merge_like_one() -> None:
    imgs = [photo("chelsea"), photo("coffee"), photo("astronaut")]
    one = ColorHistogram()
    for img in imgs:
        one.add(img)
    parts = [ColorHistogram().add(img) for img in imgs]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert torch.equal(one.color_set().counts, merged.color_set().counts)


def test_rgba_histogram() -> None:
    img = photo("chelsea")[:50, :60]
    alpha = np.full((50, 60), 255, np.uint8)
    alpha[:10] = 0
    alpha[10:20] = 128
    rgba = np.dstack([img, alpha])
    cs = ColorHistogram().add(rgba).add(img).color_set()
    assert cs.channels == 4
    direct = color_set(
        pack(torch.from_numpy(np.concatenate([rgba, np.dstack([img, np.full((50, 60), 255, np.uint8)])]))), 4
    )
    assert torch.equal(cs.keys, direct.keys) and torch.equal(cs.counts, direct.counts)


def test_fit_and_apply_gives_identical_palettes() -> None:
    imgs = [photo("chelsea"), photo("coffee"), photo("astronaut")]
    pal = Palette.fit(imgs, 32)
    assert len(pal) <= 32 and pal.colors.dtype == np.uint8
    results = pal.apply(imgs)
    for q in results:
        np.testing.assert_array_equal(q.palette, pal.colors)
    # The shared palette serves each image worse than its own, but not by much.
    own = np.mean([quantize(img, 32).mse for img in imgs])
    shared = np.mean([q.mse for q in results])
    assert own < shared < 2.5 * own


@pytest.mark.parametrize("suffix", [".json", ".npy", ".gpl", ".png"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, suffix: str) -> None:
    img = photo("coffee")
    pal = Palette.fit([img], 16, space="oklab" if suffix == ".json" else "rgb")
    path = pal.save(tmp_path / f"palette{suffix}")
    loaded = Palette.load(path, space=None if suffix == ".json" else pal.space)
    assert loaded == pal
    np.testing.assert_array_equal(
        quantize(img, palette=loaded, space=loaded.space).indices, pal.apply([img])[0].indices
    )


def test_imagegpt_centres(tmp_path) -> None:
    rng = np.random.default_rng(0)
    centres = rng.uniform(-1, 1, (512, 3)).astype(np.float32)
    np.save(tmp_path / "kmeans_centers.npy", centres)
    pal = Palette.load(tmp_path / "kmeans_centers.npy")
    assert len(pal) == 512
    np.testing.assert_array_equal(pal.colors, np.rint(127.5 * (centres + 1)).astype(np.uint8))
    q = quantize(photo("chelsea"), palette=pal)
    assert q.indices.dtype == np.uint16 and q.indices.max() < 512


def test_transparent_palette_png(tmp_path) -> None:
    pal = Palette(np.array([[0, 0, 0, 0], [10, 20, 30, 128], [200, 100, 0, 255]], np.uint8))
    assert Palette.load(pal.save(tmp_path / "p.png")) == pal


def test_bad_palettes(tmp_path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        Palette(np.zeros((3, 3), np.float32))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unknown palette file type"):
        Palette(np.zeros((3, 3), np.uint8)).save(tmp_path / "x.txt")
    from PIL import Image

    Image.new("RGB", (2, 2)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="no palette"):
        Palette.load(tmp_path / "rgb.png")
