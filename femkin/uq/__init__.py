"""Posterior uncertainty: randomised generalised eigensolver and the low-rank Laplace posterior.

Generic over operators: the Hessian, the prior precision and the prior covariance are
callables ``apply(x, out)`` on petsc4py vectors (or ``Mat``/``KSP`` objects). The SLEPc oracle
lives in :mod:`femkin.uq.slepc_oracle` and is imported explicitly.

Further modules, imported explicitly: :mod:`femkin.uq.marginals` (exact posterior marginals of
a few functionals, independent of the low-rank cut), :mod:`femkin.uq.predictive` (posterior
predictive checks), :mod:`femkin.uq.mcmc` (gpCN chains with the Laplace proposal, ESS and
R-hat), :mod:`femkin.uq.laplace_study` and :mod:`femkin.uq.sampling_study` (``femkin uq`` and
``femkin sample`` on an inverse problem).
"""

from __future__ import annotations

from femkin.uq.laplace import LowRankPosterior, correlation, credible_band
from femkin.uq.randomized import (
    Eigenpairs,
    adaptive_rank,
    as_apply,
    b_orthonormalize,
    double_pass_generalized,
)

__all__ = [
    "Eigenpairs",
    "LowRankPosterior",
    "adaptive_rank",
    "as_apply",
    "b_orthonormalize",
    "correlation",
    "credible_band",
    "double_pass_generalized",
]
