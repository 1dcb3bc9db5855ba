"""Readers: scikit-learn-style estimators that turn paired activations at one site into a direction.

Every reader is fitted on contrast pairs, ``fit(X_pos, X_neg)`` with ``X_pos[i]`` and ``X_neg[i]`` the
two sides of pair ``i`` (``[n_pairs, d]`` each), and learns

- ``direction_``: a unit vector (float32 ``[d]``) whose sign is calibrated on the training data, so that
  positives project higher than negatives on average (positive projection = concept present);
- ``threshold_``: the projection that separates the two classes (the midpoint of the two class means on
  the training data; the logistic reader uses its own intercept instead);
- ``mean_pos_`` / ``mean_neg_``: the class means of the training projections.

``project(X)`` is the raw projection ``X @ direction_``; ``decision_function(X)`` subtracts the
threshold (positive = concept present); ``predict`` gives 1 for concept present and 0 otherwise;
``score(X_pos, X_neg)`` is the accuracy of ``predict`` over both sides (higher is better).

As in scikit-learn, ``__init__`` only stores its arguments, parameters are checked in ``fit``, and
fitted state ends in ``_``. Every computation is deterministic: full SVDs (never randomised ones), and
explicit seeds wherever randomness enters, so the same data and seed give a bit-identical direction.
Fitting runs its linear algebra on one thread (``threadpoolctl``): at these sizes that is faster, and
it does not collapse when the cores are shared with other work.

>>> reader = make_reader("pca_diff").fit(X_pos, X_neg)
>>> reader.direction_, reader.score(X_pos_test, X_neg_test)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from jaxtyping import Float, Int
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits
from torch import Tensor

from probes.contrast import mean_difference

ArrayLike = Tensor | np.ndarray

__all__ = [
    "LAT",
    "READERS",
    "Logistic",
    "MeanDiff",
    "PCACenter",
    "PCADiff",
    "RandomDirection",
    "Reader",
    "make_reader",
    "reader_names",
]


# ---- input checks ----------------------------------------------------------------------------
def as_matrix(X: Any, name: str) -> Tensor:
    """``X`` as a float64 ``[n, d]`` CPU tensor, or a ValueError/TypeError that names ``name``."""
    if isinstance(X, np.ndarray):
        X = torch.from_numpy(np.asarray(X))
    if not isinstance(X, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor (or numpy array) of shape [n, d]; got {type(X).__name__}"
        )
    if X.dim() != 2:
        raise ValueError(f"{name} must be 2-D [n, d]; got shape {tuple(X.shape)}")
    if X.is_complex() or X.dtype == torch.bool:
        raise ValueError(f"{name} must hold real numbers; got dtype {X.dtype}")
    X = X.detach().to("cpu", torch.float64)
    finite = np.isfinite(X.numpy())  # numpy: single-threaded, no thread-pool start-up per call
    if not finite.all():
        row = int(np.flatnonzero(~finite.all(axis=1))[0])
        raise ValueError(f"{name} contains NaN or inf (first at row {row})")
    return X


_R = TypeVar("_R", bound="Reader")  # fit returns the reader it was called on
# what the public methods take: [n, d] rows as a torch tensor or a numpy array, validated (clear
# errors) by check_pairs / as_matrix; the internal methods carry the shapes
Rows = Tensor | np.ndarray


def check_pairs(X_pos: Any, X_neg: Any, min_pairs: int = 2) -> tuple[Tensor, Tensor]:
    """Validate paired activations: same shape ``[n_pairs, d]``, finite, at least ``min_pairs`` rows."""
    P = as_matrix(X_pos, "X_pos")
    N = as_matrix(X_neg, "X_neg")
    if P.shape != N.shape:
        raise ValueError(
            "X_pos and X_neg must have the same shape [n_pairs, d] (row i of each is one contrast "
            f"pair); got {tuple(P.shape)} and {tuple(N.shape)}"
        )
    if P.shape[0] < min_pairs:
        raise ValueError(
            f"need at least {min_pairs} contrast pairs to fit a reader; got {P.shape[0]}"
        )
    if P.shape[1] < 1:
        raise ValueError(f"activations need at least one feature; got shape {tuple(P.shape)}")
    return P, N


def _choice(reader: Reader, param: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(
            f"{type(reader).__name__}: parameter {param!r} must be one of {tuple(allowed)}; "
            f"got {value!r}"
        )


def _int(reader: Reader, param: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(
            f"{type(reader).__name__}: parameter {param!r} must be an integer >= {minimum}; "
            f"got {value!r}"
        )


def _bool(reader: Reader, param: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(
            f"{type(reader).__name__}: parameter {param!r} must be True or False; got {value!r}"
        )


def _top_component(M: Float[Tensor, "n d"], center: bool) -> tuple[Float[Tensor, " d"], float]:
    """First right singular vector of ``M`` (after centring its rows, if asked) and its share of the
    (centred or raw) second moment. A full, deterministic SVD."""
    if center:
        M = M - M.mean(dim=0, keepdim=True)
    _, S, Vh = torch.linalg.svd(M, full_matrices=False)
    total = float((S**2).sum())
    if total <= 0.0 or not math.isfinite(total):
        raise ValueError(
            "the activations have no variance to take a principal component of "
            "(are the positive and negative sides identical?)"
        )
    return Vh[0].clone(), float(S[0] ** 2) / total


# ---- the base class --------------------------------------------------------------------------
class Reader(BaseEstimator):  # type: ignore[misc]
    """Base class of all readers: fit a unit direction on paired activations of one site.

    Subclasses implement ``_direction(P, N)``, returning an (unnormalised) float64 vector, and optionally
    an offset ``b`` when their own decision rule is ``v @ x + b`` (otherwise the threshold is the
    midpoint of the two class means of the training projections).
    """

    name: ClassVar[str] = "reader"
    baseline: ClassVar[bool] = False

    def _check_params(self) -> None:
        """Validate constructor parameters (called by ``fit``, never by ``__init__``)."""

    def _direction(
        self, P: Float[Tensor, "n d"], N: Float[Tensor, "n d"]
    ) -> tuple[Float[Tensor, " d"], float | None]:
        raise NotImplementedError

    def fit(self: _R, X_pos: Rows, X_neg: Rows) -> _R:
        """Fit on contrast pairs (row ``i`` of ``X_pos`` and ``X_neg`` is pair ``i``); returns self."""
        self._check_params()
        P, N = check_pairs(X_pos, X_neg)
        # these problems are small: one thread is faster, and immune to oversubscribed cores
        with threadpool_limits(limits=1):
            v, offset = self._direction(P, N)
        norm = float(v.norm())
        if not math.isfinite(norm) or norm <= 0.0:
            raise ValueError(
                f"{type(self).__name__} found no direction (zero vector): are the positive and "
                "negative activations identical?"
            )
        u = (v / norm).to(torch.float32)
        u64 = u.double()
        mp, mn = float((P @ u64).mean()), float((N @ u64).mean())
        flipped = mp < mn
        if flipped:
            u, u64, mp, mn = -u, -u64, -mp, -mn
        if offset is None:
            threshold = 0.5 * (mp + mn)
        else:
            # v @ x + offset > 0  <=>  u @ x > -offset / |v|  (and the flip mirrors it)
            threshold = -offset / norm
            if flipped:
                threshold = -threshold
        self.direction_ = u.contiguous()
        self.threshold_ = float(threshold)
        self.mean_pos_ = mp
        self.mean_neg_ = mn
        self.sign_flipped_ = bool(flipped)
        self.n_features_in_ = int(P.shape[1])
        self.n_pairs_ = int(P.shape[0])
        return self

    # ---- using a fitted reader ------------------------------------------------------------------
    def _checked(self, X: Any, name: str = "X") -> Float[Tensor, "n d"]:
        check_is_fitted(self, "direction_")
        M = as_matrix(X, name)
        if M.shape[1] != self.n_features_in_:
            raise ValueError(
                f"{name} has {M.shape[1]} features; {type(self).__name__} was fitted on "
                f"{self.n_features_in_}"
            )
        return M

    def project(self, X: Rows) -> Float[Tensor, " n"]:
        """Raw projections ``X @ direction_`` (float64)."""
        return self._checked(X) @ self.direction_.double()

    def decision_function(self, X: Rows) -> Float[Tensor, " n"]:
        """Projections minus the fitted threshold: positive means the concept is present."""
        return self.project(X) - self.threshold_

    def predict(self, X: Rows) -> Int[Tensor, " n"]:
        """1 where the concept is predicted present, 0 elsewhere (int64 ``[n]``)."""
        return (self.decision_function(X) > 0).long()

    def score(self, X_pos: Rows, X_neg: Rows) -> float:
        """Accuracy of ``predict`` over positives (label 1) and negatives (label 0); higher is better."""
        P, N = self._checked(X_pos, "X_pos"), self._checked(X_neg, "X_neg")
        if len(P) + len(N) == 0:
            raise ValueError("score needs at least one example in X_pos or X_neg")
        u = self.direction_.double()
        hits = int(((P @ u - self.threshold_) > 0).sum()) + int(
            ((N @ u - self.threshold_) <= 0).sum()
        )
        return hits / (len(P) + len(N))

    def pair_accuracy(self, X_pos: Rows, X_neg: Rows) -> float:
        """Fraction of pairs whose positive side projects higher than its negative side."""
        P, N = check_pairs(X_pos, X_neg, min_pairs=1)
        return float((self.project(P) > self.project(N)).double().mean())


# ---- the readers -----------------------------------------------------------------------------
class MeanDiff(Reader):
    """Difference of the class means (``mean(X_pos) - mean(X_neg)``): CAA / steering-vectors' default."""

    name = "mean_diff"

    def _direction(
        self, P: Float[Tensor, "n d"], N: Float[Tensor, "n d"]
    ) -> tuple[Float[Tensor, " d"], float | None]:
        return mean_difference(P, N).to(P.dtype), None


class PCADiff(Reader):
    """First principal component of the paired differences ``X_pos - X_neg`` (repeng ``pca_diff``).

    ``center=False`` (default) takes the component of the raw differences, which keeps the mean
    difference in view (steering-vectors' PCA aggregator). repeng's ``pca_diff`` centres the
    differences first (scikit-learn's PCA does), which only sees how the contrast *varies* between
    pairs: pass ``center=True`` for that.
    """

    name = "pca_diff"

    def __init__(self, center: bool = False) -> None:
        self.center = center

    def _check_params(self) -> None:
        _bool(self, "center", self.center)

    def _direction(
        self, P: Float[Tensor, "n d"], N: Float[Tensor, "n d"]
    ) -> tuple[Float[Tensor, " d"], float | None]:
        v, ratio = _top_component(P - N, center=self.center)
        self.explained_variance_ratio_ = ratio
        return v, None


class PCACenter(Reader):
    """PCA of the activations centred on their pair's mean (repeng ``pca_center``).

    Each pair contributes ``x_pos - c`` and ``x_neg - c`` with ``c`` the pair mean, i.e. ``±(x_pos -
    x_neg) / 2``: the pair-specific content cancels and only the contrast is left.
    """

    name = "pca_center"

    def _direction(
        self, P: Float[Tensor, "n d"], N: Float[Tensor, "n d"]
    ) -> tuple[Float[Tensor, " d"], float | None]:
        c = 0.5 * (P + N)
        v, ratio = _top_component(torch.cat([P - c, N - c]), center=True)
        self.explained_variance_ratio_ = ratio
        return v, None


class LAT(Reader):
    """RepE's linear artificial tomography: PCA over differences of randomly paired stimuli.

    ``pairing="contrast"`` (default; the RepE repository's pipeline for contrast data such as its
    honesty pairs) keeps each contrast pair and randomises the order of its two stimuli (seeded), so
    the differences point either way; ``pairing="random"`` (the paper's unsupervised recipe) shuffles
    all stimuli of both sides together and pairs them at random, so only about half of the differences
    cross the concept and the rest is content. The differences are centred (``center=True``), their
    first principal component is the direction, and the labels only choose its sign, on the training
    data. On persona-prompt data such as facts/honesty the random pairing is dominated by content
    (each statement prefix differs) and reads near chance, hence the default.
    """

    name = "lat"

    def __init__(self, pairing: str = "contrast", center: bool = True, seed: int = 0) -> None:
        self.pairing = pairing
        self.center = center
        self.seed = seed

    def _check_params(self) -> None:
        _choice(self, "pairing", self.pairing, ("random", "contrast"))
        _bool(self, "center", self.center)
        _int(self, "seed", self.seed, 0)

    def _direction(
        self, P: Float[Tensor, "n d"], N: Float[Tensor, "n d"]
    ) -> tuple[Float[Tensor, " d"], float | None]:
        g = torch.Generator().manual_seed(int(self.seed))
        n = P.shape[0]
        if self.pairing == "random":
            X = torch.cat([P, N])
            perm = torch.randperm(2 * n, generator=g)
            diffs = X[perm[0::2]] - X[perm[1::2]]
        else:
            flip = torch.randint(0, 2, (n,), generator=g).bool().unsqueeze(1)
            diffs = torch.where(flip, N - P, P - N)
        v, ratio = _top_component(diffs, center=self.center)
        self.explained_variance_ratio_ = ratio
        return v, None


def _logistic_cv(
    Z: np.ndarray, y: np.ndarray, Cs: Any, folds: list[tuple[np.ndarray, np.ndarray]], **kw: Any
) -> Any:
    """``LogisticRegressionCV`` with an L2 penalty, across scikit-learn versions."""
    import inspect
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV

    accepted = inspect.signature(LogisticRegressionCV).parameters
    extra: dict[str, Any] = {}
    if "use_legacy_attributes" in accepted:  # scikit-learn >= 1.8
        extra["use_legacy_attributes"] = False
        extra["l1_ratios"] = (0.0,)
    model = LogisticRegressionCV(Cs=Cs, cv=folds, **kw, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(Z, y)


class Logistic(Reader):
    """L2-regularised logistic regression on standardised activations, ``C`` chosen by cross-validation.

    The folds are fixed for a seed and keep both sides of a pair together (no pair leaks across a
    fold). The direction is the coefficient vector mapped back to activation space (divided by the
    feature scales) and normalised; the threshold is the model's own decision boundary.

    ``Cs``: an int (that many values on a log grid from 1e-4 to 1e4) or a list of values of ``C``.
    ``solver``: ``liblinear`` (default, the fastest here; it also penalises the intercept, which is
    near zero anyway on standardised, balanced data), ``newton-cholesky`` or ``lbfgs``. With fewer
    examples than features the fit runs in the row space of the data, which gives the same L2
    solution on a smaller problem.
    """

    name = "logistic"

    def __init__(
        self,
        Cs: int | Sequence[float] = 10,
        cv: int = 5,
        max_iter: int = 1000,
        scoring: str = "neg_log_loss",
        solver: str = "liblinear",
        seed: int = 0,
    ) -> None:
        self.Cs = Cs
        self.cv = cv
        self.max_iter = max_iter
        self.scoring = scoring
        self.solver = solver
        self.seed = seed

    def _check_params(self) -> None:
        if isinstance(self.Cs, int | np.integer) and not isinstance(self.Cs, bool):
            _int(self, "Cs", self.Cs, 1)
        elif not (
            isinstance(self.Cs, Sequence)
            and len(self.Cs) > 0
            and all(isinstance(c, int | float) and c > 0 for c in self.Cs)
        ):
            raise ValueError(
                f"Logistic: parameter 'Cs' must be a positive integer or a non-empty list of "
                f"positive numbers; got {self.Cs!r}"
            )
        _int(self, "cv", self.cv, 2)
        _int(self, "max_iter", self.max_iter, 1)
        _choice(self, "scoring", self.scoring, ("neg_log_loss", "accuracy", "roc_auc"))
        _choice(self, "solver", self.solver, ("liblinear", "lbfgs", "newton-cholesky"))
        _int(self, "seed", self.seed, 0)

    def _direction(
        self, P: Float[Tensor, "n d"], N: Float[Tensor, "n d"]
    ) -> tuple[Float[Tensor, " d"], float | None]:
        n = P.shape[0]
        X = torch.cat([P, N]).numpy()
        y = np.concatenate([np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)])
        mean = X.mean(axis=0)
        scale = X.std(axis=0)
        scale[scale == 0.0] = 1.0
        Z = (X - mean) / scale
        # with fewer examples than features the L2 solution lies in the row space of Z: fit there
        # (same optimum, same folds, a smaller problem) and map the coefficients back
        basis: np.ndarray | None = None
        if Z.shape[1] > Z.shape[0]:
            _, S, Vt = np.linalg.svd(Z, full_matrices=False)
            rank = max(1, int((S > S[0] * 1e-10).sum()))
            basis = Vt[:rank]
            Z = Z @ basis.T
        order = np.random.default_rng(int(self.seed)).permutation(n)
        folds = []
        for held in np.array_split(order, min(int(self.cv), n)):
            test = np.sort(np.concatenate([held, held + n]))
            train = np.setdiff1d(np.arange(2 * n), test)
            folds.append((train, test))
        Cs = int(self.Cs) if isinstance(self.Cs, int | np.integer) else list(self.Cs)
        model = _logistic_cv(
            Z,
            y,
            Cs,
            folds,
            max_iter=int(self.max_iter),
            scoring=self.scoring,
            solver=self.solver,
            random_state=int(self.seed),
        )
        coef = np.asarray(model.coef_, dtype=np.float64).reshape(-1)
        if basis is not None:
            coef = coef @ basis
        w = coef / scale
        b = float(np.asarray(model.intercept_).reshape(-1)[0]) - float(w @ mean)
        self.C_ = float(np.asarray(model.C_).reshape(-1)[0])
        return torch.from_numpy(w.copy()), b


class RandomDirection(Reader):
    """A seeded random unit direction (sign calibrated like every reader): the chance baseline."""

    name = "random"
    baseline = True

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def _check_params(self) -> None:
        _int(self, "seed", self.seed, 0)

    def _direction(
        self, P: Float[Tensor, "n d"], N: Float[Tensor, "n d"]
    ) -> tuple[Float[Tensor, " d"], float | None]:
        g = torch.Generator().manual_seed(int(self.seed))
        return torch.randn(P.shape[1], generator=g, dtype=torch.float64), None


# ---- the factory -----------------------------------------------------------------------------
READERS: dict[str, type[Reader]] = {
    cls.name: cls for cls in (MeanDiff, PCADiff, PCACenter, LAT, Logistic, RandomDirection)
}


def reader_names() -> list[str]:
    """The names ``make_reader`` accepts."""
    return list(READERS)


def make_reader(name: str, **params: Any) -> Reader:
    """Build a reader by name (``mean_diff``, ``pca_diff``, ``pca_center``, ``lat``, ``logistic``,
    ``random``) with its parameters, e.g. ``make_reader("lat", seed=1)``."""
    if name not in READERS:
        raise ValueError(f"unknown reader {name!r}; valid names: {', '.join(READERS)}")
    cls = READERS[name]
    valid = sorted(cls().get_params())
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"reader {name!r} has no parameter(s) {unknown}; its parameters: "
            f"{', '.join(valid) if valid else '(none)'}"
        )
    return cls(**params)
