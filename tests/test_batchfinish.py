"""Tests of the batched finish (gpu_kquant.batchfinish): bit-identical to the per-image finish, O(1) syncs."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from common_utils import count_syncs, photo

from gpu_kquant import batchfinish, quantize_batch
from gpu_kquant.colors import color_sets
from gpu_kquant.fitplan import fit_palettes
from gpu_kquant.options import FitOptions
from gpu_kquant.spaces import ColorSpace
from gpu_kquant.stopping import StopFlag, Stopped

quantize = importlib.import_module("gpu_kquant.quantize")  # the package's `quantize` is the function


def mixed_images() -> list[np.ndarray]:
    """Photo crops (one with more colours than a 4096-point row), one pixel, two colours, a thin strip."""
    two = np.zeros((9, 13, 3), np.uint8)
    two[::2] = (200, 30, 90)
    return [
        photo("china")[100:190, 200:330],
        photo("astronaut")[60:61, 80:81],
        two,
        photo("coffee")[100:250, 200:290],
        photo("astronaut")[200:203, 100:300],
        photo("china")[300:370, 0:70],
    ]


def prepared(images: list[np.ndarray], k: int, space: str) -> tuple[list[torch.Tensor], list, list]:
    tensors = [torch.from_numpy(img.copy()) for img in images]
    sets = color_sets(tensors)
    fitted = fit_palettes(sets, FitOptions(k=k, space=space), torch.device("cpu"))
    return tensors, sets, fitted


def per_image(images: list[np.ndarray], k: int, space: str) -> list[quantize.Quantized]:
    tensors, sets, fitted = prepared(images, k, space)
    sp = ColorSpace(space)
    return [
        quantize._finish(t, cs, sp, pal, bins, fixed=False, dither="none")
        for t, cs, (pal, bins) in zip(tensors, sets, fitted)
    ]


def batched(images: list[np.ndarray], k: int, space: str) -> list[quantize.Quantized]:
    tensors, sets, fitted = prepared(images, k, space)
    mapped = batchfinish.finish_batch(tensors, sets, [pal for pal, _ in fitted], ColorSpace(space))
    return [quantize.Quantized(*m) for m in mapped]


def assert_same(a: quantize.Quantized, b: quantize.Quantized) -> None:
    assert a.palette.dtype == b.palette.dtype and a.palette.shape == b.palette.shape
    assert np.array_equal(a.palette, b.palette)
    assert a.indices.dtype == b.indices.dtype and np.array_equal(a.indices, b.indices)
    assert a.mse == b.mse  # bit-identical floats, not approximately equal
    assert a.ssim == b.ssim
    assert a.blur_mse is None and b.blur_mse is None


@pytest.mark.parametrize("kernels", ["auto", "torch"])  # torch: the image code CUDA runs
@pytest.mark.parametrize("space", ["rgb", "lab"])
@pytest.mark.parametrize("k", [2, 16, 256])
def test_batched_finish_equals_per_image(k: int, space: str, kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPU_KQUANT_KERNELS", kernels)
    images = mixed_images()
    ref, got = per_image(images, k, space), batched(images, k, space)
    assert len(ref) == len(got) == len(images)
    for a, b in zip(ref, got):
        assert_same(a, b)
    assert got[1].n_colors == 1 and got[2].n_colors == min(k, 2)  # the one-pixel and two-colour images


@pytest.mark.parametrize(("tile", "k"), [(1, 2), (64, 16)])
def test_rows_of_few_points(tile: int, k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Images spread over many assignment rows (of k points: a row holds at least k) map the same."""
    monkeypatch.setattr(batchfinish, "TILE", tile)
    images = mixed_images()[:3]
    for a, b in zip(per_image(images, k, "rgb"), batched(images, k, "rgb")):
        assert_same(a, b)


def test_more_than_256_entries() -> None:
    """k > 256: int32 indices on the device, uint16 (or uint8 for a small palette) on the host, as per image."""
    images = [photo("coffee")[100:250, 200:290], photo("china")[300:330, 0:30]]
    ref, got = per_image(images, 300, "rgb"), batched(images, 300, "rgb")
    assert got[0].indices.dtype == np.uint16 and got[0].n_colors > 256
    for a, b in zip(ref, got):
        assert_same(a, b)


def test_batch_independence() -> None:
    """An image's result does not depend on which images share its batch, nor on their order."""
    images = mixed_images()
    together = batched(images, 16, "rgb")
    backwards = batched(images[::-1], 16, "rgb")[::-1]
    for i, img in enumerate(images):
        (alone,) = batched([img], 16, "rgb")
        assert_same(alone, together[i])
        assert_same(alone, backwards[i])


def test_quantize_batch_uses_it_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    images = mixed_images()
    calls = []
    real = batchfinish.finish_batch

    def spy(*args: Any, **kwargs: Any) -> list[batchfinish.Mapped]:
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(quantize, "finish_batch", spy)
    ref = quantize_batch(images, 16, device="cpu")
    assert calls == []  # not used on CPU unless forced
    monkeypatch.setattr(batchfinish, "FORCE", True)
    got = quantize_batch(images, 16, device="cpu")
    assert calls == [len(images)]
    for a, b in zip(ref, got):
        assert_same(a, b)


def test_applies() -> None:
    rgb, rgba = torch.zeros((2, 2, 3), dtype=torch.uint8), torch.zeros((2, 2, 4), dtype=torch.uint8)
    pal3, pal4 = torch.zeros((1, 3), dtype=torch.uint8), torch.zeros((1, 4), dtype=torch.uint8)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert batchfinish.applies(cuda, [rgb, rgb], [pal3, pal3], "none")
    assert not batchfinish.applies(cpu, [rgb], [pal3], "none")
    assert not batchfinish.applies(cuda, [rgb, rgba], [pal3, pal4], "none")
    assert not batchfinish.applies(cuda, [rgb], [pal3], "ordered")
    assert not batchfinish.applies(cuda, [], [], "none")


@pytest.mark.parametrize("case", ["rgba", "ordered", "fs", "fixed"])
def test_other_inputs_take_the_per_image_path(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the batched finish must not run here")

    monkeypatch.setattr(batchfinish, "FORCE", True)
    monkeypatch.setattr(quantize, "finish_batch", refuse)
    rgb = photo("china")[100:140, 200:250]
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 128, np.uint8)], axis=2)
    if case == "rgba":
        out = quantize_batch([rgb, rgba], 8, device="cpu")
        assert out[1].has_alpha
    elif case == "fixed":
        out = quantize_batch([rgb], 8, palette=np.array([[0, 0, 0], [255, 255, 255]], np.uint8), device="cpu")
        assert out[0].n_colors == 2
    else:
        out = quantize_batch([rgb, rgb], 8, dither=case, device="cpu")
        assert out[0].blur_mse is not None


def test_stop_is_checked_before_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    tensors, sets, fitted = prepared(mixed_images()[:2], 4, "rgb")
    monkeypatch.setattr(batchfinish, "_map_colours", lambda *a: pytest.fail("mapped after a stop"))
    flag = StopFlag()
    flag.set()
    with pytest.raises(Stopped):
        batchfinish.finish_batch(tensors, sets, [pal for pal, _ in fitted], ColorSpace("rgb"), flag)


def _finishers(n: int) -> Iterator[Callable[[], object]]:
    images = (mixed_images() * 2)[:n]
    tensors, sets, fitted = prepared(images, 16, "rgb")
    sp = ColorSpace("rgb")
    yield lambda: batchfinish.finish_batch(tensors, sets, [pal for pal, _ in fitted], sp)
    yield lambda: [
        quantize._finish(t, cs, sp, pal, bins, fixed=False, dither="none")
        for t, cs, (pal, bins) in zip(tensors, sets, fitted)
    ]


def test_syncs_per_batch_do_not_grow_with_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch kernels (the code CUDA runs): a constant number of host waits, one download."""
    monkeypatch.setenv("GPU_KQUANT_KERNELS", "torch")
    few_batched, few_per_image = (count_syncs(f) for f in _finishers(2))
    many_batched, many_per_image = (count_syncs(f) for f in _finishers(9))
    assert few_batched == many_batched == ["cpu", "numpy"]  # the one download
    # The counter sees the per-image path's syncs, which grow with the batch.
    assert len(many_per_image) > len(few_per_image) >= 2 * 2


@pytest.mark.needs_cuda
@pytest.mark.parametrize("k", [16, 256])
def test_on_cuda_the_batched_finish_equals_the_per_image_path(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU (where it is the default) against the per-image finish on the same device."""
    images = mixed_images()
    batched_result = quantize_batch(images, k, device="cuda")
    monkeypatch.setattr(quantize, "applies", lambda *args: False)
    per_image = quantize_batch(images, k, device="cuda")
    for a, b in zip(per_image, batched_result):
        assert_same(a, b)
