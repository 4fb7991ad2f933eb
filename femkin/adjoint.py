"""Discrete adjoint, tangent linear and second-order adjoint of the ACR time stepping.

Everything is derived from the one residual form of :mod:`femkin.physics.acr` with
``ufl.derivative``, ``ufl.adjoint`` and ``ufl.diff`` (hIPPYlib's ``PDEProblem`` is the model):
a new physics term gets its adjoint with no new code here. The discrete step is

    F_n(u_n, u_{n-1}, u_{n-2}, s*_n, theta) = 0,   s*_n = g1_n s_{n-1} + g2_n s_{n-2},

with s_k the mean of c_k (coherency) and, for backward Euler, no u_{n-2} and s*_n = s_{n-1};
for BDF2 the weights of u_{n-1}, u_{n-2} and (g1_n, g2_n) are fixed by the step schedule
(:func:`femkin.physics.acr.bdf2_weights`). With the Lagrangian L = J + sum_n lambda_n . F_n
the adjoint runs backwards, each level collecting from the two steps that use it:

    J_n^T lambda_n = -dJ/du_n - (dF_{n+1}/du_{n-1 slot})^T lambda_{n+1}
                     - (dF_{n+2}/du_{n-2 slot})^T lambda_{n+2}
                     - (g1_{n+1} sigma_{n+1} + g2_{n+2} sigma_{n+2}) ds/du_n,
    sigma_k = lambda_k . dF_k/ds*,     dJ/dtheta = sum_n lambda_n . dF_n/dtheta.

Each step costs one assembly of J^T and one linear solve. The tangent model solves
J_n du_n = -(dF_n/du_{n-1} du_{n-1} + dF_n/du_{n-2} du_{n-2} + dF_n/ds* ds*_n
+ dF_n/dtheta dtheta), and the second-order adjoint differentiates the adjoint recursion once
more in the direction of the tangent, which gives full Hessian actions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from femkin._fem import MPI, PETSc, dolfinx, ufl
from femkin.factor_cache import FactorCache
from femkin.forward import ParticleModel, Trajectory


class Sensitivities(NamedTuple):
    """Derivatives of a functional with respect to one particle's parameters.

    Attributes:
        scalars: {block: array} for mu_h, j0, k0 (w.r.t. ln k0), kappa, coherency, lambda
            (w.r.t. ln lambda); summed over the particle's ranks (identical on each).
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
    return ufl.Form(
        [itg.reconstruct(integrand=ufl.diff(itg.integrand(), var)) for itg in form.integrals()]
    )


def _times(form, factor):
    """``form`` with every integrand multiplied by ``factor``."""
    return ufl.Form(
        [itg.reconstruct(integrand=itg.integrand() * factor) for itg in form.integrals()]
    )


class ParticleDerivatives:
    """Adjoint, tangent and second-order adjoint solves for one :class:`ParticleModel`.

    Forms are compiled once per model, the first time they are needed. All derivatives with
    respect to the scalar variables at a step are assembled in one pass, as the components of
    a vector in a cell-wise constant space with one component per variable (summed over the
    cells afterwards), and the linear solves with J and J^T share the model's matrix and
    factorisation (a transposed solve, no second matrix). The ``*_many`` methods run several
    directions or sources through one trajectory, one Jacobian factorisation per step for all;
    batches of :attr:`MATRIX_BATCH` or more also assemble the step's other derivative operators
    once, as matrices, and apply them to every member (3-4x less time per Gauss-Newton action
    for a batch of 60 on the demo), and a tangent pass that keeps J_n's factorisation keeps
    them with it, so that later passes at the same point only multiply (3x less time per
    single action in a Newton-CG loop; ``benchmarks/bench_hessian_batch.py``).
    """

    STEP_SCALARS = ("mu_e", "cbar")
    #: Batches of at least this many directions (tangent) or sources (adjoint) assemble each
    #: step's derivative operators once, as matrices (:meth:`_step_operators`), and apply them
    #: to every member by sparse products, instead of assembling one vector per member. The
    #: matrices cost about as much as six members' vectors (break-even measured at 6 on the
    #: demo, ``benchmarks/bench_hessian_batch.py``).
    MATRIX_BATCH = 8
    #: Keep each step's derivative operators beside its kept factorisation (see
    #: :meth:`_operators`); off only to measure what keeping saves.
    KEEP_OPERATORS = True

    def __init__(self, model: ParticleModel):
        self.model = model
        W, V = model.W, model.V
        self.lam = dolfinx.fem.Function(W, name="adjoint")
        self.du = dolfinx.fem.Function(W, name="tangent")
        self.du_old = dolfinx.fem.Function(W, name="tangent_old")
        self.du_old2 = dolfinx.fem.Function(W, name="tangent_old2")
        self.multistep = model.u_old2 is not None
        self.dm = dolfinx.fem.Function(V, name="dm")
        self.dconst = {
            k: [dolfinx.fem.Constant(model.mesh, PETSc.ScalarType(0.0)) for _ in v]
            for k, v in model.variables.items()
        }
        self.v_test = ufl.TestFunction(V)
        self.F_lam = ufl.replace(model.F_ufl, {model.test: self.lam})
        self._forms: dict = {}
        #: Scalar blocks to differentiate (None: all); see :meth:`_scalar_keys`.
        self.active: set[str] | None = None
        self.b = dolfinx.fem.petsc.create_vector(W)
        self.b2 = dolfinx.fem.petsc.create_vector(W)
        self.x = dolfinx.fem.petsc.create_vector(W)
        self.bV = dolfinx.fem.petsc.create_vector(V)
        self._scalar_vecs: dict = {}
        self._ops: dict | None = None
        #: Step operators kept beside the kept factorisations: {n: (generation, operators)}.
        self._kept_ops: dict[int, tuple[int, dict]] = {}
        #: Factorised Jacobians of the current trajectory, by step (see _use_step).
        self.factors = FactorCache(model)
        self._ksp = model.ksp

    # -- forms ----------------------------------------------------------------------------
    def _form(self, key, builder: Callable):
        if key not in self._forms:
            self._forms[key] = dolfinx.fem.form(builder())
        return self._forms[key]

    def _directional(self, form):
        """Total derivative of ``form`` in the direction (du, du_old, dm, dconst)."""
        m = self.model
        out = (
            ufl.derivative(form, m.u, self.du)
            + ufl.derivative(form, m.u_old, self.du_old)
            + ufl.derivative(form, m.m, self.dm)
        )
        if self.multistep:
            out += ufl.derivative(form, m.u_old2, self.du_old2)
        for name, variables in m.variables.items():
            for var, dc in zip(variables, self.dconst[name], strict=True):
                out += dc * _diff_form(form, var)
        return out

    def _tlm_rhs_ufl(self):
        m = self.model
        out = ufl.derivative(m.F_ufl, m.u_old, self.du_old) + ufl.derivative(m.F_ufl, m.m, self.dm)
        if self.multistep:
            out += ufl.derivative(m.F_ufl, m.u_old2, self.du_old2)
        for name, variables in m.variables.items():
            for var, dc in zip(variables, self.dconst[name], strict=True):
                out += dc * _diff_form(m.F_ufl, var)
        return out

    def _scalar_form(self, tag: str, keys: list, builder: Callable):
        """One linear form whose test space is cell-wise constant with ``len(keys)`` components:
        component i is ``builder(variable_i)`` (a form), so one assembly gives all of them.

        Returns (compiled form or None if every component vanishes, its assembly vector).
        """
        key = (tag, tuple(keys))
        if key not in self._forms:
            form = None
            if keys:
                total, Q = self._per_variable(keys, builder)
                if total is not None:
                    form = dolfinx.fem.form(total)
                    self._scalar_vecs[key] = dolfinx.fem.petsc.create_vector(Q)
            self._forms[key] = form
        return self._forms[key], self._scalar_vecs.get(key)

    def _per_variable(self, keys: list, builder: Callable):
        """``sum_j builder(variable_j) q_j`` with ``q`` the test function of a cell-wise constant
        space with one component per key; returns (the UFL form or None if every component
        vanishes, the space).
        """
        model = self.model
        Q = dolfinx.fem.functionspace(model.mesh, ("DG", 0, (len(keys),)))
        q = ufl.TestFunction(Q)
        parts = [
            _times(builder(model.variables[name][i]), q[j]) for j, (name, i) in enumerate(keys)
        ]
        parts = [f for f in parts if f.integrals()]
        if not parts:
            return None, Q
        total = parts[0]
        for f in parts[1:]:
            total = total + f
        return total, Q

    def _scalars_local(self, compiled) -> np.ndarray:
        """This rank's share of every component of a :meth:`_scalar_form` (not reduced)."""
        form, vec = compiled
        if form is None:
            return np.zeros(0)
        with vec.localForm() as loc:
            loc.set(0.0)
        dolfinx.fem.petsc.assemble_vector(vec, form)
        bs = vec.getBlockSize()
        # Cell integrals only touch owned cells; ghost entries stay zero, none are lost.
        return vec.array.reshape(-1, bs).sum(axis=0)

    # -- the step's derivative operators as matrices (batched tangents and adjoints) ----------
    def _step_operators(self) -> dict:
        """Compiled bilinear forms of the step's derivatives and matrices to assemble them in.

        ``old`` (and ``old2``): dF/du_{n-1} (dF/du_{n-2}), W x W; ``m``: dF/dm, W x V;
        ``scalars``: the derivatives with respect to every scalar variable (``keys``, all of
        the model's, including mu_e and cbar), as the rows of a matrix whose test space is
        cell-wise constant with one component per variable: row (cell, j) applied to a W
        vector ``w`` is that cell's share of ``w . dF/dtheta_j``. One assembly per step then
        serves every direction (``A w``) and every adjoint (``A^T lambda``).
        """
        if self._ops is None:
            m = self.model
            w_trial = ufl.TrialFunction(m.W)
            forms = {
                "old": ufl.derivative(m.F_ufl, m.u_old, w_trial),
                "m": ufl.derivative(m.F_ufl, m.m, ufl.TrialFunction(m.V)),
            }
            if self.multistep:
                forms["old2"] = ufl.derivative(m.F_ufl, m.u_old2, w_trial)
            keys = [(name, i) for name, v in m.variables.items() for i in range(len(v))]
            f_trial = ufl.replace(m.F_ufl, {m.test: w_trial})
            total, _ = self._per_variable(keys, lambda var: _diff_form(f_trial, var))
            if total is not None:
                forms["scalars"] = total
            compiled = {k: dolfinx.fem.form(f) for k, f in forms.items()}
            mats = {k: dolfinx.fem.petsc.create_matrix(f) for k, f in compiled.items()}
            ops: dict[str, Any] = {"forms": compiled, "mats": mats, "keys": keys}
            if "scalars" in mats:
                ops["q_vec"] = mats["scalars"].createVecLeft()
                ops["w_vec"] = mats["scalars"].createVecRight()
            ops["v_vec"] = mats["m"].createVecRight()
            self._ops = ops
        return self._ops

    def _assemble_step_operators(self, *, keep: bool = False) -> dict:
        """The step's derivative operators at the model's current step.

        Returns ``{"old", "old2" (None for backward Euler), "m"}``, matrices of
        :meth:`_step_operators`, and ``"D"``: row ``j`` the owned entries of the W vector
        dF/dtheta_j (the ``scalars`` matrix summed over the cells), so that ``D lambda`` is
        this rank's share of ``lambda . dF/dtheta`` and ``D^T dtheta`` its part of
        ``dF/dtheta dtheta``. ``keep``: copies that stay valid after the next assembly;
        otherwise the shared work matrices.
        """
        ops = self._step_operators()
        mats = ops["mats"]
        for k, form in ops["forms"].items():
            A = mats[k]
            A.zeroEntries()
            dolfinx.fem.petsc.assemble_matrix(A, form)
            A.assemble()
        keys = ops["keys"]
        D = np.zeros((len(keys), self.b.getLocalSize()))
        if "scalars" in mats:
            q, w = ops["q_vec"], ops["w_vec"]
            for j in range(len(keys)):
                q.zeroEntries()
                q.array.reshape(-1, len(keys))[:, j] = 1.0
                mats["scalars"].multTranspose(q, w)
                D[j] = w.array
        out = {"old": mats["old"], "old2": mats.get("old2"), "m": mats["m"], "D": D}
        if keep:
            for k in ("old", "old2", "m"):
                if out[k] is not None:
                    out[k] = out[k].duplicate(copy=True)
        return out

    def _operators(self, n: int, *, batch: int, keep: bool = False) -> dict | None:
        """The derivative operators at step n (the model at step n), or None: assemble one
        vector per member instead.

        Operators kept at this trajectory and parameters (beside the kept J_n) are reused. A
        tangent pass (``keep``) whose J_n factorisation is kept assembles them and keeps them
        with it, within ``[solver] factor_cache_mb``: the adjoint pass and every later action
        at the point (a Newton-CG inner loop, the eigensolver's passes) then only multiply.
        Otherwise a pass of :attr:`MATRIX_BATCH` or more members assembles them into the
        shared work matrices. Collective: the kept factorisations are the same on every rank.
        """
        gen = self.factors.generation
        kept = self._kept_ops.get(n)
        if kept is not None and kept[0] == gen and n in self.factors:
            return kept[1]
        if keep and self.KEEP_OPERATORS and n in self.factors:
            ops = self._assemble_step_operators(keep=True)
            self._kept_ops[n] = (gen, ops)
            nnz = sum(ops[k].getInfo()["nz_used"] for k in ("old", "old2", "m") if ops[k])
            self.factors.add_kept(
                self.model.comm.allreduce(12.0 * nnz + 8.0 * ops["D"].size, op=MPI.MAX)
            )
            return ops
        if batch >= self.MATRIX_BATCH:
            return self._assemble_step_operators()
        return None

    def _drop_stale_operators(self) -> None:
        """Free the kept operators of an older generation of kept factorisations."""
        gen = self.factors.generation
        for n in [n for n, (g, _) in self._kept_ops.items() if g != gen]:
            _, ops = self._kept_ops.pop(n)
            for k in ("old", "old2", "m"):
                if ops[k] is not None:
                    ops[k].destroy()

    def _scalar_values(self, direction: Direction, keys: list, n: int, ds: float) -> np.ndarray:
        """The direction's d theta per scalar variable at step n (what :meth:`_set_direction`
        and the tangent loop put into ``dconst``), in the order of ``keys``.
        """
        out = np.zeros(len(keys))
        for j, (name, i) in enumerate(keys):
            if name == "cbar":
                out[j] = ds
            elif name == "mu_e":
                out[j] = direction.mu_e[n] if direction.mu_e is not None else 0.0
            else:
                vals = direction.scalars.get(name)
                out[j] = 0.0 if vals is None else vals[i]
        return out

    # -- state bookkeeping --------------------------------------------------------------------
    def set_step(self, traj: Trajectory, n: int) -> None:
        """Put the model at step n: states u_n, u_{n-1} (and u_{n-2}), constants, weights."""
        m = self.model
        if traj.scheme != m.scheme:
            raise ValueError(f"a {traj.scheme!r} trajectory given to a {m.scheme!r} model")
        m.u.x.array[:] = traj.state(n)
        m.u_old.x.array[:] = traj.state(n - 1)
        if m.u_old2 is not None:
            m.u_old2.x.array[:] = traj.state(max(n - 2, 0))
            m.set_weights(traj.weights(n)[0])
        m.dt.value = traj.dt(n)
        m.constants["mu_e"][0].value = traj.mu_e[n]
        m.constants["cbar"][0].value = traj.cbar_used(n)

    def _assemble_W(self, form, vec=None):
        vec = self.b if vec is None else vec
        with vec.localForm() as loc:
            loc.set(0.0)
        dolfinx.fem.petsc.assemble_vector(vec, form)
        return vec

    def _assemble_jacobian(self) -> None:
        """Assemble J at the current step into the model's matrix and solve with the model's
        KSP (it refactorises at the next solve).
        """
        m = self.model
        m.A.zeroEntries()
        dolfinx.fem.petsc.assemble_matrix(m.A, m.J)
        m.A.assemble()
        m.ksp.setOperators(m.A)
        self._ksp = m.ksp

    def __del__(self):
        # Accounting only (no collective PETSc calls in a finaliser): the kept MUMPS
        # factorisations go with this object, so they no longer count against the limit.
        try:
            self.factors.release_count()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def clear_cache(self) -> None:
        """Free the kept factorisations and operators (done automatically when the trajectory
        changes).
        """
        self.factors.clear()
        self._drop_stale_operators()

    def _use_step(self, n: int, keep: bool = False) -> None:
        """Make the next solves use J at step n (the model must be at step n: set_step).

        Tangent runs (``keep``) factorise J_n afresh and keep it while the kept ones fit in
        ``[solver] factor_cache_mb`` per process (:class:`~femkin.factor_cache.FactorCache`);
        the adjoint and second-order runs use what is kept and otherwise refactorise the
        model's matrix (its symbolic analysis is reused, which makes a lone gradient
        cheapest). ``self.factors.bind`` must have been called for the trajectory.
        """
        ksp = self.factors.get(n)
        if ksp is None and keep:
            ksp = self.factors.factorise(n)
        if ksp is None:
            self._assemble_jacobian()
        else:
            self._ksp = ksp

    def _solve(self, transpose: bool, rhs: PETSc.Vec, out: dolfinx.fem.Function) -> None:
        """Solve J x = rhs or J^T x = rhs with the last assembled J; result into ``out``."""
        ksp = self._ksp
        if transpose:
            ksp.solveTranspose(rhs, self.x)
        else:
            ksp.solve(rhs, self.x)
        if ksp.getConvergedReason() < 0:  # pragma: no cover - direct solver
            raise RuntimeError(f"linear solve failed: KSP reason {ksp.getConvergedReason()}")
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
        if self.active is not None and (
            self.model.parameters.coherency != 0.0 or "coherency" in names
        ):
            names.add("cbar")
        return [
            (name, i)
            for name, v in self.model.variables.items()
            if name in names
            for i in range(len(v))
        ]

    # -- helpers shared by the recursions -----------------------------------------------------
    def _new_sensitivities(self, N: int) -> tuple[dict[str, np.ndarray], Any, np.ndarray]:
        """Zeroed accumulators: (scalars dict, m dual vector or None, mu_e array)."""
        scal = {name: np.zeros(len(v)) for name, v in self.model.variables.items()}
        g_m = None
        if self._field_active:
            g_m = self.bV.duplicate()
            g_m.zeroEntries()
        return scal, g_m, np.zeros(N + 1)

    def _add_step_scalars(
        self, keys, values, n: int, scal: dict, mu_e_sens: np.ndarray, cbar_index: int | None
    ) -> float:
        """Add one step's local scalar sensitivities (in the order of ``keys``): mu_e per step,
        cbar not at all (it enters the recursion instead). Returns the global cbar component.
        """
        for (name, i), v in zip(keys, values, strict=True):
            if name == "mu_e":
                mu_e_sens[n] += v
            elif name != "cbar":
                scal[name][i] += v
        if cbar_index is None or len(values) == 0:
            return 0.0
        return self.model.comm.allreduce(float(values[cbar_index]), op=MPI.SUM)

    def _finish(self, scal: dict, g_m, mu_e_sens: np.ndarray, g_c0: np.ndarray) -> Sensitivities:
        """Reduce the local scalar sums over the particle's ranks (one collective)."""
        names = [k for k in scal if k not in ("mu_e", "cbar")]
        flat = np.concatenate([scal[k] for k in names] + [mu_e_sens])
        total = np.empty_like(flat)
        self.model.comm.Allreduce(flat, total, op=MPI.SUM)
        out, pos = {}, 0
        for k in names:
            out[k] = total[pos : pos + len(scal[k])]
            pos += len(scal[k])
        if g_m is not None:
            g_m.ghostUpdate(PETSc.InsertMode.ADD, PETSc.ScatterMode.REVERSE)
            m_dual = self._owned_V(g_m)
            g_m.destroy()
        else:
            m_dual = np.zeros(self.model.V.dofmap.index_map.size_local)
        return Sensitivities(out, m_dual, total[pos:], g_c0)

    def _cbar_index(self, keys) -> int | None:
        return keys.index(("cbar", 0)) if ("cbar", 0) in keys else None

    def _mean_c_of(self, arr: np.ndarray) -> float:
        """Particle mean of the c-component of a W local array (linear: d cbar/du . arr)."""
        dcbar = self.model.dcbar_du
        local = float(np.dot(dcbar.array, arr[: dcbar.getLocalSize()]))
        return self.model.comm.allreduce(local, op=MPI.SUM)

    def _rhs(self, carry: np.ndarray, source: Callable, n: int, s: float, extra=None) -> PETSc.Vec:
        """``self.b`` = carried terms + ``source(n)`` (+ the assembled ``extra`` form), summed
        over ghosts, plus ``s`` times d cbar/du (the coherency mean's dependence).
        """
        b = self.b
        with b.localForm() as loc:
            loc.array[:] = carry
            source(n, loc.array)
        if extra is not None:
            dolfinx.fem.petsc.assemble_vector(b, extra)
        b.ghostUpdate(PETSc.InsertMode.ADD, PETSc.ScatterMode.REVERSE)
        b.axpy(s, self.model.dcbar_du)
        return b

    # -- first-order adjoint ------------------------------------------------------------------
    def adjoint(
        self, traj: Trajectory, source: Callable[[int, np.ndarray], None], *, store: bool = False
    ) -> tuple[Sensitivities, list | None]:
        """Run the adjoint backwards.

        Args:
            traj: the forward trajectory.
            source: ``source(n, out)`` adds dJ/du_n (a W local array with ghosts, before the
                reverse ghost accumulation) into ``out``; called for every state n.
            store: keep every lambda_n (needed by the second-order adjoint).

        Returns:
            The sensitivities and, if ``store``, the list of lambda arrays (index n).
        """
        return self.adjoint_many(traj, [source], store=store)[0]

    def adjoint_many(
        self, traj: Trajectory, sources: list, *, store: bool = False
    ) -> list[tuple[Sensitivities, list | None]]:
        """:meth:`adjoint` for several functionals at once: one J factorisation per step serves
        every source's transposed solve. Returns one (sensitivities, lambdas) per source.
        """
        model = self.model
        N = traj.n_steps
        self.factors.bind(traj)
        K = len(sources)
        keys = self._scalar_keys()
        i_cbar = self._cbar_index(keys)
        dFl = self._scalar_form("dFl", keys, lambda var: _diff_form(self.F_lam, var))
        rhs_old = self._form(
            "rhs_old", lambda: ufl.derivative(self.F_lam, model.u_old, ufl.TestFunction(model.W))
        )
        dFl_dm = self._form("dFl_dm", lambda: ufl.derivative(self.F_lam, model.m, self.v_test))
        acc = [self._new_sensitivities(N) for _ in range(K)]
        lambdas: list[Any] = [[None] * (N + 1) if store else None for _ in range(K)]
        rhs_old2 = None
        if self.multistep:
            rhs_old2 = self._form(
                "rhs_old2",
                lambda: ufl.derivative(self.F_lam, model.u_old2, ufl.TestFunction(model.W)),
            )
        # carry[k]: what the later steps contribute to the level being solved for, local with
        # ghosts (before the reverse scatter), and s_next[k] its cbar coefficient; carry2[k],
        # s_next2[k]: what step n+1 already contributes to level n-1 (its u_{n-2} slot).
        size = len(self.lam.x.array)
        carry = [np.zeros(size) for _ in range(K)]
        carry2 = [np.zeros(size) for _ in range(K)]
        s_next = [0.0] * K
        s_next2 = [0.0] * K
        b = self.b
        self._drop_stale_operators()
        pick: list[int] | None = None  # set at the first step with operators (compiled then)
        n_own = b.getLocalSize()
        lam_vec = self.lam.x.petsc_vec
        for n in range(N, 0, -1):
            self.set_step(traj, n)
            self._use_step(n)
            _, (g1, g2) = traj.weights(n)
            # the step's operators (kept beside J_n, or assembled for a large batch): A^T lambda
            # per source; None: one set of vectors assembled per source
            ops = self._operators(n, batch=K)
            for k in range(K):
                self._rhs(carry[k], sources[k], n, s_next[k]).scale(-1.0)
                self._solve(True, b, self.lam)
                if store:
                    lambdas[k][n] = self.lam.x.array.copy()
                scal, g_m, mu_e_sens = acc[k]
                if ops is not None:
                    if pick is None:
                        pick = [self._step_operators()["keys"].index(key) for key in keys]
                    values = ops["D"][pick] @ lam_vec.array
                    sigma = self._add_step_scalars(keys, values, n, scal, mu_e_sens, i_cbar)
                    if g_m is not None:
                        t_v = self._step_operators()["v_vec"]
                        ops["m"].multTranspose(lam_vec, t_v)
                        g_m.axpy(1.0, t_v)
                    # owned, already summed: the ghost slots carry nothing
                    ops["old"].multTranspose(lam_vec, b)
                    carry[k][:n_own] = carry2[k][:n_own] + b.array
                    carry[k][n_own:] = carry2[k][n_own:]
                    s_next[k] = s_next2[k] + g1 * sigma
                    s_next2[k] = g2 * sigma
                    if ops["old2"] is not None:
                        ops["old2"].multTranspose(lam_vec, b)
                        carry2[k][:n_own] = b.array
                        carry2[k][n_own:] = 0.0
                    continue
                sigma = self._add_step_scalars(
                    keys, self._scalars_local(dFl), n, scal, mu_e_sens, i_cbar
                )
                if g_m is not None:
                    dolfinx.fem.petsc.assemble_vector(g_m, dFl_dm)
                with b.localForm() as loc:
                    loc.set(0.0)
                dolfinx.fem.petsc.assemble_vector(b, rhs_old)
                with b.localForm() as loc:
                    carry[k][:] = carry2[k] + loc.array
                s_next[k] = s_next2[k] + g1 * sigma
                s_next2[k] = g2 * sigma
                if rhs_old2 is not None:
                    with b.localForm() as loc:
                        loc.set(0.0)
                    dolfinx.fem.petsc.assemble_vector(b, rhs_old2)
                    with b.localForm() as loc:
                        carry2[k][:] = loc.array
        out = []
        for k in range(K):
            # dJ/du_0 (the initial state is a parameter when "initial" is learned).
            b = self._rhs(carry[k], sources[k], 0, s_next[k])
            out.append((self._finish(*acc[k], self._c_owned(b)), lambdas[k]))
        return out

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
        return self.tangent_many(traj, [direction])[0]

    def tangent_many(self, traj: Trajectory, directions: list) -> list[list[np.ndarray]]:
        """:meth:`tangent` for several directions: one J factorisation per step for all."""
        N = traj.n_steps
        self.factors.bind(traj)
        rhs = self._form("tlm_rhs", self._tlm_rhs_ufl)
        outs = []
        for d in directions:
            du0 = np.zeros_like(self.du.x.array)
            if d.c0 is not None:
                du0[self.model.c_dofs] = d.c0[: len(self.model.c_dofs)]
            outs.append([du0])
        if len(directions) == 1:
            self._set_direction(directions[0])
        self._drop_stale_operators()
        # dm as vectors of V, made at the first step with operators (compiled then)
        dm_vecs: list[PETSc.Vec | None] | None = None
        b = self.b
        for n in range(1, N + 1):
            self.set_step(traj, n)
            self._use_step(n, keep=True)
            _, (g1, g2) = traj.weights(n)
            # the step's operators (kept with J_n, or assembled for a large batch): A du per
            # direction; None: one right-hand side assembled per direction
            ops = self._operators(n, batch=len(directions), keep=True)
            if ops is not None:
                keys = self._step_operators()["keys"]
                if dm_vecs is None:
                    dm_vecs = [self._dm_vec(d) for d in directions]
                for d, out, dm in zip(directions, outs, dm_vecs, strict=True):
                    self.du_old.x.array[:] = out[n - 1]
                    ds = g1 * self._mean_c_of(out[n - 1])
                    ops["old"].mult(self.du_old.x.petsc_vec, b)
                    if self.multistep:
                        self.du_old2.x.array[:] = out[max(n - 2, 0)]
                        if g2:
                            ds += g2 * self._mean_c_of(out[n - 2])
                        ops["old2"].multAdd(self.du_old2.x.petsc_vec, b, b)
                    if dm is not None:
                        ops["m"].multAdd(dm, b, b)
                    b.array[:] += ops["D"].T @ self._scalar_values(d, keys, n, ds)
                    b.scale(-1.0)
                    self._solve(False, b, self.du)
                    out.append(self.du.x.array.copy())
                continue
            for d, out in zip(directions, outs, strict=True):
                if len(directions) > 1:
                    self._set_direction(d)
                self.du_old.x.array[:] = out[n - 1]
                ds = g1 * self._mean_c_of(out[n - 1])
                if self.multistep:
                    self.du_old2.x.array[:] = out[max(n - 2, 0)]
                    if g2:
                        ds += g2 * self._mean_c_of(out[n - 2])
                self.dconst["cbar"][0].value = ds
                self.dconst["mu_e"][0].value = d.mu_e[n] if d.mu_e is not None else 0.0
                b = self._assemble_W(rhs)
                b.ghostUpdate(PETSc.InsertMode.ADD, PETSc.ScatterMode.REVERSE)
                b.scale(-1.0)
                self._solve(False, b, self.du)
                out.append(self.du.x.array.copy())
        for v in dm_vecs or []:
            if v is not None:
                v.destroy()
        return outs

    def _dm_vec(self, direction: Direction) -> PETSc.Vec | None:
        """The direction's dm as a vector of V (owned values), or None where it has none."""
        if direction.m is None:
            return None
        v = self._step_operators()["v_vec"].duplicate()
        v.array[:] = direction.m[: v.getLocalSize()]
        return v

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
    def second_order(
        self,
        traj: Trajectory,
        direction: Direction,
        lambdas: list,
        tangents: list,
        source2: Callable[[int, np.ndarray], None],
    ) -> Sensitivities:
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
        self.factors.bind(traj)
        keys = self._scalar_keys()
        i_cbar = self._cbar_index(keys)
        Wt = ufl.TestFunction(model.W)
        soa_self = self._form(
            "soa_self", lambda: self._directional(ufl.derivative(self.F_lam, model.u, Wt))
        )
        soa_old = self._form(
            "soa_old", lambda: self._directional(ufl.derivative(self.F_lam, model.u_old, Wt))
        )
        rhs_old = self._form("rhs_old", lambda: ufl.derivative(self.F_lam, model.u_old, Wt))
        dFl = self._scalar_form("dFl", keys, lambda var: _diff_form(self.F_lam, var))
        soa_dvar = self._scalar_form(
            "soa_dvar", keys, lambda var: self._directional(_diff_form(self.F_lam, var))
        )
        dFl_dm = self._form("dFl_dm", lambda: ufl.derivative(self.F_lam, model.m, self.v_test))
        soa_dm = self._form(
            "soa_dm", lambda: self._directional(ufl.derivative(self.F_lam, model.m, self.v_test))
        )
        soa_old2 = rhs_old2 = None
        if self.multistep:
            soa_old2 = self._form(
                "soa_old2",
                lambda: self._directional(ufl.derivative(self.F_lam, model.u_old2, Wt)),
            )
            rhs_old2 = self._form("rhs_old2", lambda: ufl.derivative(self.F_lam, model.u_old2, Wt))
        self._set_direction(direction)
        ds = [self._mean_c_of(t) for t in tangents]  # d s_n: mean of the tangent c
        dmu_e = direction.mu_e if direction.mu_e is not None else np.zeros(N + 1)

        def load(n: int) -> None:
            self.set_step(traj, n)
            self.lam.x.array[:] = lambdas[n]
            self.du.x.array[:] = tangents[n]
            self.du_old.x.array[:] = tangents[n - 1]
            _, (g1, g2) = traj.weights(n)
            d_cbar = g1 * ds[n - 1]
            if self.multistep:
                self.du_old2.x.array[:] = tangents[max(n - 2, 0)]
                if g2:
                    d_cbar += g2 * ds[n - 2]
            self.dconst["cbar"][0].value = d_cbar
            self.dconst["mu_e"][0].value = dmu_e[n]

        scal, g_m, mu_e_sens = self._new_sensitivities(N)
        lamhat = dolfinx.fem.Function(model.W)
        size = len(self.lam.x.array)
        carry, carry2 = np.zeros(size), np.zeros(size)
        s_coef, s_coef2 = 0.0, 0.0
        b, b2 = self.b, self.b2
        for n in range(N, 0, -1):
            load(n)
            _, (g1, g2) = traj.weights(n)
            self._rhs(carry, source2, n, s_coef, extra=soa_self).scale(-1.0)
            self._use_step(n)
            self._solve(True, b, lamhat)
            # Hessian action: D(lambda_n . dF_n/dtheta) + lamhat_n . dF_n/dtheta; the cbar parts
            # of both enter the recursion of steps n-1 and n-2 (with the carried vector terms).
            sigma = self._add_step_scalars(
                keys, self._scalars_local(soa_dvar), n, scal, mu_e_sens, i_cbar
            )
            if g_m is not None:
                dolfinx.fem.petsc.assemble_vector(g_m, soa_dm)
            for vec in (b, b2):
                with vec.localForm() as loc:
                    loc.set(0.0)
            dolfinx.fem.petsc.assemble_vector(b, soa_old)
            if soa_old2 is not None:
                dolfinx.fem.petsc.assemble_vector(b2, soa_old2)
            self.lam.x.array[:] = lamhat.x.array
            sigma += self._add_step_scalars(
                keys, self._scalars_local(dFl), n, scal, mu_e_sens, i_cbar
            )
            if g_m is not None:
                dolfinx.fem.petsc.assemble_vector(g_m, dFl_dm)
            dolfinx.fem.petsc.assemble_vector(b, rhs_old)
            if rhs_old2 is not None:
                dolfinx.fem.petsc.assemble_vector(b2, rhs_old2)
            with b.localForm() as loc:
                carry[:] = carry2 + loc.array
            with b2.localForm() as loc:
                carry2[:] = loc.array
            s_coef, s_coef2 = s_coef2 + g1 * sigma, g2 * sigma
        b = self._rhs(carry, source2, 0, s_coef)
        return self._finish(scal, g_m, mu_e_sens, self._c_owned(b))
