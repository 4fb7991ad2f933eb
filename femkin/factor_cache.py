"""Kept LU factorisations of the step Jacobians J_n of one forward trajectory.

J_n depends only on the trajectory and the parameters, so one factorisation per step serves
every tangent, adjoint and second-order solve at the same point (a Newton-CG inner loop, the
eigensolver's passes of a Laplace approximation). A :class:`FactorCache` keeps them within a
memory budget per process (``[solver] factor_cache_mb``) and forgets them when the trajectory
or the parameters change. On one rank PETSc's own LU is kept; on several ranks MUMPS, whose
factorisations each hold an MPI communicator (MPICH has 2048), so their number per process is
bounded across all caches (:attr:`FactorCache.MUMPS_LIMIT`).
"""

from __future__ import annotations

import weakref

from femkin._fem import MPI, PETSc, dolfinx


class FactorCache:
    """Factorised step Jacobians of one :class:`~femkin.forward.ParticleModel`, by step.

    Usage: :meth:`bind` once per recursion over a trajectory (drops what belongs to another
    trajectory or other parameters); then per step, with the model at that step,
    :meth:`get` what is kept or :meth:`factorise` and keep it (None when the budget is spent).

    Args:
        model: the particle model (its ``J`` form, matrix layout and solver options).
    """

    #: Kept MUMPS factorisations per process, over all caches.
    MUMPS_LIMIT = 256
    _mumps_kept = 0

    def __init__(self, model):
        self.model = model
        self._ksps: dict[int, PETSc.KSP] = {}
        self._of = None
        self._key = None
        #: Memory of the kept steps (bytes, estimated; see :meth:`step_bytes`); what is kept
        #: beside a step's factorisation (:class:`~femkin.adjoint.ParticleDerivatives` keeps
        #: the step's derivative operators) is added here and counts against the budget.
        self.bytes = 0.0
        self._extra_bytes = 0.0
        #: Incremented whenever the kept factorisations are dropped: what was kept beside them
        #: under an older generation is stale.
        self.generation = 0
        self._step_bytes: float | None = None

    # -- public queries -------------------------------------------------------------------
    @classmethod
    def mumps_kept(cls) -> int:
        """Kept MUMPS factorisations of this process (all caches)."""
        return cls._mumps_kept

    def __len__(self) -> int:
        return len(self._ksps)

    def __contains__(self, n: int) -> bool:
        return n in self._ksps

    def steps(self) -> list[int]:
        """The steps whose factorisation is kept."""
        return sorted(self._ksps)

    def get(self, n: int) -> PETSc.KSP | None:
        """The solver of the kept J_n, or None."""
        return self._ksps.get(n)

    @property
    def step_bytes(self) -> float | None:
        """Estimated memory of one kept step (matrix, factors and what is kept beside them,
        :meth:`add_kept`), once one was kept.
        """
        if self._step_bytes is None:
            return None
        return self._step_bytes + self._extra_bytes

    # -- validity -------------------------------------------------------------------------
    def fingerprint(self) -> tuple:
        """The model's parameters (not the per-step constants mu_e, cbar) and m."""
        m = self.model
        consts = tuple(
            float(c.value)
            for name, v in m.constants.items()
            if name not in ("mu_e", "cbar")
            for c in v
        )
        return consts, hash(m.m.x.array.tobytes())

    def bind(self, traj) -> None:
        """Drop the kept factorisations unless they belong to ``traj`` and the parameters.

        Call once per recursion over ``traj``, before its first :meth:`get`.
        """
        key = self.fingerprint()
        if self._of is None or self._of() is not traj or self._key != key:
            self.clear()
            self._of = weakref.ref(traj)
            self._key = key

    def clear(self) -> None:
        """Free every kept factorisation (collective on the model's communicator)."""
        for ksp in self._ksps.values():
            if ksp.getPC().getFactorSolverType() == "mumps":
                FactorCache._mumps_kept -= 1
            A = ksp.getOperators()[0]
            ksp.destroy()
            A.destroy()
        self._ksps = {}
        self._of = None
        self._key = None
        self.bytes = 0.0
        self.generation += 1

    def release_count(self) -> None:
        """Forget this cache's MUMPS count without collective calls (for finalisers)."""
        FactorCache._mumps_kept -= sum(
            ksp.getPC().getFactorSolverType() == "mumps" for ksp in self._ksps.values()
        )
        self._ksps = {}

    # -- keeping --------------------------------------------------------------------------
    def factorise(self, n: int) -> PETSc.KSP | None:
        """Factorise J at the model's current step into a new matrix and keep it as step n.

        Returns the solver, or None (nothing done) when the budget or the MUMPS limit is
        reached. Collective: every rank of the particle decides alike.
        """
        m = self.model
        budget = 2.0**20 * m.solver_options.factor_cache_mb
        estimate = self.step_bytes or 0.0
        comm = m.comm
        mumps = comm.size > 1
        full = (
            budget <= 0
            or self.bytes + estimate > budget
            or (mumps and FactorCache._mumps_kept >= self.MUMPS_LIMIT)
        )
        if comm.allreduce(bool(full), op=MPI.LOR):
            return None
        A = m.A.duplicate(copy=False)
        dolfinx.fem.petsc.assemble_matrix(A, m.J)
        A.assemble()
        ksp = PETSc.KSP().create(comm)
        ksp.setOperators(A)
        ksp.setType("preonly")
        pc = ksp.getPC()
        pc.setType("lu")
        if mumps:
            pc.setFactorSolverType("mumps")
            FactorCache._mumps_kept += 1
        else:
            pc.setFactorSolverType("petsc")
            pc.setFactorOrdering("nd")
        ksp.setUp()
        if self._step_bytes is None:
            self._step_bytes = comm.allreduce(self._estimate_bytes(A, pc), op=MPI.MAX)
        self.bytes += self._step_bytes
        self._ksps[n] = ksp
        return ksp

    def add_kept(self, nbytes: float) -> None:
        """Count ``nbytes`` kept beside the step just factorised (about the same for every
        step, e.g. its derivative operators): in :attr:`bytes`, and in :attr:`step_bytes`, the
        budget's estimate of one step.
        """
        self.bytes += nbytes
        self._extra_bytes = max(self._extra_bytes, nbytes)

    @staticmethod
    def _estimate_bytes(A: PETSc.Mat, pc: PETSc.PC) -> float:
        """Memory of a kept step: the matrix and its factors (8-byte values, 4-byte indices)."""
        nnz = A.getInfo()["nz_used"]
        try:
            nnz_f = pc.getFactorMatrix().getInfo()["nz_used"]
        except PETSc.Error:  # pragma: no cover - solver without MatGetInfo
            nnz_f = 0.0
        if nnz_f <= 0:
            nnz_f = 20.0 * nnz  # a generous fill for 2-D P1 meshes
        return 12.0 * (nnz + nnz_f)
