"""MAP estimation: misfit + Gaussian prior, minimised with PETSc TAO.

The prior is Gaussian: independent N(x0, std^2) on the global coefficients (around the case's
initial values; no constant term in ln j0 and prior mean 0 for m resolve the k0 exp(m) / j0
scale degeneracy), a BiLaplacian prior on each particle's m (covariance A^{-1} M_L A^{-1},
A = delta M + gamma K, with delta, gamma from the pointwise std and correlation length for a
Matern nu = 1 field in 2-D), and N(x0, std^2) nodal priors on mu_e knots and initial states.

TAO wiring (options prefix ``femkin_tao_``): Newton-Krylov types (nls, bnls, ntr, bntr) get
the Gauss-Newton (or full) Hessian plus the prior precision as a shell matrix; its CG is
preconditioned by the prior covariance. Quasi-Newton types (lmvm, blmvm) get the prior
covariance as initial inverse Hessian. The gradient norm uses the Riesz map of the parameter
space, so iteration counts do not grow under mesh refinement.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from femkin._fem import MPI, PETSc, dolfinx, ufl
from femkin.errors import ConvergenceError


class BiLaplacian:
    """BiLaplacian Gaussian prior on a P1 space: precision R = A M_L^{-1} A.

    Args:
        V: the P1 space.
        std: pointwise standard deviation (in the interior).
        length: correlation length (um), where the correlation drops to about 0.14.
    """

    def __init__(self, V, std: float, length: float, prefix: str):
        # Matern nu = 1 in 2-D: rho = sqrt(8)/kappa_m, sigma^2 = 1/(4 pi gamma delta kappa_m^0)...
        # with A = delta M + gamma K: kappa_m^2 = delta/gamma, sigma^2 = 1/(4 pi delta gamma).
        kappa_m = np.sqrt(8.0) / length
        gamma = 1.0 / (std * kappa_m * np.sqrt(4.0 * np.pi))
        delta = gamma * kappa_m ** 2
        u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
        mesh = V.mesh
        g = dolfinx.fem.Constant(mesh, PETSc.ScalarType(gamma))
        d = dolfinx.fem.Constant(mesh, PETSc.ScalarType(delta))
        # Robin term (hIPPYlib) damps the boundary variance inflation.
        robin = dolfinx.fem.Constant(mesh, PETSc.ScalarType(np.sqrt(gamma * delta) / 1.42))
        a = (d * u * v + g * ufl.inner(ufl.grad(u), ufl.grad(v))) * ufl.dx + robin * u * v * ufl.ds
        self.A = dolfinx.fem.petsc.assemble_matrix(dolfinx.fem.form(a))
        self.A.assemble()
        ml = dolfinx.fem.petsc.assemble_vector(dolfinx.fem.form(v * ufl.dx))
        ml.ghostUpdate(PETSc.InsertMode.ADD, PETSc.ScatterMode.REVERSE)
        self.ml = ml
        self.ksp = PETSc.KSP().create(mesh.comm)
        self.ksp.setOptionsPrefix(prefix)
        self.ksp.setOperators(self.A)
        self.ksp.setType("cg")
        self.ksp.getPC().setType("gamg")
        self.ksp.setTolerances(rtol=1e-12, atol=1e-30)
        self.ksp.setFromOptions()
        self.w1 = self.A.createVecRight()
        self.w2 = self.A.createVecRight()

    def precision(self, x: PETSc.Vec, y: PETSc.Vec) -> None:
        self.A.mult(x, self.w1)
        self.w1.pointwiseDivide(self.w1, self.ml)
        self.A.mult(self.w1, y)

    def covariance(self, r: PETSc.Vec, y: PETSc.Vec) -> None:
        self.ksp.solve(r, self.w1)
        self.w1.pointwiseMult(self.w1, self.ml)
        self.ksp.solve(self.w1, y)


class Prior:
    """The Gaussian prior over a problem's parameter space."""

    def __init__(self, problem, prior_case: dict, x0: PETSc.Vec):
        self.space = problem.space
        self.mean = x0.copy()
        self.inv_var = x0.duplicate()
        self.inv_var.set(0.0)
        std = {"mu_h": prior_case["coefficient_std"], "j0": prior_case["coefficient_std"],
               "k0": prior_case["coefficient_std"], "kappa": prior_case["coefficient_std"] * 0.01,
               "coherency": prior_case["coefficient_std"], "mu_e": prior_case["mu_e_std"],
               "initial": prior_case["initial_std"]}
        arr = self.inv_var.getArray()
        for (name, label), (root, sl) in self.space._scalars.items():
            if sl is not None:
                arr[sl] = 1.0 / std[name] ** 2
        self.fields = {}
        for (name, label), data in self.space._fields.items():
            if data is None:
                continue
            if name == "m":
                self.mean.getArray()[data.slice] = 0.0
                self.fields[(name, label)] = (data, BiLaplacian(
                    data.V, prior_case["m_std"], prior_case["m_length"],
                    f"femkin_prior_{label}_"))
            else:
                arr[data.slice] = 1.0 / std[name] ** 2
        self._work = x0.duplicate()

    def _fieldwise(self, x, y, method: str) -> None:
        for (name, label), (data, bl) in self.fields.items():
            xv = data.wrap(x.getArray(readonly=True)[data.slice].copy())
            yv = data.wrap(y.getArray()[data.slice])
            getattr(bl, method)(xv, yv)

    def precision(self, x: PETSc.Vec, y: PETSc.Vec) -> None:
        """y = Gamma^{-1} x (dual)."""
        y.pointwiseMult(self.inv_var, x)
        self._fieldwise(x, y, "precision")

    def covariance(self, r: PETSc.Vec, y: PETSc.Vec) -> None:
        """y = Gamma r."""
        arr_r, arr_y, iv = r.getArray(readonly=True), y.getArray(), self.inv_var.getArray(
            readonly=True)
        arr_y[:] = np.where(iv > 0, arr_r / np.where(iv > 0, iv, 1.0), 0.0)
        self._fieldwise(r, y, "covariance")

    def cost_gradient(self, x: PETSc.Vec, g: PETSc.Vec) -> float:
        """Prior cost 1/2 |x - mean|^2_{Gamma^{-1}}; its gradient added into g."""
        x.copy(self._work)
        self._work.axpy(-1.0, self.mean)
        tmp = x.duplicate()
        self.precision(self._work, tmp)
        cost = 0.5 * tmp.dot(self._work)
        g.axpy(1.0, tmp)
        tmp.destroy()
        return cost


class MapResult(NamedTuple):
    x: PETSc.Vec
    value: float
    misfit: float
    iterations: int
    reason: str
    history: list


def _reason_name(reason: int) -> str:
    names = {v: k for k, v in vars(PETSc.TAO.ConvergedReason).items() if isinstance(v, int)}
    return names.get(reason, str(reason))


def solve_map(problem, prior: Prior, x0: PETSc.Vec, *, tao_type: str = "bnls",
              max_iterations: int = 100, gatol: float = 1e-6, grtol: float = 1e-8,
              gauss_newton: bool = True, petsc_options: dict | None = None,
              monitor: Callable | None = None, start_iteration: int = 0,
              history: list | None = None) -> MapResult:
    """Minimise misfit + prior with TAO from x0 (options -femkin_tao_type, -femkin_tao_monitor,
    ...; ``petsc_options`` keys as in PETSc without the leading ``femkin_``, e.g. ``tao_type``)."""
    comm = problem.comm
    space = problem.space
    history = list(history or [])
    state = {"misfit": np.nan}
    opts = PETSc.Options()
    # TAO's own options are -tao_*; with the prefix "femkin_" they read -femkin_tao_type etc.
    for k, v in (petsc_options or {}).items():
        if not opts.hasName("femkin_" + k):
            opts["femkin_" + k] = v

    def objective_gradient(tao, x, g):
        g.set(0.0)
        try:
            mis = problem.gradient(x, g)
        except ConvergenceError:
            g.set(0.0)
            return np.inf
        state["misfit"] = mis
        return mis + prior.cost_gradient(x, g)

    tao = PETSc.TAO().create(comm)
    tao.setOptionsPrefix("femkin_")
    tao.setType(tao_type)
    tao.setObjectiveGradient(objective_gradient, x0.duplicate())
    n_loc, n_glob = x0.getSizes()

    class Hessian:
        """Misfit Hessian + prior precision, plus the diagonal shift TAO may ask for."""

        def __init__(self):
            self.shift_value = 0.0

        def mult(self, mat, v, y):
            problem.hessian_mult(v, y, gauss_newton=gauss_newton)
            tmp = y.duplicate()
            prior.precision(v, tmp)
            y.axpy(1.0, tmp)
            if self.shift_value:
                y.axpy(self.shift_value, v)
            tmp.destroy()

        def shift(self, mat, a):
            self.shift_value += a

    H = PETSc.Mat().createPython((n_loc, n_glob), Hessian(), comm=comm)
    H.setUp()
    is_newton = tao_type in ("nls", "bnls", "ntr", "bntr", "ntl", "bntl")
    hessian_ctx = H.getPythonContext()

    def form_hessian(tao, x, A, P):
        hessian_ctx.shift_value = 0.0  # a new linearisation point: TAO re-applies its shift

    if is_newton:
        tao.setHessian(form_hessian, H, H)
    tao.setTolerances(gatol=gatol, grtol=grtol)
    tao.setMaximumIterations(max(max_iterations - start_iteration, 0))

    class Riesz:
        def mult(self, mat, x, y):
            space.riesz_inverse_mult(x, y)

    R = PETSc.Mat().createPython((n_loc, n_glob), Riesz(), comm=comm)
    R.setUp()
    tao.setGradientNorm(R)
    t_start = MPI.Wtime()

    def mon(tao):
        its, f, gnorm, _, _, _ = tao.getSolutionStatus()
        it = its + start_iteration
        rec = {"iteration": it, "objective": float(f), "misfit": float(state["misfit"]),
               "gradient_norm": float(gnorm),
               "misfit_rms": float(np.sqrt(2 * state["misfit"] / max(problem.n_observed, 1))),
               "time": MPI.Wtime() - t_start}
        history.append(rec)
        if monitor is not None:
            monitor(rec, tao.getSolution())

    tao.setMonitor(mon)
    is_lmvm = tao_type in ("lmvm", "blmvm")
    if is_lmvm:
        # Initial Hessian = prior precision, applied through its inverse (the prior covariance).
        class PriorPrecision:
            def mult(self, mat, x, y):
                prior.precision(x, y)

        H0 = PETSc.Mat().createPython((n_loc, n_glob), PriorPrecision(), comm=comm)
        H0.setUp()
        tao.setLMVMH0(H0)
    tao.setFromOptions()
    if is_lmvm:
        h0ksp = tao.getLMVMH0KSP()
        h0ksp.setType("preonly")
        h0pc = h0ksp.getPC()

        class PriorCovariancePC:
            def apply(self, pc, r, y):
                prior.covariance(r, y)

        h0pc.setType("python")
        h0pc.setPythonContext(PriorCovariancePC())
    if is_newton:
        ksp = tao.getKSP()
        if ksp is not None:
            ksp.setType("cg")
            pc = ksp.getPC()

            class PriorPC:
                def apply(self, pc, r, y):
                    prior.covariance(r, y)

            pc.setType("python")
            pc.setPythonContext(PriorPC())
            ksp.setTolerances(rtol=1e-2 if gauss_newton else 1e-3, max_it=30)
            ksp.setFromOptions()
    x = x0.copy()
    tao.solve(x)
    reason = tao.getConvergedReason()
    name = _reason_name(reason)
    if reason < 0 and reason != PETSc.TAO.ConvergedReason.DIVERGED_MAXITS:
        if not np.isfinite(tao.getSolutionStatus()[1]):
            raise ConvergenceError(f"TAO {tao_type} failed: {name}")
    g = x.duplicate()
    value = objective_gradient(tao, x, g)
    result = MapResult(x, float(value), float(state["misfit"]),
                       tao.getIterationNumber() + start_iteration, name, history)
    tao.destroy()
    return result
