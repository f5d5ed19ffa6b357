"""Tests of Floyd-Steinberg and ordered dithering."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from common_utils import photo

from gpu_kquant import map_to_palette, quantize
from gpu_kquant.spaces import ColorSpace

dither = importlib.import_module("gpu_kquant.dither")


def flat_region() -> np.ndarray:
    """A large flat colour that no palette entry matches."""
    return np.full((64, 96, 3), (100, 150, 60), np.uint8)


PALETTE = np.array([[0, 0, 0], [255, 255, 255], [90, 140, 50], [120, 170, 80], [200, 40, 40]], np.uint8)


@pytest.mark.parametrize("method", ["fs", "ordered"])
def test_dithering_preserves_the_mean_colour_of_flat_areas(method: str) -> None:
    img = flat_region()
    plain = map_to_palette([img], PALETTE)[0].to_rgb().reshape(-1, 3).mean(0)
    dithered = map_to_palette([img], PALETTE, dither=method)[0].to_rgb().reshape(-1, 3).mean(0)
    target = img.reshape(-1, 3).mean(0)
    assert np.abs(dithered - target).sum() < 0.5 * np.abs(plain - target).sum()


@pytest.mark.parametrize("method", ["fs", "ordered"])
def test_dithered_output_uses_only_palette_colours_and_is_deterministic(method: str) -> None:
    img = photo("chelsea")
    a = quantize(img, 16, dither=method, seed=2)
    b = quantize(img, 16, dither=method, seed=2)
    np.testing.assert_array_equal(a.indices, b.indices)
    colours = {tuple(c) for c in a.to_rgb().reshape(-1, 3)}
    assert colours <= {tuple(c) for c in a.palette}
    assert a.blurred_psnr is not None and a.blurred_psnr > a.psnr  # per-pixel PSNR penalises dithering


def test_fs_kernel_matches_reference_implementation() -> None:
    rng = np.random.default_rng(0)
    img = photo("coffee")[:40, :57]
    palette = rng.integers(0, 256, (24, 3), dtype=np.uint8)
    space = ColorSpace("rgb")
    fast = dither.floyd_steinberg(img, palette, space)
    pixels = img.reshape(-1, 3)
    import torch

    points = space.points(torch.from_numpy(pixels.copy())).numpy()
    pal_points = space.points(torch.from_numpy(palette)).numpy()
    bounds = dither.channel_bounds(space, 3)
    ref = np.empty((40, 57), np.int32)
    max_error = 2.0 * dither.palette_spacing(torch.from_numpy(pal_points))
    dither._fs_dither_python(
        points, dither.pixel_classes(None, (40, 57)), pal_points, dither.entry_flags(palette), bounds, ref, max_error
    )
    np.testing.assert_array_equal(fast, ref)


def test_fs_keeps_alpha_rules() -> None:
    img = photo("chelsea")[:60, :80]
    alpha = np.zeros((60, 80), np.uint8)
    alpha[:, 30:] = 255
    alpha[:, 20:30] = 90
    q = quantize(np.dstack([img, alpha]), 12, dither="fs")
    out = q.to_array()
    assert (out[alpha == 0][:, 3] == 0).all()
    assert (out[alpha == 255][:, 3] == 255).all()


def test_error_clamping_limits_streaks() -> None:
    # A saturated colour far outside the palette: undamped error would build up and
    # spray the darkest entry across the area; clamping keeps the result near-flat.
    img = np.full((32, 64, 3), (255, 0, 0), np.uint8)
    palette = np.array([[0, 0, 0], [128, 0, 0], [200, 30, 30]], np.uint8)
    q = map_to_palette([img], palette, dither="fs")[0]
    share_black = (q.indices == 0).mean()
    assert share_black < 0.05


def test_bad_dither_name() -> None:
    with pytest.raises(ValueError, match="dither"):
        quantize(photo("chelsea"), 4, dither="atkinson")
