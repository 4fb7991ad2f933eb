"""Lagged (reused) forward Jacobians against exact Newton, side by side in one run.

The forward Newton iteration assembles and LU-factorises J at every iteration; at ~31k DOFs the
factorisation is ~60% of forward time (``bench_forward.py``). ``[solver] jacobian = "lagged"``
keeps a factorised J across iterations and steps while it contracts the residual (see
``ParticleModel.newton_step``); PETSc's own ``-snes_lag_jacobian`` (fixed lag, with and without
``_persists``) is timed alongside. Every variant solves the same problem with the same
tolerances; the derivative solves are not involved (they always use the exact J).

Cases:

- ``window``: the demo particle of :mod:`_common` at ``--size`` pixels (default 0.32, ~31k
  DOFs), BDF2 over its 5 frame intervals (0-300 s).
- ``cycle``: the full lithiation/delithiation cycle of ``bench_timestep.py`` (25 frames over
  3000 s, the particle mean 0.1 -> 0.99 -> 0.02, phase separation) at ``--cycle-size`` pixels
  (default 1.5, 2332 DOFs): the hard case for a reused J.

Per variant: steps, rejected steps, Newton iterations (all of them, failed solves included),
Jacobian assemblies = LU factorisations (counted by femkin and by PETSc's ``PCSetUp`` event),
lagged solves redone with exact Newton, wall and process CPU time after a warm-up run, the
shares of wall time in LU factorisation and Jacobian assembly, and the difference of the
forward result from exact Newton's at the frames (largest |c| and |mu| difference, largest
particle-average difference). Speed-ups are exact / variant in the same run, on CPU time (the
machine is shared; wall time is reported too).

Run: ``python benchmarks/bench_lagged.py [--size 0.32] [--cycle-size 1.5] [--cases window
cycle] [--variants exact lagged ...]`` (about 10 minutes on one busy core); under ``mpirun -n
2`` for two ranks (``exact`` always runs: it is the reference).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
from _common import FRAMES, make_problem
from bench_timestep import DRIVING, TRUTH
from bench_timestep import FRAMES as CYCLE_FRAMES

from femkin._fem import MPI, PETSc, dolfinx
from femkin.forward import ParticleModel, SolverOptions

#: label -> (jacobian, LAG_MAX_RATE, extra SolverOptions, PETSc options)
VARIANTS: dict[str, tuple[str, float | None, dict, dict]] = {
    "exact": ("exact", None, {}, {}),
    "lagged": ("lagged", None, {}, {}),
    "lagged_rate_0.3": ("lagged", 0.3, {}, {}),
    "lagged_rate_0.01": ("lagged", 0.01, {}, {}),
    "lagged_atol_1e-13": ("lagged", None, {"newton_atol": 1e-13}, {}),
    "petsc_lag_per_step": ("exact", None, {}, {"snes_lag_jacobian": 1000}),
    "petsc_lag_3_persists": (
        "exact",
        None,
        {},
        {"snes_lag_jacobian": 3, "snes_lag_jacobian_persists": "true"},
    ),
}


def _pc_setups() -> tuple[int, float]:
    info = PETSc.Log.Event("PCSetUp").getPerfInfo()
    return int(info["count"]), float(info["time"])


def _jac_time() -> float:
    return float(PETSc.Log.Event("SNESJacobianEval").getPerfInfo()["time"])


def _frame_values(model, traj) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_own = model.V.dofmap.index_map.size_local
    c = np.array([traj.state(n)[model.c_dofs[:n_own]] for n in traj.frame_steps])
    mu = np.array([traj.state(n)[model.mu_dofs[:n_own]] for n in traj.frame_steps])
    avg = np.array([traj.cbar[n] for n in traj.frame_steps])
    return c, mu, avg


def run_variant(label: str, build, frames, driving, c0) -> tuple[dict, tuple]:
    jacobian, rate, extra, petsc = VARIANTS[label]
    model = build(SolverOptions(scheme="bdf2", jacobian=jacobian, petsc_options=petsc, **extra))
    if rate is not None:
        model.LAG_MAX_RATE = rate
    model.solve(frames[:2], driving, c0)  # warm-up: JIT, MUMPS analysis
    n0, t_lu0 = _pc_setups()
    t_jac0 = _jac_time()
    comm = model.comm
    comm.Barrier()
    t0, p0 = time.perf_counter(), time.process_time()
    traj = model.solve(frames, driving, c0)
    wall, cpu = time.perf_counter() - t0, time.process_time() - p0
    n1, t_lu1 = _pc_setups()
    cpu = comm.allreduce(cpu, op=MPI.MAX)
    wall = comm.allreduce(wall, op=MPI.MAX)
    return {
        "steps": traj.n_steps,
        "rejected_steps": traj.rejected,
        "newton_iterations": traj.newton_total,
        "factorisations": traj.factorisations,
        "pc_setup_events": n1 - n0,
        "fallbacks_to_exact": traj.jacobian_fallbacks,
        "wall_s": wall,
        "cpu_s": cpu,
        "lu_factorisation_share": (t_lu1 - t_lu0) / wall,
        "jacobian_assembly_share": (_jac_time() - t_jac0) / wall,
    }, _frame_values(model, traj)


def run_case(build, frames, driving, c0, comm, labels) -> dict:
    out: dict = {}
    ref = None
    for label in ["exact"] + [v for v in labels if v != "exact"]:
        res, (c, mu, avg) = run_variant(label, build, frames, driving, c0)
        if ref is None:
            ref = (c, mu, avg)
        res["max_c_difference"] = comm.allreduce(float(np.abs(c - ref[0]).max()), op=MPI.MAX)
        res["max_mu_difference"] = comm.allreduce(float(np.abs(mu - ref[1]).max()), op=MPI.MAX)
        res["max_average_c_difference"] = float(np.abs(avg - ref[2]).max())
        out[label] = res
    ex = out["exact"]
    for res in out.values():
        res["cpu_speedup_vs_exact"] = ex["cpu_s"] / res["cpu_s"]
        res["wall_speedup_vs_exact"] = ex["wall_s"] / res["wall_s"]
    return out


def window_case(size: float, labels) -> tuple[dict, dict]:
    problem = make_problem(size, prefix="bench_lagged_probe_")
    n_dofs = problem.n_dofs
    counter = iter(range(100))

    def build(solver: SolverOptions):
        return make_problem(size, solver=solver, prefix=f"bench_lagged_w{next(counter)}_").model

    info = {"mesh_size_px": size, "dofs": n_dofs, "frames": [float(t) for t in FRAMES]}
    return info, run_case(build, FRAMES, problem.driving, problem.c0, problem.model.comm, labels)


def cycle_case(size: float, labels) -> tuple[dict, dict]:
    from _common import demo_mask

    from femkin.meshing import mesh_particle

    mask, label, px, _ = demo_mask()
    mesh = mesh_particle(mask, label, px, MPI.COMM_WORLD, size=size).mesh
    counter = iter(range(100))
    holder: dict = {}

    def build(solver: SolverOptions):
        model = ParticleModel(
            mesh,
            TRUTH,
            solver=solver,
            options_prefix=f"bench_lagged_c{next(counter)}_",
        )
        x = model.V.tabulate_dof_coordinates()
        model.set_m(0.5 * np.sin(6 * x[:, 0] + 1.0) * np.cos(5 * x[:, 1]))
        holder["c0"] = 0.1 + 0.03 * np.sin(9 * x[:, 0]) * np.cos(7 * x[:, 1])
        holder["dofs"] = model.W.dofmap.index_map.size_global * model.W.dofmap.index_map_bs
        return model

    build(SolverOptions())  # fills c0 (same mesh and space for every variant)
    info = {"mesh_size_px": size, "dofs": holder["dofs"], "frames": len(CYCLE_FRAMES)}

    return info, run_case(build, CYCLE_FRAMES, DRIVING, holder["c0"], mesh.comm, labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=0.32)
    ap.add_argument("--cycle-size", type=float, default=1.5)
    ap.add_argument("--cases", nargs="+", default=["window", "cycle"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    PETSc.Log.begin()
    comm = MPI.COMM_WORLD
    t0 = time.perf_counter()
    out: dict = {
        "benchmark": "lagged_jacobian",
        "ranks": comm.size,
        "host": platform.node(),
        "python": platform.python_version(),
        "dolfinx": dolfinx.__version__,
        "note": "one run per variant after a warm-up; speed-ups exact / variant from the same "
        "run (CPU time: process time, max over ranks); differences vs exact Newton at the "
        "frames; tolerances newton_rtol 1e-10, newton_atol 1e-11 unless the label says",
        "cases": {},
    }
    for name in args.cases:
        if name == "window":
            info, res = window_case(args.size, args.variants)
        else:
            info, res = cycle_case(args.cycle_size, args.variants)
        out["cases"][name] = {**info, "variants": res}
    out["total_wall_s"] = time.perf_counter() - t0
    if comm.rank == 0:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
