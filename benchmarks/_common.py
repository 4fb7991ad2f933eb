"""Shared set-up of the femkin benchmarks: a demo-sized particle, its observation and data.

The demo particle is label 1 of ``cases/demo/data/video.npz`` when that file exists, else a
synthetic elliptical platelet of similar size (40 x 24 pixels of 0.05 um) so that the
benchmarks run on a fresh checkout. Meshes come from :func:`femkin.meshing.mesh_particle`.
Also builds the same discrete problem on dolfinx-adjoint's tape (used by the benchmark and
by ``tests/adjoint/test_oracle.py``).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any

import numpy as np

import femkin._fem  # noqa: F401  (dolfinx_solver before dolfinx)
from femkin._fem import MPI, PETSc, dolfinx, ufl
from femkin.blocks import blocks_unused_by
from femkin.driving import Driving
from femkin.forward import ModelParameters, ParticleModel, SolverOptions
from femkin.meshing import mesh_particle
from femkin.misfit import PixelMisfit
from femkin.observation import build_observation
from femkin.physics import acr

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO_VIDEO = ROOT / "cases" / "demo" / "data" / "video.npz"

PARAMETERS = ModelParameters(
    mu_h=(3.2, 0.0, 0.6),
    j0=(-0.6, 0.3),
    j0_prefactor=(0.5, 0.5),
    k0=1.5e-3,
    kappa=0.01,
    coherency=0.5,
)
FRAMES = np.linspace(0.0, 300.0, 6)
MU_E = -1.0 - 0.5 * np.arange(6)
SIGMA = 0.05


def demo_mask() -> tuple[np.ndarray, int, float, str]:
    """(mask, label, pixel_size, source) of the demo particle (or the synthetic stand-in)."""
    if DEMO_VIDEO.is_file():
        with np.load(DEMO_VIDEO) as z:
            return np.asarray(z["mask"]), 1, float(z["pixel_size"]), str(DEMO_VIDEO)
    rows, cols = np.mgrid[0:32, 0:48]
    mask = (((cols - 23.5) / 20.0) ** 2 + ((rows - 15.5) / 12.0) ** 2 <= 1.0).astype(int)
    return mask, 1, 0.05, "synthetic ellipse 40x24 px (cases/demo/data/video.npz absent)"


def initial_fields(V) -> tuple[np.ndarray, np.ndarray]:
    """Smooth, coordinate-seeded c0 and m on the P1 space V (owned + ghosts)."""
    x = V.tabulate_dof_coordinates()
    c0 = 0.2 + 0.1 * np.sin(7 * x[:, 0]) * np.cos(5 * x[:, 1])
    m = 0.3 * np.cos(4 * x[:, 0] + 2 * x[:, 1])
    return c0, m


@dataclasses.dataclass
class Problem:
    """A particle model with its fields, driving, observation and data."""

    model: ParticleModel
    mask: np.ndarray
    source: str
    size: float
    c0: np.ndarray
    m: np.ndarray
    driving: Driving
    obs: Any
    mesh_seconds: float

    @property
    def n_dofs(self) -> int:
        im = self.model.W.dofmap.index_map
        return im.size_global * self.model.W.dofmap.index_map_bs


def make_problem(
    size: float,
    comm=MPI.COMM_WORLD,
    *,
    solver: SolverOptions | None = None,
    quadrature_degree: int = 4,
    prefix: str = "bench_forward_",
) -> Problem:
    """Mesh the demo particle with element size ``size`` (pixels) and build its model."""
    mask, label, pixel_size, source = demo_mask()
    t0 = time.perf_counter()
    mesh = mesh_particle(mask, label, pixel_size, comm, size=size).mesh
    t_mesh = time.perf_counter() - t0
    model = ParticleModel(
        mesh, PARAMETERS, solver=solver, quadrature_degree=quadrature_degree, options_prefix=prefix
    )
    c0, m = initial_fields(model.V)
    model.set_m(m)
    obs = build_observation(model.W.sub(0), mask, label, pixel_size)
    return Problem(model, mask, source, size, c0, m, Driving(FRAMES, MU_E), obs, t_mesh)


def pixel_misfit(problem: Problem, traj) -> PixelMisfit:
    """The production pixel misfit (frames 1..) against synthetic data.

    The data are the observed trajectory plus a deterministic pixel-seeded offset.
    """
    obs = problem.obs
    data = np.zeros((len(traj.frame_steps), obs.pixels.size))
    for k, n in enumerate(traj.frame_steps[1:]):
        data[k + 1] = obs.apply(traj.state(n)) + 0.5 * SIGMA * np.cos(0.37 * obs.pixels + k)
    return PixelMisfit(obs, data, np.full(data.shape, SIGMA**-2), include_first=False)


# The same discrete problem with an L2 misfit, for femkin and for dolfinx-adjoint.


def l2_data(model: ParticleModel, traj) -> dict[int, Any]:
    """Data Functions on V at the frames: the trajectory's c plus a smooth offset."""
    x = model.V.tabulate_dof_coordinates()
    data = {}
    for k, n in enumerate(traj.frame_steps[1:]):
        d = dolfinx.fem.Function(model.V)
        d.x.array[:] = traj.state(n)[np.ravel(model.c_dofs)] + 0.03 * np.cos(11 * x[:, 0] + 3 * k)
        data[n] = d
    return data


def l2_misfit_source(model: ParticleModel, traj, data: dict[int, Any]):
    """(J, source) for J = sum_f 1/2 int (c_f - d_f)^2 / sigma^2 dx, assembled with model.dx."""
    c = ufl.split(model.u)[0]
    vc = ufl.split(ufl.TestFunction(model.W))[0]
    d = dolfinx.fem.Function(model.V)
    grad_form = dolfinx.fem.form((c - d) / SIGMA**2 * vc * model.dx)
    j_form = dolfinx.fem.form(0.5 * (c - d) ** 2 / SIGMA**2 * model.dx)
    frames = set(traj.frame_steps[1:])
    J = 0.0
    for n in sorted(frames):
        model.u.x.array[:] = traj.state(n)
        d.x.array[:] = data[n].x.array
        J += model.comm.allreduce(dolfinx.fem.assemble_scalar(j_form), op=MPI.SUM)

    def source(n: int, out: np.ndarray) -> None:
        if n in frames:
            model.u.x.array[:] = traj.state(n)
            d.x.array[:] = data[n].x.array
            out += dolfinx.fem.assemble_vector(grad_form).array

    return J, source


class TapedProblem:
    """The same time-discrete ACR problem recorded on dolfinx-adjoint's (pyadjoint's) tape.

    Scalar parameters are ``dolfinx_adjoint.Constant`` (a Function on a real space), the
    log-rate field ``m`` a ``dolfinx_adjoint.Function`` on the model's P1 space; cbar is an
    assembled AdjFloat assigned into a Constant, so its dependence on the state is taped.
    The problem object stays alive (on ``self``) while the tape may replay.

    Args:
        model: the femkin model whose mesh, spaces, parameters and ``m`` are copied.
        traj: a femkin trajectory; its step times and initial state are replayed.
        data: L2 data Functions at the frame steps (from :func:`l2_data`).
    """

    def __init__(
        self,
        model: ParticleModel,
        traj,
        data: dict[int, Any],
        driving: Driving,
        *,
        rtol: float = 1e-13,
        atol: float = 1e-14,
    ):
        import dolfinx_adjoint as dxa
        import pyadjoint

        self.pyadjoint = pyadjoint
        tape = pyadjoint.get_working_tape()
        tape.clear_tape()
        pyadjoint.continue_annotation()
        mesh, W, p = model.mesh, model.W, model.parameters
        self.u = dxa.Function(W, name="u")
        self.u_old = dxa.Function(W, name="u_old")
        self.u_old2 = dxa.Function(W, name="u_old2")
        multistep = traj.scheme == "bdf2"

        def C(v):
            return dxa.Constant(mesh, PETSc.ScalarType(v))

        def fixed(v):
            return dolfinx.fem.Constant(mesh, PETSc.ScalarType(v))

        self.blocks = {
            "mu_h": [C(v) for v in p.mu_h],
            "j0": [C(v) for v in p.j0],
            "k0": [C(np.log(p.k0))],
            "kappa": [C(p.kappa)],
            "coherency": [C(p.coherency)],
            "lambda": [C(np.log(p.lambda_))],  # ln lambda, like the femkin block
        }
        for name in blocks_unused_by(p.kinetics, list(self.blocks)):
            del self.blocks[name]  # not in this law's residual
        self.m = dxa.Function(model.V, name="m")
        dt, mu_e, cbar = C(1.0), C(0.0), C(0.0)
        weights = [C(1.0), C(-1.0), C(0.0)]  # BDF weights, assigned per step like dt
        with pyadjoint.stop_annotating():
            self.m.x.array[:] = model.m.x.array
            self.u_old.x.array[:] = traj.state(0)
            self.u_old2.x.array[:] = traj.state(0)
            self.u.x.array[:] = traj.state(0)
        coeffs = acr.ACRCoefficients(
            a=self.blocks["mu_h"],
            b=self.blocks.get("j0", []),
            p=fixed(p.j0_prefactor[0]),
            q=fixed(p.j0_prefactor[1]),
            ln_k0=self.blocks["k0"][0],
            m=self.m,
            kappa=self.blocks["kappa"][0],
            coherency=self.blocks["coherency"][0],
            alpha=fixed(p.alpha),
            kinetics=p.kinetics,
            reorganization=ufl.exp(self.blocks["lambda"][0])
            if "lambda" in self.blocks
            else fixed(p.lambda_),
        )
        dx = model.dx
        tests = ufl.split(ufl.TestFunction(W))
        if multistep:
            F = acr.residual_multistep(
                ufl.split(self.u),
                ufl.split(self.u_old),
                ufl.split(self.u_old2),
                tests,
                dt,
                weights,
                mu_e,
                cbar,
                coeffs,
                dx,
            )
        else:
            F = acr.residual(
                ufl.split(self.u), ufl.split(self.u_old), tests, dt, mu_e, cbar, coeffs, dx
            )
        lu = {"ksp_type": "preonly", "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"}
        opts = {
            "snes_type": "newtonls",
            "snes_linesearch_type": "basic",
            "snes_rtol": rtol,
            "snes_atol": atol,
            "snes_max_it": 50,
            **lu,
        }
        self.problem = dxa.NonlinearProblem(F, self.u, petsc_options=opts, adjoint_petsc_options=lu)
        times = traj.times
        frames = set(traj.frame_steps[1:])
        J = 0.0
        for n in range(1, len(times)):
            cb = dxa.assemble_scalar(ufl.split(self.u_old)[0] / model.area * dx)
            if multistep:
                (a0, a1, a2), (g1, g2) = traj.weights(n)
                for const, value in zip(weights, (a0, a1, a2), strict=True):
                    dxa.assign(float(value), const)
                if g2:
                    cb2 = dxa.assemble_scalar(ufl.split(self.u_old2)[0] / model.area * dx)
                    cb = g1 * cb + g2 * cb2
            dxa.assign(cb, cbar)
            dxa.assign(float(times[n] - times[n - 1]), dt)
            dxa.assign(float(driving(times[n])), mu_e)
            self.problem.solve()
            if self.problem.solver.getConvergedReason() <= 0:
                raise RuntimeError(f"dolfinx-adjoint forward step {n} did not converge")
            if n in frames:
                J = J + dxa.assemble_scalar(
                    0.5 * (ufl.split(self.u)[0] - data[n]) ** 2 / SIGMA**2 * dx
                )
            if multistep:
                dxa.assign(self.u_old, self.u_old2)
            dxa.assign(self.u, self.u_old)
        pyadjoint.pause_annotation()
        self.J = J
        names = [(k, i) for k, v in self.blocks.items() for i in range(len(v))]
        self.control_names = names + [("m", None)]
        controls = [pyadjoint.Control(self.blocks[k][i]) for k, i in names]
        controls.append(pyadjoint.Control(self.m))
        self.rf = pyadjoint.ReducedFunctional(J, controls)

    def gradient(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The taped derivative: ({block: array}, m dual vector on V's owned dofs)."""
        g = self.rf.derivative()
        scal: dict[str, list] = {k: [] for k in self.blocks}
        for (name, _i), gi in zip(self.control_names[:-1], g[:-1], strict=True):
            scal[name].append(float(np.asarray(gi.x.array).ravel()[0]) if gi.x.array.size else 0.0)
        n_own = self.m.function_space.dofmap.index_map.size_local
        return {k: np.array(v) for k, v in scal.items()}, g[-1].x.array[:n_own].copy()
