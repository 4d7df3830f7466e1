"""Sample quality against real images: Frechet distance and precision / recall / density / coverage.

* **Frechet distance** (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium"; computed on any feature space, as Stein et al. 2023, "Exposing flaws of generative model evaluation
  metrics", dgm-eval, do): ``||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))`` with the sample means and
  covariances (ddof = 1). The trace of the matrix square root is computed exactly from the centred data matrices
  ``A`` (n x d) and ``B`` (m x d): the non-zero eigenvalues of ``S_a S_b`` are the squared singular values of
  ``A B^T / sqrt((n-1)(m-1))``, so ``tr((S_a S_b)^(1/2))`` is the nuclear norm of that n x m matrix. The real side is
  factored once (thin SVD ``B = U S V^T``; ``A B^T`` and ``A V S`` share their singular values), so each further set
  of samples -- every bootstrap resample -- costs one small symmetric eigendecomposition, and no d x d matrix is
  ever formed: raw-pixel features of any size work. FD is biased by the sample size (it shrinks with n):
  compare values at equal n only (:func:`frechet_floor`).
* **Precision and recall** (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing Generative
  Models") and **density and coverage** (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative
  Models"; reference code clovaai/generative-evaluation-prdc), with k = 5: each real (fake) point's manifold ball
  has the radius of its k-th nearest real (fake) neighbour, Euclidean distance.

  - precision: the fraction of fakes inside some real ball;
  - recall: the fraction of reals inside some fake ball;
  - density: the mean number of real balls holding a fake, divided by k;
  - coverage: the fraction of reals whose ball holds some fake.

Confidence intervals: Wilson intervals for precision, recall and coverage (a proportion over fakes or reals, with
the balls taken as fixed); a normal interval for density (a mean over fakes). The FD interval is a normal interval
whose standard error is bootstrapped over the fakes (the reals held fixed; a resample repeats images, which biases
FD upwards, so percentiles of the resampled FDs need not contain the estimate, while their spread is a fair standard
error); it is cheap because each resample costs one n x m SVD.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..results import Estimate
from .stats import proportion_estimate

PRDC_K = 5


def _matrix(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"{name} must be (n >= 2, dim) feature vectors; got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN/inf")
    return a


class FrechetReference:
    """The real side of the Frechet distance, factored once: mean, trace of the covariance, and ``W = V S`` from the
    thin SVD ``B_c = U S V^T`` (so ``A_c B_c^T`` and ``A_c W`` have the same singular values)."""

    def __init__(self, b: np.ndarray) -> None:
        B = _matrix(b, "b")
        self.mu = B.mean(0)
        Bc = B - self.mu
        self.nb = len(B) - 1
        self.tr = float((Bc * Bc).sum() / self.nb)
        _, sv, vt = np.linalg.svd(Bc, full_matrices=False)
        self.W = vt.T * sv  # (d, r), r <= min(m, d)
        self.dim = B.shape[1]

    def distance(self, a: np.ndarray) -> float:
        A = _matrix(a, "a")
        if A.shape[1] != self.dim:
            raise ValueError(f"a and b must have the same dimension; got {A.shape[1]} and {self.dim}")
        mu = A.mean(0)
        Ac = A - mu
        na = len(A) - 1
        M = Ac @ self.W  # (n, r): its singular values are those of A_c B_c^T
        G = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
        cross = float(np.sqrt(np.clip(np.linalg.eigvalsh(G), 0.0, None)).sum() / math.sqrt(na * self.nb))
        tr_a = float((Ac * Ac).sum() / na)
        return max(0.0, float(((mu - self.mu) ** 2).sum()) + tr_a + self.tr - 2.0 * cross)


def frechet_distance(a, b) -> float:
    """Frechet distance between the Gaussians fitted to feature sets ``a`` (n, d) and ``b`` (m, d) (module doc)."""
    return FrechetReference(b).distance(a)


def _ref(real) -> "FrechetReference":
    return real if isinstance(real, FrechetReference) else FrechetReference(real)


def frechet_estimate(fake, real, *, confidence: float = 0.95, n_boot: int = 50, seed: int = 0) -> Estimate:
    """FD of ``fake`` against ``real`` (vectors, or a :class:`FrechetReference` built once from them) with a CI from
    the bootstrap standard error over the fakes (module doc)."""
    F = _matrix(fake, "fake")
    ref = _ref(real)
    value = ref.distance(F)
    rng = np.random.default_rng(seed)
    boots = [ref.distance(F[rng.integers(0, len(F), len(F))]) for _ in range(int(n_boot))]
    if len(boots) < 2:
        return Estimate(value, None, None, len(F), confidence)
    half = _z(confidence) * float(np.std(boots, ddof=1))
    return Estimate(value, max(0.0, value - half), value + half, len(F), confidence)


def frechet_floor(a, real, n: int, *, repeats: int = 5, seed: int = 0) -> float:
    """Mean FD of ``repeats`` random ``n``-subsets of ``a`` against ``real``: the value to compare with another set's
    FD at the same ``n`` (e.g. training images against held-out ones: the real-data floor)."""
    A = _matrix(a, "a")
    n = int(min(n, len(A)))
    if n < 2:
        raise ValueError(f"n={n}: the Frechet distance needs at least 2 vectors")
    ref = _ref(real)
    if n == len(A):
        return ref.distance(A)
    rng = np.random.default_rng(seed)
    return float(np.mean([ref.distance(A[rng.choice(len(A), n, replace=False)]) for _ in range(repeats)]))


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(d, 0.0))


def knn_radii(x, k: int = PRDC_K) -> np.ndarray:
    """Distance of each row of ``x`` to its k-th nearest other row (the radius of its manifold ball)."""
    X = _matrix(x, "x")
    if len(X) <= k:
        raise ValueError(f"k={k} nearest neighbours need more than {k} vectors; got {len(X)}")
    d = _pairwise(X, X)
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


@dataclass
class PRDC:
    precision: Estimate
    recall: Estimate
    density: Estimate
    coverage: Estimate


def prdc(real, fake, k: int = PRDC_K, *, confidence: float = 0.95, real_radii: Optional[np.ndarray] = None) -> PRDC:
    """Precision, recall, density and coverage of ``fake`` against ``real`` (module doc); ``real_radii``: the
    reals' k-NN radii when already computed (:func:`knn_radii`)."""
    R, F = _matrix(real, "real"), _matrix(fake, "fake")
    if R.shape[1] != F.shape[1]:
        raise ValueError(f"real and fake must have the same dimension; got {R.shape[1]} and {F.shape[1]}")
    r_real = knn_radii(R, k) if real_radii is None else np.asarray(real_radii, np.float64)
    r_fake = knn_radii(F, k)
    d = _pairwise(R, F)  # (n_real, n_fake); strict "<" as in the reference code
    inside_real = d < r_real[:, None]  # fake j inside real ball i
    precision = proportion_estimate(inside_real.any(axis=0), confidence=confidence)
    recall = proportion_estimate((d < r_fake[None, :]).any(axis=1), confidence=confidence)
    coverage = proportion_estimate(d.min(axis=1) < r_real, confidence=confidence)
    per_fake = inside_real.sum(axis=0) / float(k)
    mean = float(per_fake.mean())
    half = _z(confidence) * float(per_fake.std(ddof=1)) / math.sqrt(len(per_fake)) if len(per_fake) > 1 else 0.0
    density = Estimate(mean, max(0.0, mean - half), mean + half, len(per_fake), confidence)
    return PRDC(precision, recall, density, coverage)


def _z(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2.0))
