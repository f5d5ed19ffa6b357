"""Tests of the scikit-learn estimator: scikit-learn's own checks and its KMeans as the reference."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from common_utils import ROOT, photo

from gpu_kquant import KMeans
from gpu_kquant.estimator import DEFAULT_SEED, NotFittedError

try:
    from sklearn.utils.estimator_checks import parametrize_with_checks
except ImportError:  # the estimator must work without scikit-learn; its checks need it
    parametrize_with_checks = None


def blobs(n: int = 600, d: int = 3, centers: int = 5, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, d, generator=gen) * 20
    return c[torch.randint(0, centers, (n,), generator=gen)] + torch.randn(n, d, generator=gen)


def pixels(n: int = 4000, seed: int = 0) -> np.ndarray:
    """n random pixels (n, 3) float64 of a real photo bundled with scikit-learn."""
    img = photo("china").reshape(-1, 3)
    return img[np.random.default_rng(seed).choice(len(img), n, replace=False)].astype(np.float64)


def real_datasets() -> list:
    """(name, X, k): iris (150, 4) and photo pixels (4000, 3)."""
    datasets = pytest.importorskip("sklearn.datasets")
    return [("iris", datasets.load_iris().data, 3), ("china", pixels(), 16)]


def _expected_failures(estimator: KMeans) -> dict[str, str]:
    # The check shuffles the weighted rows before fitting, so k-means++ draws different
    # points than on the repeated rows and reaches another local optimum; scikit-learn
    # marks its own KMeans the same way. test_integer_weights_equal_repeated_points
    # checks the equivalence where it is well defined (same row order, or a fixed init).
    reason = "sample_weight is not equivalent to removing/repeating samples under shuffled k-means++ seeding"
    return {"check_sample_weight_equivalence_on_dense_data": reason}


if parametrize_with_checks is not None:

    @parametrize_with_checks([KMeans()], expected_failed_checks=_expected_failures)
    def test_sklearn_check_estimator(estimator: KMeans, check: object) -> None:
        with warnings.catch_warnings():
            # Tiny random data sets in the checks often have fewer distinct points than k.
            warnings.filterwarnings("ignore", message="Number of distinct clusters")
            check(estimator)  # type: ignore[operator]


class TestEstimator:
    def test_sklearn_conventions(self) -> None:
        est = KMeans(4, seed=3)
        assert est.get_params()["n_clusters"] == 4
        assert not hasattr(est, "cluster_centers_")
        x = blobs(300, 2, 4).numpy()
        assert est.fit(x) is est
        assert est.cluster_centers_.shape == (4, 2)
        assert est.labels_.shape == (300,)
        assert est.n_iter_ >= 1 and est.inertia_ > 0
        np.testing.assert_array_equal(est.predict(x), est.labels_)
        np.testing.assert_array_equal(KMeans(4, seed=3).fit_predict(x), est.labels_)
        assert est.set_params(n_clusters=3) is est and est.n_clusters == 3

    def test_sklearn_clone_works(self) -> None:
        base = pytest.importorskip("sklearn.base")
        est = base.clone(KMeans(5, tol=0.0))
        assert est.n_clusters == 5 and est.tol == 0.0

    def test_warns_on_fewer_distinct_points(self) -> None:
        x = np.array([[0.0, 0.0], [1.0, 1.0]] * 5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            est = KMeans(4).fit(x)
        assert any("distinct clusters (2)" in str(w.message) for w in caught)
        assert est.cluster_centers_.shape == (2, 2)

    def test_predict_before_fit(self) -> None:
        with pytest.raises(RuntimeError, match="not fitted"):
            KMeans(2).predict(np.zeros((2, 2)))


@pytest.mark.parametrize("name", ["iris", "china"])
def test_matches_sklearn_on_real_data(name: str) -> None:
    cluster = pytest.importorskip("sklearn.cluster")
    _, x, k = next(d for d in real_datasets() if d[0] == name)
    ref = cluster.KMeans(k, n_init=4, random_state=0).fit(x)
    ours = KMeans(k, n_init=4, random_state=0, device="cpu").fit(x)
    # k-means++ draws differ between the two, so only the quality is compared.
    assert ours.inertia_ <= 1.01 * ref.inertia_
    d2 = ((x[:, None, :] - ours.cluster_centers_[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(ours.labels_, d2.argmin(1))
    assert ours.inertia_ == pytest.approx(d2.min(1).sum(), rel=1e-5)
    assert ours.score(x) == pytest.approx(-ours.inertia_, rel=1e-5)


@pytest.mark.parametrize("name", ["iris", "china"])
@pytest.mark.parametrize("weighted", [False, True])
def test_same_start_same_result_as_sklearn(name: str, weighted: bool) -> None:
    cluster = pytest.importorskip("sklearn.cluster")
    _, x, k = next(d for d in real_datasets() if d[0] == name)
    rng = np.random.default_rng(1)
    w = rng.integers(1, 5, len(x)).astype(np.float64) if weighted else None
    start = x[rng.choice(len(x), k, replace=False)]
    ref = cluster.KMeans(k, init=start, n_init=1).fit(x, sample_weight=w)
    ours = KMeans(k, init=start, n_init=1, device="cpu").fit(x, sample_weight=w)
    assert np.mean(ours.labels_ == ref.labels_) >= 0.99
    assert ours.inertia_ == pytest.approx(ref.inertia_, rel=0.01)
    np.testing.assert_allclose(ours.cluster_centers_, ref.cluster_centers_, rtol=0.01, atol=0.01 * np.ptp(x))


@pytest.mark.parametrize("name", ["iris", "china"])
def test_transform_and_score_match_sklearn_for_same_centres(name: str) -> None:
    cluster = pytest.importorskip("sklearn.cluster")
    _, x, k = next(d for d in real_datasets() if d[0] == name)
    ref = cluster.KMeans(k, n_init=1, random_state=0).fit(x)
    # max_iter=0 keeps the given centres (as float32, hence the tolerances).
    ours = KMeans(k, init=ref.cluster_centers_, max_iter=0, device="cpu").fit(x)
    out = ours.transform(x)
    assert out.shape == (len(x), k) and out.dtype == np.float64
    # A distance moves by at most as much as its centre did when rounded to float32.
    rounding = np.linalg.norm(ours.cluster_centers_ - ref.cluster_centers_, axis=1).max()
    assert rounding < 1e-4 * np.ptp(x)
    np.testing.assert_allclose(out, ref.transform(x), rtol=1e-7, atol=rounding + 1e-7)
    # scikit-learn's KMeans.transform is euclidean_distances to its centres: same on ours.
    pairwise = pytest.importorskip("sklearn.metrics.pairwise")
    exact = pairwise.euclidean_distances(x, ours.cluster_centers_)
    np.testing.assert_allclose(out, exact, rtol=1e-7, atol=1e-7 * np.ptp(x))
    np.testing.assert_array_equal(ours.predict(x), ref.predict(x))
    w = np.random.default_rng(2).uniform(0, 3, len(x))
    assert ours.score(x, sample_weight=w) == pytest.approx(ref.score(x, sample_weight=w), rel=1e-5)
    np.testing.assert_allclose(KMeans(k, init=ref.cluster_centers_, max_iter=0).fit_transform(x), out)


def test_integer_weights_equal_repeated_points() -> None:
    x = blobs(200, 3, 6, seed=4).double().numpy()
    sw = np.random.default_rng(3).integers(0, 4, len(x))
    repeated = np.repeat(x, sw, axis=0)
    start = x[sw > 0][:6]
    for params in ({"init": start}, {"random_state": 5}):
        a = KMeans(6, device="cpu", **params).fit(x, sample_weight=sw)
        b = KMeans(6, device="cpu", **params).fit(repeated)
        np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, rtol=1e-6, atol=1e-5)
        np.testing.assert_array_equal(a.predict(x), b.predict(x))
        assert a.inertia_ == pytest.approx(b.inertia_, rel=1e-6)


def test_pipeline_and_grid_search() -> None:
    pytest.importorskip("sklearn")
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = blobs(400, 3, 4, seed=1).double().numpy()
    est = KMeans(3, random_state=7, device="cpu")
    copy = clone(est.fit(x))
    assert copy.get_params() == est.get_params() and not hasattr(copy, "labels_")
    pipe = make_pipeline(StandardScaler(), KMeans(4, random_state=0)).fit(x)
    np.testing.assert_array_equal(pipe.predict(x), pipe[-1].labels_)
    assert pipe.transform(x).shape == (400, 4)
    # The score is the negative inertia: more clusters always score higher on held-out rows here.
    search = GridSearchCV(KMeans(random_state=0), {"n_clusters": [1, 2, 4]}, cv=3).fit(x)
    assert search.best_params_ == {"n_clusters": 4}
    assert search.cv_results_["mean_test_score"][0] < search.cv_results_["mean_test_score"][1] < 0


def test_random_state_and_seed() -> None:
    x = blobs(300, 3, 8, seed=2).numpy()
    centres = {rs: KMeans(8, random_state=rs, device="cpu").fit(x).cluster_centers_ for rs in (0, 1)}
    assert not np.array_equal(centres[0], centres[1])
    np.testing.assert_array_equal(KMeans(8, seed=1, device="cpu").fit(x).cluster_centers_, centres[1])
    np.testing.assert_array_equal(
        KMeans(8, random_state=DEFAULT_SEED).fit(x).cluster_centers_, KMeans(8).fit(x).cluster_centers_
    )
    a = KMeans(8, random_state=np.random.RandomState(3)).fit(x).cluster_centers_
    b = KMeans(8, random_state=np.random.RandomState(3)).fit(x).cluster_centers_
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="not both"):
        KMeans(8, random_state=1, seed=1).fit(x)


def test_input_errors_and_dtypes() -> None:
    x = blobs(50, 3, 3).numpy()
    with pytest.raises(ValueError, match="n_samples=2 should be >= n_clusters=3"):
        KMeans(3).fit(x[:2])
    est = KMeans(3).fit(x)
    assert est.n_features_in_ == 3 and est.cluster_centers_.dtype == np.float32
    assert est.transform(x).dtype == np.float32
    with pytest.raises(ValueError, match="X has 2 features"):
        est.predict(x[:, :2])
    with pytest.raises(ValueError, match="NaN"):
        est.transform(np.full((2, 3), np.nan))
    with pytest.raises(ValueError, match="sample_weight"):
        KMeans(3).fit(x, sample_weight=np.ones(4))
    with pytest.raises(NotFittedError):
        KMeans(3).score(x)
    est64 = KMeans(3).fit(x.astype(np.float64))
    assert est64.cluster_centers_.dtype == np.float64 and est64.transform(x.astype(np.float64)).dtype == np.float64


_NO_SKLEARN = """
import json, sys
sys.modules["sklearn"] = None  # every `import sklearn...` now raises ImportError
import numpy as np
from gpu_kquant.estimator import HAVE_SKLEARN, KMeans

def error(call):
    try:
        call()
    except Exception as exc:
        return [type(exc).__name__, isinstance(exc, ValueError), isinstance(exc, RuntimeError), str(exc)]

x = np.random.default_rng(0).normal(size=(200, 3)) + np.repeat(np.eye(3) * 10, [70, 70, 60], axis=0)
est = KMeans(3, random_state=1)
errors = {"unfitted": error(lambda: est.predict(x)), "1d": error(lambda: est.fit(x[:, 0])),
          "nan": error(lambda: est.fit(np.full((4, 2), np.nan)))}
est.fit(x)
errors["features"] = error(lambda: est.predict(x[:, :2]))
print(json.dumps({"have": HAVE_SKLEARN, "repr": repr(est), "params": sorted(est.get_params()),
    "set": est.set_params(tol=0.5).tol, "labels": est.predict(x).tolist() == est.labels_.tolist(),
    "transform": list(est.transform(x).shape), "score": est.score(x) / -est.inertia_, "errors": errors}))
"""


def test_works_without_sklearn() -> None:
    out = subprocess.run([sys.executable, "-c", _NO_SKLEARN], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["have"] is False
    assert got["repr"] == "KMeans(n_clusters=3, random_state=1)"
    assert got["params"] == ["device", "init", "max_iter", "n_clusters", "n_init", "random_state", "seed", "tol"]
    assert got["set"] == 0.5 and got["labels"] and got["transform"] == [200, 3]
    assert got["score"] == pytest.approx(1.0, rel=1e-5)
    errors = got["errors"]
    assert errors["unfitted"][:3] == ["NotFittedError", True, True] and "not fitted" in errors["unfitted"][3]
    assert errors["1d"][:2] == ["ValueError", True] and "2-dimensional" in errors["1d"][3]
    assert errors["nan"][:2] == ["ValueError", True] and "NaN" in errors["nan"][3]
    assert errors["features"][:2] == ["ValueError", True]
    assert "X has 2 features, but KMeans is expecting 3" in errors["features"][3]
