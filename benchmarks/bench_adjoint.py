"""Cost of derivatives relative to the forward run, and femkin vs dolfinx-adjoint.

On the demo particle (element size 1 pixel) and the same particle refined ~4x (size 0.5), over
the first two frame intervals (~10 adaptive steps), with the pixel misfit
J = 1/2 sum_f sum_p (B c_f - d)^2 / sigma^2:

- forward: ``ParticleModel.solve`` (adaptive steps, trajectory in memory);
- gradient: ``ParticleDerivatives.adjoint`` (one J assembly, factorisation and transposed
  solve per step, all scalar sensitivities of a step in one assembly);
- Gauss-Newton Hessian action: ``tangent`` + ``adjoint`` driven by B^T B du / sigma^2;
- full Hessian action: ``tangent`` + ``second_order`` (first-order adjoint states reused
  from the gradient, as in a Newton-CG inner loop).

- all of the above with every J_n refactorised ("cold", the top-level numbers), and with the
  factorisations kept per step (``kept_factorisations``, the default ``[solver]
  factor_cache_mb``): the first Hessian action at a point factorises and keeps each J_n, and
  the later ones at the same point (a Newton-CG loop, the eigensolver) only assemble
  right-hand sides and solve;
- a block of ``BATCH`` Gauss-Newton actions one by one vs batched (``tangent_many`` +
  ``adjoint_many``: one factorisation per step serves all directions), as in the randomised
  eigensolver of the uncertainty step.

Every timing is the best of ``REPEATS`` calls after one warm-up call of the same operation (JIT
compilation excluded); ratios are given on wall clock and on process CPU time, all measured in the
same run. Memory: peak resident set size (everything: PETSc, MUMPS, Python) of a fresh process that
sets the problem up and runs a forward solve, or a forward solve and the gradient (and a Hessian
action keeping the factorisations), once to compile and once measured (peak counter reset in
between); the growth over the memory held before the measured run is reported too. On the demo mesh
the same discrete problem with an L2 misfit is taped by dolfinx-adjoint and its
``ReducedFunctional.derivative()`` (second call) is timed against femkin's adjoint driven by the
same functional. If a ratio misses its target, a cProfile summary of the slow operation is included.
Prints one JSON object on stdout.

Run: ``.venv/bin/python benchmarks/bench_adjoint.py``.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import subprocess
import sys
import time

import numpy as np
from _common import (
    TapedProblem,
    l2_data,
    l2_misfit_source,
    make_problem,
    pixel_misfit,
)

from femkin._fem import MPI, dolfinx
from femkin.adjoint import Direction, ParticleDerivatives

FRAMES = [0.0, 60.0, 120.0]
TARGETS = {"gradient_over_forward": 0.4, "gauss_newton_over_forward": 0.8}
BATCH = 8


REPEATS = 5


def _timed(fn, *args, **kwargs):
    """One warm-up call, then the best of ``REPEATS`` calls: (wall s, process CPU s, result).

    The minimum is the standard estimator on a shared machine (other jobs only ever add time).
    """
    out = fn(*args, **kwargs)  # warm-up
    walls, cpus = [], []
    for _ in range(REPEATS):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus), out


def _profile(fn, n: int = 15) -> list[str]:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(n)
    lines = [ln.strip() for ln in s.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("ncalls"))
    return lines[start : start + n + 1]


def _directions(model, count: int) -> list[Direction]:
    """``count`` fixed directions over every block (deterministic, from dof coordinates)."""
    x = model.V.tabulate_dof_coordinates()
    out = []
    for j in range(count):
        s = 1.0 + 0.1 * j
        out.append(
            Direction(
                {
                    "mu_h": s * np.array([0.3, -0.2, 0.1]),
                    "j0": s * np.array([0.2, 0.1]),
                    "k0": np.array([0.3 * s]),
                    "kappa": np.array([0.004]),
                    "coherency": np.array([0.3]),
                },
                m=0.5 * np.sin((3 + j) * x[:, 0] + j * x[:, 1]),
            )
        )
    return out


def bench_case(size: float, *, with_dxa: bool) -> dict:
    problem = make_problem(size, prefix=f"bench_adj_{str(size).replace('.', '_')}_")
    model = problem.model
    der = ParticleDerivatives(model)
    # Cold: every derivative solve refactorises J_n (no kept factorisations).
    model.solver_options.factor_cache_mb = 0.0

    def forward():
        return model.solve(FRAMES, problem.driving, problem.c0)

    t_fwd, c_fwd, traj = _timed(forward)
    misfit = pixel_misfit(problem, traj)
    source = misfit.source(traj)
    t_grad, c_grad, _ = _timed(der.adjoint, traj, source)
    _, lambdas = der.adjoint(traj, source, store=True)
    direction = _directions(model, 1)[0]

    def gn_action():
        tang = der.tangent(traj, direction)
        return der.adjoint(traj, misfit.gauss_newton_source(traj, tang))[0]

    def full_action():
        tang = der.tangent(traj, direction)
        return der.second_order(
            traj, direction, lambdas, tang, misfit.gauss_newton_source(traj, tang)
        )

    t_tan, c_tan, _ = _timed(der.tangent, traj, direction)
    t_gn, c_gn, _ = _timed(gn_action)
    t_full, c_full, _ = _timed(full_action)
    # As in an inversion with the default [inversion] learn: only the learned blocks'
    # sensitivities are assembled at every step (coherency is 0, so cbar drops out too).
    der.active = {"mu_h", "j0", "k0", "m"}
    t_grad_l, c_grad_l, _ = _timed(der.adjoint, traj, source)
    t_gn_l, c_gn_l, _ = _timed(gn_action)
    # A block of Gauss-Newton actions (the randomised eigensolver's passes): one by one vs
    # batched (one Jacobian factorisation per step for every direction).
    block = _directions(model, BATCH)

    def gn_one_by_one():
        return [gn_action_for(d) for d in block]

    def gn_action_for(d):
        tang = der.tangent(traj, d)
        return der.adjoint(traj, misfit.gauss_newton_source(traj, tang))[0]

    def gn_batched():
        tangs = der.tangent_many(traj, block)
        return [
            s
            for s, _ in der.adjoint_many(traj, [misfit.gauss_newton_source(traj, t) for t in tangs])
        ]

    t_seq, c_seq, seq = _timed(gn_one_by_one)
    t_bat, c_bat, bat = _timed(gn_batched)
    batch_diff = max(
        float(np.max(np.abs(a.m - b.m)) / np.max(np.abs(a.m)))
        for a, b in zip(seq, bat, strict=True)
    )
    # Kept factorisations (the default): the first Hessian action at a point factorises each
    # J_n in its tangent run and keeps it (timed from an empty cache every call); later
    # actions at the same point (Newton-CG, the eigensolver) only solve. The gradient keeps
    # nothing and costs the same as above.
    model.solver_options.factor_cache_mb = 1024.0

    def first_gn():
        der.clear_cache()
        return gn_action()

    t_first_k, c_first_k, _ = _timed(first_gn)
    gn_action()
    t_gn_k, c_gn_k, _ = _timed(gn_action)
    t_bat_k, _, _ = _timed(gn_batched)
    der.active = None
    t_full_k, _, _ = _timed(full_action)
    kept = {
        "steps_kept": len(der.factors),
        "kept_MiB": der.factors.bytes / 2**20,
        "first_gauss_newton_action_s": t_first_k,
        "gauss_newton_action_s": t_gn_k,
        "full_hessian_action_s": t_full_k,
        "batched_gauss_newton_s": t_bat_k,
        "first_gauss_newton_over_forward_default_learn": t_first_k / t_fwd,
        "gauss_newton_over_forward_default_learn": t_gn_k / t_fwd,
        "full_hessian_over_forward": t_full_k / t_fwd,
        "batched_gauss_newton_per_action_over_forward": t_bat_k / BATCH / t_fwd,
        "cpu_gauss_newton_over_forward_default_learn": c_gn_k / c_fwd,
    }
    der.clear_cache()
    model.solver_options.factor_cache_mb = 0.0

    out = {
        "mesh_size_px": size,
        "dofs": problem.n_dofs,
        "steps": traj.n_steps,
        "newton_its_total": int(np.sum(traj.newton_iterations)),
        "wall_s": {
            "forward": t_fwd,
            "gradient": t_grad,
            "tangent": t_tan,
            "gauss_newton_action": t_gn,
            "full_hessian_action": t_full,
            "gradient_default_learn": t_grad_l,
            "gauss_newton_action_default_learn": t_gn_l,
        },
        "cpu_s": {
            "forward": c_fwd,
            "gradient": c_grad,
            "tangent": c_tan,
            "gauss_newton_action": c_gn,
            "full_hessian_action": c_full,
            "gradient_default_learn": c_grad_l,
            "gauss_newton_action_default_learn": c_gn_l,
        },
        "gradient_over_forward": t_grad / t_fwd,
        "gauss_newton_over_forward": t_gn / t_fwd,
        "full_hessian_over_forward": t_full / t_fwd,
        "gradient_over_forward_default_learn": t_grad_l / t_fwd,
        "gauss_newton_over_forward_default_learn": t_gn_l / t_fwd,
        "cpu_gradient_over_forward": c_grad / c_fwd,
        "cpu_gauss_newton_over_forward": c_gn / c_fwd,
        "cpu_gradient_over_forward_default_learn": c_grad_l / c_fwd,
        "cpu_gauss_newton_over_forward_default_learn": c_gn_l / c_fwd,
        "batched_gauss_newton": {
            "directions": BATCH,
            "one_by_one_s": t_seq,
            "batched_s": t_bat,
            "speedup": t_seq / t_bat,
            "per_action_over_forward": t_bat / BATCH / t_fwd,
            "max_rel_diff": batch_diff,
        },
        "kept_factorisations": kept,
        "memory": memory_case(size),
    }
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


def _status_kib(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return float(line.split()[1])
    raise KeyError(field)


def _rss_child(size: float, what: str) -> None:
    """In a fresh process: set the problem up and run ``what`` once (JIT compilation), reset
    the peak-RSS counter (Linux ``clear_refs``), run it again and print the peak and the
    resident memory before the measured run (MiB).
    """
    problem = make_problem(size, prefix=f"bench_mem_{str(size).replace('.', '_')}_")
    model = problem.model
    der = ParticleDerivatives(model)
    direction = _directions(model, 1)[0]

    def run():
        traj = model.solve(FRAMES, problem.driving, problem.c0)
        if what != "forward":
            misfit = pixel_misfit(problem, traj)
            der.adjoint(traj, misfit.source(traj))
        if what == "gauss_newton_kept":
            tang = der.tangent(traj, direction)
            der.adjoint(traj, misfit.gauss_newton_source(traj, tang))
        return traj

    traj = run()
    der.clear_cache()
    del traj
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    _traj = run()  # held until the peak is read, like the first run's
    peak = _status_kib("VmHWM")
    print(json.dumps({"before_MiB": before / 1024, "peak_MiB": peak / 1024}))


def memory_case(size: float) -> dict:
    """Peak resident memory (whole process: PETSc, MUMPS, Python) of a forward solve, of a
    forward solve plus gradient, and of those plus a Gauss-Newton action that keeps every
    step's factorisation, each in a fresh process; the growth is the peak over the memory held
    before the run (mesh, forms, matrices, compiled kernels).
    """
    res = {}
    for what in ("forward", "gradient", "gauss_newton_kept"):
        proc = subprocess.run(
            [sys.executable, __file__, "--rss", str(size), what],
            capture_output=True,
            text=True,
            check=True,
        )
        res[what] = json.loads(proc.stdout.strip().splitlines()[-1])
    f = res["forward"]
    out = {
        "forward_peak_rss_MiB": f["peak_MiB"],
        "forward_growth_MiB": f["peak_MiB"] - f["before_MiB"],
    }
    for what in ("gradient", "gauss_newton_kept"):
        g = res[what]
        out[what + "_peak_rss_MiB"] = g["peak_MiB"]
        out[what + "_growth_MiB"] = g["peak_MiB"] - g["before_MiB"]
        out[what + "_peak_over_forward_peak"] = g["peak_MiB"] / f["peak_MiB"]
    return out


def compare_dxa(problem, traj) -> dict:
    """Our gradient vs dolfinx-adjoint's taped gradient, same L2 functional and trajectory."""
    model = problem.model
    der = ParticleDerivatives(model)
    data = l2_data(model, traj)
    J, source = l2_misfit_source(model, traj, data)
    t_ours, _, (sens, _) = _timed(der.adjoint, traj, source)
    t0 = time.perf_counter()
    taped = TapedProblem(model, traj, data, problem.driving, rtol=1e-10, atol=1e-11)
    t_tape_forward = time.perf_counter() - t0
    t_dxa, _, (scalars, g_m) = _timed(taped.gradient)
    rel = max(
        float(np.max(np.abs(sens.scalars[k] - scalars[k]) / np.max(np.abs(scalars[k]))))
        for k in scalars
    )
    rel_m = float(np.max(np.abs(sens.m - g_m)) / np.max(np.abs(g_m)))
    return {
        "functional": "sum_f 1/2 int (c_f - d_f)^2 / sigma^2 dx",
        "J_ours": J,
        "J_taped": float(taped.J),
        "ours_gradient_s": t_ours,
        "dolfinx_adjoint_gradient_s": t_dxa,
        "dolfinx_adjoint_taped_forward_s_incl_jit": t_tape_forward,
        "speedup": t_dxa / t_ours,
        "max_rel_diff_scalars": rel,
        "max_rel_diff_m": rel_m,
    }


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--rss":
        _rss_child(float(sys.argv[2]), sys.argv[3])
        return
    t0 = time.perf_counter()
    out = {
        "benchmark": "adjoint",
        "ranks": MPI.COMM_WORLD.size,
        "dolfinx": dolfinx.__version__,
        "frames": FRAMES,
        "targets": TARGETS,
        "note": f"times: best of {REPEATS} calls after one warm-up call of each operation (JIT "
        "excluded), ratios of wall and of process CPU times from the same run; "
        "memory: peak RSS of fresh processes; full Hessian action reuses the "
        "stored first-order adjoint states",
        "cases": {
            "demo": bench_case(1.0, with_dxa=True),
            "refined_4x": bench_case(0.5, with_dxa=False),
        },
    }
    out["total_wall_s"] = time.perf_counter() - t0
    if MPI.COMM_WORLD.rank == 0:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
