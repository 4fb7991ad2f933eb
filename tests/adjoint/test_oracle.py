"""The femkin discrete adjoint against dolfinx-adjoint (pyadjoint's DOLFINx port).

The same discrete problem (8x8 rectangle, the ACR residual of :mod:`femkin.physics.acr` with
quadrature degree 4, four fixed steps of unequal size, backward Euler or BDF2 (with its
extrapolated cbar)) is recorded on
pyadjoint's tape. Point evaluation of pixels is not taped by dolfinx-adjoint, so the
functional is the L2 misfit J = sum_f 1/2 int (c_f - d_f)^2 / sigma^2 dx, and femkin's adjoint
is driven by the same functional through its ``source`` callback. Gradients with respect to
every scalar block (mu_h, j0, ln k0, kappa, coherency) and the nodal values of m agree to 1e-8,
under the default kinetic law and under CIET (with ln lambda, and without the j0 block).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("dolfinx_adjoint")


from _common import PARAMETERS, TapedProblem, initial_fields, l2_data, l2_misfit_source

from femkin._fem import MPI, dolfinx
from femkin.adjoint import ParticleDerivatives
from femkin.blocks import blocks_unused_by
from femkin.driving import Driving
from femkin.forward import ParticleModel, SolverOptions

CIET = dataclasses.replace(PARAMETERS, kinetics="ciet", j0=(), k0=4e-2, lambda_=8.3)


@pytest.mark.parametrize(
    "scheme,params",
    [("bdf2", PARAMETERS), ("euler", PARAMETERS), ("bdf2", CIET)],
    ids=["bdf2", "euler", "bdf2-ciet"],
)
def test_gradient_matches_dolfinx_adjoint(scheme, params):
    comm = MPI.COMM_WORLD
    mesh = dolfinx.mesh.create_rectangle(
        comm, [[0.0, 0.0], [0.4, 0.4]], [8, 8], dolfinx.mesh.CellType.triangle
    )
    solver = SolverOptions(newton_rtol=1e-13, newton_atol=1e-14, scheme=scheme)
    model = ParticleModel(
        mesh, params, solver=solver, quadrature_degree=4, options_prefix="oracle_forward_"
    )
    c0, m = initial_fields(model.V)
    model.set_m(m)
    frames = [0.0, 100.0, 200.0]
    driving = Driving(frames, [-1.0, -2.0, -2.5])
    traj = model.solve(frames, driving, c0, schedule=[0.0, 40.0, 100.0, 130.0, 200.0])
    assert traj.n_steps == 4
    data = l2_data(model, traj)
    J, source = l2_misfit_source(model, traj, data)
    sens, _ = ParticleDerivatives(model).adjoint(traj, source)

    taped = TapedProblem(model, traj, data, driving)
    assert abs(float(taped.J) - J) <= 1e-10 * abs(J)  # the same forward trajectory
    scalars, g_m = taped.gradient()
    # the blocks outside the law are not taped; their femkin sensitivity is exactly zero
    unused = set(sens.scalars) - set(scalars)
    assert unused <= set(blocks_unused_by(params.kinetics, sens.scalars)), unused
    assert ("lambda" in scalars) == (params.kinetics == "ciet")
    for name in unused:
        assert not np.any(sens.scalars[name]), name
    for name, ref in scalars.items():
        ours = sens.scalars[name]
        assert ref.shape == ours.shape, name
        scale = np.max(np.abs(ref))
        assert scale > 0.0, name  # every block has a nonzero gradient here
        assert np.max(np.abs(ours - ref)) <= 1e-8 * scale, (name, ours, ref)
    diff = comm.allreduce(float(np.max(np.abs(sens.m - g_m), initial=0.0)), op=MPI.MAX)
    scale = comm.allreduce(float(np.max(np.abs(g_m), initial=0.0)), op=MPI.MAX)
    assert scale > 0.0
    assert diff <= 1e-8 * scale
