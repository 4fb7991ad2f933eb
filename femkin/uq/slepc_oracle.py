"""SLEPc Krylov-Schur on shell operators: the accuracy oracle for the randomised eigensolver.

Solves the same generalised Hermitian problem ``H v = lambda B v`` (``B`` the prior
precision) with SLEPc's Krylov-Schur method, using only operator actions: ``H`` and ``B`` are
Python shell ``Mat``s. The shift spectral transform with ``sigma = 0`` needs solves with
``B``; SLEPc's default (``preonly`` + LU) would need an assembled matrix, so its KSP is
``preonly`` with a Python ``PC`` that applies ``B^{-1}`` (the prior covariance) exactly.
SLEPc then iterates on ``B^{-1} H`` in the B-inner product. Collective on the vectors'
communicator.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from femkin._fem import PETSc
from femkin.petsc_tools import ApplyContext, shell_mat
from femkin.uq.randomized import Eigenpairs, as_apply, gram

try:  # pragma: no cover - import order of the wheel
    import slepc4py

    slepc4py.init()
    from slepc4py import SLEPc
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        "femkin.uq.slepc_oracle needs slepc4py (part of dolfinx-solver-real)"
    ) from exc

__all__ = ["slepc_generalized"]


def _shell(apply, template: PETSc.Vec) -> PETSc.Mat:
    return shell_mat(template.getSizes(), template.getComm(), apply=apply, symmetric=True)


def slepc_generalized(
    apply_H,
    apply_B,
    apply_Binv,
    template: PETSc.Vec,
    k: int,
    *,
    tol: float = 1e-12,
    max_it: int = 1000,
    ncv: int | None = None,
    initial: Sequence[PETSc.Vec] = (),
) -> Eigenpairs:
    """The ``k`` largest eigenpairs of ``H v = lambda B v`` by Krylov-Schur (SLEPc GHEP).

    Args:
        apply_H: ``out = H x`` (symmetric), callable ``(x, out)`` or ``Mat``.
        apply_B: ``out = B x`` (symmetric positive definite).
        apply_Binv: ``out = B^{-1} x``.
        template: a vector with the parameter layout.
        k: number of pairs.
        tol: SLEPc's relative residual tolerance.
        max_it: iteration cap.
        ncv: Krylov subspace dimension (SLEPc's default when ``None``).
        initial: optional starting vectors (seeded by the caller, for reproducibility).

    Returns:
        ``Eigenpairs``: eigenvalues descending and eigenvectors with ``V^T B V = I``.

    Raises:
        RuntimeError: when fewer than ``k`` pairs converge (SLEPc's reason is in the message).
    """
    apply_H, apply_B, apply_Binv = as_apply(apply_H), as_apply(apply_B), as_apply(apply_Binv)
    comm = template.getComm()
    h, b = _shell(apply_H, template), _shell(apply_B, template)
    eps = SLEPc.EPS().create(comm=comm)
    eps.setOperators(h, b)
    eps.setProblemType(SLEPc.EPS.ProblemType.GHEP)
    eps.setType(SLEPc.EPS.Type.KRYLOVSCHUR)
    eps.setWhichEigenpairs(SLEPc.EPS.Which.LARGEST_REAL)
    eps.setDimensions(nev=k, ncv=ncv if ncv is not None else PETSc.DECIDE)
    eps.setTolerances(tol=tol, max_it=max_it)
    st = eps.getST()
    st.setType(SLEPc.ST.Type.SHIFT)
    st.setShift(0.0)
    ksp = st.getKSP()
    ksp.setType(PETSc.KSP.Type.PREONLY)
    pc = ksp.getPC()
    pc.setType(PETSc.PC.Type.PYTHON)
    pc.setPythonContext(ApplyContext(apply_Binv))
    if initial:
        eps.setInitialSpace(list(initial))
    eps.solve()
    nconv = eps.getConverged()
    if nconv < k:
        reason = eps.getConvergedReason()
        raise RuntimeError(f"SLEPc converged {nconv} of {k} eigenpairs (reason {reason})")
    found, vectors = [], []
    for i in range(nconv):
        v = template.duplicate()
        lam = eps.getEigenpair(i, v)
        found.append(lam.real)
        vectors.append(v)
    order = np.argsort(found)[::-1][:k]
    values = np.asarray(found)[order]
    vectors = [vectors[i] for i in order]
    # Normalise in the B-inner product (SLEPc already does for GHEP; make it explicit).
    for v in vectors:
        bv = v.duplicate()
        apply_B(v, bv)
        v.scale(1.0 / np.sqrt(gram([v], [bv])[0, 0]))
        bv.destroy()
    eps.destroy()
    h.destroy()
    b.destroy()
    return Eigenpairs(values, vectors)
