"""Tests of image quantization: quality against scikit-learn and Pillow, exactness, edge cases."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from common_utils import cpu_and_cuda, needs_cuda, photo
from PIL import Image

from gpu_kquant import map_to_palette, quantize, quantize_batch

QUALITY_PHOTOS = ["china", "astronaut", "coffee"]


def nearest_entry_error(image: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Squared distance (float64) from every pixel to its nearest palette entry."""
    px = image.reshape(-1, image.shape[-1]).astype(np.float64)
    best = np.full(px.shape[0], np.inf)
    for entry in palette.astype(np.float64):
        best = np.minimum(best, ((px - entry) ** 2).sum(1))
    return best


def sklearn_full_fit_mse(image: np.ndarray, k: int) -> float:
    cluster = pytest.importorskip("sklearn.cluster")
    threadpoolctl = pytest.importorskip("threadpoolctl")
    px = image.reshape(-1, 3).astype(np.float32)
    # One OpenMP thread: scikit-learn's idle spinning workers would otherwise compete
    # with torch's on a 2-core machine and slow the rest of the test session.
    with threadpoolctl.threadpool_limits(1):
        return cluster.KMeans(k, n_init=1, random_state=0).fit(px).inertia_ / px.size


def pillow_default_mse(image: np.ndarray, k: int) -> float:
    out = np.asarray(Image.fromarray(image).quantize(k).convert("RGB")).astype(np.float64)
    return float(((out - image) ** 2).mean())


@pytest.mark.parametrize("k", [16, 64])
def test_quality_matches_sklearn_full_fit_and_beats_pillow(k: int) -> None:
    ours = [quantize(photo(name), k, device="cpu").mse for name in QUALITY_PHOTOS]
    reference = [sklearn_full_fit_mse(photo(name), k) for name in QUALITY_PHOTOS]
    pillow = [pillow_default_mse(photo(name), k) for name in QUALITY_PHOTOS]
    assert np.mean(ours) <= 1.01 * np.mean(reference), (ours, reference)
    assert np.mean(ours) < np.mean(pillow), (ours, pillow)


def test_every_pixel_gets_its_nearest_palette_entry() -> None:
    img = photo("chelsea")
    # A small fit budget forces the histogram path with bin-guided mapping.
    for options in ({}, {"max_fit_points": 2048}):
        q = quantize(img, 32, **options)
        err = ((q.to_rgb().astype(np.float64) - img) ** 2).sum(-1).reshape(-1)
        np.testing.assert_array_equal(err, nearest_entry_error(img, q.palette))
        assert q.mse == pytest.approx(err.mean() / 3)


def test_output_contract() -> None:
    img = photo("coffee")
    q = quantize(img, 16)
    assert q.palette.dtype == np.uint8 and q.palette.shape == (q.n_colors, 3)
    assert q.indices.dtype == np.uint8 and q.indices.shape == img.shape[:2]
    assert q.n_colors <= 16
    np.testing.assert_array_equal(q.to_rgb(), q.palette[q.indices])
    counts = np.bincount(q.indices.reshape(-1), minlength=q.n_colors)
    assert (counts > 0).all() and (np.diff(counts) <= 0).all()  # all used, most used first
    pil = q.to_pil()
    assert pil.mode == "P"
    np.testing.assert_array_equal(np.asarray(pil.convert("RGB")), q.to_rgb())
    assert q.psnr == pytest.approx(10 * np.log10(255**2 / q.mse))


def test_accepts_pil_numpy_and_tensor() -> None:
    img = photo("chelsea")
    a = quantize(img, 8)
    b = quantize(Image.fromarray(img), 8)
    c = quantize(torch.from_numpy(img.copy()), 8)
    for other in (b, c):
        np.testing.assert_array_equal(a.palette, other.palette)
        np.testing.assert_array_equal(a.indices, other.indices)


def test_batch_equals_alone() -> None:
    imgs = [photo("chelsea"), photo("coffee")[:123, :301], photo("astronaut")[::3, ::2]]
    together = quantize_batch(imgs, 12, seed=5)
    for img, q in zip(imgs, together):
        alone = quantize(img, 12, seed=5)
        np.testing.assert_array_equal(q.palette, alone.palette)
        np.testing.assert_array_equal(q.indices, alone.indices)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_deterministic(device: str) -> None:
    img = photo("astronaut")
    a = quantize(img, 32, seed=3, device=device)
    b = quantize(img, 32, seed=3, device=device)
    np.testing.assert_array_equal(a.palette, b.palette)
    np.testing.assert_array_equal(a.indices, b.indices)


def test_few_colours_are_kept_exactly() -> None:
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (5, 3), dtype=np.uint8)
    img = colours[rng.integers(0, 5, (40, 30))]
    q = quantize(img, 16)
    assert q.n_colors == 5 and q.mse == 0 and q.psnr == float("inf")
    np.testing.assert_array_equal(q.to_rgb(), img)


@pytest.mark.parametrize("k", [1, 2, 256])
def test_edge_k(k: int) -> None:
    img = photo("chelsea")
    q = quantize(img, k)
    assert 1 <= q.n_colors <= k
    err = ((q.to_rgb().astype(np.float64) - img) ** 2).sum(-1).reshape(-1)
    np.testing.assert_array_equal(err, nearest_entry_error(img, q.palette))


def test_k1_gives_the_mean_colour() -> None:
    img = photo("coffee")
    q = quantize(img, 1)
    np.testing.assert_array_equal(q.palette[0], np.round(img.reshape(-1, 3).mean(0)).astype(np.uint8))


def test_one_colour_and_one_pixel_images() -> None:
    flat = np.full((7, 9, 3), 77, np.uint8)
    q = quantize(flat, 8)
    assert q.n_colors == 1 and q.mse == 0
    one = quantize(np.array([[[1, 2, 3]]], np.uint8), 4)
    np.testing.assert_array_equal(one.palette, [[1, 2, 3]])
    assert one.indices.shape == (1, 1)


def test_large_k_uses_uint16_indices() -> None:
    img = photo("chelsea")
    q = quantize(img, 1000)
    assert q.indices.dtype == np.uint16 and 256 < q.n_colors <= 1000
    assert q.to_pil().mode == "RGB"


def test_batch_of_64_images() -> None:
    base = photo("chelsea")
    imgs = [
        np.ascontiguousarray(base[(i % 8) * 30 : (i % 8) * 30 + 40, (i // 8) * 50 : (i // 8) * 50 + 60])
        for i in range(64)
    ]
    out = quantize_batch(imgs, 6)
    assert len(out) == 64
    for img, q in zip(imgs[::9], out[::9]):
        assert q.indices.shape == img.shape[:2] and q.n_colors <= 6


def test_dense_and_sorted_colour_histograms_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    img = photo("astronaut")
    a = quantize(img, 16)
    monkeypatch.setattr(importlib.import_module("gpu_kquant.colors"), "_DENSE_MIN_PIXELS", 1)
    b = quantize(img, 16)
    np.testing.assert_array_equal(a.palette, b.palette)
    np.testing.assert_array_equal(a.indices, b.indices)


def test_rgba_keeps_transparency() -> None:
    img = photo("chelsea")
    h, w = img.shape[:2]
    alpha = np.zeros((h, w), np.uint8)
    alpha[:, w // 3 :] = 255
    alpha[:, w // 3 : w // 2] = np.linspace(1, 254, w // 2 - w // 3).astype(np.uint8)
    rgba = np.dstack([img, alpha])
    q = quantize(rgba, 16)
    assert q.has_alpha and q.n_colors <= 16
    out = q.to_array()
    assert (out[alpha == 0][:, 3] == 0).all()
    assert (out[alpha == 255][:, 3] == 255).all()
    assert ((out[(alpha > 0) & (alpha < 255)][:, 3]) > 0).all()
    assert (q.palette[:, 3] == 0).sum() == 1  # exactly one fully transparent entry
    opaque = q.palette[:, 3] == 255
    assert not opaque[: np.argmax(opaque)].any() and opaque[np.argmax(opaque) :].all()  # transparent first
    pil = q.to_pil()
    np.testing.assert_array_equal(np.asarray(pil.convert("RGBA")), out)


def test_opaque_rgba_becomes_rgb() -> None:
    img = photo("chelsea")
    q = quantize(np.dstack([img, np.full(img.shape[:2], 255, np.uint8)]), 8)
    ref = quantize(img, 8)
    assert not q.has_alpha
    np.testing.assert_array_equal(q.palette, ref.palette)


def test_map_to_fixed_palette() -> None:
    img = photo("coffee")
    palette = np.array([[0, 0, 0], [255, 255, 255], [200, 100, 50], [90, 60, 30]], np.uint8)
    (q,) = map_to_palette([img], palette)
    np.testing.assert_array_equal(q.palette, palette)  # kept whole and in order
    err = ((q.to_rgb().astype(np.float64) - img) ** 2).sum(-1).reshape(-1)
    np.testing.assert_array_equal(err, nearest_entry_error(img, palette))


@pytest.mark.parametrize("space", ["oklab", "lab"])
def test_perceptual_spaces_map_in_their_space(space: str) -> None:
    spaces = importlib.import_module("gpu_kquant.spaces")
    img = photo("chelsea")
    q = quantize(img, 16, space=space)
    convert = spaces.srgb_to_oklab if space == "oklab" else spaces.srgb_to_lab
    px = convert(torch.from_numpy(img.reshape(-1, 3).copy()).double() / 255)
    pal = convert(torch.from_numpy(q.palette).double() / 255)
    d = torch.cdist(px, pal)
    chosen = d.gather(1, torch.from_numpy(q.indices.reshape(-1, 1)).long()).squeeze(1)
    assert torch.all(chosen <= d.min(1).values + 1e-4)


def test_bad_input_messages() -> None:
    with pytest.raises(ValueError, match="k must be"):
        quantize(photo("chelsea"), 0)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        quantize(np.zeros((4, 4), np.uint8), 2)
    with pytest.raises(ValueError, match="uint8"):
        quantize(np.zeros((4, 4, 3), np.float32), 2)
    with pytest.raises(ValueError, match="empty"):
        quantize(np.zeros((0, 4, 3), np.uint8), 2)
    with pytest.raises(TypeError, match="PIL image"):
        quantize([[1, 2, 3]], 2)
    with pytest.raises(ValueError, match="space"):
        quantize(photo("chelsea"), 4, space="hsv")


@needs_cuda
def test_cuda_result_is_close_to_cpu() -> None:
    img = photo("astronaut")
    cpu = quantize(img, 32, device="cpu")
    gpu = quantize(img, 32, device="cuda")
    assert gpu.mse == pytest.approx(cpu.mse, rel=0.02)
    err = ((gpu.to_rgb().astype(np.float64) - img) ** 2).sum(-1).reshape(-1)
    np.testing.assert_array_equal(err, nearest_entry_error(img, gpu.palette))


def test_batch_composition_never_changes_a_result() -> None:
    # A resumed or sharded run batches images differently, so an image's result must
    # not depend on its batch mates, even at near-ties of non-integer centroids.
    names = ("chelsea", "coffee", "astronaut")
    rng = np.random.default_rng(0)
    imgs = []
    for i in range(46):
        img = photo(names[i % 3])
        h, w = int(rng.integers(64, 161)), int(rng.integers(64, 201))
        y, x = int(rng.integers(0, img.shape[0] - h)), int(rng.integers(0, img.shape[1] - w))
        imgs.append(np.ascontiguousarray(img[y : y + h, x : x + w]))
    for k, options in ((8, {}), (32, {"max_fit_points": 1024})):
        alone = [quantize(img, k, **options) for img in imgs]
        batches = [list(range(46)), *[[i, (i + 4) % 46] for i in range(46)]]
        for batch in batches:
            for i, q in zip(batch, quantize_batch([imgs[i] for i in batch], k, **options)):
                np.testing.assert_array_equal(q.palette, alone[i].palette)
                np.testing.assert_array_equal(q.indices, alone[i].indices)


def test_refined_restarts_keep_the_best() -> None:
    # With at most two restarts every one is refined on the fine set, and restart 0 is
    # the single run, so two restarts never end worse than one (up to uint8 rounding).
    for name in QUALITY_PHOTOS:
        img = photo(name)
        one = quantize(img, 16, n_init=1, max_fit_points=4096)
        two = quantize(img, 16, n_init=2, max_fit_points=4096)
        assert two.mse <= one.mse * 1.002, (name, one.mse, two.mse)


def test_c_image_kernels_change_no_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Colour sets, bins, mapping and error in C give the torch code's results bit for bit."""
    if importlib.import_module("gpu_kquant.kernels").image_backend(torch.device("cpu")) is None:
        pytest.skip("no compiled per-image kernels")
    crop = photo("china")[100:228, 200:392]
    alpha = np.full(crop.shape[:2], 255, np.uint8)
    alpha[:40] = np.arange(crop.shape[1]) % 256
    imgs = [crop, photo("coffee")[::2, ::2], np.dstack([crop, alpha])]
    palette = np.array([[0, 0, 0], [255, 255, 255], [180, 40, 30], [20, 160, 60]], np.uint8)

    def run() -> list:
        fitted = [q for d in ("none", "ordered") for q in quantize_batch(imgs, 16, dither=d)]
        wide = quantize_batch([crop[:40, :60], imgs[2][:40, :60]], 300)  # int32 indices before the uint16 cast
        return fitted + wide + map_to_palette(imgs, palette)

    with_c = run()
    for module in ("gpu_kquant.colors", "gpu_kquant.quantize"):
        monkeypatch.setattr(importlib.import_module(module), "image_backend", lambda device: None)
    for a, b in zip(with_c, run(), strict=True):
        np.testing.assert_array_equal(a.palette, b.palette)
        np.testing.assert_array_equal(a.indices, b.indices)
        assert a.mse == b.mse


@pytest.mark.parametrize(("dither", "given", "expected"), [
    ("adaptive", None, True), ("none", None, False), ("fs", None, False),
    ("adaptive", False, False), ("none", True, True),
])  # fmt: skip
def test_exact_finish_defaults_on_for_adaptive_dithering_only(dither: str, given: bool | None, expected: bool) -> None:
    from gpu_kquant.options import FitOptions
    from gpu_kquant.quantize import _fit_options

    assert _fit_options(FitOptions(exact_finish=given), dither).exact_finish is expected
    if given is None:
        assert _fit_options(None, dither, k=8).exact_finish is expected
