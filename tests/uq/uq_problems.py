"""Linear-Gaussian test problems on a DOLFINx P1 mesh, with dense references.

Parameter: a P1 field m on the unit square (owned dofs in a plain, non-ghosted PETSc Vec).
Prior: BiLaplacian precision ``B = A M_L^{-1} A``, ``A = gamma K + delta M``, ``M_L`` the lumped
mass; ``Gamma_prior = A^{-1} M_L A^{-1}`` (two CG solves). Observations: ``d = F m + noise``,
``F[j, i] = M_L[i] * kernel(x_i - p_j)`` (weighted local averages around seeded points), noise
std ``sigma``, so ``H = F^T F / sigma^2`` exactly. Everything random is seeded from global
coordinates, so the problem and the probes do not depend on the partition.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from femkin._fem import MPI, PETSc, dolfinx, ufl


class Problem(NamedTuple):
    comm: MPI.Comm
    template: PETSc.Vec
    apply_H: object
    apply_B: object
    apply_Binv: object
    prior_sample: object  # (seed) -> Vec, a sample of N(0, Gamma_prior)
    make_probe: object  # (i) -> Vec, standard normal entries seeded by (i, coordinates)
    gather: object  # Vec -> global numpy array (PETSc global ordering, every rank)
    scatter: object  # global numpy array -> new Vec
    dense_H: np.ndarray
    dense_B: np.ndarray
    n_obs: int
    keep: tuple  # mesh, space, matrix, solver: their communicators must outlive the vectors


def _canonical_order(comm: MPI.Comm, coords: np.ndarray) -> tuple[np.ndarray, int]:
    """Index of each owned dof in a lexicographic ordering of all dof coordinates."""
    all_coords = np.concatenate(comm.allgather(coords))
    order = np.lexsort((all_coords[:, 1].round(12), all_coords[:, 0].round(12)))
    rank_of = np.empty_like(order)
    rank_of[order] = np.arange(order.size)
    offset = sum(comm.allgather(coords.shape[0])[: comm.rank])
    return rank_of[offset : offset + coords.shape[0]], all_coords.shape[0]


def make_problem(
    comm: MPI.Comm,
    *,
    n: int = 8,
    n_obs: int = 12,
    sigma: float = 0.05,
    width: float = 0.12,
    gamma: float = 0.05,
    delta: float = 1.0,
    seed: int = 1234,
) -> Problem:
    """Build the linear-Gaussian problem on an ``n x n`` triangle mesh of the unit square."""
    msh = dolfinx.mesh.create_unit_square(comm, n, n)
    V = dolfinx.fem.functionspace(msh, ("Lagrange", 1))
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    a = dolfinx.fem.form(
        gamma * ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx + delta * ufl.inner(u, v) * ufl.dx
    )
    A = dolfinx.fem.petsc.assemble_matrix(a)
    A.assemble()
    ml_form = dolfinx.fem.form(v * ufl.dx)
    ml = dolfinx.fem.petsc.assemble_vector(ml_form)
    ml.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
    n_owned = V.dofmap.index_map.size_local
    ml_owned = ml.array_r[:n_owned].copy()
    ml.destroy()

    template = A.createVecRight()
    ksp = PETSc.KSP().create(comm)
    ksp.setOperators(A)
    ksp.setType("cg")
    ksp.getPC().setType("jacobi")
    ksp.setTolerances(rtol=1e-14, atol=1e-300, max_it=10000)

    def solve_A(b, x):
        ksp.solve(b, x)
        if ksp.getConvergedReason() <= 0:
            raise RuntimeError(f"CG did not converge: {ksp.getConvergedReason()}")

    work = template.duplicate()

    def apply_B(x, out):
        A.mult(x, work)
        work.array[:] /= ml_owned
        A.mult(work, out)

    def apply_Binv(x, out):
        solve_A(x, work)
        work.array[:] *= ml_owned
        solve_A(work, out)

    coords = V.tabulate_dof_coordinates()[:n_owned, :2]
    canon, n_global = _canonical_order(comm, coords)
    rng = np.random.default_rng(seed)
    points = rng.uniform(0.1, 0.9, size=(n_obs, 2))
    dist2 = ((coords[None, :, :] - points[:, None, :]) ** 2).sum(axis=2)
    f_local = ml_owned[None, :] * np.exp(-dist2 / (2 * width**2)) / (2 * np.pi * width**2)

    def apply_H(x, out):
        fx = comm.allreduce(f_local @ x.array_r, op=MPI.SUM)
        out.array[:] = f_local.T @ fx / sigma**2

    def make_probe(i):
        w = template.duplicate()
        w.array[:] = np.random.default_rng([seed, 7, i]).standard_normal(n_global)[canon]
        return w

    def prior_sample(i):
        # Gamma_prior = A^{-1} M_L A^{-1}: x = A^{-1} M_L^{1/2} z, z white on the canonical order.
        z = template.duplicate()
        z.array[:] = (
            np.sqrt(ml_owned)
            * (np.random.default_rng([seed, 11, i]).standard_normal(n_global)[canon])
        )
        x = template.duplicate()
        solve_A(z, x)
        z.destroy()
        return x

    def gather(x):
        return np.concatenate(comm.allgather(np.asarray(x.array_r)))

    lo, hi = template.getOwnershipRange()

    def scatter(arr):
        w = template.duplicate()
        w.array[:] = np.asarray(arr)[lo:hi]
        return w

    f_dense = np.concatenate(comm.allgather(f_local.T)).T
    dense_H = f_dense.T @ f_dense / sigma**2
    dense_B = np.empty((n_global, n_global))
    e, be = template.duplicate(), template.duplicate()
    for j in range(n_global):
        e.zeroEntries()
        if lo <= j < hi:
            e.array[j - lo] = 1.0
        apply_B(e, be)
        dense_B[:, j] = gather(be)
    return Problem(
        comm,
        template,
        apply_H,
        apply_B,
        apply_Binv,
        prior_sample,
        make_probe,
        gather,
        scatter,
        0.5 * (dense_H + dense_H.T),
        0.5 * (dense_B + dense_B.T),
        n_obs,
        (msh, V, A, ksp),
    )


def unit_vectors(problem: Problem) -> list[PETSc.Vec]:
    """All global unit vectors e_j in the PETSc global ordering."""
    n_global = problem.template.getSize()
    out = []
    for j in range(n_global):
        e = np.zeros(n_global)
        e[j] = 1.0
        out.append(problem.scatter(e))
    return out


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """Relative Frobenius difference ``|a - b| / |b|``."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def simulated_twin(prefix: str, max_iterations: int, extra_toml: str):
    """Collective: a tiny twin case (``tests/workflow_case.py``) in a fresh temporary root, with
    ``extra_toml`` appended to its case file, simulated on every rank. Returns (root, case)."""
    import pathlib
    import tempfile

    from workflow_case import write_case

    from femkin.cli import main

    comm = MPI.COMM_WORLD
    root = tempfile.mkdtemp(prefix=prefix) if comm.rank == 0 else None
    root = pathlib.Path(comm.bcast(root, root=0))
    case = root / "case"
    if comm.rank == 0:
        write_case(case, max_iterations=max_iterations)
        with open(case / "case.toml", "a") as f:
            f.write(extra_toml)
    comm.barrier()
    assert main(["simulate", str(case), "--quiet"]) == 0
    return root, case


def simulated_twin_fixture(prefix: str, extra_toml: str):
    """Body of a module fixture: the tiny twin simulated (no fit: analyses run at its initial
    point), yielded, and removed afterwards (collective)."""
    import shutil

    comm = MPI.COMM_WORLD
    root, case = simulated_twin(prefix, 2, extra_toml)
    yield case
    comm.barrier()
    if comm.rank == 0:
        shutil.rmtree(root, ignore_errors=True)
