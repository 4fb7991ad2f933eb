"""The ACR forward model of one particle: spaces, parameters, compiled forms, time stepping.

A :class:`ParticleModel` owns everything that lives on one particle's mesh: the mixed P1 x P1
space of (c, mu), the P1 space of the log-rate field ``m``, the parameter constants (wrapped in
``ufl.variable`` so that ``ufl.diff`` gives parameter derivatives), the residual form and its
Jacobian compiled once, and a PETSc SNES (options prefix ``femkin_forward_``).

:meth:`ParticleModel.solve` integrates from the initial state through the frame times and
keeps every converged state in a :class:`Trajectory` (in memory or on disk) for the adjoint.
Two schemes (``[solver] scheme``):

- ``"bdf2"`` (default): variable-step BDF2 (second order, L-stable-like, backward Euler for the
  first step) with steps chosen from a local error estimate: the difference between the BDF2
  solution and the quadratic extrapolation of the three previous levels, scaled by the
  variable-step error constants, is kept below ``time_tol`` (units of c, max over the mesh);
  steps land on every frame time and every mu_e knot.
- ``"euler"``: backward Euler with the step chosen so that c changes by about ``dc_max`` per
  step (first order; the scheme of femkin <= 0.x, kept for comparison).

Each step's nonlinear system is solved by the SNES with a lagged Jacobian (``[solver]
jacobian = "lagged"``, the default; BDF2 only: a factorised J is reused across iterations and
steps while it contracts the residual, see :meth:`ParticleModel.newton_step`) or with exact
Newton (``"exact"``, and always for backward Euler). Either way the solve stops on the same residual
tolerances, and the derivative solves of :mod:`femkin.adjoint` assemble and factorise the
exact J at the converged states.
"""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile
from collections.abc import Callable, Sequence

import basix.ufl
import numpy as np

from femkin._fem import MPI, PETSc, dolfinx, ufl
from femkin.errors import ConvergenceError
from femkin.physics import acr


def _step_failure(t: float, step: float, reason, its: int, dt_min: float) -> ConvergenceError:
    """The error of a time step whose Newton solve failed at the step floor (or replay)."""
    return ConvergenceError(
        f"Newton did not converge at t = {t:.6g} s with step {step:.3g} s "
        f"(SNES reason {reason}, {its} iterations); the step floor is dt_min = {dt_min:g} s"
    )


@dataclasses.dataclass
class ModelParameters:
    """Numerical values of the global model parameters.

    Attributes:
        mu_h: Legendre coefficients a_1..a_N of mu_h (kT).
        j0: Legendre coefficients b_1..b_M of ln j0.
        j0_prefactor: (p, q), fixed exponents of c and (1 - c) in j0.
        k0: rate prefactor (1/s).
        kappa: gradient-energy coefficient (kT um^2).
        coherency: coherency coefficient B (kT).
        alpha: charge-transfer symmetry factor (the Butler-Volmer laws).
        kinetics: the kinetic law (:data:`femkin.physics.acr.KINETICS`); fixed per model.
        lambda_: reorganisation energy lambda of ``"ciet"`` (kT); the ``lambda`` block's
            coordinate is ln lambda.
    """

    mu_h: Sequence[float] = (3.2,)
    j0: Sequence[float] = ()
    j0_prefactor: Sequence[float] = (0.5, 0.5)
    k0: float = 1e-3
    kappa: float = 0.02
    coherency: float = 0.0
    alpha: float = 0.5
    kinetics: str = "bv"
    lambda_: float = 8.3

    def block_values(self) -> dict[str, np.ndarray]:
        """Values per learnable scalar block (``k0`` as ln k0, ``lambda`` as ln lambda)."""
        return {
            "mu_h": np.array(self.mu_h, float),
            "j0": np.array(self.j0, float),
            "k0": np.array([np.log(self.k0)]),
            "kappa": np.array([self.kappa]),
            "coherency": np.array([self.coherency]),
            "lambda": np.array([np.log(self.lambda_)]),
        }

    def coefficients(self) -> acr.ACRCoefficients:
        """The global coefficients as numbers (``ln_k0`` and ``m`` zero), for NumPy curves."""
        return acr.ACRCoefficients(
            a=tuple(self.mu_h),
            b=tuple(self.j0),
            p=float(self.j0_prefactor[0]),
            q=float(self.j0_prefactor[1]),
            ln_k0=0.0,
            m=0.0,
            kappa=self.kappa,
            coherency=self.coherency,
            alpha=self.alpha,
            kinetics=self.kinetics,
            reorganization=self.lambda_,
        )

    def j0_curve(self, c) -> np.ndarray:
        """The exchange factor j0(c) of the kinetic law (:func:`femkin.physics.acr.j0_curve`)."""
        return acr.j0_curve(c, self.coefficients())

    def with_blocks(self, values: dict[str, np.ndarray]) -> ModelParameters:
        """A copy with some blocks replaced (``k0`` given as ln k0, ``lambda`` as ln lambda)."""
        new = dataclasses.replace(self)
        for name, v in values.items():
            v = np.asarray(v, dtype=float)
            if name in ("mu_h", "j0"):
                setattr(new, name, tuple(v.tolist()))
            elif name == "k0":  # given as ln k0; kept where exp neither under- nor overflows
                new.k0 = float(np.exp(np.clip(v[0], -700.0, 700.0)))
            elif name == "lambda":  # given as ln lambda
                new.lambda_ = float(np.exp(np.clip(v[0], -700.0, 700.0)))
            elif name in ("kappa", "coherency"):
                setattr(new, name, float(v[0]))
            else:
                raise KeyError(name)
        return new


@dataclasses.dataclass
class SolverOptions:
    """Time stepping and Newton settings (``[solver]``, see :func:`femkin.study.solver_options`).

    ``scheme`` is ``"bdf2"`` (steps from the local error estimate, ``time_tol`` in units of c)
    or ``"euler"`` (steps from the change of c, ``dc_max``). ``jacobian`` is ``"exact"``
    (Newton: J assembled and factorised at every iteration) or ``"lagged"`` (modified Newton:
    a factorised J is reused across iterations and steps while it contracts the residual
    fast enough, see :meth:`ParticleModel.newton_step`; BDF2 only: backward Euler's step
    growth counts Newton iterations, so it keeps exact Newton); derivative solves always use
    the exact J at the converged states.
    """

    dt_initial: float | None = None
    dt_min: float = 1e-6
    dt_max: float | None = None
    newton_rtol: float = 1e-10
    newton_atol: float = 1e-11
    newton_max_it: int = 25
    dc_max: float = 0.02
    scheme: str = "bdf2"
    time_tol: float = 5e-4
    storage: str = "memory"
    jacobian: str = "lagged"
    factor_cache_mb: float = 1024.0
    petsc_options: dict = dataclasses.field(default_factory=dict)


class Trajectory:
    """Converged states of one forward run, for the adjoint.

    Attributes:
        times: (N+1,) times of the states, ``times[0]`` the first frame.
        mu_e: (N+1,) mu_e at those times.
        cbar: (N+1,) particle mean of c at those times.
        frame_steps: index of the state at each frame time.
    """

    def __init__(self, storage: str = "memory", scheme: str = "euler"):
        self.scheme = scheme
        #: Work of the run, rejected steps and failed Newton solves included.
        self.newton_total = 0
        self.rejected = 0
        #: Forward Jacobians assembled and factorised (one per Newton iteration when exact).
        self.factorisations = 0
        #: Lagged-Jacobian solves that failed and were redone with exact Newton.
        self.jacobian_fallbacks = 0
        self.times: list[float] = []
        self.mu_e: list[float] = []
        self.cbar: list[float] = []
        self.frame_steps: list[int] = []
        self.newton_iterations: list[int] = []
        self._storage = storage
        self._states: list[np.ndarray] = []
        self._dir = (
            tempfile.TemporaryDirectory(prefix="femkin-traj-") if storage == "disk" else None
        )

    def append(self, t: float, mu_e: float, cbar: float, state: np.ndarray) -> None:
        """Record time ``t`` (s): mu_e, mean Li fraction and the state (owned + ghost values)."""
        self.times.append(float(t))
        self.mu_e.append(float(mu_e))
        self.cbar.append(float(cbar))
        if self._dir is None:
            self._states.append(state.copy())
        else:
            path = pathlib.Path(self._dir.name) / f"{len(self.times) - 1}.npy"
            np.save(path, state)

    def state(self, n: int) -> np.ndarray:
        """The local array (owned + ghosts) of state ``n``."""
        if self._dir is None:
            return self._states[n]
        return np.load(pathlib.Path(self._dir.name) / f"{n}.npy")

    @property
    def n_steps(self) -> int:
        """The number of time steps (stored states minus the initial one)."""
        return len(self.times) - 1

    def dt(self, n: int) -> float:
        """The length (s) of step ``n`` (from state n-1 to n)."""
        return self.times[n] - self.times[n - 1]

    def weights(self, n: int) -> tuple[tuple[float, float, float], tuple[float, float]]:
        """Step n's ((a0, a1, a2), (g1, g2)) of :func:`femkin.physics.acr.bdf2_weights`."""
        if self.scheme == "bdf2" and n >= 2:
            return acr.bdf2_weights(self.dt(n), self.dt(n - 1))
        return acr.bdf2_weights(self.dt(n), None)

    def cbar_used(self, n: int) -> float:
        """The value of the coherency mean in step n's residual."""
        _, (g1, g2) = self.weights(n)
        return g1 * self.cbar[n - 1] + (g2 * self.cbar[n - 2] if g2 else 0.0)


class ParticleModel:
    """The ACR model on one particle mesh.

    Args:
        mesh: the particle's DOLFINx mesh (2-D triangles).
        parameters: initial global parameter values.
        solver: time-stepping and Newton options.
        quadrature_degree: quadrature degree of every integral.
        options_prefix: PETSc options prefix of the SNES.
    """

    def __init__(
        self,
        mesh,
        parameters: ModelParameters,
        *,
        solver: SolverOptions | None = None,
        quadrature_degree: int = 4,
        options_prefix: str = "femkin_forward_",
    ):
        if not options_prefix:
            raise ValueError("options_prefix must not be empty")
        self.mesh = mesh
        self.comm = mesh.comm
        self.solver_options = solver or SolverOptions()
        cell = mesh.basix_cell()
        p1 = basix.ufl.element("Lagrange", cell, 1)
        self.W = dolfinx.fem.functionspace(mesh, basix.ufl.mixed_element([p1, p1]))
        # V is the collapsed c-subspace, so c_dofs maps V's local dofs to W's exactly.
        self.V, self.c_dofs = self.W.sub(0).collapse()
        _, self.mu_dofs = self.W.sub(1).collapse()
        self.c_dofs = np.asarray(self.c_dofs, dtype=np.int32).reshape(-1)  # 0.11: list of one array
        self.mu_dofs = np.asarray(self.mu_dofs, dtype=np.int32).reshape(-1)
        self.dx = ufl.Measure("dx", domain=mesh, metadata={"quadrature_degree": quadrature_degree})

        self.u = dolfinx.fem.Function(self.W, name="state")
        self.u_old = dolfinx.fem.Function(self.W, name="state_old")
        self.scheme = self.solver_options.scheme
        if self.scheme not in ("bdf2", "euler"):
            raise ValueError(f'scheme must be "bdf2" or "euler", found {self.scheme!r}')
        if self.solver_options.jacobian not in ("exact", "lagged"):
            raise ValueError(
                f'jacobian must be "exact" or "lagged", found {self.solver_options.jacobian!r}'
            )
        #: The level t_{n-2} of a BDF2 step (None for backward Euler).
        self.u_old2 = (
            dolfinx.fem.Function(self.W, name="state_old2") if self.scheme == "bdf2" else None
        )
        self.m = dolfinx.fem.Function(self.V, name="m")
        self.test = ufl.TestFunction(self.W)
        self.trial = ufl.TrialFunction(self.W)

        def const(value):
            return dolfinx.fem.Constant(mesh, PETSc.ScalarType(value))

        self.n_a = len(parameters.mu_h)
        self.n_b = len(parameters.j0)
        if parameters.kinetics not in acr.KINETICS:
            raise ValueError(
                f"kinetics must be one of {acr.KINETICS}, found {parameters.kinetics!r}"
            )
        #: The kinetic law, compiled into the forms (fixed for the model's life).
        self.kinetics = parameters.kinetics
        # Named scalar constants: learnable blocks, plus the per-step mu_e and cbar.
        self.constants: dict[str, list] = {
            "mu_h": [const(0.0) for _ in range(self.n_a)],
            "j0": [const(0.0) for _ in range(self.n_b)],
            "k0": [const(0.0)],
            "kappa": [const(0.0)],
            "coherency": [const(0.0)],
            "lambda": [const(0.0)],  # ln lambda
            "mu_e": [const(0.0)],
            "cbar": [const(0.0)],
        }
        self.variables = {k: [ufl.variable(c) for c in v] for k, v in self.constants.items()}
        self.p = const(parameters.j0_prefactor[0])
        self.q = const(parameters.j0_prefactor[1])
        self.alpha = const(parameters.alpha)
        self.dt = const(1.0)
        var = self.variables
        self.coeffs = acr.ACRCoefficients(
            a=var["mu_h"],
            b=var["j0"],
            p=self.p,
            q=self.q,
            ln_k0=var["k0"][0],
            m=self.m,
            kappa=var["kappa"][0],
            coherency=var["coherency"][0],
            alpha=self.alpha,
            kinetics=parameters.kinetics,
            reorganization=ufl.exp(var["lambda"][0]),
        )
        #: BDF weights (a0, a1, a2) of the current step (fixed by the step schedule).
        self.bdf = [const(1.0), const(-1.0), const(0.0)]
        if self.scheme == "euler":
            self.F_ufl = acr.residual(
                ufl.split(self.u),
                ufl.split(self.u_old),
                ufl.split(self.test),
                self.dt,
                var["mu_e"][0],
                var["cbar"][0],
                self.coeffs,
                self.dx,
            )
        else:
            self.F_ufl = acr.residual_multistep(
                ufl.split(self.u),
                ufl.split(self.u_old),
                ufl.split(self.u_old2),
                ufl.split(self.test),
                self.dt,
                self.bdf,
                var["mu_e"][0],
                var["cbar"][0],
                self.coeffs,
                self.dx,
            )
        self.J_ufl = ufl.derivative(self.F_ufl, self.u, self.trial)
        self.F = dolfinx.fem.form(self.F_ufl)
        self.J = dolfinx.fem.form(self.J_ufl)
        self.set_parameters(parameters)

        one = const(1.0)
        self.area = self.comm.allreduce(
            dolfinx.fem.assemble_scalar(dolfinx.fem.form(one * ufl.dx(domain=mesh))), op=MPI.SUM
        )
        self._mean_c_form = dolfinx.fem.form(ufl.split(self.u)[0] / self.area * self.dx)
        # d cbar / d u_old as a vector over W: (1/|Omega|) int phi_c.
        self.dcbar_du = dolfinx.fem.petsc.assemble_vector(
            dolfinx.fem.form(ufl.split(self.test)[0] / self.area * self.dx)
        )
        self.dcbar_du.ghostUpdate(PETSc.InsertMode.ADD, PETSc.ScatterMode.REVERSE)
        self.dcbar_du.ghostUpdate(PETSc.InsertMode.INSERT, PETSc.ScatterMode.FORWARD)
        self._setup_snes(options_prefix)

    # -- parameters -----------------------------------------------------------------------
    def set_parameters(self, parameters: ModelParameters) -> None:
        """Copy global parameter values into the constants."""
        if len(parameters.mu_h) != self.n_a or len(parameters.j0) != self.n_b:
            raise ValueError(
                f"expected {self.n_a} mu_h and {self.n_b} j0 coefficients, found "
                f"{len(parameters.mu_h)} and {len(parameters.j0)}"
            )
        if parameters.kinetics != self.kinetics:
            raise ValueError(
                f"the model was compiled with kinetics {self.kinetics!r}, "
                f"found {parameters.kinetics!r}"
            )
        self.parameters = dataclasses.replace(parameters)
        for name, values in parameters.block_values().items():
            for c, v in zip(self.constants[name], values, strict=True):
                c.value = v
        self.p.value, self.q.value = parameters.j0_prefactor
        self.alpha.value = parameters.alpha

    def set_m(self, values: np.ndarray) -> None:
        """Set the owned values of m (P1 on the particle) and update ghosts."""
        n = self.V.dofmap.index_map.size_local
        self.m.x.array[:n] = values[:n]
        self.m.x.scatter_forward()

    def set_newton_tolerances(self, rtol: float, atol: float) -> None:
        """Tighten (never loosen) the Newton tolerances of the forward steps."""
        opts = self.solver_options
        opts.newton_rtol = min(opts.newton_rtol, rtol)
        opts.newton_atol = min(opts.newton_atol, atol)
        self.snes.setTolerances(rtol=opts.newton_rtol, atol=opts.newton_atol)

    # -- SNES -----------------------------------------------------------------------------
    def _setup_snes(self, prefix: str) -> None:
        self.A = dolfinx.fem.petsc.create_matrix(self.J)
        self.b = dolfinx.fem.petsc.create_vector(self.W)
        self.x = dolfinx.fem.petsc.create_vector(self.W)
        snes = PETSc.SNES().create(self.comm)
        snes.setOptionsPrefix(prefix)
        snes.setFunction(
            dolfinx.fem.petsc.assemble_residual,
            self.b,
            kargs={"u": self.u, "residual": self.F, "jacobian": self.J, "bcs": []},
        )
        snes.setJacobian(self._jacobian, self.A, None)
        #: Forward Jacobians assembled (each is factorised at the next linear solve), and
        #: lagged-Jacobian solves redone with exact Newton, over the model's life.
        self.factorisations = 0
        self.jacobian_fallbacks = 0
        self._jac_stale = True  # the kept J must not be reused (a new solve, a fallback)
        self._jac_gamma = 1.0  # a0 / dt of the kept J
        self._fnorm_prev = 0.0
        # Backward Euler's step growth counts Newton iterations, which lagging changes (and
        # with them the step schedule): lagging serves the BDF2 scheme only.
        self._exact_newton = self.solver_options.jacobian == "exact" or self.scheme == "euler"
        self._step_fresh = True  # the last Newton update used a J of its own iterate
        o = self.solver_options
        opts = PETSc.Options()
        # Plain Newton: its Jacobian keeps one sparsity pattern, so MUMPS reuses its analysis
        # (vinewtonrsls re-analyses a submatrix every iteration, 1.7-1.9x slower). A step that
        # leaves (0, 1) gives NaN, Newton fails and the step is halved.
        defaults = {
            "snes_type": "newtonls",
            "snes_linesearch_type": "basic",
            "ksp_type": "preonly",
            "pc_type": "lu",
            "pc_factor_mat_solver_type": "mumps",
        }
        for k, v in {**defaults, **o.petsc_options}.items():
            if not opts.hasName(prefix + k):
                opts[prefix + k] = v
        snes.setTolerances(rtol=o.newton_rtol, atol=o.newton_atol, max_it=o.newton_max_it)
        snes.setFromOptions()
        #: SNES's step-length tolerance of exact Newton; a lagged solve runs without that
        #: test (the size of a modified-Newton update does not bound its error).
        self._stol = snes.getTolerances()[2]
        if not self._exact_newton:
            snes.setTolerances(stol=0.0)
        # With -femkin_forward_snes_type vinewtonrsls: c stays inside (0, 1); mu is free.
        self.lower = self.x.duplicate()
        self.upper = self.x.duplicate()
        eps = 1e-9
        n_own = self.W.dofmap.index_map.size_local * self.W.dofmap.index_map_bs
        lo = np.full(n_own, -1e20)
        hi = np.full(n_own, 1e20)
        cd = self.c_dofs[self.c_dofs < n_own]
        lo[cd], hi[cd] = eps, 1.0 - eps
        self.lower.array[:] = lo
        self.upper.array[:] = hi
        if snes.getType().startswith("vi"):
            snes.setVariableBounds(self.lower, self.upper)
        self.snes = snes
        # A KSP for linear solves with J or J^T (adjoint, tangent), same options as Newton.
        self.ksp = PETSc.KSP().create(self.comm)
        self.ksp.setOptionsPrefix(
            prefix.replace("forward", "adjoint") if "forward" in prefix else prefix + "adjoint_"
        )
        for k in ("ksp_type", "pc_type", "pc_factor_mat_solver_type"):
            key = self.ksp.getOptionsPrefix() + k
            if not opts.hasName(key):
                opts[key] = defaults[k]
        self.ksp.setFromOptions()

    #: Lagged Jacobian: the kept factorisation is refreshed when a modified-Newton update
    #: reduced the residual norm by less than this factor, ...
    LAG_MAX_RATE = 0.1
    #: ... or, at the start of a step, when a0/dt differs from that of the kept J by more than
    #: this fraction (the mass term of J scales with a0/dt).
    LAG_MAX_GAMMA_CHANGE = 0.3

    def _jacobian(self, snes, x, J, P) -> None:
        """SNES Jacobian callback: assemble J at ``x``, or keep the factorised one (lagged).

        With ``jacobian = "lagged"`` the J of an earlier iterate (of this or an earlier step
        of the same solve) is kept while it contracts: the update from iterate i-1 to i must
        have reduced the residual norm by the factor :attr:`LAG_MAX_RATE`, and a step starts
        with it only when its a0/dt is within :attr:`LAG_MAX_GAMMA_CHANGE` of the kept one.
        Not assembling leaves the matrix unchanged, so the linear solver keeps its factors.
        The decision depends on global norms only, so every rank takes it alike.
        """
        it = snes.getIterationNumber()
        fnorm = snes.getFunctionNorm()
        gamma = float(self.bdf[0].value) / float(self.dt.value)
        reuse = not (self._exact_newton or self._jac_stale)
        if reuse and it == 0:
            reuse = abs(gamma / self._jac_gamma - 1.0) <= self.LAG_MAX_GAMMA_CHANGE
        elif reuse:
            reuse = fnorm <= self.LAG_MAX_RATE * self._fnorm_prev
        self._fnorm_prev = fnorm
        self._step_fresh = not reuse
        if reuse:
            return
        dolfinx.fem.petsc.assemble_jacobian(snes, x, J, P, self.u, self.J, None, [])
        self.factorisations += 1
        self._jac_gamma = gamma
        self._jac_stale = False

    def set_weights(self, weights: Sequence[float]) -> None:
        """Set the BDF weights (a0, a1, a2) of the next step (BDF2 scheme only)."""
        for c, v in zip(self.bdf, weights, strict=True):
            c.value = v

    def newton_step(
        self, dt: float, mu_e: float, cbar: float, guess: np.ndarray | None = None
    ) -> tuple[bool, int, int]:
        """Solve one step from ``u_old``; returns (converged, iterations, SNES reason).

        ``guess`` (owned values of W) starts Newton; default the previous state. With a
        lagged Jacobian the solve converges on the residual tests only (``newton_rtol``,
        ``newton_atol``; SNES's step-length test is off, since the size of a modified-Newton
        update does not bound its error as a Newton update's does), and a solve that fails
        (iteration limit, NaN, a diverging update) is redone from the same guess with exact
        Newton; the iterations of both count, and if that fails too the caller cuts the step.
        """
        self.dt.value = dt
        self.constants["mu_e"][0].value = mu_e
        self.constants["cbar"][0].value = cbar
        start = self.u_old.x.petsc_vec.array if guess is None else guess
        ok, its, reason = self._newton_solve(start)
        if self._exact_newton or ok:
            return ok, its, reason
        self.jacobian_fallbacks += 1
        self._exact_newton, self._jac_stale = True, True
        self.snes.setTolerances(stol=self._stol)
        try:
            ok, its2, reason = self._newton_solve(start)
        finally:
            self._exact_newton = False
            self.snes.setTolerances(stol=0.0)
        return ok, its + its2, reason

    def _newton_solve(self, start: np.ndarray) -> tuple[bool, int, int]:
        """One SNES solve from ``start``; the state ``u`` is set where it converged."""
        self.x.array[:] = start
        try:
            self.snes.solve(None, self.x)
        except PETSc.Error as err:
            if err.__cause__ is not None:
                # a Python exception inside a callback (Ctrl-C, a full disk, a bug) is not a
                # Newton failure: halving the step would hide it
                raise err.__cause__ from None
            return False, self.snes.getIterationNumber(), -99
        reason = self.snes.getConvergedReason()
        its = self.snes.getIterationNumber()
        ok = reason > 0 and np.all(np.isfinite(self.x.array))
        # A "converged" solve without a Newton update (PETSc can report a step-norm
        # convergence at iteration 0 when the update vanishes) must have a small residual.
        if ok and its == 0:
            ok = self.snes.getFunctionNorm() <= self.solver_options.newton_atol
        if (
            ok
            and not self._step_fresh
            and reason == PETSc.SNES.ConvergedReason.CONVERGED_SNORM_RELATIVE
        ):
            ok = False  # a small modified-Newton update is no proof of convergence
        ok = self.comm.allreduce(bool(ok), op=MPI.LAND)
        if ok:
            self.x.ghostUpdate(PETSc.InsertMode.INSERT, PETSc.ScatterMode.FORWARD)
            self.u.x.petsc_vec.array[:] = self.x.array
            self.u.x.scatter_forward()
        return ok, its, reason

    def mean_c(self, u_array: np.ndarray | None = None) -> float:
        """Particle mean of c of the current state (or of a given local array)."""
        if u_array is not None:
            self.u.x.array[:] = u_array
        return self.comm.allreduce(dolfinx.fem.assemble_scalar(self._mean_c_form), op=MPI.SUM)

    # -- time stepping ----------------------------------------------------------------------
    def solve(
        self,
        frame_times: Sequence[float] | np.ndarray,
        driving: Callable[[float], float],
        c0: np.ndarray,
        *,
        schedule: Sequence[float] | None = None,
        storage: str | None = None,
        on_frame: Callable[[int], None] | None = None,
    ) -> Trajectory:
        """Integrate from ``c0`` at ``frame_times[0]`` through all frame times.

        Args:
            frame_times: strictly increasing frame times (s).
            driving: mu_e(t) in kT.
            c0: initial c as owned+ghost values of the P1 space ``V``.
            schedule: replay these step times exactly (from an earlier trajectory) instead of
                choosing steps adaptively; used for derivative checks.
            storage: "memory" or "disk" (default from the solver options).
            on_frame: called as ``on_frame(i)`` once frame ``i >= 1`` is reached (progress).

        Returns:
            The trajectory of converged states.

        Raises:
            ConvergenceError: Newton failed with the step at its floor.
        """
        o = self.solver_options
        frame_times = [float(t) for t in frame_times]
        traj = Trajectory(storage or o.storage, self.scheme)
        self.u.x.array[:] = 0.0
        nV = len(self.c_dofs)
        self.u.x.array[self.c_dofs] = c0[:nV]
        self.u.x.array[self.mu_dofs] = 0.0
        self.u.x.scatter_forward()
        t = float(frame_times[0])
        cbar = self.mean_c()
        traj.append(t, driving(t), cbar, self.u.x.array)
        traj.frame_steps.append(0)
        self._jac_stale = True  # parameters, m or the matrix (derivative solves) may differ
        f0, fb0 = self.factorisations, self.jacobian_fallbacks
        try:
            if self.scheme == "bdf2":
                return self._solve_bdf2(traj, frame_times, driving, schedule, on_frame)
            return self._solve_euler(traj, frame_times, driving, schedule, on_frame)
        finally:
            traj.factorisations = self.factorisations - f0
            traj.jacobian_fallbacks = self.jacobian_fallbacks - fb0

    def _solve_euler(self, traj, frame_times, driving, schedule, on_frame) -> Trajectory:
        """Backward Euler from the state in ``traj`` (see :meth:`solve`)."""
        o = self.solver_options
        t = float(frame_times[0])
        cbar = traj.cbar[0]
        gaps = np.diff(frame_times)
        dt = o.dt_initial or (gaps[0] / 10.0 if gaps.size else 1.0)
        dt_max = o.dt_max or np.inf
        if schedule is not None:
            steps = np.diff(np.asarray(schedule, dtype=float))
            targets = list(np.asarray(schedule, dtype=float)[1:])
        frame_i = 1
        k = 0
        while frame_i < len(frame_times):
            t_frame = frame_times[frame_i]
            if schedule is not None:
                t_new = targets[k]
                step = steps[k]
            else:
                step = min(dt, dt_max, t_frame - t)
                t_new = t + step
                if t_frame - t_new < 1e-9 * max(1.0, abs(t_frame)):
                    t_new = t_frame
                    step = t_frame - t
            self.u_old.x.array[:] = self.u.x.array
            ok, its, reason = self.newton_step(step, driving(t_new), cbar)
            traj.newton_total += its
            if not ok:
                traj.rejected += 1
                self.u.x.array[:] = self.u_old.x.array
                if schedule is not None or step / 2 < o.dt_min:
                    raise _step_failure(t, step, reason, its, o.dt_min)
                dt = step / 2
                continue
            t = t_new
            k += 1
            cbar_new = self.mean_c()
            traj.append(t, driving(t), cbar_new, self.u.x.array)
            traj.newton_iterations.append(its)
            cbar = cbar_new
            if abs(t - t_frame) <= 1e-9 * max(1.0, abs(t_frame)):
                traj.frame_steps.append(len(traj.times) - 1)
                if on_frame is not None:
                    on_frame(frame_i)
                frame_i += 1
            # Accuracy control: aim at a change of c of at most dc_max per step.
            dc = np.max(
                np.abs(self.u.x.array[self.c_dofs] - self.u_old.x.array[self.c_dofs]), initial=0.0
            )
            dc = self.comm.allreduce(float(dc), op=MPI.MAX)
            growth = 1.5 if its <= 4 else 1.0
            dt = step * float(np.clip(o.dc_max / max(dc, 1e-300), 0.5, growth))
        return traj

    def _solve_bdf2(self, traj, frame_times, driving, schedule, on_frame) -> Trajectory:
        """Variable-step BDF2 from the state in ``traj`` (see :meth:`solve`).

        The local error of a step is estimated from the difference of the BDF2 solution and
        the quadratic extrapolation p of the three previous levels: with steps h, h1, h2, a0
        the leading BDF2 weight and c3 the third time derivative of c,
        c_n - c(t_n) ~ h^2 (h + h1) c3 / (6 a0) and c(t_n) - p(t_n) ~ h (h + h1) (h + h1 + h2)
        c3 / 6, so the error is (h / a0) / (h / a0 + h + h1 + h2) |c_n - p(t_n)|. The first
        step (backward Euler) takes half the change of c as its error and the second one the
        distance to the linear extrapolation: both overestimate, so the start is cautious.
        """
        o = self.solver_options
        comm = self.comm
        cd = self.c_dofs
        n_own = len(self.x.array)
        u_old2 = self.u_old2
        assert u_old2 is not None  # a BDF2 model
        t = float(frame_times[0])
        t_end = float(frame_times[-1])
        scale = max(1.0, abs(t_end))
        # Step targets: the frames and the mu_e knots inside the interval.
        targets = [float(x) for x in frame_times[1:]]
        for knot in np.asarray(getattr(driving, "t", ()), dtype=float):
            if t < knot < t_end and min(abs(knot - x) for x in targets) > 1e-9 * scale:
                targets.append(float(knot))
        targets = sorted(targets)
        gaps = np.diff(frame_times)
        h = o.dt_initial or (gaps[0] / 10.0 if gaps.size else 1.0)
        dt_max = o.dt_max or np.inf
        tol = o.time_tol
        hist = [self.u.x.array.copy()]  # the last three accepted states (local arrays)
        hist_t = [t]
        cbars = [traj.cbar[0]]
        frame_i, target_i, k = 1, 0, 0
        if schedule is not None:
            sched = np.asarray(schedule, dtype=float)
        while frame_i < len(frame_times):
            if schedule is not None:
                t_new = float(sched[k + 1])
                step = t_new - t
            else:
                target = targets[target_i]
                step = min(h, dt_max)
                if len(hist) >= 2:
                    step = min(step, 2.0 * (t - hist_t[-2]))  # ratio <= 2: zero-stable BDF2
                rem = target - t
                if step >= rem * (1.0 - 1e-9):
                    step, t_new = rem, target
                else:
                    step = min(step, 0.5 * rem)  # two even steps rather than a sliver
                    t_new = t + step
                step = t_new - t  # exactly the step the trajectory's times give
            h_prev = t - hist_t[-2] if len(hist) >= 2 else None
            a, g = acr.bdf2_weights(step, h_prev)
            self.set_weights(a)
            self.u_old.x.array[:] = hist[-1]
            u_old2.x.array[:] = hist[-2] if len(hist) >= 2 else hist[-1]
            cbar = g[0] * cbars[-1] + (g[1] * cbars[-2] if len(hist) >= 2 else 0.0)
            pred = self._extrapolated(hist, hist_t, t_new)
            guess = None
            if pred is not None:  # Newton starts from the extrapolated c where it is valid
                inside = bool(np.all((pred[cd] > 1e-6) & (pred[cd] < 1.0 - 1e-6)))
                if comm.allreduce(inside, op=MPI.LAND):
                    guess = hist[-1][:n_own].copy()
                    own = cd < n_own
                    guess[cd[own]] = pred[cd[own]]
            ok, its, reason = self.newton_step(step, driving(t_new), cbar, guess)
            traj.newton_total += its
            if not ok:
                traj.rejected += 1
                self.u.x.array[:] = hist[-1]
                if schedule is not None or step / 2 < o.dt_min:
                    raise _step_failure(t, step, reason, its, o.dt_min)
                h = step / 2
                continue
            if schedule is None:
                c_new = self.u.x.array[cd]
                if len(hist) == 1 or pred is None:
                    err_local, order = 0.5 * np.abs(c_new - hist[0][cd]), 1
                elif len(hist) == 2:
                    err_local, order = np.abs(c_new - pred[cd]), 2
                else:
                    h1, h2 = hist_t[-1] - hist_t[-2], hist_t[-2] - hist_t[-3]
                    r = (step / a[0]) / (step / a[0] + step + h1 + h2)
                    err_local, order = r * np.abs(c_new - pred[cd]), 2
                err = comm.allreduce(float(np.max(err_local, initial=0.0)), op=MPI.MAX)
                factor = 0.9 * (tol / max(err, 1e-300)) ** (1.0 / (order + 1))
                if err > tol and step * 0.2 >= o.dt_min:
                    traj.rejected += 1
                    self.u.x.array[:] = hist[-1]
                    h = step * max(0.2, min(factor, 0.9))
                    continue
                h = step * float(np.clip(factor, 0.2, 2.0))
            t = t_new
            k += 1
            cbar_new = self.mean_c()
            traj.append(t, driving(t), cbar_new, self.u.x.array)
            traj.newton_iterations.append(its)
            hist = (hist + [self.u.x.array.copy()])[-3:]
            hist_t = (hist_t + [t])[-3:]
            cbars = (cbars + [cbar_new])[-2:]
            if schedule is None and abs(t - targets[target_i]) <= 1e-9 * scale:
                target_i += 1
            t_frame = frame_times[frame_i]
            if abs(t - t_frame) <= 1e-9 * max(1.0, abs(t_frame)):
                traj.frame_steps.append(len(traj.times) - 1)
                if on_frame is not None:
                    on_frame(frame_i)
                frame_i += 1
        return traj

    @staticmethod
    def _extrapolated(hist: list, hist_t: list, t_new: float) -> np.ndarray | None:
        """The polynomial through the kept levels (linear or quadratic) at ``t_new``."""
        if len(hist) < 2:
            return None
        ts = hist_t[-3:]
        out = np.zeros_like(hist[-1])
        for i, (ti, ui) in enumerate(zip(ts, hist[-3:], strict=True)):
            w = 1.0
            for j, tj in enumerate(ts):
                if j != i:
                    w *= (t_new - tj) / (ti - tj)
            out += w * ui
        return out

    # -- helpers --------------------------------------------------------------------------
    def c_values(self, u_array: np.ndarray) -> np.ndarray:
        """C on the P1 space V (owned + ghosts) from a W local array."""
        return u_array[self.c_dofs]

    def interface_width(self) -> float:
        """sqrt(kappa / a_1) in um (inf when a_1 <= 0)."""
        a1 = self.parameters.mu_h[0] if self.parameters.mu_h else 0.0
        return float(np.sqrt(self.parameters.kappa / a1)) if a1 > 0 else float("inf")

    def h_max(self) -> float:
        """Largest cell diameter over all ranks (um)."""
        tdim = self.mesh.topology.dim
        n = self.mesh.topology.index_map(tdim).size_local
        h = self.mesh.h(tdim, np.arange(n, dtype=np.int32))
        return self.comm.allreduce(float(h.max()) if n else 0.0, op=MPI.MAX)
