"""Posterior uncertainty: randomised generalised eigensolver and the low-rank Laplace posterior.

Generic over operators: the Hessian, the prior precision and the prior covariance are
callables ``apply(x, out)`` on petsc4py vectors (or ``Mat``/``KSP`` objects). The SLEPc oracle
lives in :mod:`femkin.uq.slepc_oracle` and is imported explicitly.
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
