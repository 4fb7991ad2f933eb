"""Laplace approximation of the posterior in low-rank form, and linear propagation.

With ``H V = B V L``, ``V^T B V = I`` (``B = Gamma_prior^{-1}``, ``L = diag(lambda)``) the
Hessian is ``H ~ B V L V^T B`` and Sherman-Morrison-Woodbury gives

    Gamma_post = (H + B)^{-1} = Gamma_prior - V D V^T,   D = diag(lambda / (1 + lambda)),

exact when ``V`` spans the range of ``Gamma_prior H`` (hIPPYlib's ``GaussianLRPosterior``).
Every quantity below is an action of this operator: covariance products, variances and
covariances of linear functionals, the pointwise (nodal) variance of a field, posterior
samples from prior samples, and credible bands of curves that depend linearly (or linearised)
on the parameters. All methods are collective on the vectors' communicator.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from femkin._fem import PETSc
from femkin.uq.randomized import Apply, as_apply, gram

__all__ = ["LowRankPosterior", "correlation", "credible_band"]


class LowRankPosterior:
    """``Gamma_post = Gamma_prior - V D V^T`` from the generalised eigenpairs of (H, B).

    Args:
        eigenvalues: ``lambda_i`` of ``H v = lambda B v`` (any order), shape ``(k,)``; each
            must exceed -1 (a full Hessian away from the MAP point may violate it).
        eigenvectors: ``v_i`` with ``V^T B V = I`` (not copied; do not modify them).
        apply_prior_cov: ``apply_prior_cov(x, out)``: ``out = Gamma_prior x`` (or a ``Mat``/
            ``KSP`` solving with the prior precision).
        apply_prior_precision: ``out = Gamma_prior^{-1} x`` (or a ``Mat``); needed only by
            :meth:`sample`.

    Raises:
        ValueError: on a length mismatch or an eigenvalue ``<= -1``.
    """

    def __init__(
        self,
        eigenvalues: np.ndarray,
        eigenvectors: Sequence[PETSc.Vec],
        apply_prior_cov,
        *,
        apply_prior_precision=None,
    ) -> None:
        lam = np.asarray(eigenvalues, dtype=float).ravel()
        if lam.size != len(eigenvectors):
            raise ValueError(
                f"{lam.size} eigenvalues but {len(eigenvectors)} eigenvectors were given"
            )
        if np.any(lam <= -1.0):
            raise ValueError(
                f"eigenvalues must exceed -1 for a positive posterior covariance; found "
                f"min {lam.min()!r}"
            )
        self.eigenvalues = lam
        self.eigenvectors = list(eigenvectors)
        self.d = lam / (1.0 + lam)
        self._prior_cov: Apply = as_apply(apply_prior_cov)
        self._prior_precision: Apply | None = (
            None if apply_prior_precision is None else as_apply(apply_prior_precision)
        )

    @property
    def rank(self) -> int:
        """Number of eigenpairs kept."""
        return self.eigenvalues.size

    def _vt(self, xs: Sequence[PETSc.Vec]) -> np.ndarray:
        """``V^T X`` as a ``(k, len(xs))`` array (allreduced)."""
        if self.rank == 0:
            return np.zeros((0, len(xs)))
        return gram(self.eigenvectors, xs)

    def _add_v(self, out: PETSc.Vec, coefficients: np.ndarray) -> None:
        """``out += V coefficients`` (local)."""
        for c, v in zip(coefficients, self.eigenvectors, strict=True):
            out.axpy(float(c), v)

    def covariance_mult(self, r: PETSc.Vec, out: PETSc.Vec) -> None:
        """``out = Gamma_post r``."""
        self._prior_cov(r, out)
        if self.rank:
            self._add_v(out, -self.d * self._vt([r])[:, 0])

    def covariance_matrix(self, functionals: Sequence[PETSc.Vec]) -> np.ndarray:
        """Posterior covariance among linear functionals ``q_j = f_j . m``.

        ``C = F^T Gamma_prior F - (V^T F)^T D (V^T F)``; costs ``len(functionals)`` prior
        covariance actions.

        Args:
            functionals: the vectors ``f_j`` (e.g. unit vectors of global coefficients).

        Returns:
            Dense symmetric ``(n_f, n_f)`` matrix, identical on every rank.
        """
        if not functionals:
            return np.zeros((0, 0))
        cf = []
        for f in functionals:
            y = f.duplicate()
            self._prior_cov(f, y)
            cf.append(y)
        c = gram(list(functionals), cf)
        vf = self._vt(functionals)
        c = c - vf.T @ (self.d[:, None] * vf)
        for y in cf:
            y.destroy()
        return 0.5 * (c + c.T)

    def variance_of(
        self,
        functionals: Sequence[PETSc.Vec],
        prior_variances: np.ndarray | None = None,
    ) -> np.ndarray:
        """Posterior variances ``f_j^T Gamma_post f_j`` of linear functionals.

        Args:
            functionals: the vectors ``f_j``.
            prior_variances: ``f_j^T Gamma_prior f_j`` when known (e.g. from a diagonal
                coefficient prior); computed with ``len(functionals)`` prior covariance
                actions when ``None``.

        Returns:
            Array of shape ``(n_f,)``, identical on every rank.
        """
        if prior_variances is None:
            prior = []
            for f in functionals:
                y = f.duplicate()
                self._prior_cov(f, y)
                prior.append(f.dot(y))
                y.destroy()
            prior_variances = np.array(prior)
        prior_variances = np.asarray(prior_variances, dtype=float).ravel()
        if prior_variances.size != len(functionals):
            raise ValueError(
                f"{len(functionals)} functionals but {prior_variances.size} prior variances"
            )
        vf = self._vt(functionals)
        return prior_variances - np.einsum("i,ij,ij->j", self.d, vf, vf)

    def pointwise_variance(self, prior_pointwise_variance: PETSc.Vec) -> PETSc.Vec:
        """Diagonal of ``Gamma_post``: ``prior diagonal - sum_i d_i v_i^2`` (entrywise).

        Args:
            prior_pointwise_variance: the diagonal of ``Gamma_prior`` (exact or estimated).

        Returns:
            A new vector with the posterior diagonal.
        """
        out = prior_pointwise_variance.copy()
        arr = out.getArray()
        for d, v in zip(self.d, self.eigenvectors, strict=True):
            a = v.getArray(readonly=True)
            arr -= d * a * a
        out.setArray(arr)
        return out

    def sample(self, prior_sample: PETSc.Vec, out: PETSc.Vec | None = None) -> PETSc.Vec:
        """A zero-mean posterior sample from a zero-mean prior sample.

        ``x_post = x_prior - V diag(s) V^T B x_prior``, ``s = 1 - 1/sqrt(1 + lambda)``
        (hIPPYlib's ``LowRankPosteriorSampler``). With ``S = I - V diag(s) V^T B`` and
        ``V^T B V = I``: ``S Gamma_prior S^T = Gamma_prior - V diag(2s - s^2) V^T`` and
        ``2s - s^2 = 1 - 1/(1+lambda) = lambda/(1+lambda)``, so the sample has covariance
        ``Gamma_post``. Add the MAP point to the result for a sample of the parameters.

        Needs ``apply_prior_precision`` (given to the constructor): one action of ``B`` per
        sample.

        Args:
            prior_sample: a sample of ``N(0, Gamma_prior)``.
            out: where to write the sample (a new vector when ``None``).

        Returns:
            The posterior sample.

        Raises:
            ValueError: when the posterior was built without ``apply_prior_precision``.
        """
        if self._prior_precision is None:
            raise ValueError(
                "LowRankPosterior.sample needs apply_prior_precision (B = Gamma_prior^{-1}); "
                "found None"
            )
        if out is None:
            out = prior_sample.duplicate()
        prior_sample.copy(out)
        if self.rank:
            bx = prior_sample.duplicate()
            self._prior_precision(prior_sample, bx)
            s = 1.0 - 1.0 / np.sqrt(1.0 + self.eigenvalues)
            self._add_v(out, -s * self._vt([bx])[:, 0])
            bx.destroy()
        return out


def correlation(covariance: np.ndarray) -> np.ndarray:
    """Correlation matrix ``C_ij / sqrt(C_ii C_jj)`` of a dense covariance matrix."""
    covariance = np.asarray(covariance, dtype=float)
    std = np.sqrt(np.diag(covariance))
    return covariance / np.outer(std, std)


def credible_band(
    mean_values: np.ndarray,
    jacobian_rows: Sequence[PETSc.Vec],
    posterior: LowRankPosterior,
    z: float = 1.959964,
    *,
    prior_variances: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Credible band of a derived curve by linear propagation of the posterior.

    For ``g_j(m) ~ g_j(m_MAP) + J_j . (m - m_MAP)`` (exact when ``g`` is linear in the
    parameters, e.g. ``mu_h(c_j) = sum_n a_n phi_n(c_j)``), ``Var g_j = J_j^T Gamma_post J_j``
    and the band is ``g_j +- z std_j`` (``z = 1.96``: 95%).

    Args:
        mean_values: ``g_j(m_MAP)``, shape ``(n,)``.
        jacobian_rows: ``n`` vectors ``J_j`` (the gradient of ``g_j`` in parameter space,
            Euclidean: ``dg_j = J_j . dm``).
        posterior: the Laplace posterior.
        z: the standard-normal quantile.
        prior_variances: ``J_j^T Gamma_prior J_j`` when known; computed when ``None``.

    Returns:
        ``(lo, hi)``, arrays of shape ``(n,)``, identical on every rank.

    Raises:
        ValueError: when the number of rows does not match the number of values.
    """
    mean_values = np.asarray(mean_values, dtype=float).ravel()
    if mean_values.size != len(jacobian_rows):
        raise ValueError(f"{mean_values.size} mean values but {len(jacobian_rows)} Jacobian rows")
    var = posterior.variance_of(jacobian_rows, prior_variances)
    std = np.sqrt(np.maximum(var, 0.0))
    return mean_values - z * std, mean_values + z * std
