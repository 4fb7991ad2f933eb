"""Minimise a reduced functional with PETSc TAO (options prefix ``femkin_tao_``).

The objective is one object (:class:`ReducedFunctional`: value, dual gradient, Hessian action,
prior included); this module only wires it into TAO, after pyadjoint's ``tao_solver.py``:

- the gradient norm is measured in the parameter inner product, ``||g|| = sqrt(g^T R^{-1} g)``
  (``Tao.setGradientNorm`` with a shell Mat applying the inverse Riesz map), so ``gatol`` means
  the same on every mesh;
- Newton-Krylov types (nls, bnls, ntr, bntr, ntl, bntl) get the Hessian as a Python shell Mat
  (``Tao.setHessian``); with a prior, the KSP's preconditioner is a Python PC applying the prior
  covariance, so the inner solve is prior-preconditioned CG;
- quasi-Newton types (lmvm, blmvm) get the prior precision as the initial Hessian
  (``Tao.setLMVMH0``) whose KSP (``Tao.getLMVMH0KSP``) is ``preonly`` with the covariance PC,
  so the first step is the prior-preconditioned steepest descent step.

With the prior in the preconditioner the iteration counts depend on the number of
data-informed directions, not on the mesh.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

import numpy as np

from femkin._fem import PETSc
from femkin.errors import ConvergenceError, InputError
from femkin.parameters import ParameterSpace
from femkin.petsc_tools import ApplyContext, shell_mat

NEWTON_TYPES = ("nls", "bnls", "ntr", "bntr", "ntl", "bntl")
LMVM_TYPES = ("lmvm", "blmvm")

_REASONS = {
    int(getattr(PETSc.TAO.ConvergedReason, n)): n
    for n in dir(PETSc.TAO.ConvergedReason)
    if n.isupper()
}


def reason_name(reason: int) -> str:
    """The name of a TAO converged reason (``CONVERGED_GATOL``, ``DIVERGED_MAXITS``, ...)."""
    if reason == int(PETSc.TAO.ConvergedReason.CONVERGED_ITERATING):
        return "ITERATING"
    return _REASONS.get(int(reason), str(reason))


class ReducedFunctional(Protocol):
    """What :func:`minimize` needs: the objective (misfit + prior) and its derivatives."""

    space: ParameterSpace

    def value(self, x: PETSc.Vec) -> float:
        """The objective at ``x``."""

    def value_gradient(self, x: PETSc.Vec, g: PETSc.Vec) -> float:
        """The objective at ``x``; writes the dual gradient ``dJ/dx_i`` into ``g``."""

    def hessian_mult(self, x: PETSc.Vec, v: PETSc.Vec, out: PETSc.Vec) -> None:
        """``out = H(x) v`` (Gauss-Newton or full Hessian of misfit + prior, dual output)."""


class CovariancePrior(Protocol):
    """The part of :class:`femkin.prior.Prior` that preconditions TAO."""

    def precision_mult(self, v: PETSc.Vec, out: PETSc.Vec) -> None:
        """``out = Gamma_prior^{-1} v`` (the prior precision; dual output)."""

    def covariance_mult(self, r: PETSc.Vec, out: PETSc.Vec) -> None:
        """``out = Gamma_prior r`` (the prior covariance applied to a dual vector)."""


class TaoResult(NamedTuple):
    """The outcome of :func:`minimize`.

    Attributes:
        x: the minimiser (a new Vec).
        value: the objective at ``x``.
        iterations: TAO iterations.
        reason: TAO's converged reason, e.g. ``"CONVERGED_GATOL"`` or ``"DIVERGED_MAXITS"``.
        history: one dict per monitored iteration: ``iteration``, ``value``, ``gradient_norm``,
            ``time`` (seconds since the start).
    """

    x: PETSc.Vec
    value: float
    iterations: int
    reason: str
    history: list[dict]


class _HessianContext:
    """Python Mat context: the Hessian action at the current TAO iterate."""

    def __init__(self, rf: ReducedFunctional):
        self.rf = rf
        self.x: PETSc.Vec | None = None
        self.shift_value = 0.0

    def update(self, x: PETSc.Vec) -> None:
        if self.x is None:
            self.x = x.copy()
        else:
            x.copy(self.x)
        self.shift_value = 0.0  # a new linearisation point; TAO re-applies any shift

    def mult(self, mat, v, out):
        self.rf.hessian_mult(self.x, v, out)
        if self.shift_value:
            out.axpy(self.shift_value, v)

    def shift(self, mat, a):
        """MatShift: bounded Newton methods perturb an indefinite Hessian by a multiple of I."""
        self.shift_value += a


def _shell(space: ParameterSpace, context) -> PETSc.Mat:
    return shell_mat((space.local_size, space.global_size), space.comm, context=context)


class _ReducedCovariancePC:
    """Python PC applying the prior covariance, also on the inactive-set subspace.

    With active bounds, TAO's bounded Newton methods solve on the inactive variables only and
    hand the PC reduced vectors. The inactive set is then estimated as the strictly interior
    entries of the current iterate; the covariance is applied to the zero-extended vector and
    restricted back. When that estimate does not match the reduced size, the PC falls back to
    the diagonal of the scalar prior variances (identity on fields), which is still SPD.
    """

    def __init__(
        self,
        space: ParameterSpace,
        prior: CovariancePrior,
        iterate: _HessianContext,
        lower: PETSc.Vec | None,
        upper: PETSc.Vec | None,
    ):
        self.space, self.prior, self.iterate = space, prior, iterate
        self.lower, self.upper = lower, upper
        self.fallbacks = 0

    def apply(self, pc, x, y):
        if x.getSize() == self.space.global_size:
            self.prior.covariance_mult(x, y)
            return
        if self.iterate.x is None:
            raise RuntimeError("the Newton PC was applied before TAO set a Hessian point")
        xk = self.iterate.x.getArray(readonly=True)
        tol = 1e-12 * (1.0 + np.abs(xk))
        inactive = np.ones(xk.size, dtype=bool)
        if self.lower is not None:
            inactive &= xk > self.lower.getArray(readonly=True) + tol
        if self.upper is not None:
            inactive &= xk < self.upper.getArray(readonly=True) - tol
        counts = self.space.comm.allgather((int(inactive.sum()), x.getLocalSize()))
        if any(a != b for a, b in counts):
            self.fallbacks += 1
            x.copy(y)
            return
        full = self.space.create_vector()
        out = full.duplicate()
        full.getArray()[inactive] = x.getArray(readonly=True)
        self.prior.covariance_mult(full, out)
        y.getArray()[:] = out.getArray(readonly=True)[inactive]
        full.destroy()
        out.destroy()


def _set_python_pc(ksp: PETSc.KSP, context) -> None:
    pc = ksp.getPC()
    pc.setType(PETSc.PC.Type.PYTHON)
    pc.setPythonContext(context)


def minimize(
    rf: ReducedFunctional,
    x0: PETSc.Vec,
    *,
    prior: CovariancePrior | None = None,
    tao_type: str = "bnls",
    max_iterations: int = 100,
    gatol: float = 1e-6,
    grtol: float = 1e-8,
    gttol: float = 0.0,
    bounds: tuple[PETSc.Vec | None, PETSc.Vec | None] | None = None,
    options_prefix: str = "femkin_tao_",
    petsc_options: dict | None = None,
    monitor: Callable[[int, PETSc.Vec, float, float], None] | None = None,
    checkpoint: Callable[[int, PETSc.Vec, float, float], None] | None = None,
    raise_on_failure: bool = True,
    ksp_rtol: float = 0.05,
    ksp_max_it: int = 20,
) -> TaoResult:
    """Minimise ``rf`` from ``x0`` with TAO.

    Args:
        rf: the reduced functional (prior included).
        x0: the starting point (not modified; projected into the bounds).
        prior: the prior whose covariance preconditions Newton-Krylov types and is the initial
            inverse Hessian of LMVM types; ``None``: TAO's defaults.
        tao_type: any TAO type (``bnls``, ``bntr``, ``nls``, ``ntr``, ``lmvm``, ``blmvm``, ...);
            the options database (``-femkin_tao_type``) overrides it.
        max_iterations: iteration cap; reaching it is reported as ``DIVERGED_MAXITS``, not raised.
        gatol: TAO's absolute gradient tolerance (gradient norm in the parameter inner product).
        grtol: TAO's gradient tolerance relative to ``|f|``.
        gttol: TAO's gradient tolerance relative to the initial gradient norm.
        bounds: ``(lower, upper)``, either may be ``None`` (unbounded); only bound-constrained
            types (b*) honour them.
        options_prefix: PETSc options prefix (non-empty).
        petsc_options: options set under the prefix unless already given (command line wins);
            removed again afterwards.
        monitor: called as ``monitor(iteration, x, value, gradient_norm)`` every iteration.
        checkpoint: called like ``monitor``, after it (write a checkpoint there).
        ksp_rtol: inexact Newton: the Newton-Krylov types' CG stops at this relative residual;
            PETSc options (``-femkin_tao_bnk_ksp_rtol`` ...) override it.
        ksp_max_it: ... or at this iteration count (each iteration is one Hessian action);
            ``-femkin_tao_bnk_ksp_max_it`` overrides it.
        raise_on_failure: raise on a DIVERGED reason; else return the last iterate with it
            (a line-search failure close to the optimum is often the attainable accuracy).

    Returns:
        The :class:`TaoResult`.

    Raises:
        InputError: an empty prefix or crossed bounds.
        ConvergenceError: TAO stopped with a DIVERGED reason other than the iteration cap.
    """
    space = rf.space
    comm = space.comm
    if not options_prefix:
        raise InputError(
            "<tao>", "options_prefix", "a non-empty PETSc options prefix", repr(options_prefix)
        )
    lower, upper = bounds if bounds is not None else (None, None)
    x = x0.copy()
    if lower is not None or upper is not None:
        lo = lower.copy() if lower is not None else x0.duplicate()
        hi = upper.copy() if upper is not None else x0.duplicate()
        if lower is None:
            lo.set(PETSc.NINFINITY)
        if upper is None:
            hi.set(PETSc.INFINITY)
        crossed = comm.allreduce(
            int(np.sum(lo.getArray(readonly=True) > hi.getArray(readonly=True)))
        )
        if crossed:
            raise InputError("<tao>", "bounds", "lower <= upper", f"{crossed} crossed entries")
        x.pointwiseMax(x, lo)
        x.pointwiseMin(x, hi)
    else:
        lo = hi = None

    opts = PETSc.Options()
    added = []
    for key, value in (petsc_options or {}).items():
        name = options_prefix + key.lstrip("-")
        if not opts.hasName(name):
            opts[name] = value
            added.append(name)

    tao = PETSc.TAO().create(comm)
    tao.setOptionsPrefix(options_prefix)
    tao.setType(tao_type)
    if tao_type in NEWTON_TYPES:  # before setFromOptions, so that PETSc options still win
        tao.getKSP().setTolerances(rtol=ksp_rtol, max_it=ksp_max_it)
    tao.setSolution(x)
    gradient = x.duplicate()

    def objective_gradient(tao, xk, g):
        return rf.value_gradient(xk, g)

    tao.setObjectiveGradient(objective_gradient, gradient)
    tao.setObjective(lambda tao, xk: rf.value(xk))
    hessian_ctx = _HessianContext(rf)
    H = _shell(space, hessian_ctx)

    def hessian(tao, xk, A, P):
        hessian_ctx.update(xk)

    tao.setHessian(hessian, H, H)
    riesz_inverse = space.riesz_inverse()
    tao.setGradientNorm(riesz_inverse)
    if lo is not None:
        tao.setVariableBounds(lo, hi)
    tao.setTolerances(gatol=gatol, grtol=grtol, gttol=gttol)
    tao.setMaximumIterations(max_iterations)

    history: list[dict] = []
    start = time.perf_counter()

    def on_iteration(tao):
        its, f, gnorm, _, _, _ = tao.getSolutionStatus()
        history.append(
            {
                "iteration": int(its),
                "value": float(f),
                "gradient_norm": float(gnorm),
                "time": time.perf_counter() - start,
            }
        )
        xk = tao.getSolution()
        if monitor is not None:
            monitor(int(its), xk, float(f), float(gnorm))
        if checkpoint is not None:
            checkpoint(int(its), xk, float(f), float(gnorm))

    tao.setMonitor(on_iteration)
    tao.setFromOptions()
    actual_type = tao.getType()
    precision = None
    if prior is not None and actual_type in NEWTON_TYPES:
        if not opts.hasName(options_prefix + "pc_type"):
            _set_python_pc(tao.getKSP(), _ReducedCovariancePC(space, prior, hessian_ctx, lo, hi))
    elif (
        prior is not None
        and actual_type in LMVM_TYPES
        and not (actual_type == "blmvm" and lo is not None)
    ):
        # BLMVM projects its step onto the feasible set; with a non-diagonal H0 the projected
        # step is no longer a descent direction once bounds are active (line-search failures
        # in the tests), so bounded BLMVM keeps TAO's default diagonal H0.
        precision = _shell(space, ApplyContext(prior.precision_mult))
        tao.setLMVMH0(precision)
        tao.setUp()
        h0_ksp = tao.getLMVMH0KSP()
        h0_ksp.setType(PETSc.KSP.Type.PREONLY)
        _set_python_pc(h0_ksp, ApplyContext(prior.covariance_mult))
    try:
        try:
            tao.solve(x)
        except PETSc.Error as error:  # e.g. TAO refuses a NaN/Inf objective or gradient
            raise ConvergenceError(
                f"TAO {actual_type} failed: DIVERGED (PETSc error "
                f"{error.ierr}: NaN/Inf objective or solver failure)"
            ) from error
        reason = tao.getConvergedReason()
        name = reason_name(reason)
        iterations = tao.getIterationNumber()
        value = tao.getObjectiveValue()
    finally:
        for key in added:
            opts.delValue(key)
    for obj in (tao, H, riesz_inverse, gradient, precision, lo, hi):
        if obj is not None:
            obj.destroy()
    if raise_on_failure and reason < 0 and reason != PETSc.TAO.ConvergedReason.DIVERGED_MAXITS:
        raise ConvergenceError(
            f"TAO {actual_type} failed after {iterations} iterations: "
            f"{name} (objective {value:.6g})"
        )
    return TaoResult(x, float(value), int(iterations), name, history)
