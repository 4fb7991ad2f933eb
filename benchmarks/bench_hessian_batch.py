"""Benchmark: batched Gauss-Newton Hessian actions, step operators as matrices or vectors.

A batch of K Hessian actions runs the tangent model forward and the adjoint backward through
one trajectory (one Jacobian factorisation per step for all K). What each member needs at a
step besides the solve, ``dF/du_{n-1} du``, ``dF/dm dm``, ``dF/dtheta dtheta`` (tangent) and
their transposes applied to lambda (adjoint), is either assembled as one vector per member
(``ParticleDerivatives.MATRIX_BATCH`` above K) or assembled once per step as sparse matrices
and applied to every member by products (K >= ``MATRIX_BATCH``, the default from 4). This
measures both on the demo case (``cases/demo``: simulated, the Hessian at its initial point,
~1170 vertices, BDF2 at ``time_tol`` 5e-4) in one process, one after the other, and checks
that they give the same actions.

Prints one JSON object: per batch size K the seconds per action of each route, their ratio
and the largest relative difference of the actions; ``one_at_a_time``: ``--repeats`` single
actions at one point after a first one (a Newton-CG inner loop), with each step's operators
kept beside its factorisation (``ParticleDerivatives.KEEP_OPERATORS``, the default) or
assembled as vectors every time.

Run: ``.venv/bin/python benchmarks/bench_hessian_batch.py [--sizes 1,4,6,15,60] [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,4,6,15,60", help="batch sizes K")
    ap.add_argument("--keep", type=Path, default=None, help="work in this directory and keep it")
    ap.add_argument("--repeats", type=int, default=10, help="single actions at one point")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    from femkin._fem import MPI
    from femkin.adjoint import ParticleDerivatives
    from femkin.cli import main as femkin_main
    from femkin.study import build_problem, open_study

    work = args.keep or Path(tempfile.mkdtemp(prefix="femkin-hbatch-"))
    case = work / "demo"
    if not case.exists():
        case.mkdir(parents=True)
        shutil.copy2(ROOT / "cases" / "demo" / "case.toml", case / "case.toml")
        shutil.copytree(ROOT / "cases" / "demo" / "data", case / "data")
    if not (case / "simulated" / "video.npz").exists():
        assert femkin_main(["simulate", str(case), "--quiet"]) == 0
    comm = MPI.COMM_WORLD
    problem = build_problem(open_study(case, comm), comm, quiet=True, require_data=True)
    x = problem.initial_vector()
    g = problem.space.create_vector()
    problem.gradient(x, g)
    n_dofs = problem.space.global_size
    part = next(iter(problem.particles.values()))
    steps = part.trajectory.n_steps
    out: dict = {
        "case": "cases/demo (simulated; Hessian at the initial point)",
        "parameters": int(n_dofs),
        "steps": int(steps),
        "matrix_batch": ParticleDerivatives.MATRIX_BATCH,
        "ranks": comm.size,
        "sizes": {},
    }
    default = ParticleDerivatives.MATRIX_BATCH
    # the batch routes alone: operators assembled per pass, none kept between passes
    ParticleDerivatives.KEEP_OPERATORS = False
    for k in sizes:
        vs = [problem.space.random_normal(100 + i) for i in range(k)]
        row = {}
        results = {}
        # a warm-up batch (forms compiled, factorisations kept), then both routes timed
        problem.hessian_mult_batch(vs[:1], [vs[0].duplicate()], gauss_newton=True)
        for route, threshold in (("vectors", 10**9), ("matrices", 1)):
            ParticleDerivatives.MATRIX_BATCH = threshold
            outs = [v.duplicate() for v in vs]
            t0 = time.perf_counter()
            problem.hessian_mult_batch(vs, outs, gauss_newton=True)
            row[f"{route}_s_per_action"] = (time.perf_counter() - t0) / k
            results[route] = np.array([o.getArray(readonly=True).copy() for o in outs])
            for o in outs:
                o.destroy()
        ParticleDerivatives.MATRIX_BATCH = default
        a, b = results["matrices"], results["vectors"]
        diff = comm.allreduce(float(np.max(np.abs(a - b))), op=MPI.MAX)
        scale = comm.allreduce(float(np.max(np.abs(b))), op=MPI.MAX)
        row["max_relative_difference"] = diff / scale
        row["speedup"] = row["vectors_s_per_action"] / row["matrices_s_per_action"]
        out["sizes"][str(k)] = row
        for v in vs:
            v.destroy()
    # One action at a time at one point (a Newton-CG inner loop): the first keeps each step's
    # factorisation and, unless switched off, its derivative operators; the later ones reuse.
    repeats = args.repeats
    vs = [problem.space.random_normal(500 + i) for i in range(repeats + 1)]
    seq: dict = {}
    for label, keep in (("vectors", False), ("kept_operators", True)):
        ParticleDerivatives.KEEP_OPERATORS = keep
        problem.gradient(x, g)  # a fresh trajectory: nothing kept
        first = vs[0].duplicate()
        t0 = time.perf_counter()
        problem.hessian_mult(vs[0], first, gauss_newton=True)
        t_first = time.perf_counter() - t0
        outs = [v.duplicate() for v in vs[1:]]
        t0 = time.perf_counter()
        for v, o in zip(vs[1:], outs, strict=True):
            problem.hessian_mult(v, o, gauss_newton=True)
        seq[label] = {
            "first_action_s": t_first,
            "later_s_per_action": (time.perf_counter() - t0) / repeats,
            "actions": np.array([o.getArray(readonly=True).copy() for o in outs]),
        }
    ParticleDerivatives.KEEP_OPERATORS = True
    a, b = seq["kept_operators"].pop("actions"), seq["vectors"].pop("actions")
    diff = comm.allreduce(float(np.max(np.abs(a - b))), op=MPI.MAX)
    scale = comm.allreduce(float(np.max(np.abs(b))), op=MPI.MAX)
    out["one_at_a_time"] = {
        **seq,
        "repeats": repeats,
        "max_relative_difference": diff / scale,
        "speedup_later": seq["vectors"]["later_s_per_action"]
        / seq["kept_operators"]["later_s_per_action"],
    }
    if comm.rank == 0:
        print(json.dumps(out, indent=1))
    if args.keep is None and comm.rank == 0:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
