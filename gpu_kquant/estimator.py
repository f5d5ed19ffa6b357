"""A scikit-learn estimator around :func:`gpu_kquant.kmeans.kmeans` for (N, D) data.

With scikit-learn installed, :class:`KMeans` derives from its ``BaseEstimator``,
``ClusterMixin`` and ``TransformerMixin``, validates input with scikit-learn's own
functions (so errors carry scikit-learn's messages) and passes ``check_estimator``.
Without it, a small stand-in base gives ``get_params``, ``set_params`` and ``repr``, and
the input checks below raise the same kinds of errors. scikit-learn stays optional.
"""

from __future__ import annotations

import inspect
import numbers
import operator
import warnings
from typing import Any

import numpy as np
import torch

from .device import resolve_device
from .kernels import backend
from .kmeans import kmeans

__all__ = ["DEFAULT_SEED", "HAVE_SKLEARN", "KMeans", "NotFittedError"]

# Engine seed when neither ``random_state`` nor ``seed`` is set: gpu_kquant fits are
# reproducible by default (scikit-learn would draw a fresh seed instead).
DEFAULT_SEED = 0


class _ParamsBase:
    """``get_params``, ``set_params`` and ``repr`` in scikit-learn's manner, for when it is absent."""

    @classmethod
    def _get_param_names(cls) -> list[str]:
        params = inspect.signature(cls.__init__).parameters.values()
        return sorted(p.name for p in params if p.name != "self" and p.kind is not p.VAR_KEYWORD)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor parameters by name."""
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params: Any) -> Any:
        """Set constructor parameters; an unknown name raises ``ValueError``."""
        valid = self.get_params()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"Invalid parameter {name!r} for estimator {self}. Valid parameters: {sorted(valid)}.")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        changed = [f"{n}={v!r}" for n, v in self.get_params().items() if repr(v) != repr(defaults.get(n))]
        return f"{type(self).__name__}({', '.join(changed)})"


try:
    from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, ClusterMixin, TransformerMixin  # type: ignore[import-untyped]
    from sklearn.exceptions import ConvergenceWarning as _FewClustersWarning  # type: ignore[import-untyped]
    from sklearn.exceptions import NotFittedError as _NotFittedBase
    from sklearn.utils import validation as _sk_validation  # type: ignore[import-untyped]

    HAVE_SKLEARN = True
    _BASES: tuple[type, ...] = (ClassNamePrefixFeaturesOutMixin, TransformerMixin, ClusterMixin, BaseEstimator)
except ImportError:
    HAVE_SKLEARN = False
    _BASES = (_ParamsBase,)
    _FewClustersWarning = UserWarning

    class _NotFittedBase(ValueError, AttributeError):  # type: ignore[no-redef]
        """Stand-in for scikit-learn's ``NotFittedError`` (same bases)."""


def _sk_validate_data(estimator: Any, X: Any, **kwargs: Any) -> np.ndarray:
    """scikit-learn's ``validate_data`` (a method before scikit-learn 1.6)."""
    if hasattr(_sk_validation, "validate_data"):
        arr: np.ndarray = _sk_validation.validate_data(estimator, X, **kwargs)
    else:
        arr = estimator._validate_data(X, **kwargs)
    return arr


class NotFittedError(_NotFittedBase, RuntimeError):  # type: ignore[misc]
    """Raised when a method needs a fitted estimator: scikit-learn's error (when installed), also a RuntimeError."""


def _plain_check_array(x: Any, name: str = "X") -> np.ndarray:
    """scikit-learn's ``check_array`` rules for dense float data, for when it is absent."""
    arr = np.asarray(x)
    if arr.dtype.kind == "c":
        raise ValueError("Complex data not supported")
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    if arr.ndim != 2:
        raise ValueError(f"Expected a 2-dimensional container but got {arr.ndim}D for {name}. Reshape your data.")
    for axis, what in ((0, "sample"), (1, "feature")):
        if arr.shape[axis] < 1:
            raise ValueError(f"Found array with 0 {what}(s) (shape={arr.shape}) while a minimum of 1 is required.")
    if not np.isfinite(arr).all():
        raise ValueError(f"Input {name} contains NaN or infinity.")
    return arr


def _check_weights(sample_weight: Any, n: int) -> np.ndarray | None:
    """``sample_weight`` as an (n,) float64 array (a scalar is broadcast), or None."""
    if sample_weight is None:
        return None
    w = np.asarray(sample_weight, dtype=np.float64)
    if w.ndim == 0:
        w = np.full(n, float(w))
    if w.shape != (n,):
        raise ValueError(f"sample_weight.shape == {w.shape}, expected {(n,)}!")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("sample_weight must be finite and non-negative.")
    if not w.any():
        raise ValueError("Sample weights must contain at least one non-zero number.")
    return w


class KMeans(*_BASES):  # type: ignore[misc]
    """Weighted k-means for (N, D) data, scikit-learn's estimator API on gpu_kquant's engine.

    ``__init__`` only stores parameters. :meth:`fit` sets ``cluster_centers_`` (k', D),
    ``labels_`` (N,) int64, ``inertia_``, ``n_iter_`` and ``n_features_in_`` as CPU numpy
    values; ``k'`` is smaller than ``n_clusters`` (with a warning) when the data has fewer
    distinct points. Centres are computed in float32 and stored in the input's dtype.

    Args:
        n_clusters: number of clusters k.
        init: ``"k-means++"`` or initial centres (k, D) (then one init is run).
        n_init: k-means++ restarts; the lowest inertia wins.
        max_iter: maximum Lloyd iterations.
        tol: relative tolerance on the centre shift (scikit-learn's rule).
        random_state: None (:data:`DEFAULT_SEED`), an int (the engine's seed), or a
            numpy ``RandomState``/``Generator`` from which a seed is drawn at each fit.
        seed: alias of ``random_state``, kept for older code; set at most one of the two.
        device: where to compute, ``None`` for CUDA when available.
    """

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        init: str | np.ndarray = "k-means++",
        n_init: int = 1,
        max_iter: int = 300,
        tol: float = 1e-4,
        random_state: int | np.random.RandomState | None = None,
        seed: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.seed = seed
        self.device = device

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    @property
    def _n_features_out(self) -> int:
        """Columns of :meth:`transform`'s output (for ``get_feature_names_out``)."""
        return int(self.cluster_centers_.shape[0])

    def _validate(self, X: Any, reset: bool) -> np.ndarray:
        """X as a 2-D float32/float64 array; ``reset`` records ``n_features_in_``, else checks it."""
        if HAVE_SKLEARN:
            return _sk_validate_data(self, X, reset=reset, dtype=[np.float64, np.float32])
        arr = _plain_check_array(X)
        if reset:
            self.n_features_in_ = arr.shape[1]
        elif arr.shape[1] != self.n_features_in_:
            name = type(self).__name__
            raise ValueError(
                f"X has {arr.shape[1]} features, but {name} is expecting {self.n_features_in_} features as input."
            )
        return arr

    def _validate_fitted(self, X: Any) -> np.ndarray:
        if not hasattr(self, "cluster_centers_"):
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with appropriate arguments "
                "before using this estimator."
            )
        return self._validate(X, reset=False)

    def _engine_seed(self) -> int:
        """The engine's integer seed from ``random_state`` or ``seed``."""
        if self.random_state is not None and self.seed is not None:
            raise ValueError("set random_state or its alias seed, not both")
        value = self.seed if self.random_state is None else self.random_state
        if value is None:
            return DEFAULT_SEED
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, np.random.RandomState):
            return int(value.randint(np.iinfo(np.int32).max))
        if isinstance(value, np.random.Generator):
            return int(value.integers(np.iinfo(np.int32).max))
        raise ValueError(f"random_state must be None, an int or a numpy RandomState, got {value!r}")

    def _engine_init(self, n_clusters: int, n_features: int) -> tuple[str | torch.Tensor, int]:
        """The engine's ``init`` and ``n_init``."""
        if isinstance(self.init, str):
            return self.init, self.n_init
        centres = _plain_check_array(self.init, "init")
        if centres.shape != (n_clusters, n_features):
            raise ValueError(f"init must have shape {(n_clusters, n_features)}, got {centres.shape}.")
        if self.n_init != 1:
            warnings.warn(
                f"Explicit initial center position passed: performing only one init in {type(self).__name__} "
                f"instead of n_init={self.n_init}.",
                RuntimeWarning,
                stacklevel=3,
            )
        return torch.tensor(centres, dtype=torch.float32), 1

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> KMeans:
        """Fit on X (N, D) with optional non-negative ``sample_weight`` (N,); returns ``self``."""
        data = self._validate(X, reset=True)
        try:
            k = operator.index(self.n_clusters)
        except TypeError:
            raise ValueError(f"n_clusters must be a positive integer, got {self.n_clusters!r}") from None
        if data.shape[0] < k:
            raise ValueError(f"n_samples={data.shape[0]} should be >= n_clusters={k}.")
        weights = _check_weights(sample_weight, data.shape[0])
        init, n_init = self._engine_init(k, data.shape[1])
        res = kmeans(
            torch.tensor(data, dtype=torch.float32),
            k,
            weights=None if weights is None else torch.tensor(weights, dtype=torch.float32),
            init=init,
            n_init=n_init,
            max_iter=self.max_iter,
            tol=self.tol,
            seed=self._engine_seed(),
            device=self.device,
        )
        k_eff = int(res.n_clusters[0])
        if k_eff < k:
            warnings.warn(
                f"Number of distinct clusters ({k_eff}) found smaller than n_clusters ({k}). "
                "Possibly due to duplicate points in X.",
                _FewClustersWarning,
                stacklevel=2,
            )
        self.cluster_centers_ = res.centroids[0, :k_eff].cpu().numpy().astype(data.dtype)
        self.labels_ = res.labels[0].cpu().numpy()
        self.inertia_ = float(res.inertia[0])
        self.n_iter_ = int(res.n_iter[0])
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Index (N,) int64 of the nearest learned centre for every row of X (N, D)."""
        data = self._validate_fitted(X)
        dev = resolve_device(self.device)
        points = torch.tensor(data, dtype=torch.float32, device=dev)[None]
        centres = torch.tensor(self.cluster_centers_, dtype=torch.float32, device=dev)[None]
        labels, _, _ = backend(dev).nearest(points, centres)
        out: np.ndarray = labels[0].cpu().numpy()
        return out

    def _distances(self, data: np.ndarray) -> np.ndarray:
        """Euclidean distances (N, k') float64 from validated rows to the centres, computed in float64."""
        dev = resolve_device(self.device)
        x = torch.tensor(data, dtype=torch.float64, device=dev)
        c = torch.tensor(self.cluster_centers_, dtype=torch.float64, device=dev)
        # Direct differences rather than the |x|^2 - 2xc + |c|^2 form, which cancels badly.
        return torch.cdist(x[None], c[None], compute_mode="donot_use_mm_for_euclid_dist")[0].cpu().numpy()

    def transform(self, X: Any) -> np.ndarray:
        """Distances (N, k') from every row of X to every centre, in X's float dtype."""
        data = self._validate_fitted(X)
        return self._distances(data).astype(data.dtype, copy=False)

    def fit_transform(self, X: Any, y: Any = None, sample_weight: Any = None) -> np.ndarray:
        """Fit, then return :meth:`transform` of X."""
        return self.fit(X, sample_weight=sample_weight).transform(X)

    def fit_predict(self, X: Any, y: Any = None, sample_weight: Any = None) -> np.ndarray:
        """Fit, then return ``labels_``."""
        return self.fit(X, sample_weight=sample_weight).labels_

    def score(self, X: Any, y: Any = None, sample_weight: Any = None) -> float:
        """Negative (weighted) inertia of X under the learned centres, in float64: higher is better."""
        data = self._validate_fitted(X)
        weights = _check_weights(sample_weight, data.shape[0])
        d2 = np.square(self._distances(data).min(axis=1))
        return -float(d2.sum() if weights is None else d2 @ weights)
