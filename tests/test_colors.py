"""Tests of colour sets: packing, exact histograms, lookups and binned means."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from common_utils import photo

from gpu_kquant.colors import bin_colors, color_set, lookup, pack, unpack


@pytest.mark.parametrize("channels", [3, 4])
def test_pack_unpack_round_trip(channels: int) -> None:
    rng = np.random.default_rng(0)
    px = torch.from_numpy(rng.integers(0, 256, (50, 7, channels), dtype=np.uint8))
    keys = pack(px)
    assert keys.shape == (50, 7) and keys.dtype == torch.int32
    assert torch.equal(unpack(keys, channels), px)
    if channels == 3:
        expected = px[..., 0].int() | (px[..., 1].int() << 8) | (px[..., 2].int() << 16)
        assert torch.equal(keys, expected)


@pytest.mark.parametrize("dense", [False, True])
def test_color_set_matches_numpy_unique(dense: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if dense:
        monkeypatch.setattr(importlib.import_module("gpu_kquant.colors"), "_DENSE_MIN_PIXELS", 1)
    img = photo("astronaut")
    cs = color_set(pack(torch.from_numpy(img.copy())))
    colours, counts = np.unique(img.reshape(-1, 3), axis=0, return_counts=True)
    order = np.lexsort((colours[:, 0], colours[:, 1], colours[:, 2]))  # key order: b, then g, then r
    np.testing.assert_array_equal(cs.colors.numpy(), colours[order])
    np.testing.assert_array_equal(cs.counts.numpy(), counts[order])
    # The dense table is left zeroed for the next image.
    again = color_set(pack(torch.from_numpy(img[:10].copy())))
    assert int(again.counts.sum()) == 10 * img.shape[1]


def test_rgba_color_set_and_lookup() -> None:
    rng = np.random.default_rng(1)
    px = torch.from_numpy(rng.integers(0, 4, (30, 20, 4), dtype=np.uint8) * 85)
    keys = pack(px)
    cs = color_set(keys, 4)
    assert int(cs.counts.sum()) == 600 and cs.channels == 4
    values = torch.arange(len(cs), dtype=torch.int32)
    idx = lookup(cs, values, keys)
    assert torch.equal(cs.colors[idx.long()], px)


def test_lookup_rgb() -> None:
    img = torch.from_numpy(photo("chelsea").copy())
    keys = pack(img)
    cs = color_set(keys)
    idx = lookup(cs, torch.arange(len(cs), dtype=torch.int32), keys)
    assert torch.equal(cs.colors[idx.long()], img)


def test_bin_means_are_weighted_means() -> None:
    img = photo("coffee")
    cs = color_set(pack(torch.from_numpy(img.copy())))
    points = cs.colors.float()
    means, counts, inverse, corners = bin_colors(cs.colors, cs.counts, points, 5)
    assert int(counts.sum()) == img.shape[0] * img.shape[1]
    ref = np.zeros((means.shape[0], 3))
    np.add.at(ref, inverse.numpy(), points.double().numpy() * cs.counts.numpy()[:, None])
    np.testing.assert_allclose(means.numpy(), ref / counts.numpy()[:, None], rtol=1e-6)
    # Every colour of a bin shares its top 5 bits per channel.
    top = (cs.colors.long() >> 3).numpy()
    for b in range(0, means.shape[0], 97):
        assert len(np.unique(top[inverse.numpy() == b], axis=0)) == 1
        np.testing.assert_array_equal(top[inverse.numpy() == b][0] << 3, corners[b].numpy())
    # Coarsening the bins gives the histogram of the colours at fewer bits.
    coarser = bin_colors(corners, counts, means, 4)
    direct = bin_colors(cs.colors, cs.counts, points, 4)
    torch.testing.assert_close(coarser[0], direct[0])
    assert torch.equal(coarser[1], direct[1]) and torch.equal(coarser[3], direct[3])
