"""MAP estimation: the misfit of an :class:`~femkin.problem.InverseProblem` plus a Gaussian
prior, minimised with PETSc TAO (:func:`femkin.inversion.tao.minimize`).

The prior (:func:`build_prior`) has independent N(x0, std^2) on the global coefficients
(around the case's initial values; ln j0 has no constant term and m has prior mean 0, which
resolves the scale degeneracy of k0 exp(m) and j0), a BiLaplacian prior on each particle's m
(pointwise std and correlation length from ``[inversion.prior]``), N(x0, mu_e_std^2) on mu_e
knots, and a BiLaplacian prior around the projected first frame on learned initial states.

TAO's options prefix is ``femkin_``: ``-femkin_tao_type blmvm``, ``-femkin_tao_monitor``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from femkin._fem import PETSc
from femkin.errors import ConvergenceError
from femkin.inversion.tao import minimize
from femkin.prior import BiLaplacianPrior, GaussianScalarPrior, Prior

#: Objective returned where the forward model fails, so that line searches step back.
FAILED_OBJECTIVE = 1e30


def build_prior(problem, prior_case: dict, x0: PETSc.Vec) -> Prior:
    """The Gaussian prior of a problem's parameter space, centred on ``x0`` (m: on 0)."""
    space = problem.space
    coefficient_std = {
        "mu_h": prior_case["coefficient_std"],
        "j0": prior_case["coefficient_std"],
        "k0": prior_case["k0_std"],  # of ln k0, the block's coordinate
        "kappa": prior_case["kappa_std"],
        "coherency": prior_case["coherency_std"],
    }
    priors: dict[tuple[str, int | None], GaussianScalarPrior | BiLaplacianPrior | None] = {}
    for b in space.scalar_blocks:
        mean = space.get_scalars(x0, b.name)
        priors[(b.name, None)] = GaussianScalarPrior(mean, np.full(b.size, coefficient_std[b.name]))
    for b in space.particle_scalar_blocks:
        mean = space.get_scalars(x0, b.name, b.label)
        priors[(b.name, b.label)] = GaussianScalarPrior(
            mean, np.full(b.size, prior_case["mu_e_std"])
        )
    for b in space.field_blocks:
        if b.V is None:
            priors[(b.name, b.label)] = None
            continue
        prefix = f"femkin_prior_{b.name}_{b.label}_"
        if b.name == "m":
            priors[(b.name, b.label)] = BiLaplacianPrior(
                b.V, prior_case["m_std"], prior_case["m_length"], options_prefix=prefix
            )
        else:
            mean = space.field_view(x0, b.name, b.label, readonly=True).copy()
            priors[(b.name, b.label)] = BiLaplacianPrior(
                b.V,
                prior_case["initial_std"],
                prior_case["m_length"],
                mean=mean,
                options_prefix=prefix,
            )
    return Prior(space, priors)


class MapFunctional:
    """misfit(x) + prior cost(x), its gradient and Hessian actions (TAO's reduced functional).

    Args:
        problem: the inverse problem.
        prior: its prior.
        gauss_newton: Gauss-Newton (True) or full misfit Hessian.
    """

    def __init__(self, problem, prior: Prior, *, gauss_newton: bool = True):
        self.problem = problem
        self.prior = prior
        self.space = problem.space
        self.gauss_newton = gauss_newton
        self.last_misfit = np.nan
        self._gradient_at: PETSc.Vec | None = None

    def value(self, x: PETSc.Vec) -> float:
        """Misfit + prior at ``x``; a failed forward solve gives a large value (TAO backtracks)."""
        try:
            self.last_misfit = self.problem.misfit(x)
        except ConvergenceError:
            return FAILED_OBJECTIVE
        return self.last_misfit + self.prior.cost(x)

    def value_gradient(self, x: PETSc.Vec, g: PETSc.Vec) -> float:
        """Misfit + prior at ``x``, their dual gradient into ``g`` (zero if the forward failed)."""
        try:
            self.last_misfit = self.problem.gradient(x, g)
        except ConvergenceError:
            g.set(0.0)
            self._gradient_at = None
            return FAILED_OBJECTIVE
        work = g.duplicate()
        cost = self.prior.cost_gradient(x, work)
        g.axpy(1.0, work)
        work.destroy()
        if self._gradient_at is None:
            self._gradient_at = x.copy()
        else:
            x.copy(self._gradient_at)
        return self.last_misfit + cost

    def hessian_mult(self, x: PETSc.Vec, v: PETSc.Vec, out: PETSc.Vec) -> None:
        """``out = H v``: misfit Hessian (full or Gauss-Newton) at ``x`` plus prior precision."""
        # Hessian actions linearise at the last gradient point; refresh it if TAO moved on.
        same = self._gradient_at is not None and self._gradient_at.equal(x)
        if not same:
            g = x.duplicate()
            self.value_gradient(x, g)
            g.destroy()
        self.problem.hessian_mult(v, out, gauss_newton=self.gauss_newton)
        work = out.duplicate()
        self.prior.precision_mult(v, work)
        out.axpy(1.0, work)
        work.destroy()


class MapResult(NamedTuple):
    """The MAP point ``x``, objective and misfit there, TAO iterations, stopping reason, history."""

    x: PETSc.Vec
    value: float
    misfit: float
    iterations: int
    reason: str
    history: list


def solve_map(
    problem,
    prior: Prior,
    x0: PETSc.Vec,
    *,
    tao_type: str = "bnls",
    max_iterations: int = 100,
    gatol: float = 1e-6,
    grtol: float = 1e-8,
    gauss_newton: bool = True,
    petsc_options: dict | None = None,
    monitor: Callable | None = None,
    start_iteration: int = 0,
    history: list | None = None,
) -> MapResult:
    """Minimise misfit + prior from x0; ``history`` and ``start_iteration`` continue a run.

    Args:
        problem: the :class:`~femkin.problem.InverseProblem` (misfit and its derivatives).
        prior: the Gaussian prior of all blocks.
        x0: the starting point (not modified).
        tao_type: the TAO solver (``bnls``, ``nls``, ``blmvm``, ...).
        max_iterations: the iteration budget of this call.
        gatol: absolute tolerance on the gradient norm.
        grtol: tolerance on the gradient norm relative to the objective.
        gauss_newton: use the Gauss-Newton Hessian of the misfit instead of the full one.
        petsc_options: PETSc options without the leading ``femkin_`` (e.g. ``tao_monitor``).
        monitor: ``monitor(record, x)`` after every iteration; the record has iteration,
            objective, misfit, misfit_rms (in units of sigma), gradient_norm, time.
        start_iteration: the iteration number the run continues from (a resumed fit).
        history: the records of the run so far (a resumed fit); extended, not modified.
    """
    rf = MapFunctional(problem, prior, gauss_newton=gauss_newton)
    history = list(history or [])
    t0 = time.perf_counter() - (history[-1]["time"] if history else 0.0)

    def on_iteration(it, x, f, gnorm):
        rec = {
            "iteration": it + start_iteration,
            "objective": f,
            "misfit": rf.last_misfit,
            "misfit_rms": float(np.sqrt(2 * rf.last_misfit / max(problem.n_observed, 1))),
            "gradient_norm": gnorm,
            "time": time.perf_counter() - t0,
        }
        history.append(rec)
        if monitor is not None:
            monitor(rec, x)

    result = minimize(
        rf,
        x0,
        prior=prior,
        tao_type=tao_type,
        max_iterations=max(max_iterations - start_iteration, 0),
        gatol=gatol,
        grtol=grtol,
        options_prefix="femkin_",
        petsc_options=petsc_options,
        monitor=on_iteration,
        raise_on_failure=False,
    )
    value = rf.value(result.x)
    return MapResult(
        result.x,
        float(value),
        float(rf.last_misfit),
        result.iterations + start_iteration,
        result.reason,
        history,
    )
