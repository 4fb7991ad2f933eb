"""Discrete adjoint, tangent linear and second-order adjoint of the ACR time stepping.

Everything is derived from the one residual form of :mod:`femkin.physics.acr` with
``ufl.derivative``, ``ufl.adjoint`` and ``ufl.diff`` (hIPPYlib's ``PDEProblem`` is the model):
a new physics term gets its adjoint with no new code here. The discrete step is

    F_n(u_n, u_{n-1}, s_{n-1}, theta) = 0,     s_{n-1} = mean of c_{n-1} (coherency),

and with the Lagrangian L = J + sum_n lambda_n . F_n the adjoint runs backwards:

    J_n^T lambda_n = -dJ/du_n - (dF_{n+1}/du_n)^T lambda_{n+1} - (lambda_{n+1} . dF_{n+1}/ds) ds/du_n,
    dJ/dtheta = sum_n lambda_n . dF_n/dtheta.

Each step costs one assembly of J^T and one linear solve. The tangent model solves
J_n du_n = -(dF_n/du_{n-1} du_{n-1} + dF_n/ds ds_{n-1} + dF_n/dtheta dtheta), and the
second-order adjoint differentiates the adjoint recursion once more in the direction of the
tangent, which gives full Hessian actions.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from femkin._fem import MPI, PETSc, dolfinx, ufl
from femkin.forward import ParticleModel, Trajectory


class Sensitivities(NamedTuple):
    """Derivatives of a functional with respect to one particle's parameters.

    Attributes:
        scalars: {block: array} for mu_h, j0, k0 (w.r.t. ln k0), kappa, coherency; summed
            over the particle's ranks (identical on each).
        m: dual vector (owned dofs of V) w.r.t. the nodal values of m.
        mu_e: derivative w.r.t. mu_e at each trajectory time (index 0 unused).
        c0: dual vector (owned dofs of V) w.r.t. the nodal values of the initial c.
    """

    scalars: dict[str, np.ndarray]
    m: np.ndarray
    mu_e: np.ndarray
    c0: np.ndarray


class Direction(NamedTuple):
    """A parameter direction for tangent and Hessian actions (zero where None).

    Attributes:
        scalars: {block: array}, same layout as :attr:`Sensitivities.scalars`.
        m: values of dm on V (owned + ghosts) or None.
        mu_e: d mu_e at each trajectory time, or None.
        c0: d c0 on V (owned + ghosts), or None.
    """

    scalars: dict[str, np.ndarray]
    m: np.ndarray | None = None
    mu_e: np.ndarray | None = None
    c0: np.ndarray | None = None


def _diff_form(form, var):
    """The derivative of every integrand of ``form`` with respect to ``ufl.variable`` ``var``."""
    return ufl.Form([itg.reconstruct(integrand=ufl.diff(itg.integrand(), var))
                     for itg in form.integrals()])


class ParticleDerivatives:
    """Adjoint, tangent and second-order adjoint solves for one :class:`ParticleModel`.

    Forms are compiled once per model, the first time they are needed.
    """

    STEP_SCALARS = ("mu_e", "cbar")

    def __init__(self, model: ParticleModel):
        self.model = model
        W, V = model.W, model.V
        self.lam = dolfinx.fem.Function(W, name="adjoint")
        self.du = dolfinx.fem.Function(W, name="tangent")
        self.du_old = dolfinx.fem.Function(W, name="tangent_old")
        self.dm = dolfinx.fem.Function(V, name="dm")
        self.dconst = {k: [dolfinx.fem.Constant(model.mesh, PETSc.ScalarType(0.0)) for _ in v]
                       for k, v in model.variables.items()}
        self.v_test = ufl.TestFunction(V)
        self.F_lam = ufl.replace(model.F_ufl, {model.test: self.lam})
        self._forms: dict = {}
        #: Scalar blocks to differentiate (None: all); see :meth:`_scalar_keys`.
        self.active: set[str] | None = None
        self.b = dolfinx.fem.petsc.create_vector(W)
        self.x = dolfinx.fem.petsc.create_vector(W)
        self.bV = dolfinx.fem.petsc.create_vector(V)
        self._AT = None

    # -- forms ----------------------------------------------------------------------------
    def _form(self, key, builder: Callable):
        if key not in self._forms:
            self._forms[key] = dolfinx.fem.form(builder())
        return self._forms[key]

    def _directional(self, form):
        """Total derivative of ``form`` in the direction (du, du_old, dm, dconst)."""
        m = self.model
        out = (ufl.derivative(form, m.u, self.du) + ufl.derivative(form, m.u_old, self.du_old)
               + ufl.derivative(form, m.m, self.dm))
        for name, variables in m.variables.items():
            for var, dc in zip(variables, self.dconst[name]):
                out += dc * _diff_form(form, var)
        return out

    def _tlm_rhs_ufl(self):
        m = self.model
        out = ufl.derivative(m.F_ufl, m.u_old, self.du_old) + ufl.derivative(m.F_ufl, m.m, self.dm)
        for name, variables in m.variables.items():
            for var, dc in zip(variables, self.dconst[name]):
                out += dc * _diff_form(m.F_ufl, var)
        return out

    def _adjoint_jacobian(self):
        form = self._form("JT", lambda: ufl.adjoint(self.model.J_ufl))
        if self._AT is None:
            self._AT = dolfinx.fem.petsc.create_matrix(form)
        return form

    # -- state bookkeeping --------------------------------------------------------------------
    def set_step(self, traj: Trajectory, n: int) -> None:
        """Put the model at step n: u = u_n, u_old = u_{n-1}, and that step's constants."""
        m = self.model
        m.u.x.array[:] = traj.state(n)
        m.u_old.x.array[:] = traj.state(n - 1)
        m.dt.value = traj.dt(n)
        m.constants["mu_e"][0].value = traj.mu_e[n]
        m.constants["cbar"][0].value = traj.cbar[n - 1]

    def _assemble_scalar(self, form) -> float:
        return self.model.comm.allreduce(dolfinx.fem.assemble_scalar(form), op=MPI.SUM)

    def _assemble_W(self, form, vec=None):
        vec = self.b if vec is None else vec
        with vec.localForm() as loc:
            loc.set(0.0)
        dolfinx.fem.petsc.assemble_vector(vec, form)
        return vec

    def _solve(self, transpose: bool, rhs: PETSc.Vec, out: dolfinx.fem.Function) -> None:
        """Solve J x = rhs or J^T x = rhs at the current step; result into ``out``."""
        m = self.model
        if transpose:
            form = self._adjoint_jacobian()
            A = self._AT
        else:
            form = m.J
            A = m.A
        A.zeroEntries()
        dolfinx.fem.petsc.assemble_matrix(A, form)
        A.assemble()
        m.ksp.setOperators(A)
        m.ksp.solve(rhs, self.x)
        if m.ksp.getConvergedReason() < 0:  # pragma: no cover - direct solver
            raise RuntimeError(f"linear solve failed: KSP reason {m.ksp.getConvergedReason()}")
        self.x.ghostUpdate(PETSc.InsertMode.INSERT, PETSc.ScatterMode.FORWARD)
        with self.x.localForm() as loc:
            out.x.array[:] = loc.array

    def _owned_V(self, vec: PETSc.Vec) -> np.ndarray:
        return vec.array[: self.model.V.dofmap.index_map.size_local].copy()

    @property
    def _field_active(self) -> bool:
        return self.active is None or "m" in self.active

    def _scalar_keys(self):
        """The scalar variables whose sensitivities are assembled at every step.

        ``active`` (None: all) restricts them to the learned blocks; ``cbar`` is needed by the
        recursion itself unless the coherency term vanishes identically (B = 0, not learned).
        """
        names = set(self.model.variables) if self.active is None else set(self.active)
        if self.active is not None and (self.model.parameters.coherency != 0.0
                                        or "coherency" in names):
            names.add("cbar")
        return [(name, i) for name, v in self.model.variables.items() if name in names
                for i in range(len(v))]

    # -- first-order adjoint ------------------------------------------------------------------
    def adjoint(self, traj: Trajectory, source: Callable[[int, np.ndarray], None], *,
                store: bool = False) -> tuple[Sensitivities, list | None]:
        """Run the adjoint backwards.

        Args:
            traj: the forward trajectory.
            source: ``source(n, out)`` adds dJ/du_n (a W local array with ghosts, before the
                reverse ghost accumulation) into ``out``; called for every state n.
            store: keep every lambda_n (needed by the second-order adjoint).

        Returns:
            The sensitivities and, if ``store``, the list of lambda arrays (index n).
        """
        model = self.model
        N = traj.n_steps
        keys = self._scalar_keys()
        dFl_dvar = {k: self._form(("dFl", k), lambda k=k: _diff_form(
            self.F_lam, model.variables[k[0]][k[1]])) for k in keys}
        rhs_old = self._form("rhs_old", lambda: ufl.derivative(
            self.F_lam, model.u_old, ufl.TestFunction(model.W)))
        dFl_dm = self._form("dFl_dm", lambda: ufl.derivative(self.F_lam, model.m, self.v_test))
        scal = {name: np.zeros(len(v)) for name, v in model.variables.items()}
        g_m = self.bV.duplicate()
        g_m.zeroEntries()
        mu_e_sens = np.zeros(N + 1)
        lambdas = [None] * (N + 1) if store else None
        lam_next = None
        for n in range(N, -1, -1):
            b = self.b
            with b.localForm() as loc:
                loc.set(0.0)
                source(n, loc.array)
            s_next = 0.0
            if lam_next is not None:
                self.set_step(traj, n + 1)
                self.lam.x.array[:] = lam_next
                dolfinx.fem.petsc.assemble_vector(b, rhs_old)
                if ("cbar", 0) in dFl_dvar:
                    s_next = self._assemble_scalar(dFl_dvar[("cbar", 0)])
            b.ghostUpdate(PETSc.InsertMode.ADD, PETSc.ScatterMode.REVERSE)
            b.axpy(s_next, model.dcbar_du)
            if n == 0:
                # dJ/du_0 (the initial state is a parameter when "initial" is learned).
                g_c0 = self._c_owned(b)
                break
            b.scale(-1.0)
            self.set_step(traj, n)
            self._solve(True, b, self.lam)
            lam_next = self.lam.x.array.copy()
            if store:
                lambdas[n] = lam_next
            self._accumulate(dFl_dvar, n, scal, mu_e_sens)
            if self._field_active:
                dolfinx.fem.petsc.assemble_vector(g_m, dFl_dm)
        g_m.ghostUpdate(PETSc.InsertMode.ADD, PETSc.ScatterMode.REVERSE)
        scal.pop("mu_e")
        scal.pop("cbar")
        return Sensitivities(scal, self._owned_V(g_m), mu_e_sens, g_c0), lambdas

    def _accumulate(self, forms: dict, n: int, scal: dict, mu_e_sens: np.ndarray) -> None:
        """Add the scalar-parameter forms at step n: mu_e per step, cbar not at all (its
        dependence on the previous state enters the adjoint recursion instead)."""
        for (name, i), form in forms.items():
            if name == "cbar":
                continue
            val = self._assemble_scalar(form)
            if name == "mu_e":
                mu_e_sens[n] += val
            else:
                scal[name][i] += val

    def _c_owned(self, b: PETSc.Vec) -> np.ndarray:
        """Owned V values of the c-component of an assembled (reverse-scattered) W vector."""
        model = self.model
        nV = model.V.dofmap.index_map.size_local
        nW = len(b.array)
        cd = model.c_dofs[:nV]
        assert np.all(cd < nW)
        return b.array[cd].copy()

    # -- tangent linear model -----------------------------------------------------------------
    def tangent(self, traj: Trajectory, direction: Direction) -> list[np.ndarray]:
        """Tangent states du_n (W local arrays with ghosts), n = 0..N."""
        model = self.model
        N = traj.n_steps
        rhs = self._form("tlm_rhs", self._tlm_rhs_ufl)
        mean_form = self._form("mean_du", lambda: ufl.split(self.du_old)[0] / model.area * model.dx)
        du0 = np.zeros_like(self.du.x.array)
        if direction.c0 is not None:
            du0[model.c_dofs] = direction.c0[: len(model.c_dofs)]
        self._set_direction(direction)
        out = [du0]
        for n in range(1, N + 1):
            self.set_step(traj, n)
            self.du_old.x.array[:] = out[n - 1]
            self.dconst["cbar"][0].value = self._assemble_scalar(mean_form)
            self.dconst["mu_e"][0].value = direction.mu_e[n] if direction.mu_e is not None else 0.0
            b = self._assemble_W(rhs)
            b.ghostUpdate(PETSc.InsertMode.ADD, PETSc.ScatterMode.REVERSE)
            b.scale(-1.0)
            self._solve(False, b, self.du)
            out.append(self.du.x.array.copy())
        return out

    def _set_direction(self, direction: Direction) -> None:
        for name, consts in self.dconst.items():
            vals = direction.scalars.get(name)
            for i, c in enumerate(consts):
                c.value = 0.0 if vals is None else vals[i]
        if direction.m is not None:
            self.dm.x.array[:] = direction.m[: len(self.dm.x.array)]
        else:
            self.dm.x.array[:] = 0.0

    # -- second-order adjoint -----------------------------------------------------------------
    def second_order(self, traj: Trajectory, direction: Direction, lambdas: list,
                     tangents: list, source2: Callable[[int, np.ndarray], None]) -> Sensitivities:
        """Full Hessian action of the functional whose first adjoint gave ``lambdas``.

        Args:
            traj: the forward trajectory.
            direction: the parameter direction (the one ``tangents`` were computed for).
            lambdas: first-order adjoint states (from ``adjoint(..., store=True)``).
            tangents: tangent states from :meth:`tangent`.
            source2: ``source2(n, out)`` adds (d^2 J/du_n^2) du_n into ``out``.

        Returns:
            The Hessian action, as sensitivities (second-order terms included).
        """
        model = self.model
        N = traj.n_steps
        keys = self._scalar_keys()
        Wt = ufl.TestFunction(model.W)
        soa_self = self._form("soa_self", lambda: self._directional(
            ufl.derivative(self.F_lam, model.u, Wt)))
        soa_old = self._form("soa_old", lambda: self._directional(
            ufl.derivative(self.F_lam, model.u_old, Wt)))
        rhs_old = self._form("rhs_old", lambda: ufl.derivative(self.F_lam, model.u_old, Wt))
        dFl_dvar = {k: self._form(("dFl", k), lambda k=k: _diff_form(
            self.F_lam, model.variables[k[0]][k[1]])) for k in keys}
        soa_dvar = {k: self._form(("soa_dvar", k), lambda k=k: self._directional(_diff_form(
            self.F_lam, model.variables[k[0]][k[1]]))) for k in keys}
        dFl_dm = self._form("dFl_dm", lambda: ufl.derivative(self.F_lam, model.m, self.v_test))
        soa_dm = self._form("soa_dm", lambda: self._directional(
            ufl.derivative(self.F_lam, model.m, self.v_test)))
        mean_form = self._form("mean_du", lambda: ufl.split(self.du_old)[0] / model.area * model.dx)
        self._set_direction(direction)
        # d s_{n} for every n (mean of the tangent c).
        ds = np.zeros(N + 1)
        for n in range(N + 1):
            self.du_old.x.array[:] = tangents[n]
            ds[n] = self._assemble_scalar(mean_form)
        dmu_e = direction.mu_e if direction.mu_e is not None else np.zeros(N + 1)

        def load(n: int, lam: np.ndarray) -> None:
            self.set_step(traj, n)
            self.lam.x.array[:] = lam
            self.du.x.array[:] = tangents[n]
            self.du_old.x.array[:] = tangents[n - 1]
            self.dconst["cbar"][0].value = ds[n - 1]
            self.dconst["mu_e"][0].value = dmu_e[n]

        scal = {name: np.zeros(len(v)) for name, v in model.variables.items()}
        g_m = self.bV.duplicate()
        g_m.zeroEntries()
        mu_e_sens = np.zeros(N + 1)
        lamhat = dolfinx.fem.Function(model.W)
        lamhat_next = None
        for n in range(N, -1, -1):
            b = self.b
            with b.localForm() as loc:
                loc.set(0.0)
                source2(n, loc.array)
            s_coef = 0.0
            if n < N:
                load(n + 1, lambdas[n + 1])
                dolfinx.fem.petsc.assemble_vector(b, soa_old)
                # D(lambda_{n+1} . dF_{n+1}/ds) ds/du_n
                if ("cbar", 0) in soa_dvar:
                    s_coef += self._assemble_scalar(soa_dvar[("cbar", 0)])
                self.lam.x.array[:] = lamhat_next
                dolfinx.fem.petsc.assemble_vector(b, rhs_old)
                if ("cbar", 0) in dFl_dvar:
                    s_coef += self._assemble_scalar(dFl_dvar[("cbar", 0)])
            if n >= 1:
                load(n, lambdas[n])
                dolfinx.fem.petsc.assemble_vector(b, soa_self)
            b.ghostUpdate(PETSc.InsertMode.ADD, PETSc.ScatterMode.REVERSE)
            b.axpy(s_coef, model.dcbar_du)
            if n == 0:
                g_c0 = self._c_owned(b)
                break
            b.scale(-1.0)
            load(n, lambdas[n])
            self._solve(True, b, lamhat)
            lamhat_next = lamhat.x.array.copy()
            # Hessian action: D(lambda_n . dF_n/dtheta) + lamhat_n . dF_n/dtheta.
            self._accumulate(soa_dvar, n, scal, mu_e_sens)
            if self._field_active:
                dolfinx.fem.petsc.assemble_vector(g_m, soa_dm)
            self.lam.x.array[:] = lamhat_next
            self._accumulate(dFl_dvar, n, scal, mu_e_sens)
            if self._field_active:
                dolfinx.fem.petsc.assemble_vector(g_m, dFl_dm)
        g_m.ghostUpdate(PETSc.InsertMode.ADD, PETSc.ScatterMode.REVERSE)
        scal.pop("mu_e")
        scal.pop("cbar")
        return Sensitivities(scal, self._owned_V(g_m), mu_e_sens, g_c0)
