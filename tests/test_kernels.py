"""The kernel interface: every CPU backend against the torch reference and float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from common_utils import photo

from gpu_kquant import kmeans
from gpu_kquant.kernels import ENV_VAR, available_backends, backend, cpu, reference
from gpu_kquant.reduce import FixedPointSums

needs_c = pytest.mark.skipif(not cpu.AVAILABLE, reason="the C kernels were not built")
CPU = torch.device("cpu")


def _photo_colours(name: str, n: int) -> torch.Tensor:
    """(1, n, 3) float32 distinct colours of a real photo, in a fixed shuffled order."""
    colours = np.unique(photo(name).reshape(-1, 3), axis=0)
    rng = np.random.default_rng(0)
    return torch.from_numpy(colours[rng.permutation(len(colours))[:n]].astype(np.float32))[None]


def _float64_nearest(points: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = (points.double()[:, :, None, :] - centroids.double()[:, None, :, :]).square().sum(-1)
    top = d.topk(min(2, d.shape[2]), dim=2, largest=False)
    return top.indices[..., 0], top.values


def test_registry_prefers_c_on_cpu_and_honours_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    names = available_backends(CPU)
    assert names[-1] == "torch"
    assert names[0] == ("c" if cpu.AVAILABLE else "torch")
    monkeypatch.setenv(ENV_VAR, "torch")
    assert backend(CPU) is reference
    monkeypatch.setenv(ENV_VAR, "no-such-backend")
    with pytest.raises(ValueError, match=ENV_VAR):
        backend(CPU)


@pytest.mark.parametrize("d", [3, 4, 7])
@pytest.mark.parametrize("k", [1, 2, 16, 300])
def test_reference_nearest_agrees_with_float64(d: int, k: int) -> None:
    g = torch.Generator().manual_seed(k * 10 + d)
    x = torch.rand((2, 500, d), generator=g) * 255
    c = torch.rand((2, k, d), generator=g) * 255
    labels, d2, d2nd = reference.nearest(x, c, second=True)
    exact, top = _float64_nearest(x, c)
    near_tie = (top[..., 1] - top[..., 0] <= 1e-4 * top[..., 1]) if k > 1 else torch.zeros_like(labels, dtype=bool)
    assert torch.equal(labels[~near_tie], exact[~near_tie])
    torch.testing.assert_close(d2.double(), top[..., 0], rtol=1e-5, atol=1e-3)
    if k > 1:
        torch.testing.assert_close(d2nd.double(), top[..., 1], rtol=1e-5, atol=1e-3)
    else:
        assert torch.isinf(d2nd).all()


@needs_c
@pytest.mark.parametrize("d", [3, 4, 7])
@pytest.mark.parametrize("k", [1, 2, 16, 33, 300])
def test_c_kernels_equal_reference_bit_for_bit(d: int, k: int) -> None:
    g = torch.Generator().manual_seed(k + d)
    # Integer colours give many exact ties: the lowest index must win in both.
    x = torch.randint(0, 8, (3, 700, d), generator=g).float()
    c = torch.randint(0, 8, (3, k, d), generator=g).float()
    w = torch.randint(0, 5, (3, 700), generator=g).float()
    for second in (False, True):
        ref, got = reference.nearest(x, c, second), cpu.nearest(x, c, second)
        for a, b in zip(ref, got):
            assert (a is None and b is None) or torch.equal(a, b)
    sums = FixedPointSums(x, w)
    for a, b in zip(reference.lloyd_step(x, sums.qx, sums.qw, c), cpu.lloyd_step(x, sums.qx, sums.qw, c)):
        assert torch.equal(a, b)
    closest = torch.rand((3, 700), generator=g) * 50
    assert torch.equal(reference.min_update(x, c[:, 0], closest), cpu.min_update(x, c[:, 0], closest))
    torch.testing.assert_close(
        cpu.kpp_potential(x, w, closest, c[:, :5]), reference.kpp_potential(x, w, closest, c[:, :5]), rtol=1e-12, atol=0
    )


@needs_c
def test_c_lloyd_sums_are_exact_integers() -> None:
    x = _photo_colours("coffee", 5000)
    w = torch.randint(1, 9, x.shape[:2]).float()
    sums = FixedPointSums(x, w)
    c = x[:, :16].clone()
    labels, _, s, m = cpu.lloyd_step(x, sums.qx, sums.qw, c)
    lab = labels[0].numpy()
    qx, qw = sums.qx[0].numpy(), sums.qw[0].numpy()
    for j in range(16):
        members = lab == j
        assert int(s[0, j, 0]) == sum(int(v) for v in qx[members, 0])
        assert int(m[0, j]) == sum(int(v) for v in qw[members])


@needs_c
@pytest.mark.parametrize("k", [2, 16, 64, 256])
def test_c_fit_equals_torch_fit_on_photos(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole C fit (k-means++ and the Lloyd loop, with Hamerly bounds from k = 32) gives
    the torch loop's centroids and labels on real colour sets."""
    x = _photo_colours("astronaut", 3000)
    w = torch.from_numpy(np.random.default_rng(1).integers(1, 20, x.shape[1])).float()[None]
    results = {}
    for name in ("c", "torch"):
        monkeypatch.setenv(ENV_VAR, name)
        results[name] = kmeans(x, k, weights=w, n_init=2, seed=5, keep_restarts=True)
    a, b = results["c"], results["torch"]
    assert torch.equal(a.centroids, b.centroids)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.n_iter, b.n_iter)
    assert torch.equal(a.converged, b.converged)
    torch.testing.assert_close(a.inertia, b.inertia, rtol=1e-12, atol=0)


@needs_c
def test_c_fit_handles_empty_clusters_and_padding_like_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.cat([_photo_colours("chelsea", 300), torch.zeros(1, 50, 3)], 1)
    w = torch.cat([torch.ones(1, 300), torch.zeros(1, 50)], 1)
    init = torch.cat([x[:, :5], torch.full((1, 3, 3), 1e4)], 1)  # three far-away centres go empty
    results = {}
    for name in ("c", "torch"):
        monkeypatch.setenv(ENV_VAR, name)
        results[name] = kmeans(x, 8, weights=w, init=init, max_iter=50)
    assert torch.equal(results["c"].centroids, results["torch"].centroids)
    assert torch.equal(results["c"].labels[:, :300], results["torch"].labels[:, :300])
    assert float(results["c"].centroids.abs().max()) <= 255


def test_kpp_candidates_follow_scikit_learn() -> None:
    from gpu_kquant.kmeans import kpp_candidates

    assert [kpp_candidates(k) for k in (2, 16, 256)] == [2 + int(math.log(k)) for k in (2, 16, 256)]
