"""Small PETSc building blocks used in several places: shell matrices and the mass-matrix CG.

Kept in one module (imported explicitly, like DOLFINx's ``fem/petsc.py``) so that the
physics and the parameter layout stay free of PETSc object plumbing.
"""

from __future__ import annotations

from collections.abc import Callable

from femkin._fem import MPI, PETSc, dolfinx, ufl

#: ``y = Op x`` on PETSc vectors.
Apply = Callable[[PETSc.Vec, PETSc.Vec], None]


class ApplyContext:
    """Python ``Mat``/``PC`` context applying ``f(x, y)`` (``mult``: Mat, ``apply``: PC)."""

    def __init__(self, f: Apply):
        self.f = f

    def mult(self, mat, x, y):
        """``y = f(x)`` as a Mat action."""
        self.f(x, y)

    def apply(self, pc, x, y):
        """``y = f(x)`` as a preconditioner application."""
        self.f(x, y)


def shell_mat(
    sizes: tuple[int, int] | tuple[tuple[int, int], tuple[int, int]],
    comm: MPI.Comm,
    *,
    apply: Apply | None = None,
    context: object | None = None,
    symmetric: bool = False,
) -> PETSc.Mat:
    """A square Python (shell) Mat on ``comm`` whose action is ``apply`` or ``context.mult``.

    Args:
        sizes: ``(local, global)`` rows, used for the columns too (or PETSc's full pair).
        comm: the communicator.
        apply: ``apply(x, y)`` computes ``y = A x``; or
        context: a Python Mat context (``mult(mat, x, y)``, and e.g. ``shift``).
        symmetric: mark the Mat symmetric (eigensolvers and CG may use it).

    Raises:
        ValueError: neither or both of ``apply`` and ``context`` given.
    """
    if apply is not None and context is None:
        context = ApplyContext(apply)
    elif (apply is None) == (context is None):
        raise ValueError("shell_mat needs exactly one of apply and context")
    size = sizes if isinstance(sizes[0], tuple) else (sizes, sizes)
    mat = PETSc.Mat().createPython(size, context=context, comm=comm)
    if symmetric:
        mat.setOption(PETSc.Mat.Option.SYMMETRIC, True)
    mat.setUp()
    return mat


def mass_matrix(V) -> PETSc.Mat:
    """The assembled mass matrix ``(u, v)`` of a scalar function space ``V``."""
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    M = dolfinx.fem.petsc.assemble_matrix(dolfinx.fem.form(u * v * ufl.dx))
    M.assemble()
    return M


def mass_solver(M: PETSc.Mat) -> PETSc.KSP:
    """Jacobi-preconditioned CG on a mass matrix, to rtol 1e-14 (a well-conditioned SPD solve).

    Check ``getConvergedReason() > 0`` after each solve (:func:`solved`).
    """
    ksp = PETSc.KSP().create(M.getComm())
    ksp.setOperators(M)
    ksp.setType("cg")
    ksp.getPC().setType("jacobi")
    ksp.setTolerances(rtol=1e-14, atol=1e-300, max_it=1000)
    return ksp


def solved(ksp: PETSc.KSP, b: PETSc.Vec, x: PETSc.Vec) -> bool:
    """Solve ``ksp`` for ``x`` from ``b``; whether it converged (``getConvergedReason() > 0``)."""
    ksp.solve(b, x)
    return ksp.getConvergedReason() > 0
