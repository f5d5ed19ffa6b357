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


# ----------------------------------------------------------------------------- C kernels against the torch code

_C_IMAGES = importlib.import_module("gpu_kquant.kernels.cpu_images")
needs_c_images = pytest.mark.skipif(not _C_IMAGES.AVAILABLE, reason="gpu_kquant._imagekernels not built")


def _with_alpha(img: np.ndarray, seed: int) -> np.ndarray:
    """The photo with a random alpha band (all values), a clear band and opaque elsewhere."""
    rng = np.random.default_rng(seed)
    h, w = img.shape[:2]
    alpha = np.full((h, w), 255, np.uint8)
    alpha[: h // 4] = rng.integers(0, 256, (h // 4, w))
    alpha[h // 2 : h // 2 + 9] = 0
    return np.dstack([img, alpha])


def _photo_cases() -> list[tuple[str, np.ndarray]]:
    cases = []
    for i, name in enumerate(["china", "flower", "astronaut", "coffee"]):
        img = photo(name)
        cases += [(name, img), (f"{name}-crop", img[40:296, 30:286]), (f"{name}-rgba", _with_alpha(img, i))]
    return cases


@needs_c_images
@pytest.mark.parametrize("name,img", _photo_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_c_colour_set_and_lookup_equal_torch(name: str, img: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    colors = importlib.import_module("gpu_kquant.colors")
    pixels = torch.from_numpy(np.array(img))
    ref = color_set(pack(pixels), pixels.shape[2])
    for bucket_min in (1, 1 << 30):  # the C kernel's buckets and its radix sort
        monkeypatch.setattr(colors, "_C_BUCKET_MIN_PIXELS", bucket_min)
        cs = colors.pixel_color_set(pixels)
        assert torch.equal(cs.keys, ref.keys) and torch.equal(cs.counts, ref.counts)
        assert torch.equal(cs.colors, unpack(ref.keys, ref.channels))
    gen = torch.Generator().manual_seed(0)
    for dtype, high in ((torch.uint8, 256), (torch.int32, 1 << 16)):
        values = torch.randint(0, high, (len(ref),), generator=gen).to(dtype)
        assert torch.equal(colors.pixel_lookup(cs, values, pixels), lookup(ref, values, pack(pixels)))


@needs_c_images
@pytest.mark.parametrize("name", ["china", "coffee-rgba"])
@pytest.mark.parametrize("space", ["rgb", "oklab"])
def test_c_bin_colors_equal_torch(name: str, space: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpu_kquant.spaces import ColorSpace

    img = photo(name.split("-")[0])
    img = _with_alpha(img, 3) if name.endswith("rgba") else img
    cs = color_set(pack(torch.from_numpy(np.array(img))), img.shape[2])
    points = ColorSpace(space).points(cs.colors)
    for bits in (8, 6, 3, 1):
        monkeypatch.setenv("GPU_KQUANT_KERNELS", "torch")
        ref = bin_colors(cs.colors, cs.counts, points, bits)
        monkeypatch.setenv("GPU_KQUANT_KERNELS", "c")
        got = bin_colors(cs.colors, cs.counts, points, bits)
        for a, b in zip(got, ref):
            assert a.dtype == b.dtype and torch.equal(a, b)


@needs_c_images
def test_c_rgb_error_is_exact() -> None:
    cs = color_set(pack(torch.from_numpy(photo("coffee").copy())))
    palette = torch.tensor([[0, 0, 0], [255, 255, 255], [200, 120, 40]], dtype=torch.uint8)
    labels = torch.arange(len(cs)) % 3
    total, usage = _C_IMAGES.rgb_error(cs.colors, cs.counts, labels, palette)
    diff = cs.colors.long() - palette[labels].long()
    assert total == int((diff.square().sum(1) * cs.counts).sum())
    assert torch.equal(usage, torch.bincount(labels, weights=cs.counts.double(), minlength=3).long())
    with pytest.raises(ValueError, match="label out of range"):
        _C_IMAGES.rgb_error(cs.colors[:1], cs.counts[:1], torch.tensor([3]), palette)


def test_image_kernels_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpu_kquant.kernels import image_backend

    monkeypatch.setenv("GPU_KQUANT_KERNELS", "torch")
    assert image_backend(torch.device("cpu")) is None
    monkeypatch.setenv("GPU_KQUANT_KERNELS", "auto")
    assert (image_backend(torch.device("cpu")) is not None) == _C_IMAGES.AVAILABLE
    assert image_backend(torch.device("meta")) is None


def test_batched_colour_sets_equal_one_by_one() -> None:
    """One sort keyed by (image, colour) gives every image's own colour set (CPU tensors; CUDA uses it)."""
    colors = importlib.import_module("gpu_kquant.colors")
    rgb = [photo("chelsea")[:150], photo("coffee")[::3, ::3], np.zeros((1, 1, 3), np.uint8), photo("chelsea")[:20]]
    rgba = [_with_alpha(photo("astronaut")[::4, ::4], 5), np.full((3, 5, 4), 7, np.uint8)]
    images = [torch.from_numpy(np.array(img)) for img in (rgb[0], rgba[0], rgb[1], rgb[2], rgba[1], rgb[3])]
    got = colors.batched_color_sets(images)
    assert len(got) == len(images)
    for img, cs in zip(images, got):
        ref = color_set(pack(img), img.shape[2])
        assert cs.channels == ref.channels
        assert torch.equal(cs.keys, ref.keys) and torch.equal(cs.counts, ref.counts)


def _binning_sets(channels: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(colors, counts, points) of photo crops of very different sizes, one colour included."""
    from gpu_kquant.spaces import ColorSpace

    crops = [photo("china")[:200, :300], photo("coffee")[50:60, 0:7], photo("astronaut")[:1, :1], photo("flower")]
    out = []
    for img in crops:
        img = _with_alpha(img, 5) if channels == 4 else img
        cs = color_set(pack(torch.from_numpy(np.array(img))), channels)
        out.append((cs.colors, cs.counts, ColorSpace("oklab").points(cs.colors)))
    return out


@pytest.mark.parametrize("channels", [3, 4])
def test_bin_colors_many_equals_bin_colors_per_set(channels: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batched binning (the torch code CUDA runs) gives each set exactly its own bin_colors."""
    from gpu_kquant.colors import bin_colors_many

    monkeypatch.setenv("GPU_KQUANT_KERNELS", "torch")
    sets = _binning_sets(channels)
    for bits in (6, 4, 1):
        batched = bin_colors_many(sets, bits)
        assert len(batched) == len(sets)
        for s, got in zip(sets, batched):
            for a, b in zip(got, bin_colors(*s, bits)):
                assert a.dtype == b.dtype and torch.equal(a, b)


def test_bin_colors_many_waits_on_the_device_a_fixed_number_of_times(monkeypatch: pytest.MonkeyPatch) -> None:
    from common_utils import count_syncs

    from gpu_kquant.colors import bin_colors_many

    monkeypatch.setenv("GPU_KQUANT_KERNELS", "torch")
    few, many = _binning_sets(3)[:2], _binning_sets(3) * 3
    assert count_syncs(lambda: bin_colors_many(few, 6)) == count_syncs(lambda: bin_colors_many(many, 6))
    assert count_syncs(lambda: bin_colors_many(many, 6)) == ["_unique2", "tolist"]
    # each set on its own waits at least once per set
    assert len(count_syncs(lambda: [bin_colors(*s, 6) for s in many])) >= len(many)
