"""Forward cost of the ACR model: time per step, DOF-steps per second, where the time goes.

Cases: the demo particle (element size 1 pixel), the same particle refined ~4x in cell count (size
0.5) and a ~30k-DOF mesh (size 0.32; issue #2 target >= 2e5 DOF-steps/s per core). For each case the
femkin forward (``ParticleModel.solve``, adaptive backward-Euler steps, its default SNES), the same
with the default BDF2 scheme, and, as the baseline, a plain ``dolfinx.fem.petsc.NonlinearProblem``
loop on the same compiled-from-the-same-UFL forms over the same step times (plain ``newtonls``:
bounds are not needed on this trajectory). PETSc's event log splits SNES time into residual
assembly, Jacobian assembly and linear solves (LU factorisation + triangular solves). Each timed run
follows a warm-up run (JIT compilation excluded). Prints one JSON object on stdout.

Run: ``.venv/bin/python benchmarks/bench_forward.py`` (about 2-3 minutes on one idle core).
"""

from __future__ import annotations

import json
import platform
import time

import numpy as np
from _common import make_problem

from femkin._fem import MPI, PETSc, dolfinx, ufl
from femkin.forward import SolverOptions

# Timed window: the first two frame intervals (~10 adaptive steps), so that the whole
# benchmark stays within a few minutes; warm-up: a 1 s window (compiles every form).
TIMED_FRAMES = [0.0, 60.0, 120.0]
WARMUP_FRAMES = [0.0, 1.0]

EVENTS = ("SNESSolve", "SNESFunctionEval", "SNESJacobianEval", "KSPSolve", "PCSetUp", "PCApply")


def _events() -> dict[str, float]:
    out = {}
    for name in EVENTS:
        info = PETSc.Log.Event(name).getPerfInfo()
        out[name] = float(info["time"])
    return out


def _delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def _breakdown(wall: float, ev: dict) -> dict:
    snes = ev["SNESSolve"]
    return {
        "snes_share": snes / wall,
        "residual_assembly_share": ev["SNESFunctionEval"] / wall,
        "jacobian_assembly_share": ev["SNESJacobianEval"] / wall,
        "linear_solve_share": ev["KSPSolve"] / wall,
        "lu_factorisation_share": ev["PCSetUp"] / wall,
        "outside_snes_share": 1.0 - snes / wall,
    }


def run_femkin(problem, snes_type: str | None = None) -> dict:
    """Time ``ParticleModel.solve`` (after a warm-up run)."""
    model = problem.model
    if snes_type is not None:
        opts = PETSc.Options()
        opts[model.snes.getOptionsPrefix() + "snes_type"] = snes_type
        model.snes.setFromOptions()
    model.solve(WARMUP_FRAMES, problem.driving, problem.c0)  # warm-up (JIT compilation)
    before = _events()
    t0, c0 = time.perf_counter(), time.process_time()
    traj = model.solve(TIMED_FRAMES, problem.driving, problem.c0)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ev = _delta(_events(), before)
    n = traj.n_steps
    its = np.array(traj.newton_iterations)
    return {
        "snes_type": model.snes.getType(),
        "steps": n,
        "wall_s": wall,
        "cpu_s": cpu,
        "time_per_step_s": wall / n,
        "dof_steps_per_s": problem.n_dofs * n / wall,
        "dof_steps_per_cpu_s": problem.n_dofs * n / cpu,
        "newton_its_per_step": float(its.mean()),
        "newton_its_total": int(its.sum()),
        **_breakdown(wall, ev),
    }, traj


def run_plain_dolfinx(problem, times: list[float]) -> dict:
    """A plain dolfinx NonlinearProblem loop over the given step times, same forms."""
    model = problem.model
    o = model.solver_options
    u, u_old = model.u, model.u_old
    opts = {
        "snes_type": "newtonls",
        "snes_linesearch_type": "basic",
        "snes_rtol": o.newton_rtol,
        "snes_atol": o.newton_atol,
        "snes_max_it": o.newton_max_it,
        "ksp_type": "preonly",
        "pc_type": "lu",
        "pc_factor_mat_solver_type": "mumps",
    }
    prob = dolfinx.fem.petsc.NonlinearProblem(
        model.F_ufl, u, J=model.J_ufl, petsc_options_prefix="bench_plain_", petsc_options=opts
    )
    mean_form = dolfinx.fem.form(ufl.split(u_old)[0] / model.area * model.dx)
    nV = model.V.dofmap.index_map.size_local + model.V.dofmap.index_map.num_ghosts
    c_dofs = np.ravel(model.c_dofs)

    def loop(times) -> tuple[float, float, int]:
        u.x.array[:] = 0.0
        u.x.array[c_dofs] = problem.c0[:nV]
        its = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for n in range(1, len(times)):
            u_old.x.array[:] = u.x.array
            model.dt.value = times[n] - times[n - 1]
            model.constants["mu_e"][0].value = problem.driving(times[n])
            model.constants["cbar"][0].value = model.comm.allreduce(
                dolfinx.fem.assemble_scalar(mean_form), op=MPI.SUM
            )
            prob.solve()
            if prob.solver.getConvergedReason() <= 0:
                raise RuntimeError(f"plain dolfinx Newton failed at step {n}")
            its += prob.solver.getIterationNumber()
        return time.perf_counter() - t0, time.process_time() - c0, its

    loop(times[:3])  # warm-up
    before = _events()
    wall, cpu, its = loop(times)
    ev = _delta(_events(), before)
    n = len(times) - 1
    return {
        "snes_type": "newtonls",
        "steps": n,
        "wall_s": wall,
        "cpu_s": cpu,
        "time_per_step_s": wall / n,
        "dof_steps_per_s": problem.n_dofs * n / wall,
        "dof_steps_per_cpu_s": problem.n_dofs * n / cpu,
        "newton_its_per_step": its / n,
        "newton_its_total": its,
        **_breakdown(wall, ev),
    }


def bench_case(name: str, size: float) -> dict:
    # The plain loop is backward Euler, so the throughput comparison runs femkin's Euler; the
    # default BDF2 is timed on the same window alongside (its step count follows its error
    # control, see bench_timestep.py for equal-accuracy comparisons).
    problem = make_problem(size, solver=SolverOptions(scheme="euler"), prefix=f"bench_{name}_")
    femkin_vi, traj = run_femkin(problem)
    times = list(traj.times)
    plain = run_plain_dolfinx(problem, times)
    bdf2 = make_problem(size, solver=SolverOptions(scheme="bdf2"), prefix=f"bench_{name}_bdf2_")
    femkin_bdf2, _ = run_femkin(bdf2)
    return {
        "mesh_size_px": size,
        "cells": problem.model.mesh.topology.index_map(2).size_global,
        "dofs": problem.n_dofs,
        "femkin": femkin_vi,
        "femkin_bdf2": femkin_bdf2,
        "plain_dolfinx_newton": plain,
        "femkin_vs_plain_throughput": femkin_vi["dof_steps_per_s"] / plain["dof_steps_per_s"],
    }


def main() -> None:
    PETSc.Log.begin()
    t0 = time.perf_counter()
    comm = MPI.COMM_WORLD
    out = {
        "benchmark": "forward",
        "ranks": comm.size,
        "host": platform.node(),
        "python": platform.python_version(),
        "dolfinx": dolfinx.__version__,
        "note": "wall and process CPU times after a warm-up run (JIT excluded); shares "
        "from PETSc's event log; DOF = global DOFs of the mixed (c, mu) P1xP1 space",
        "cases": {},
    }
    for name, size in (("demo", 1.0), ("refined_4x", 0.5), ("target_30k", 0.32)):
        out["cases"][name] = bench_case(name, size)
    out["total_wall_s"] = time.perf_counter() - t0
    if comm.rank == 0:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
