"""Taylor tests of the discrete adjoint, tangent and second-order adjoint, per parameter block.

The functional is the production pixel misfit (:class:`femkin.misfit.PixelMisfit`)
J = sum_frames |B c_n - d_n|^2 / (2 sigma^2) of one particle on a small square mesh; the
forward is replayed with the step sequence of the reference run, so J is a smooth function of
the parameters. Both time schemes (BDF2 and backward Euler) are tested. Rates:
|J(theta + h d) - J - h g.d| = O(h^2) and,
with the full Hessian term, O(h^3).
"""

from __future__ import annotations

import numpy as np
import pytest

from femkin._fem import MPI, dolfinx
from femkin.adjoint import Direction, ParticleDerivatives
from femkin.driving import Driving
from femkin.forward import ModelParameters, ParticleModel, SolverOptions
from femkin.misfit import PixelMisfit
from femkin.observation import build_observation

pytestmark = pytest.mark.mpi

PARAMS = ModelParameters(
    mu_h=(3.2, 0.0, 0.6),
    j0=(-0.6, 0.3),
    j0_prefactor=(0.5, 0.5),
    k0=1.5e-3,
    kappa=0.01,
    coherency=0.5,
)
SIGMA = 0.05
FRAMES = np.linspace(0.0, 240.0, 5)
KNOTS = Driving(FRAMES, 0.3 + 0.4 * np.arange(5))
SCALARS = ("mu_h", "j0", "k0", "kappa", "coherency")
#: Every global block (``lambda`` only enters the CIET law, see test_taylor_kinetics.py).
ALL_SCALARS = SCALARS + ("lambda",)
BLOCKS = SCALARS + ("m", "mu_e", "initial")


class Problem:
    """Model, data and derivative machinery of the misfit on one communicator."""

    def __init__(self, comm, scheme: str = "bdf2", params: ModelParameters = PARAMS):
        self.comm = comm
        self.scheme = scheme
        self.params = params
        mesh = dolfinx.mesh.create_rectangle(
            comm, [[0.0, 0.0], [0.6, 0.6]], [8, 8], dolfinx.mesh.CellType.triangle
        )
        self.model = ParticleModel(
            mesh, params, solver=SolverOptions(scheme=scheme), options_prefix="femkin_test_taylor_"
        )
        self.der = ParticleDerivatives(self.model)
        self.obs = build_observation(self.model.W.sub(0), np.ones((12, 12), dtype=int), 1, 0.05)
        self.x = self.model.V.tabulate_dof_coordinates()
        self.n_own = self.model.V.dofmap.index_map.size_local
        x, y = self.x[:, 0], self.x[:, 1]
        self.c0 = 0.2 + 0.1 * np.sin(7 * x) * np.cos(5 * y)
        self.m = 0.3 * np.cos(4 * x + 2 * y)
        self.model.set_m(self.m)
        traj = self.model.solve(FRAMES, KNOTS, self.c0)
        self.schedule = list(traj.times)
        # Synthetic data: the model plus a deterministic, coordinate-seeded perturbation.
        data = np.stack(
            [
                self.obs.apply(traj.state(n)) + SIGMA * np.sin(1.7 * self.obs.pixels + 0.3 * i)
                for i, n in enumerate(traj.frame_steps)
            ]
        )
        self.pixel_misfit = PixelMisfit(
            self.obs, data, np.full(data.shape, SIGMA**-2), include_first=True
        )
        self.J0, self.traj = self.misfit(self.base())
        self.source = self.pixel_misfit.source(self.traj)  # dJ/du_n at the reference run
        self.grad, self.lambdas = self.der.adjoint(self.traj, self.source, store=True)

    def base(self) -> dict:
        theta = dict(self.params.block_values())
        theta.update(m=self.m.copy(), mu_e=KNOTS.values.copy(), initial=self.c0.copy())
        return theta

    def misfit(self, theta: dict):
        model = self.model
        model.set_parameters(self.params.with_blocks({k: theta[k] for k in ALL_SCALARS}))
        model.set_m(theta["m"])
        traj = model.solve(
            FRAMES, Driving(FRAMES, theta["mu_e"]), theta["initial"], schedule=self.schedule
        )
        return self.comm.allreduce(self.pixel_misfit.cost(traj), op=MPI.SUM), traj

    def linear_source(self, tangents):
        """The Gauss-Newton source of tangent states at the reference trajectory."""
        return self.pixel_misfit.gauss_newton_source(self.traj, tangents)

    def direction(self, d: dict) -> Direction:
        return Direction(
            {k: d[k] for k in ALL_SCALARS if k in d},
            m=d.get("m"),
            mu_e=KNOTS.step_values(self.traj.times, d["mu_e"]) if "mu_e" in d else None,
            c0=d.get("initial"),
        )

    def pair(self, sens, d: dict) -> float:
        """<sensitivities, direction> with mu_e chained to the knots."""
        total = sum(float(np.dot(sens.scalars[k], d[k])) for k in ALL_SCALARS if k in d)
        if "mu_e" in d:
            knot_grad = KNOTS.knot_gradient(self.traj.times, sens.mu_e)
            total += float(np.dot(knot_grad, d["mu_e"]))
        local = 0.0
        if "m" in d:
            local += float(np.dot(sens.m, d["m"][: self.n_own]))
        if "initial" in d:
            local += float(np.dot(sens.c0, d["initial"][: self.n_own]))
        return total + self.comm.allreduce(local, op=MPI.SUM)

    def hessian(self, d: dict, gauss_newton: bool = False):
        self.model.set_parameters(self.params)  # a Taylor evaluation may have left others set
        self.model.set_m(self.m)
        direction = self.direction(d)
        tangents = self.der.tangent(self.traj, direction)
        src = self.linear_source(tangents)
        if gauss_newton:
            return self.der.adjoint(self.traj, src)[0]
        return self.der.second_order(self.traj, direction, self.lambdas, tangents, src)


def _direction(problem: Problem, blocks, seed: float = 0.0) -> dict:
    """A direction in the named blocks, a deterministic function of coordinates and seed."""
    x, y = problem.x[:, 0], problem.x[:, 1]
    full = {
        "mu_h": np.array([0.3, -0.2, 0.1]),
        "j0": np.array([0.2, 0.1]),
        "k0": np.array([0.3]),
        "kappa": np.array([0.004]),
        "coherency": np.array([0.3]),
        "lambda": np.array([0.25]),
        "m": 0.5 * np.sin(3 * x + seed) * np.cos(2 * y),
        "mu_e": 0.3 * np.cos(np.arange(KNOTS.values.size) + seed),
        "initial": 0.05 * np.cos(5 * x - seed) * np.sin(3 * y + 1.0),
    }
    out = {k: full[k] for k in blocks}
    if seed:
        for k in ALL_SCALARS:
            if k in out:
                out[k] = out[k] * np.cos(seed + np.arange(out[k].size))
    return out


def _perturbed(theta: dict, d: dict, h: float) -> dict:
    return {k: v + h * d[k] if k in d else v for k, v in theta.items()}


@pytest.fixture(scope="module", params=["bdf2", "euler"])
def problem(request):
    return Problem(MPI.COMM_WORLD, request.param)


@pytest.mark.parametrize("block", BLOCKS)
def test_taylor_rates(problem, block):
    """Gradient rate >= 1.9 and full-Hessian rate >= 2.9 in each parameter block."""
    d = _direction(problem, [block])
    gd = problem.pair(problem.grad, d)
    dHd = problem.pair(problem.hessian(d), d)
    hs = 0.1 * 2.0 ** -np.arange(4)
    r1, r2 = [], []
    theta = problem.base()
    for h in hs:
        Jh, _ = problem.misfit(_perturbed(theta, d, h))
        r1.append(abs(Jh - problem.J0 - h * gd))
        r2.append(abs(Jh - problem.J0 - h * gd - 0.5 * h * h * dHd))
    rate1 = np.min(np.log2(np.array(r1[:-1]) / np.array(r1[1:])))
    rate2 = np.min(np.log2(np.array(r2[:-1]) / np.array(r2[1:])))
    assert abs(gd) > 1e-6, f"{block}: the gradient in this direction is (nearly) zero: {gd}"
    assert rate1 >= 1.9, f"{block}: gradient Taylor rate {rate1:.3f}, residuals {r1}"
    assert rate2 >= 2.9, f"{block}: Hessian Taylor rate {rate2:.3f}, residuals {r2}"


@pytest.mark.parametrize("gauss_newton,tol", [(True, 1e-8), (False, 1e-6)])
def test_hessian_symmetric(problem, gauss_newton, tol):
    """<H u, v> = <u, H v> for directions spanning every block."""
    u = _direction(problem, BLOCKS, seed=0.0)
    v = _direction(problem, BLOCKS, seed=1.3)
    huv = problem.pair(problem.hessian(u, gauss_newton), v)
    hvu = problem.pair(problem.hessian(v, gauss_newton), u)
    rel = abs(huv - hvu) / max(abs(huv), abs(hvu))
    assert rel < tol, f"<Hu,v> = {huv!r}, <u,Hv> = {hvu!r}, relative {rel:.3g}"
    if gauss_newton:  # and positive semidefinite
        assert problem.pair(problem.hessian(u, True), u) > 0


def _gathered_m(problem: Problem, values: np.ndarray) -> np.ndarray:
    x = problem.x[: problem.n_own, :2]
    xs = np.concatenate(problem.comm.allgather(x))
    vs = np.concatenate(problem.comm.allgather(values[: problem.n_own]))
    order = np.lexsort((np.round(xs[:, 0], 10), np.round(xs[:, 1], 10)))
    return vs[order]


def test_derivatives_independent_of_rank_count(problem):
    """Gradient and a Hessian action on COMM_WORLD equal those on COMM_SELF (relative 1e-8)."""
    ref = Problem(MPI.COMM_SELF, problem.scheme)
    d = _direction(problem, BLOCKS, seed=0.7)
    d_ref = _direction(ref, BLOCKS, seed=0.7)
    assert abs(problem.J0 - ref.J0) <= 1e-10 * abs(ref.J0)
    for sens, sens_ref in ((problem.grad, ref.grad), (problem.hessian(d), ref.hessian(d_ref))):
        for k in SCALARS:
            err = np.max(np.abs(sens.scalars[k] - sens_ref.scalars[k]))
            assert err <= 1e-8 * np.max(np.abs(sens_ref.scalars[k])), (k, err)
        gm, gm_ref = _gathered_m(problem, sens.m), _gathered_m(ref, sens_ref.m)
        assert gm.shape == gm_ref.shape
        err = np.max(np.abs(gm - gm_ref)) / np.max(np.abs(gm_ref))
        assert err <= 1e-8, f"m-gradient differs by {err:.3g} (relative)"
        assert abs(problem.pair(sens, d) - ref.pair(sens_ref, d_ref)) <= 1e-8 * abs(
            ref.pair(sens_ref, d_ref)
        )
