"""The metrics against real references on real photos: CIEDE2000 against scikit-image, SSIM against
scikit-image, blurred PSNR against SciPy, premultiplied alpha."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from common_utils import c_or_fallback, photo
from PIL import Image

from gpu_kquant import quantize
from gpu_kquant.metrics import blurred_psnr, mean_ciede2000, premultiplied, psnr, sampled_ssim, ssim, ssim_grid


def reference(original: np.ndarray, palette: np.ndarray, indices: np.ndarray) -> float:
    """Per-pixel CIEDE2000 from scikit-image (float64), averaged over visible pixels.

    The two implementations' sRGB-to-Lab constants differ in the fifth digit, hence a
    relative tolerance of 1e-4 (a CIEDE2000 of 0.0003 on a mean near 2 is invisible).
    """
    skimage_color = pytest.importorskip("skimage.color")
    rgb = original[..., :3].astype(np.float64) / 255
    mapped = palette[indices][..., :3].astype(np.float64) / 255
    delta = skimage_color.deltaE_ciede2000(skimage_color.rgb2lab(rgb), skimage_color.rgb2lab(mapped))
    if original.shape[2] == 4:
        delta = delta[original[..., 3] > 0]
    return float(delta.mean())


def test_matches_scikit_image_on_a_photo() -> None:
    img = np.ascontiguousarray(photo("coffee")[:96, :128])
    q = quantize(img, 8)
    assert mean_ciede2000(img, q.palette, q.indices) == pytest.approx(reference(img, q.palette, q.indices), rel=1e-4)


def test_sampled_mean_is_close_to_scikit_image_on_a_whole_photo() -> None:
    img = np.ascontiguousarray(photo("china"))  # 427x640: 65536 pixels at most reads every 3rd row and column
    q = quantize(img, 16, space="lab")
    exact = reference(img, q.palette, q.indices)
    assert mean_ciede2000(img, q.palette, q.indices, max_pixels=None) == pytest.approx(exact, rel=1e-4)
    assert mean_ciede2000(img, q.palette, q.indices) == pytest.approx(exact, rel=0.01)


def test_transparent_pixels_do_not_count() -> None:
    img = np.dstack([photo("chelsea")[:64, :64], np.full((64, 64), 255, np.uint8)])
    img[:, :32, 3] = 0
    q = quantize(img, 8)
    got = mean_ciede2000(img, q.palette, q.indices)
    assert got == pytest.approx(reference(img, q.palette, q.indices), rel=1e-4)
    assert mean_ciede2000(np.zeros((4, 4, 4), np.uint8), np.zeros((1, 4), np.uint8), np.zeros((4, 4), np.uint8)) == 0.0


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """A real degradation of a real photo: JPEG at ``quality``."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


@pytest.mark.parametrize("name", ["astronaut", "coffee"])
@pytest.mark.parametrize("quality", [10, 60])
def test_ssim_matches_scikit_image(name: str, quality: int) -> None:
    from skimage.metrics import structural_similarity

    img = photo(name)[:160, :200]
    out = jpeg(img, quality)
    kwargs = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False, "data_range": 255}
    expected = structural_similarity(img, out, channel_axis=2, **kwargs)
    assert ssim(img, out) == pytest.approx(expected, abs=1e-9)
    grey_expected = structural_similarity(img[..., 1], out[..., 1], **kwargs)
    assert ssim(img[..., 1], out[..., 1]) == pytest.approx(grey_expected, abs=1e-9)


def test_ssim_orders_degradations_and_is_one_for_equal_images() -> None:
    img = photo("chelsea")[:120, :150]
    assert ssim(img, img) == pytest.approx(1.0)
    assert ssim(img, jpeg(img, 10)) < ssim(img, jpeg(img, 60)) < 1.0


def test_blurred_psnr_matches_scipy_gaussian_filter() -> None:
    from scipy.ndimage import gaussian_filter

    img = photo("coffee")[:100, :130]
    out = jpeg(img, 15)

    def blur(x: np.ndarray) -> np.ndarray:
        return gaussian_filter(x.astype(np.float64), sigma=(1.0, 1.0, 0.0), mode="mirror", truncate=3.5)

    mse = np.mean((blur(img) - blur(out)) ** 2)
    assert blurred_psnr(img, out) == pytest.approx(10 * np.log10(255.0**2 / mse), abs=1e-9)
    assert blurred_psnr(img, out) > psnr(img, out)  # blurring removes part of the JPEG error


def test_premultiplied_hides_colour_of_transparent_pixels() -> None:
    a = np.array([[[10, 20, 30, 0], [200, 100, 50, 255]]], np.uint8)
    b = np.array([[[250, 0, 9, 0], [200, 100, 50, 255]]], np.uint8)
    np.testing.assert_array_equal(premultiplied(a), premultiplied(b))
    np.testing.assert_allclose(
        premultiplied(np.array([[255, 128, 0, 128]], np.uint8)), [[128, 128 * 128 / 255, 0, 128]]
    )


SKIMAGE_SSIM = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False, "data_range": 255}


def skimage_ssim_map(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
    """scikit-image's mean SSIM and its full (H, W) map, averaged over channels."""
    from skimage.metrics import structural_similarity

    mean, full = structural_similarity(a, b, channel_axis=2, full=True, **SKIMAGE_SSIM)
    return float(mean), full.mean(2)


def sampled(img: np.ndarray, palette: np.ndarray, indices: np.ndarray, max_windows: int = 4096) -> float:
    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a))

    return sampled_ssim(t(img), t(palette), t(indices.astype(np.int64)), max_windows=max_windows)


@pytest.mark.parametrize(("name", "dither"), [("chelsea", "fs"), ("astronaut", "none")])
def test_sampled_ssim_is_scikit_image_at_the_grid_centres(name: str, dither: str) -> None:
    img = np.ascontiguousarray(photo(name)[:150, :230])
    q = quantize(img, 16, dither=dither)
    _, full = skimage_ssim_map(img, q.to_array())
    for max_windows in (40, 4096):
        step = ssim_grid(*img.shape[:2], max_windows)
        at_centres = full[5 : img.shape[0] - 5 : step, 5 : img.shape[1] - 5 : step]
        assert at_centres.size <= max_windows
        assert sampled(img, q.palette, q.indices, max_windows) == pytest.approx(at_centres.mean(), abs=1e-9)


@pytest.mark.parametrize("dither", ["none", "adaptive"])
def test_sampled_ssim_estimates_scikit_image_on_a_whole_photo(dither: str) -> None:
    img = np.ascontiguousarray(photo("coffee"))  # 400x600: at most 512 windows samples 1 pixel in 4
    q = quantize(img, 16, dither=dither)
    mean, _ = skimage_ssim_map(img, q.to_array())
    assert ssim_grid(*img.shape[:2], 512) >= 22
    assert sampled(img, q.palette, q.indices, 512) == pytest.approx(mean, abs=0.01)
    assert q.ssim == pytest.approx(sampled(img, q.palette, q.indices), abs=1e-12)  # what the report rows carry


def test_sampled_ssim_compares_rgba_premultiplied() -> None:
    from skimage.metrics import structural_similarity

    img = np.dstack([photo("chelsea")[:90, :120], np.full((90, 120), 255, np.uint8)])
    img[:, :40, 3] = 0
    img[:, 40:60, 3] = 128
    q = quantize(img, 12)
    a, b = premultiplied(img), premultiplied(q.to_array())
    full = structural_similarity(a, b, channel_axis=2, full=True, **SKIMAGE_SSIM)[1].mean(2)
    assert sampled(img, q.palette, q.indices) == pytest.approx(full[5:-5:11, 5:-5:11].mean(), abs=1e-9)


def test_sampled_ssim_of_tiny_and_equal_images() -> None:
    img = np.ascontiguousarray(photo("coffee")[:6, :9])
    palette, inverse = np.unique(img.reshape(-1, 3), axis=0, return_inverse=True)
    assert sampled(img, palette, inverse.reshape(6, 9)) == pytest.approx(1.0)
    assert sampled(img, palette[:1], np.zeros((6, 9), np.int64)) < 0.99


def test_binomial_blur_matches_scipy_on_a_photo() -> None:
    """The 3x3 binomial blur behind ``Quantized.blurred_psnr``, against scipy's convolution (edges replicated)."""
    ndimage = pytest.importorskip("scipy.ndimage")
    from gpu_kquant.metrics import binomial_blur

    img = photo("coffee")[:37, :53].astype(np.float64) - 100.5
    k = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16
    expected = np.stack([ndimage.convolve(img[..., c], k, mode="nearest") for c in range(3)], -1)
    np.testing.assert_allclose(binomial_blur(torch.from_numpy(img)).numpy(), expected, rtol=0, atol=1e-12)


def test_quantized_blur_mse_is_the_blurred_error_of_its_pixels() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    img = photo("chelsea")[:60, :80]
    q = quantize(img, 8, dither="adaptive", device="cpu")
    k = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16
    diff = q.to_rgb().astype(np.float64) - img
    blurred = np.stack([ndimage.convolve(diff[..., c], k, mode="nearest") for c in range(3)], -1)
    assert q.blur_mse == pytest.approx(float((blurred**2).mean()), rel=1e-12)


@pytest.fixture(params=["c", "fallback"])
def sums_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A test once with the C sums of dithered_errors and once with the torch code that stands in without them."""
    import gpu_kquant.metrics as metrics_module

    return c_or_fallback(request, monkeypatch, metrics_module, "_sums_c")


def test_dithered_error_sums_in_c_are_the_torch_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bit for bit, on a dithered photo (and a slice of it, not contiguous) and on thin noise."""
    import gpu_kquant.metrics as metrics_module
    from gpu_kquant.metrics import dithered_errors

    if metrics_module._sums_c is None:
        pytest.skip("gpu_kquant._metrics did not build")
    img = photo("coffee")[:140, :190]
    out = quantize(img, 16, dither="adaptive", device="cpu").to_rgb()
    rng = np.random.default_rng(2)
    noise = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((1, 9), (9, 1), (1, 1))]
    pairs = [(img, out), (img[5:, 3:-2], out[5:, 3:-2]), (noise[0], np.ascontiguousarray(noise[0][:, ::-1]))]
    pairs += [(noise[1], 255 - noise[1]), (noise[2], noise[2] // 2)]
    fast = [dithered_errors(torch.tensor(a), torch.tensor(b)) for a, b in pairs]
    monkeypatch.setattr(metrics_module, "_sums_c", None)
    assert fast == [dithered_errors(torch.tensor(a), torch.tensor(b)) for a, b in pairs]
    assert fast[0][0] > fast[0][1] > 0  # dithering: the blur removes most of the error


@pytest.mark.usefixtures("sums_backend")
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 1), (2, 3), (37, 53)])
@pytest.mark.parametrize("channels", [3, 4])
def test_dithered_errors_match_a_float64_reference(shape: tuple[int, int], channels: int) -> None:
    """MSE and blurred MSE per channel (premultiplied when RGBA), against SciPy's blur in float64."""
    ndimage = pytest.importorskip("scipy.ndimage")
    from gpu_kquant.metrics import dithered_errors

    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, (*shape, channels), dtype=np.uint8)
    b = rng.integers(0, 256, (*shape, channels), dtype=np.uint8)
    diff = premultiplied(a) - premultiplied(b) if channels == 4 else a.astype(np.float64) - b
    k = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16
    blurred = np.stack([ndimage.convolve(diff[..., c], k, mode="nearest") for c in range(diff.shape[-1])], -1)
    mse, blur_mse = dithered_errors(torch.from_numpy(a), torch.from_numpy(b))
    assert mse == pytest.approx(float((diff**2).mean()), rel=1e-12)
    assert blur_mse == pytest.approx(float((blurred**2).mean()), rel=1e-12)
