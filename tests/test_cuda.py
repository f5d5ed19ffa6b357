"""The CUDA path against the CPU path (marker ``needs_cuda``; skipped without CUDA).

Targets from issue 11: results on CUDA are deterministic, batch-independent and equal
to the CPU's labels except where distances tie within float32 rounding, and the Lloyd
loop makes O(1) host syncs per batch, not one per iteration or per image.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from common_utils import needs_cuda, photo

from gpu_kquant import quantize_batch
from gpu_kquant.kmeans import kmeans

pytestmark = needs_cuda
U32 = 2.0**-24  # float32 unit roundoff
# Host syncs allowed for one batched k-means fit, whatever the batch size and the number
# of Lloyd iterations (max_iter=100 here): setup, a convergence check every few iterations
# (the issue asks for every 8-10) and the final results. Not per iteration, not per problem.
MAX_SYNCS_PER_BATCH = 16


def _crops(count: int, seed: int) -> list[np.ndarray]:
    """Crops of bundled photos of assorted sizes (64..200 px a side)."""
    names, rng = ("chelsea", "coffee", "astronaut"), np.random.default_rng(seed)
    out = []
    for i in range(count):
        img = photo(names[i % 3])
        h, w = int(rng.integers(64, 201)), int(rng.integers(64, 201))
        y, x = int(rng.integers(0, img.shape[0] - h)), int(rng.integers(0, img.shape[1] - w))
        out.append(np.ascontiguousarray(img[y : y + h, x : x + w]))
    return out


def test_cuda_backend_is_triton() -> None:
    pytest.importorskip("triton")
    from gpu_kquant.kernels import backend

    assert backend(torch.device("cuda")).__name__.endswith("triton_kernels")


@pytest.mark.parametrize("k", [2, 16, 64])
def test_quantize_batch_cuda_equals_cpu_except_ties(k: int) -> None:
    imgs = _crops(6, seed=k)
    cpu = quantize_batch(imgs, k, device="cpu")
    gpu = quantize_batch(imgs, k, device="cuda")
    for img, c, g in zip(imgs, cpu, gpu):
        np.testing.assert_array_equal(g.palette, c.palette)
        differ = g.indices != c.indices
        if differ.any():  # only pixels equidistant (within float32 rounding) from both entries
            px = img[differ].astype(np.float64)
            d_gpu = ((px - g.palette[g.indices[differ]]) ** 2).sum(-1)
            d_cpu = ((px - c.palette[c.indices[differ]]) ** 2).sum(-1)
            np.testing.assert_allclose(d_gpu, d_cpu, rtol=10 * U32, atol=0)


def test_batch_independence_and_determinism_on_cuda() -> None:
    imgs = _crops(9, seed=1)
    alone = [quantize_batch([img], 16, device="cuda")[0] for img in imgs[:3]]
    together = quantize_batch(imgs, 16, device="cuda")
    again = quantize_batch(imgs, 16, device="cuda")
    for a, t in zip(alone, together[:3]):
        np.testing.assert_array_equal(t.palette, a.palette)
        np.testing.assert_array_equal(t.indices, a.indices)
    for t, r in zip(together, again):
        np.testing.assert_array_equal(t.palette, r.palette)
        np.testing.assert_array_equal(t.indices, r.indices)


def _count_syncs(points: torch.Tensor, weights: torch.Tensor) -> int:
    """Host syncs torch reports (set_sync_debug_mode) during one batched fit; results stay on the GPU."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            kmeans(points, 16, weights=weights, max_iter=100, seed=0, device="cuda")
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("batch", [4, 32])
def test_lloyd_loop_syncs_per_batch(batch: int) -> None:
    gen = torch.Generator().manual_seed(batch)
    pixels = np.concatenate([img.reshape(-1, 3) for img in _crops(3, seed=2)]).astype(np.float32)
    rows = torch.randint(0, pixels.shape[0], (batch, 4096), generator=gen)
    points = torch.from_numpy(pixels)[rows].cuda()
    weights = torch.rand(batch, 4096, generator=gen).cuda()
    weights[:, 3000:] = 0  # padded rows, as the batched image path makes them
    kmeans(points, 16, weights=weights, max_iter=100, seed=0, device="cuda")  # warm-up: compile and cache
    syncs = _count_syncs(points, weights)
    assert syncs <= MAX_SYNCS_PER_BATCH, f"{syncs} host syncs for one batch of {batch} problems"
