"""Tests of the batched k-means engine against float64 recomputations and scikit-learn."""

from __future__ import annotations

import importlib
import itertools
import pickle
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from common_utils import cpu_and_cuda, needs_cuda
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_kquant import kmeans
from gpu_kquant.kmeans import assign, assign_with_bounds, nearest_two
from gpu_kquant.stopping import StopFlag, Stopped


def blobs(n: int = 600, d: int = 3, centers: int = 5, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, d, generator=gen) * 20
    return c[torch.randint(0, centers, (n,), generator=gen)] + torch.randn(n, d, generator=gen)


def sq_dists64(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (x.double()[:, None, :] - c.double()[None, :, :]).square().sum(-1)


def check_labels_are_argmin(x: torch.Tensor, c: torch.Tensor, labels: torch.Tensor) -> None:
    d = sq_dists64(x, c)
    chosen = d.gather(1, labels[:, None]).squeeze(1)
    best = d.min(1).values
    # Near-ties within float32 rounding may go either way.
    assert torch.all(chosen <= best + 1e-4 * (1 + d.max(1).values))


@st.composite
def weighted_problems(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, int]:
    n = draw(st.integers(1, 40))
    d = draw(st.integers(1, 4))
    values = draw(st.lists(st.integers(-30, 30), min_size=n * d, max_size=n * d))
    weights = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    if not any(weights):
        weights[0] = 1
    k = draw(st.integers(1, 8))
    x = torch.tensor(values, dtype=torch.float32).reshape(n, d) / 3
    return x, torch.tensor(weights, dtype=torch.float32), k


@settings(max_examples=60, deadline=None)
@given(weighted_problems())
def test_properties_against_float64(problem: tuple[torch.Tensor, torch.Tensor, int]) -> None:
    x, w, k = problem
    res = kmeans(x, k, weights=w, tol=0.0, seed=1)
    c, labels = res.centroids[0], res.labels[0]
    assert torch.isfinite(c).all()
    check_labels_are_argmin(x, c, labels)
    # Inertia is the weighted sum of squared distances to the assigned centroids.
    d = sq_dists64(x, c).gather(1, labels[:, None]).squeeze(1)
    assert float(res.inertia[0]) == pytest.approx(float((d * w.double()).sum()), rel=1e-4, abs=1e-4)
    # The effective k never exceeds the number of distinct points with positive weight.
    distinct = torch.unique(x[w > 0], dim=0).shape[0]
    assert int(res.n_clusters[0]) == min(k, distinct)
    # At convergence every non-empty centroid is the weighted mean of its points.
    if bool(res.converged[0]):
        for j in range(int(res.n_clusters[0])):
            mask = (labels == j) & (w > 0)
            if mask.any():
                mean = (x[mask].double() * w[mask, None].double()).sum(0) / w[mask].double().sum()
                assert torch.allclose(c[j].double(), mean, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(weighted_problems())
def test_integer_weights_equal_repeated_points(problem: tuple[torch.Tensor, torch.Tensor, int]) -> None:
    x, w, k = problem
    distinct = torch.unique(x[w > 0], dim=0)
    k = min(k, distinct.shape[0])
    init = distinct[:k]
    weighted = kmeans(x, k, weights=w, init=init, tol=0.0)
    repeated = kmeans(x.repeat_interleave(w.long(), 0), k, init=init, tol=0.0)
    assert float(weighted.inertia[0]) == pytest.approx(float(repeated.inertia[0]), rel=1e-5, abs=1e-5)
    # Same clustering; when empty clusters are re-seeded, copies of one point may tie,
    # so compare the centroids as a set.
    a = sorted(map(tuple, weighted.centroids[0].tolist()))
    b = sorted(map(tuple, repeated.centroids[0].tolist()))
    assert np.allclose(a, b, atol=1e-5)


def test_matches_sklearn_quality_on_blobs() -> None:
    sklearn = pytest.importorskip("sklearn.cluster")
    x = blobs(2000, 3, 8)
    ours = kmeans(x, 8, n_init=3, seed=0)
    ref = sklearn.KMeans(8, n_init=3, random_state=0).fit(x.numpy())
    assert float(ours.inertia[0]) <= ref.inertia_ * 1.01


def test_padded_ragged_batch_equals_each_problem_alone() -> None:
    sizes = [500, 37, 260]
    problems = [blobs(n, 3, 4, seed=i) for i, n in enumerate(sizes)]
    batch = torch.zeros(len(sizes), max(sizes), 3)
    weights = torch.zeros(len(sizes), max(sizes))
    for i, p in enumerate(problems):
        batch[i, : p.shape[0]] = p
        weights[i, : p.shape[0]] = torch.arange(1, p.shape[0] + 1) % 3 + 1
    together = kmeans(batch, 6, weights=weights, n_init=2, seed=7)
    for i, p in enumerate(problems):
        alone = kmeans(p, 6, weights=weights[i, : p.shape[0]], n_init=2, seed=7)
        assert torch.equal(together.centroids[i], alone.centroids[0])
        assert torch.equal(together.labels[i, : p.shape[0]], alone.labels[0])
        assert int(together.n_iter[i]) == int(alone.n_iter[0])


def test_order_of_problems_in_batch_does_not_matter() -> None:
    problems = torch.stack([blobs(300, 3, 4, seed=s) for s in range(4)])
    forward = kmeans(problems, 5, seed=3)
    backward = kmeans(problems.flip(0), 5, seed=3)
    assert torch.equal(forward.centroids, backward.centroids.flip(0))


def test_permuting_points_gives_identical_centroids() -> None:
    # Fixed-point sums make the update independent of summation order.
    x = blobs(800, 3, 6)
    init = x[:6].clone()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    a = kmeans(x, 6, init=init, tol=0.0)
    b = kmeans(x[perm], 6, init=init, tol=0.0)
    assert torch.equal(a.centroids, b.centroids)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_same_seed_same_result(device: str) -> None:
    x = blobs(1000, 3, 6)
    a = kmeans(x, 6, n_init=3, seed=11, device=device)
    b = kmeans(x, 6, n_init=3, seed=11, device=device)
    assert torch.equal(a.centroids, b.centroids)
    assert torch.equal(a.labels, b.labels)


def test_different_seeds_draw_different_seeds() -> None:
    x = blobs(1000, 3, 12)
    a = kmeans(x, 12, max_iter=0, seed=1)
    b = kmeans(x, 12, max_iter=0, seed=2)
    assert not torch.equal(a.centroids, b.centroids)


def test_restarts_keep_the_lowest_inertia() -> None:
    x = blobs(1500, 2, 10)
    best = kmeans(x, 10, n_init=5, seed=4)
    for r in range(5):
        # Restart r uses stream r; a single run with seed 4 is restart 0.
        assert float(best.inertia[0]) <= float(kmeans(x, 10, n_init=r + 1, seed=4).inertia[0]) + 1e-6


def test_empty_cluster_is_reseeded_on_a_point() -> None:
    x = blobs(400, 2, 3)
    init = torch.cat([x[:3], torch.tensor([[1e4, 1e4]])])
    res = kmeans(x, 4, init=init, max_iter=50, stats=True)
    c = res.centroids[0]
    assert torch.isfinite(c).all()
    assert res.stats[0].reseeded == 1
    assert bool((res.labels[0] == 3).any())
    assert float(c[3].abs().max()) < 1e3


def test_fewer_distinct_points_than_k() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [5.0, 5.0]])
    res = kmeans(x, 6)
    assert int(res.n_clusters[0]) == 3
    real = res.centroids[0, :3]
    assert torch.unique(real, dim=0).shape[0] == 3
    assert set(res.labels[0].tolist()) <= {0, 1, 2}
    assert float(res.inertia[0]) == 0.0


@pytest.mark.parametrize("k", [1, 2, 256])
def test_edge_k(k: int) -> None:
    x = blobs(700, 3, 4)
    res = kmeans(x, k)
    assert res.centroids.shape == (1, k, 3)
    assert torch.isfinite(res.centroids).all()
    check_labels_are_argmin(x, res.centroids[0], res.labels[0])


def test_single_point() -> None:
    res = kmeans(torch.tensor([[3.0, 4.0, 5.0]]), 4)
    assert int(res.n_clusters[0]) == 1
    assert torch.equal(res.centroids[0, 0], torch.tensor([3.0, 4.0, 5.0]))


def test_large_batch_of_small_problems() -> None:
    x = torch.stack([blobs(64, 3, 3, seed=s) for s in range(64)])
    res = kmeans(x, 4)
    assert res.centroids.shape == (64, 4, 3)
    assert bool(res.converged.all())
    for b in (0, 31, 63):
        check_labels_are_argmin(x[b], res.centroids[b], res.labels[b])


def test_chunked_assignment_equals_unchunked(monkeypatch: pytest.MonkeyPatch) -> None:
    reference = importlib.import_module("gpu_kquant.kernels.reference")
    monkeypatch.setenv("GPU_KQUANT_KERNELS", "torch")
    x = blobs(3000, 3, 6)[None]
    c = x[:, :40].clone()
    full = assign(x, c)
    monkeypatch.setitem(reference._BLOCK_ELEMENTS, "cpu", 1000)
    chunked = assign(x, c)
    assert torch.equal(full[0], chunked[0])
    assert torch.equal(full[1], chunked[1])


def test_assign_with_bounds_is_exact() -> None:
    x = blobs(2000, 3, 10)[None]
    c = blobs(50, 3, 10, seed=5)[None]
    exact, _ = assign(x, c)
    guess = torch.randint(0, 50, exact.shape, generator=torch.Generator().manual_seed(0))
    labels, _ = assign_with_bounds(x, c, guess, torch.full(exact.shape, -float("inf")))
    assert torch.equal(labels, exact)
    # A valid bound from a nearby guess gives the same answer.
    lab2, second = nearest_two(x, c)
    labels, _ = assign_with_bounds(x, c, lab2, second)
    assert torch.equal(labels, exact)


def test_validation_messages() -> None:
    with pytest.raises(ValueError, match="k must be"):
        kmeans(torch.zeros(3, 2), 0)
    with pytest.raises(ValueError, match="shape"):
        kmeans(torch.zeros(3), 2)
    with pytest.raises(ValueError, match="non-negative"):
        kmeans(torch.zeros(3, 2), 2, weights=torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="positive weight"):
        kmeans(torch.zeros(3, 2), 2, weights=torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        kmeans(torch.tensor([[float("nan"), 0.0]]), 1)


def test_per_iteration_stats() -> None:
    res = kmeans(blobs(500, 3, 5), 5, n_init=2, stats=True)
    assert len(res.stats) == int(res.n_iter.max())
    inertias = [s.inertia for s in res.stats if s.active == 2]
    assert all(a >= b - 1e-3 * a for a, b in itertools.pairwise(inertias))


@needs_cuda
def test_cuda_matches_cpu_labels() -> None:
    x = blobs(5000, 3, 8)
    cpu = kmeans(x, 8, seed=0, device="cpu")
    gpu = kmeans(x, 8, seed=0, device="cuda")
    # Same random streams (drawn on the CPU) and exact integer-free reductions: the
    # results agree up to float rounding of near-ties.
    check_labels_are_argmin(x, gpu.centroids[0].cpu(), gpu.labels[0].cpu())
    assert torch.allclose(cpu.centroids, gpu.centroids.cpu(), atol=1e-3)


# -- a cooperative stop (issue 12, item 17) ---------------------------------------------------------------------------


def run_in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Start ``call`` on a daemon thread; its result or its :class:`Stopped` lands in the list."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Stopped as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def assert_stops_quickly(stop: StopFlag, thread: threading.Thread, outcome: list[object]) -> None:
    """Still running after 0.5 s; once ``stop`` is set, ended with :class:`Stopped` within 2 s."""
    time.sleep(0.5)
    assert thread.is_alive(), "the call should still be running"
    stop.set()
    start = time.perf_counter()
    thread.join(60)
    assert time.perf_counter() - start < 2.0
    assert len(outcome) == 1 and isinstance(outcome[0], Stopped), outcome


@pytest.mark.parametrize("stats", [False, True], ids=["whole-loop kernel", "python loop"])
def test_a_stop_flag_ends_a_long_fit_within_two_seconds(stats: bool) -> None:
    """A k = 256 fit on 4 x 65,536 colours that runs for seconds (tol 0: until no label changes)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((4, 65536, 3), generator=gen) * 255
    stop = StopFlag()
    fit = run_in_thread(lambda: kmeans(x, 256, init=x[:, :256], tol=0, max_iter=100_000, stats=stats, stop=stop))
    assert_stops_quickly(stop, *fit)


def test_a_set_flag_stops_before_seeding_and_through_the_fit_options() -> None:
    from gpu_kquant.options import FitOptions
    from gpu_kquant.quantize import quantize_batch

    stop = StopFlag()
    stop.set()
    with pytest.raises(Stopped):
        kmeans(blobs(), 4, stop=stop)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with pytest.raises(Stopped):
        quantize_batch([image], options=FitOptions(k=16, stop=stop), device="cpu")
    assert FitOptions(k=16, stop=stop) == FitOptions(k=16)  # the flag is not part of what the options mean
    copy = pickle.loads(pickle.dumps(FitOptions(k=16, stop=stop)))
    assert isinstance(copy.stop, StopFlag) and not copy.stop.is_set()  # a flag belongs to one process


def test_an_unset_flag_changes_nothing() -> None:
    x = blobs(2000)
    plain = kmeans(x, 8, n_init=2, seed=3, device="cpu")
    flagged = kmeans(x, 8, n_init=2, seed=3, device="cpu", stop=StopFlag())
    assert torch.equal(plain.centroids, flagged.centroids) and torch.equal(plain.labels, flagged.labels)


def test_a_stop_flag_ends_a_long_seeding_within_two_seconds() -> None:
    """k-means++ on 4 x 65,536 points at k = 512 is one kernel call of several seconds; it polls the flag."""
    km = importlib.import_module("gpu_kquant.kmeans")
    gen = torch.Generator().manual_seed(1)
    x = torch.rand((4, 65536, 3), generator=gen) * 255
    u = km._uniforms(0, [0, 1, 2, 3], (512, km.kpp_candidates(512)), torch.device("cpu"))
    stop = StopFlag()
    seeding = run_in_thread(lambda: km.kmeans_plusplus(x, torch.ones(4, 65536), 512, u, stop))
    assert_stops_quickly(stop, *seeding)
