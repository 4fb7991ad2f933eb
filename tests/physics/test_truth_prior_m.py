"""``[simulate] m_field = "prior"``: the true m of a twin drawn from the BiLaplacian prior.

The sample must not depend on the partition (white noise hashed from rounded coordinates), must
change with the seed, and must have the prior's pointwise spread: over 40 seeds the sample std
at the centre of a square matches the prior's exact pointwise std there.
"""

from __future__ import annotations

import numpy as np
import pytest

from femkin._fem import MPI, dolfinx
from femkin.prior import BiLaplacianPrior
from femkin.twin import prior_m

pytestmark = pytest.mark.mpi


def _space(comm):
    mesh = dolfinx.mesh.create_rectangle(
        comm, [[0.0, 0.0], [1.0, 1.0]], [16, 16], dolfinx.mesh.CellType.triangle
    )
    return dolfinx.fem.functionspace(mesh, ("Lagrange", 1))


def _sorted_global(V, values: np.ndarray) -> np.ndarray:
    """Owned values of all ranks, ordered by rounded coordinates (same on any partition)."""
    n = V.dofmap.index_map.size_local
    x = np.round(V.tabulate_dof_coordinates()[:n, :2], 8)
    xs = np.concatenate(V.mesh.comm.allgather(x))
    vs = np.concatenate(V.mesh.comm.allgather(values[:n]))
    order = np.lexsort((xs[:, 1], xs[:, 0]))
    return vs[order]


def test_prior_sample_is_partition_independent_and_seeded():
    V = _space(MPI.COMM_WORLD)
    ref_V = _space(MPI.COMM_SELF)
    a = _sorted_global(V, prior_m(V, 0.5, 0.2, seed=7, label=1))
    b = _sorted_global(ref_V, prior_m(ref_V, 0.5, 0.2, seed=7, label=1))
    c = _sorted_global(V, prior_m(V, 0.5, 0.2, seed=8, label=1))
    assert np.max(np.abs(a - b)) < 1e-10 * np.max(np.abs(b))
    assert np.max(np.abs(a - c)) > 0.1  # another seed, another field


def test_prior_sample_has_the_prior_spread():
    V = _space(MPI.COMM_SELF)
    x = V.tabulate_dof_coordinates()
    centre = int(np.argmin(np.sum((x[:, :2] - 0.5) ** 2, axis=1)))
    samples = np.array([prior_m(V, 0.5, 0.2, seed=s, label=1)[centre] for s in range(40)])
    prior = BiLaplacianPrior(V, 0.5, 0.2)
    exact = np.sqrt(prior.pointwise_variance("exact")[centre])
    prior.destroy()
    # 40 samples: the std estimate has a relative standard error of ~11%.
    assert abs(samples.std() / exact - 1.0) < 0.35, (samples.std(), exact)
    assert abs(samples.mean()) < 3 * exact / np.sqrt(40)
