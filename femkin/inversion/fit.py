"""MAP estimation: the misfit of an :class:`~femkin.problem.InverseProblem` plus a Gaussian prior.

The prior (:func:`build_prior`) has independent N(x0, std^2) on the global coefficients
(around the case's initial values; ln j0 has no constant term and m has prior mean 0, which
resolves the scale degeneracy of k0 exp(m) and j0), a BiLaplacian prior on each particle's m
(pointwise std and correlation length from ``[inversion.prior]``), N(x0, mu_e_std^2) on mu_e
knots, and a BiLaplacian prior around the projected first frame on learned initial states.

The optimiser is inexact Newton–CG (:mod:`femkin.inversion.newton`, ``[inversion] method =
"newton"``) or PETSc TAO (``method = "tao"``; options prefix ``femkin_``:
``-femkin_tao_type blmvm``, ``-femkin_tao_monitor``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from femkin._fem import PETSc
from femkin.errors import ConvergenceError, InputError
from femkin.inversion.newton import FAILED_OBJECTIVE
from femkin.inversion.tao import minimize
from femkin.prior import BiLaplacianPrior, GaussianScalarPrior, Prior


def build_prior(problem, prior_case: dict, x0: PETSc.Vec) -> Prior:
    """The Gaussian prior of a problem's parameter space, centred on ``x0`` (m: on 0)."""
    space = problem.space
    coefficient_std = {
        "mu_h": prior_case["coefficient_std"],
        "j0": prior_case["coefficient_std"],
        "k0": prior_case["k0_std"],  # of ln k0, the block's coordinate
        "kappa": prior_case["kappa_std"],
        "coherency": prior_case["coherency_std"],
        "lambda": prior_case["lambda_std"],  # of ln lambda, the block's coordinate
        "psf_fwhm": prior_case["psf_fwhm_std"],  # of ln psf_fwhm, the block's coordinate
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
        #: How many evaluations re-adapted the frozen step schedule (read by the line search).
        self.schedule_changes = 0

    def value(self, x: PETSc.Vec) -> float:
        """Misfit + prior at ``x``; a failed forward solve gives a large value (TAO backtracks)."""
        try:
            self.last_misfit = self.problem.misfit(x)
        except ConvergenceError:
            return FAILED_OBJECTIVE
        return self.last_misfit + self.prior.cost(x)

    def value_gradient(self, x: PETSc.Vec, g: PETSc.Vec) -> float:
        """The objective at ``x``, its dual gradient into ``g`` (huge where the model fails).

        Where this evaluation (re)adapted the frozen step schedule, it is repeated with the
        schedule it froze: the value and gradient are then those of a replay, exactly what a
        run resumed from a checkpoint (which holds the schedule) computes at ``x``.
        """
        before = self.problem.schedules()
        try:
            self.last_misfit = self.problem.gradient(x, g)
            if self.problem.schedules() != before:
                self.schedule_changes += 1
                self.last_misfit = self.problem.gradient(x, g)
        except ConvergenceError:  # raised on every rank together: schedules() is safe here
            if self.problem.schedules() != before:
                self.schedule_changes += 1
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
    """The outcome of :func:`solve_map`.

    Attributes:
        x: the last accepted iterate.
        value: misfit + prior cost at ``x``.
        misfit: the misfit at ``x``.
        iterations: optimiser iterations (over resumed segments).
        reason: ``CONVERGED_*`` / ``DIVERGED_*`` (Newton–CG's or TAO's).
        history: one record per iterate.
        converged: whether ``reason`` is a convergence reason.
        stop_reason: one sentence saying why the fit stopped.
        stats: the numbers behind it: ``method``, ``decrement`` (nats), ``gradient_norm``,
            ``relative_gradient``, ``hessian_actions``, ``gradient_evaluations``, ...
        state: the optimiser state at ``x`` (``solve_map(..., state=state)`` continues).
    """

    x: PETSc.Vec
    value: float
    misfit: float
    iterations: int
    reason: str
    history: list
    converged: bool = False
    stop_reason: str = ""
    stats: dict | None = None
    state: dict | None = None


def _record_misfit(rf: MapFunctional, n_observed: int) -> dict:
    return {
        "misfit": float(rf.last_misfit),
        "misfit_rms": float(np.sqrt(2 * rf.last_misfit / max(n_observed, 1))),
    }


def solve_map(
    problem,
    prior: Prior,
    x0: PETSc.Vec,
    *,
    method: str = "newton",
    tao_type: str = "bnls",
    max_iterations: int = 50,
    decrement_tol: float = 1e-3,
    gatol: float = 0.0,
    grtol: float = 0.0,
    gttol: float = 1e-8,
    cg_max_iterations: int = 200,
    gauss_newton: bool = True,
    petsc_options: dict | None = None,
    monitor: Callable | None = None,
    state: dict | None = None,
) -> MapResult:
    """Minimise misfit + prior from ``x0``; ``state`` (from ``monitor``) continues a run.

    Args:
        problem: the inverse problem.
        prior: its prior.
        x0: the starting point (or the iterate ``state`` was saved with).
        method: ``"newton"`` (:func:`femkin.inversion.newton.newton_cg`, the default) or
            ``"tao"`` (:func:`femkin.inversion.tao.minimize` with ``tao_type``; a resumed TAO
            run restarts TAO at the saved iterate, so its later steps differ).
        tao_type: the TAO type of ``method = "tao"``.
        max_iterations: the iteration cap (a budget).
        decrement_tol: Newton–CG: the Newton decrement tolerance, nats.
        gatol: absolute gradient tolerance (both methods).
        grtol: TAO's gradient tolerance relative to ``|f|``.
        gttol: gradient tolerance relative to the first iterate's (both methods).
        cg_max_iterations: Newton–CG: CG cap per step.
        gauss_newton: Gauss–Newton (True) or full Hessian.
        petsc_options: PETSc options without the leading ``femkin_`` (e.g. ``tao_monitor``).
        monitor: ``monitor(record, x, state)`` after every iterate; the record has iteration,
            objective, misfit, misfit_rms (in units of sigma), gradient_norm, time; ``state``
            is what ``solve_map(..., state=state)`` needs to continue (JSON-serialisable).
        state: a saved ``state``; ``x0`` is then the iterate it was saved with.
    """
    rf = MapFunctional(problem, prior, gauss_newton=gauss_newton)
    if method == "newton":
        from femkin.inversion.newton import REASON_TEXT, newton_cg

        def on_iteration(rec, x, snapshot):
            if monitor is not None:
                monitor(rec, x, snapshot)

        res = newton_cg(
            rf,
            x0,
            prior=prior,
            max_iterations=max_iterations,
            decrement_tol=decrement_tol,
            gatol=gatol,
            gttol=gttol,
            cg_max_iterations=cg_max_iterations,
            state=state,
            on_iteration=on_iteration,
            annotate=lambda: _record_misfit(rf, problem.n_observed),
        )
        stats = {
            "method": "newton-cg",
            "hessian": "gauss-newton" if gauss_newton else "full",
            # null (not NaN, which is not JSON) when no Newton system was solved at the result
            "decrement": res.decrement if math.isfinite(res.decrement) else None,
            "decrement_tol": decrement_tol,
            "gradient_norm": res.gradient_norm,
            "relative_gradient": res.relative_gradient,
            "gradient_evaluations": res.counters["value_gradient"],
            "hessian_actions": res.counters["hessian_actions"],
            "cg_iterations": res.counters["cg_iterations"],
            "backtracks": res.counters["backtracks"],
            "reschedules": res.counters["reschedules"],  # line searches restarted (newton.py)
        }
        if res.reason == "DIVERGED_LINE_SEARCH":
            misfit = float(rf.last_misfit)
        else:
            misfit = float(res.history[-1]["misfit"])
        return MapResult(
            res.x,
            float(res.value),
            misfit,
            res.iterations,
            res.reason,
            res.history,
            res.converged,
            REASON_TEXT[res.reason],
            stats,
            res.state,
        )
    if method != "tao":
        raise InputError("<inversion>", "method", "'newton' or 'tao'", repr(method))
    history = [dict(h) for h in (state or {}).get("history", [])]
    start_iteration = int((state or {}).get("iteration", 0))
    t0 = time.perf_counter() - (history[-1]["time"] if history else 0.0)
    counts = {"hessian": problem.counters["hessian"], "gradient": problem.counters["gradient"]}

    def on_tao_iteration(it, x, f, gnorm):
        if history and it == 0 and history[-1]["iteration"] == start_iteration:
            return  # the resumed iterate is already recorded
        rec = {"iteration": it + start_iteration, "objective": f, "gradient_norm": gnorm}
        rec |= _record_misfit(rf, problem.n_observed)
        rec["time"] = time.perf_counter() - t0
        history.append(rec)
        if monitor is not None:
            snapshot = {"iteration": rec["iteration"], "history": [dict(h) for h in history]}
            monitor(rec, x, snapshot)

    result = minimize(
        rf,
        x0,
        prior=prior,
        tao_type=tao_type,
        max_iterations=max(max_iterations - start_iteration, 0),
        gatol=gatol,
        grtol=grtol,
        gttol=gttol,
        options_prefix="femkin_",
        petsc_options=petsc_options,
        monitor=on_tao_iteration,
        raise_on_failure=False,
    )
    value = rf.value(result.x)
    converged = result.reason.startswith("CONVERGED")
    text = f"{'converged' if converged else 'NOT converged'}: TAO {tao_type} {result.reason}"
    if result.reason == "DIVERGED_MAXITS":
        text += " (stopped at the iteration cap; the result is not the MAP point)"
    stats = {
        "method": f"tao-{tao_type}",
        "hessian": "gauss-newton" if gauss_newton else "full",
        "gradient_norm": float(history[-1]["gradient_norm"]) if history else float("nan"),
        "gradient_evaluations": problem.counters["gradient"] - counts["gradient"],
        "hessian_actions": problem.counters["hessian"] - counts["hessian"],
    }
    return MapResult(
        result.x,
        float(value),
        float(rf.last_misfit),
        result.iterations + start_iteration,
        result.reason,
        history,
        converged,
        text,
        stats,
        {"iteration": result.iterations + start_iteration, "history": history},
    )
