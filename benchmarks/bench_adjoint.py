"""Cost of derivatives relative to the forward run, and femkin vs dolfinx-adjoint.

On the demo particle (element size 1 pixel) and the same particle refined ~4x (size 0.5), over
the first two frame intervals (~10 adaptive steps), with the pixel misfit
J = 1/2 sum_f sum_p (B c_f - d)^2 / sigma^2:

- forward: ``ParticleModel.solve`` (adaptive steps, trajectory in memory);
- gradient: ``ParticleDerivatives.adjoint`` (one J^T assembly and solve per step);
- Gauss-Newton Hessian action: ``tangent`` + ``adjoint`` driven by B^T B du / sigma^2;
- full Hessian action: ``tangent`` + ``second_order`` (first-order adjoint states reused
  from the gradient, as in a Newton-CG inner loop).

Every timing follows one warm-up call of the same operation (JIT compilation excluded).
Memory: ``tracemalloc`` peaks (Python and numpy heap only; PETSc/MUMPS allocations are not
traced) of a forward solve and of a forward solve followed by the gradient. On the demo mesh
the same discrete problem with an L2 misfit is taped by dolfinx-adjoint and its
``ReducedFunctional.derivative()`` (second call) is timed against femkin's adjoint driven by the
same functional. If a ratio misses its target, a cProfile summary of the slow operation is
included. Prints one JSON object on stdout.

Run: ``.venv/bin/python benchmarks/bench_adjoint.py``.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (TapedProblem, gauss_newton_source, l2_data, l2_misfit_source,  # noqa: E402
                     make_problem, pixel_data, pixel_misfit_sources)

from femkin._fem import MPI, dolfinx  # noqa: E402
from femkin.adjoint import Direction, ParticleDerivatives  # noqa: E402

FRAMES = [0.0, 60.0, 120.0]
TARGETS = {"gradient_over_forward": 0.4, "gauss_newton_over_forward": 0.8}


def _timed(fn, *args, **kwargs):
    fn(*args, **kwargs)  # warm-up
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def _profile(fn, n: int = 15) -> list[str]:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(n)
    lines = [ln.strip() for ln in s.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("ncalls"))
    return lines[start:start + n + 1]


def bench_case(size: float, *, with_dxa: bool) -> dict:
    problem = make_problem(size, prefix=f"bench_adj_{str(size).replace('.', '_')}_")
    model = problem.model
    der = ParticleDerivatives(model)

    def forward():
        return model.solve(FRAMES, problem.driving, problem.c0)

    t_fwd, traj = _timed(forward)
    data = pixel_data(problem, traj)
    _, source = pixel_misfit_sources(problem, traj, data)
    t_grad, (sens, _) = _timed(der.adjoint, traj, source)
    _, lambdas = der.adjoint(traj, source, store=True)

    x = model.V.tabulate_dof_coordinates()
    direction = Direction({"mu_h": np.array([0.3, -0.2, 0.1]), "j0": np.array([0.2, 0.1]),
                           "k0": np.array([0.3]), "kappa": np.array([0.004]),
                           "coherency": np.array([0.3])}, m=0.5 * np.sin(3 * x[:, 0]))

    def gn_action():
        tang = der.tangent(traj, direction)
        return der.adjoint(traj, gauss_newton_source(problem, traj, tang))[0]

    def full_action():
        tang = der.tangent(traj, direction)
        return der.second_order(traj, direction, lambdas, tang,
                                gauss_newton_source(problem, traj, tang))

    t_tan, _ = _timed(der.tangent, traj, direction)
    t_gn, _ = _timed(gn_action)
    t_full, _ = _timed(full_action)
    # As in an inversion with the default [inversion] learn: only the learned blocks'
    # sensitivities are assembled at every step (coherency is 0, so cbar drops out too).
    der.active = {"mu_h", "j0", "k0", "m"}
    t_grad_learned, _ = _timed(der.adjoint, traj, source)
    t_gn_learned, _ = _timed(gn_action)
    der.active = None

    tracemalloc.start()
    forward()
    _, peak_fwd = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    tracemalloc.start()
    tr2 = forward()
    der.adjoint(tr2, pixel_misfit_sources(problem, tr2, data)[1])
    _, peak_grad = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    out = {"mesh_size_px": size, "dofs": problem.n_dofs, "steps": traj.n_steps,
           "newton_its_total": int(np.sum(traj.newton_iterations)),
           "forward_s": t_fwd, "gradient_s": t_grad, "tangent_s": t_tan,
           "gauss_newton_action_s": t_gn, "full_hessian_action_s": t_full,
           "gradient_over_forward": t_grad / t_fwd,
           "gauss_newton_over_forward": t_gn / t_fwd,
           "full_hessian_over_forward": t_full / t_fwd,
           "gradient_over_forward_default_learn": t_grad_learned / t_fwd,
           "gauss_newton_over_forward_default_learn": t_gn_learned / t_fwd,
           "tracemalloc_peak_forward_MiB": peak_fwd / 2**20,
           "tracemalloc_peak_forward_plus_gradient_MiB": peak_grad / 2**20,
           "memory_gradient_over_forward": peak_grad / peak_fwd}
    profiles = {}
    if out["gradient_over_forward"] > TARGETS["gradient_over_forward"]:
        profiles["gradient"] = _profile(lambda: der.adjoint(traj, source))
    if out["gauss_newton_over_forward"] > TARGETS["gauss_newton_over_forward"]:
        profiles["gauss_newton_action"] = _profile(gn_action)
    if profiles:
        profiles["forward"] = _profile(forward)
        out["cprofile_tottime"] = profiles
    if with_dxa:
        out["dolfinx_adjoint"] = compare_dxa(problem, traj)
    return out


def compare_dxa(problem, traj) -> dict:
    """Our gradient vs dolfinx-adjoint's taped gradient, same L2 functional and trajectory."""
    model = problem.model
    der = ParticleDerivatives(model)
    data = l2_data(model, traj)
    J, source = l2_misfit_source(model, traj, data)
    t_ours, (sens, _) = _timed(der.adjoint, traj, source)
    t0 = time.perf_counter()
    taped = TapedProblem(model, traj, data, problem.driving, rtol=1e-10, atol=1e-11)
    t_tape_forward = time.perf_counter() - t0
    t_dxa, (scalars, g_m) = _timed(taped.gradient)
    rel = max(float(np.max(np.abs(sens.scalars[k] - scalars[k]) / np.max(np.abs(scalars[k]))))
              for k in scalars)
    rel_m = float(np.max(np.abs(sens.m - g_m)) / np.max(np.abs(g_m)))
    return {"functional": "sum_f 1/2 int (c_f - d_f)^2 / sigma^2 dx", "J_ours": J,
            "J_taped": float(taped.J), "ours_gradient_s": t_ours,
            "dolfinx_adjoint_gradient_s": t_dxa,
            "dolfinx_adjoint_taped_forward_s_incl_jit": t_tape_forward,
            "speedup": t_dxa / t_ours, "max_rel_diff_scalars": rel, "max_rel_diff_m": rel_m}


def main() -> None:
    t0 = time.perf_counter()
    out = {"benchmark": "adjoint", "ranks": MPI.COMM_WORLD.size, "dolfinx": dolfinx.__version__,
           "frames": FRAMES, "targets": TARGETS,
           "note": "times after one warm-up call of each operation (JIT excluded); memory is "
                   "tracemalloc peak (Python + numpy heap, not PETSc/MUMPS); full Hessian "
                   "action reuses the stored first-order adjoint states",
           "cases": {"demo": bench_case(1.0, with_dxa=True),
                     "refined_4x": bench_case(0.5, with_dxa=False)}}
    out["total_wall_s"] = time.perf_counter() - t0
    if MPI.COMM_WORLD.rank == 0:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
