"""Inexact Newton–CG on the prior-preconditioned Hessian, after hIPPYlib's ``NewtonCG``.

Each iteration at ``x_k`` solves ``H(x_k) p = -g(x_k)`` approximately with conjugate gradients
preconditioned by the prior covariance ``C`` (every block: global coefficients, m fields, mu_e
knots, initial states), then takes an Armijo backtracking step along ``p``:

- **Forcing term** (hIPPYlib's, made monotone): CG stops when ``||r||_C <= eta_k ||g_k||_C``
  with ``eta_k = min(0.5, sqrt(min_{j<=k} ||g_j||_C / ||g_0||_C))``: loose far from the optimum,
  tight near it, which gives superlinear convergence (quadratic with the full Hessian). The
  minimum over past iterates keeps a Gauss–Newton step that raised the gradient norm (the
  norm is not monotone along the iterates) from falling back to a one-CG-iteration
  steepest-descent step.
- **CG budget**: with ``C`` as preconditioner the preconditioned Hessian is ``I`` plus the
  data-misfit part, whose rank is the number of data-informed directions; CG therefore needs
  about that many Hessian actions, independently of the mesh. The cap
  (``cg_max_iterations``, bounded by the parameter dimension) is a generous safety net, not
  the stopping rule; the forcing term is.
- **Negative curvature** (Steihaug): with the full Hessian, ``d^T H d <= 0`` ends CG with the
  current iterate (on the first CG iteration: the preconditioned steepest-descent direction
  ``-C g``), so the step is always a descent direction.
- **Scaling**: the unknowns (mu_h coefficients in kT, ln j0, ln k0, the m field, ...) differ in
  scale by orders of magnitude; in the ``C``-inner product each is measured in prior standard
  deviations, so the Newton system is well conditioned on every block, and every norm and
  tolerance below is dimensionless.
- **Stopping** (in order): ``||g||`` (parameter Riesz norm, as TAO's) ``<= gatol``
  (``CONVERGED_GATOL``); ``||g||_C <= gttol ||g_0||_C`` (``CONVERGED_GTTOL``); the Newton
  decrement, i.e. the decrease of the negative log posterior predicted by the quadratic model
  along the CG step, ``-(g^T p) - 1/2 p^T H p``, below ``decrement_tol`` nats
  (``CONVERGED_DECREMENT``; judged only when CG met its forcing term); the iteration cap
  (``DIVERGED_MAXITS``: a budget, not convergence); no Armijo step after ``max_backtracks``
  halvings (``DIVERGED_LINE_SEARCH``). A decrement of 1e-3 nats means the MAP point is about
  ``sqrt(2e-3) = 0.045`` posterior standard deviations away along the Newton direction.

- **Re-adapted step schedules**: a reduced functional with a frozen time-step schedule (femkin's
  :class:`~femkin.inversion.fit.MapFunctional`) re-adapts it where a trial point's forward
  solve fails on the frozen steps, and counts that in ``rf.schedule_changes``. The objective
  then is a different discretisation, and the Armijo test against ``f(x_k)`` of the old
  schedule compares two functions (on a fast CIET cycle with backward Euler the misfit at one
  point differed by 60 nats between the two schedules, and every halving failed). So a trial
  that changed the schedule ends the line search: ``x_k`` is evaluated again on the new
  schedule (saved as the iterate's record, so a resumed run sees the same), and the step is
  recomputed; at most ``max_reschedules`` times per iteration (counted in ``reschedules``; the
  discarded step's CG iterations in the record's ``discarded_cg_iterations``), after which
  the line search goes on as usual.

Why a loop of our own rather than TAO's ``bnls``/``bntr`` with a custom KSP: TAO exposes
neither the Newton decrement as a stopping test nor a forcing term relative to the first
gradient (its ``-tao_bnk_ksp_rtol`` is fixed), its line-search and trust-region state cannot
be saved and restored, so a resumed run takes different steps, and exceptions raised in its
Python callbacks come out as a generic ``DIVERGED``. This loop's whole state between
iterations is ``(x_k, k, ||g_0||_C, history, counters)`` plus the problem's frozen step
schedule, which the checkpoint holds: a resumed run repeats the uninterrupted run's steps.
Bounds are not needed by femkin's fits (all blocks are unbounded: logarithms of rates,
Legendre coefficients); bound-constrained problems use :func:`femkin.inversion.tao.minimize`
with a ``b*`` TAO type.

All vector operations are PETSc ``Vec`` reductions, so the loop is collective and its answer
does not depend on the number of ranks beyond rounding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from femkin._fem import PETSc
from femkin.errors import ConvergenceError, InputError

#: Objective returned where the forward model fails, so that line searches step back; any value
#: at or above it (or not finite) counts as a failed evaluation.
FAILED_OBJECTIVE = 1e30

#: Stop reasons that count as converged.
CONVERGED = ("CONVERGED_GATOL", "CONVERGED_GTTOL", "CONVERGED_DECREMENT")

#: One sentence per stop reason, for ``summary.json`` and the report.
REASON_TEXT = {
    "CONVERGED_DECREMENT": "converged: the predicted decrease of the negative log posterior "
    "(Newton decrement) fell below decrement_tol",
    "CONVERGED_GATOL": "converged: the gradient norm fell below gatol",
    "CONVERGED_GTTOL": "converged: the gradient norm fell below gttol times its initial value",
    "DIVERGED_MAXITS": "NOT converged: stopped at the iteration cap (max_iterations) with the "
    "Newton decrement still above decrement_tol; the result is not the MAP point",
    "DIVERGED_LINE_SEARCH": "NOT converged: no step along the Newton direction decreased the "
    "objective (line search failed)",
}


class NewtonResult(NamedTuple):
    """The outcome of :func:`newton_cg`.

    Attributes:
        x: the last accepted iterate (a new Vec).
        value: the objective at ``x``.
        iterations: Newton steps taken (over all resumed segments).
        reason: ``CONVERGED_*`` or ``DIVERGED_*`` (:data:`CONVERGED`, :data:`REASON_TEXT`).
        converged: whether ``reason`` is a convergence reason.
        decrement: the last Newton decrement (nats; NaN when no step was computed at ``x``).
        gradient_norm: ``||g||`` in the parameter Riesz norm at ``x``.
        relative_gradient: ``||g||_C / ||g_0||_C`` at ``x``.
        history: one record per iterate (``iteration``, ``objective``, ``gradient_norm``,
            ``gradient_norm_prior``, ``decrement`` (of the step taken from that iterate),
            ``cg_iterations``, ``cg_reason``, ``step_length``, ``forcing``, ``time``).
        counters: ``value_gradient`` evaluations, ``hessian_actions``, ``cg_iterations``,
            ``backtracks`` (totals over resumed segments).
        state: the state at ``x`` (as given to ``on_iteration``): resuming from it repeats
            the stopping decision.
    """

    x: PETSc.Vec
    value: float
    iterations: int
    reason: str
    converged: bool
    decrement: float
    gradient_norm: float
    relative_gradient: float
    history: list[dict]
    counters: dict[str, int]
    state: dict


class CGResult(NamedTuple):
    """Preconditioned CG on ``H p = -g``: the step, its model decrease and why CG stopped."""

    iterations: int
    reason: str  # "forcing", "negative_curvature", "max_iterations"
    decrement: float


def steihaug_cg(
    hessian_mult: Callable[[PETSc.Vec, PETSc.Vec], None],
    covariance_mult: Callable[[PETSc.Vec, PETSc.Vec], None],
    g: PETSc.Vec,
    p: PETSc.Vec,
    *,
    rtol: float,
    max_iterations: int,
) -> CGResult:
    """Solve ``H p = -g`` by CG preconditioned with ``C``, stopping at ``||r||_C <= rtol ||g||_C``.

    Args:
        hessian_mult: ``hessian_mult(v, out)``: ``out = H v`` (primal -> dual).
        covariance_mult: ``covariance_mult(r, out)``: ``out = C r`` (dual -> primal), SPD.
        g: the gradient (dual).
        p: output, the step (primal).
        rtol: the forcing term.
        max_iterations: CG iteration cap (Hessian actions).

    Returns:
        The :class:`CGResult`; its ``decrement`` is ``-(g^T p) - 1/2 p^T H p`` (> 0).
    """
    r = g.copy()
    r.scale(-1.0)  # residual -g - H p at p = 0
    z = g.duplicate()
    covariance_mult(r, z)
    d = z.copy()
    Hd = g.duplicate()
    Hp = g.duplicate()
    p.set(0.0)
    Hp.set(0.0)
    rz = r.dot(z)
    tol = rtol * math.sqrt(max(rz, 0.0))
    reason, its = "max_iterations", 0
    try:
        if math.sqrt(max(rz, 0.0)) <= 0.0:
            return CGResult(0, "forcing", 0.0)
        for its in range(1, max_iterations + 1):
            hessian_mult(d, Hd)
            dHd = d.dot(Hd)
            if not dHd > 0.0:  # negative (or NaN) curvature: Steihaug's exit
                if its == 1:
                    p.axpy(1.0, d)  # the preconditioned steepest-descent direction
                    Hp.axpy(1.0, Hd)
                reason = "negative_curvature"
                break
            alpha = rz / dHd
            p.axpy(alpha, d)
            Hp.axpy(alpha, Hd)
            r.axpy(-alpha, Hd)
            covariance_mult(r, z)
            rz_new = r.dot(z)
            if math.sqrt(max(rz_new, 0.0)) <= tol:
                reason = "forcing"
                break
            d.aypx(rz_new / rz, z)  # d = z + beta d
            rz = rz_new
        decrement = -g.dot(p) - 0.5 * p.dot(Hp)
        return CGResult(its, reason, float(decrement))
    finally:
        for v in (r, z, d, Hd, Hp):
            v.destroy()


def newton_cg(
    rf,
    x0: PETSc.Vec,
    *,
    prior,
    max_iterations: int = 50,
    decrement_tol: float = 1e-3,
    gatol: float = 0.0,
    gttol: float = 1e-8,
    cg_max_iterations: int = 200,
    armijo_c1: float = 1e-4,
    max_backtracks: int = 12,
    max_reschedules: int = 3,
    state: dict | None = None,
    on_iteration: Callable[[dict, PETSc.Vec, dict], None] | None = None,
    annotate: Callable[[], dict] | None = None,
) -> NewtonResult:
    """Minimise ``rf`` (misfit + prior) from ``x0`` by inexact Newton–CG.

    Args:
        rf: the reduced functional: ``value_gradient(x, g)``, ``hessian_mult(x, v, out)``
            (at the last ``value_gradient`` point), ``space``. A failed evaluation returns a
            huge or non-finite value; the line search then steps back.
        x0: the starting point (not modified), or the iterate saved in ``state``.
        prior: the prior (``covariance_mult``), the preconditioner.
        max_iterations: cap on the total number of Newton steps (resumed segments included).
        decrement_tol: stop when the Newton decrement is below this many nats.
        gatol: absolute tolerance on the gradient's parameter Riesz norm (0: off).
        gttol: tolerance on ``||g||_C / ||g_0||_C`` (0: off).
        cg_max_iterations: CG cap per Newton step (also bounded by the parameter dimension).
        armijo_c1: sufficient-decrease constant of the Armijo test.
        max_backtracks: step halvings before the line search fails.
        max_reschedules: per iteration, how many times a trial point's re-adapted step
            schedule (``rf.schedule_changes``) restarts the step from ``x_k`` evaluated anew.
        state: the dict from a previous run's ``on_iteration`` (resume): ``iteration``,
            ``g0_norm``, ``history``, ``counters``, ``elapsed``; ``x0`` is then its iterate.
        on_iteration: ``on_iteration(record, x, state)`` after the starting point and after
            every accepted step (write a checkpoint of ``x`` and ``state`` there).
        annotate: ``annotate()`` returns extra fields for the record of a new iterate, called
            right after its evaluation (e.g. the misfit alone).

    Returns:
        The :class:`NewtonResult`.

    Raises:
        InputError: a tolerance or cap out of range.
        ConvergenceError: the objective is not finite at the starting point.
    """
    for name, value in (
        ("max_iterations", max_iterations),
        ("cg_max_iterations", cg_max_iterations),
    ):
        if int(value) < 1:
            raise InputError("<newton>", name, "an integer >= 1", value)
    for name, tol in (("decrement_tol", decrement_tol), ("gatol", gatol), ("gttol", gttol)):
        if not (math.isfinite(tol) and tol >= 0):
            raise InputError("<newton>", name, "a finite number >= 0", tol)
    space = rf.space
    n = space.global_size
    cg_cap = int(min(cg_max_iterations, n))
    resumed = state is not None
    state = dict(state) if state is not None else {}
    k = int(state.get("iteration", 0))
    history = [dict(h) for h in state.get("history", [])]
    counters: dict[str, int] = {
        "value_gradient": 0,
        "hessian_actions": 0,
        "cg_iterations": 0,
        "backtracks": 0,
        "reschedules": 0,
    }
    counters.update(state.get("counters", {}))
    start = time.perf_counter() - float(state.get("elapsed", 0.0))

    def hessian_mult(v, out):
        rf.hessian_mult(x, v, out)
        counters["hessian_actions"] += 1

    def c_norm(g):
        prior.covariance_mult(g, work)
        return math.sqrt(max(g.dot(work), 0.0))

    def evaluate(xk, gk) -> float:
        counters["value_gradient"] += 1
        value = rf.value_gradient(xk, gk)
        return float(value) if np.isfinite(value) else math.inf

    x = x0.copy()
    g = x.duplicate()
    work = x.duplicate()
    p = x.duplicate()
    x_trial = x.duplicate()
    g_trial = x.duplicate()
    try:
        f = evaluate(x, g)
        if not math.isfinite(f) or f >= FAILED_OBJECTIVE:
            raise ConvergenceError(
                f"the objective is not finite at the {'resumed' if resumed else 'starting'} "
                f"point (iteration {k}): the forward model failed there"
            )
        g_norm, g_norm_c = space.dual_norm(g), c_norm(g)
        g0 = float(state.get("g0_norm", g_norm_c)) if resumed else g_norm_c
        g0 = g0 if g0 > 0 else 1.0

        def record() -> dict:
            rec = {
                "iteration": k,
                "objective": f,
                "gradient_norm": g_norm,
                "gradient_norm_prior": g_norm_c,
            }
            rec.update(annotate() if annotate is not None else {})
            rec["time"] = time.perf_counter() - start
            return rec

        def save(rec):
            if history and history[-1]["iteration"] == rec["iteration"]:
                history[-1] = rec  # the resumed iterate: keep one record
            else:
                history.append(rec)
            snapshot = {
                "iteration": k,
                "g0_norm": g0,
                "history": [dict(h) for h in history],
                "counters": dict(counters),
                "elapsed": time.perf_counter() - start,
            }
            if on_iteration is not None:
                on_iteration(history[-1], x, snapshot)

        if not resumed:
            save(record())
        decrement = math.nan
        reschedules = 0  # of this iteration
        while True:
            if gatol > 0 and g_norm <= gatol:
                reason = "CONVERGED_GATOL"
                break
            if gttol > 0 and g_norm_c <= gttol * g0:
                reason = "CONVERGED_GTTOL"
                break
            if k >= max_iterations:
                reason = "DIVERGED_MAXITS"
                break
            g_min = min(h["gradient_norm_prior"] for h in history)
            forcing = min(0.5, math.sqrt(g_min / g0))
            cg = steihaug_cg(
                hessian_mult, prior.covariance_mult, g, p, rtol=forcing, max_iterations=cg_cap
            )
            counters["cg_iterations"] += cg.iterations
            decrement = cg.decrement
            step_info = {
                "decrement": decrement,
                "cg_iterations": cg.iterations,
                "cg_reason": cg.reason,
                "forcing": forcing,
            }
            if cg.reason == "forcing" and decrement < decrement_tol:
                history[-1].update(step_info)
                reason = "CONVERGED_DECREMENT"
                break
            slope = g.dot(p)  # < 0 for a descent direction
            alpha, accepted, rescheduled = 1.0, False, False
            epoch = getattr(rf, "schedule_changes", 0)
            for _ in range(max_backtracks + 1):
                x.copy(x_trial)
                x_trial.axpy(alpha, p)
                f_trial = evaluate(x_trial, g_trial)
                if getattr(rf, "schedule_changes", 0) != epoch and reschedules < max_reschedules:
                    rescheduled = True  # f(x_k) belongs to the old schedule: start again
                    break
                if f_trial <= f + armijo_c1 * alpha * slope:
                    accepted = True
                    break
                counters["backtracks"] += 1
                alpha *= 0.5
            if rescheduled:
                reschedules += 1
                counters["reschedules"] += 1
                f = evaluate(x, g)
                if not math.isfinite(f) or f >= FAILED_OBJECTIVE:
                    raise ConvergenceError(
                        f"the forward model failed at iterate {k} on its re-adapted step schedule"
                    )
                g_norm, g_norm_c = space.dual_norm(g), c_norm(g)
                rec = record()  # the iterate's record (and checkpoint) on the new schedule
                rec["discarded_cg_iterations"] = (
                    history[-1].get("discarded_cg_iterations", 0) + cg.iterations
                )
                save(rec)
                continue
            if not accepted:
                history[-1].update(step_info)
                reason = "DIVERGED_LINE_SEARCH"
                # The last evaluation was at a rejected trial point: evaluate x again so
                # that later Hessian actions (uncertainty) linearise at the returned point.
                evaluate(x, g)
                break
            history[-1].update(step_info | {"step_length": alpha})
            x_trial.copy(x)
            g_trial.copy(g)
            f = f_trial
            k += 1
            reschedules = 0
            g_norm, g_norm_c = space.dual_norm(g), c_norm(g)
            decrement = math.nan
            save(record())
        return NewtonResult(
            x.copy(),
            f,
            k,
            reason,
            reason in CONVERGED,
            float(decrement),
            float(g_norm),
            float(g_norm_c / g0),
            history,
            dict(counters),
            {
                "iteration": k,
                "g0_norm": g0,
                "history": [dict(h) for h in history],
                "counters": dict(counters),
                "elapsed": time.perf_counter() - start,
            },
        )
    finally:
        for v in (x, g, work, p, x_trial, g_trial):
            v.destroy()
