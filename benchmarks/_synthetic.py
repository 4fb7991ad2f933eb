"""Synthetic many-particle twin cases and an instrumented fit, for the inversion benchmarks.

:func:`~twin_case.write_synthetic_case` (``twin_case.py``, shared with the tests) lays out
``n_particles`` elliptical particles (sizes, aspect ratios, orientations and initial Li fractions
drawn from a generator seeded by the particle index) on a grid of 0.05 um pixels and writes the
twin-experiment case of the workflow tests (``femkin simulate`` makes the data). :func:`timed_fit`
runs ``femkin invert``'s :func:`~femkin.commands.invert.invert` with per-phase timers patched onto
:class:`femkin.problem.InverseProblem` (forward runs, adjoint solves of gradients, Hessian actions),
and returns wall and CPU times reduced over the ranks.

Run as a script it is the worker the benchmark drivers start (serially or under mpirun)::

    python benchmarks/_synthetic.py fit CASE          # one JSON line on stdout (rank 0)
    python benchmarks/_synthetic.py simulate CASE
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import sys
import time

from twin_case import synthetic_mask, write_synthetic_case  # noqa: F401  (the workers' API)

ROOT = pathlib.Path(__file__).resolve().parents[1]


class PhaseTimers:
    """Accumulated wall time of forward runs, gradient adjoints and Hessian actions.

    Patches ``misfit``, ``gradient`` and ``hessian_mult`` of
    :class:`femkin.problem.InverseProblem` (the class, for the process's lifetime). A forward
    run inside a gradient counts as forward; the rest of the gradient as adjoint.
    """

    def __init__(self):
        from femkin.problem import InverseProblem

        self.seconds = {"forward": 0.0, "adjoint": 0.0, "hessian": 0.0}
        self.calls = {"forward": 0, "adjoint": 0, "hessian": 0}
        timers = self
        misfit, gradient, hessian = (
            InverseProblem.misfit,
            InverseProblem.gradient,
            InverseProblem.hessian_mult,
        )

        def timed_misfit(problem, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return misfit(problem, *args, **kwargs)
            finally:
                timers.seconds["forward"] += time.perf_counter() - t0
                timers.calls["forward"] += 1

        def timed_gradient(problem, *args, **kwargs):
            t0, f0 = time.perf_counter(), timers.seconds["forward"]
            try:
                return gradient(problem, *args, **kwargs)
            finally:
                inner = timers.seconds["forward"] - f0
                timers.seconds["adjoint"] += time.perf_counter() - t0 - inner
                timers.calls["adjoint"] += 1

        def timed_hessian(problem, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return hessian(problem, *args, **kwargs)
            finally:
                timers.seconds["hessian"] += time.perf_counter() - t0
                timers.calls["hessian"] += 1

        InverseProblem.misfit = timed_misfit
        InverseProblem.gradient = timed_gradient
        InverseProblem.hessian_mult = timed_hessian


def cpu_seconds() -> float:
    """User + system CPU time of this process."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed_fit(case, comm=None) -> dict:
    """Run ``invert(case)`` with phase timers; the record (same on every rank).

    Wall times are rank 0's (every phase is collective); CPU times are summed and maxed over
    ranks; phase shares are of the fit's wall time.
    """
    from femkin._fem import MPI
    from femkin.commands.invert import invert

    comm = comm or MPI.COMM_WORLD
    timers = PhaseTimers()
    comm.barrier()
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    problem, result, timings, _ = invert(case, quiet=True, comm=comm)
    comm.barrier()
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    phases = {k: comm.allreduce(v, op=MPI.MAX) for k, v in timers.seconds.items()}
    summary = None
    if comm.rank == 0:
        summary = json.loads((pathlib.Path(case) / "results" / "summary.json").read_text())
    summary = comm.bcast(summary)
    fit = timings["fit"]
    return {
        "ranks": comm.size,
        "particles": len(problem.labels),
        "n_observed": int(problem.n_observed),
        "groups": problem.distribution.n_groups,
        "iterations": int(result.iterations),
        "tao_reason": str(result.reason),
        "converged": summary.get("converged"),
        "convergence": summary.get("convergence"),
        "wall_s": {"total": wall, **{k: float(v) for k, v in timings.items()}},
        "cpu_s": {
            "sum_over_ranks": comm.allreduce(cpu, op=MPI.SUM),
            "max_rank": comm.allreduce(cpu, op=MPI.MAX),
        },
        "phase_wall_s": phases,
        "phase_share_of_fit": {k: v / fit for k, v in phases.items()},
        "phase_calls": dict(timers.calls),
        "solves": summary["solves"],
        "misfit_rms": summary["misfit_rms"],
        "coefficients": summary["coefficients"],
        "truth_comparison": summary.get("truth_comparison"),
        "load_average": list(os.getloadavg()),
    }


def _main(argv: list[str]) -> int:
    import femkin._fem  # noqa: F401  (dolfinx_solver before dolfinx)
    from femkin._fem import MPI

    verb, case = argv[0], pathlib.Path(argv[1])
    if verb == "simulate":
        from femkin.commands.simulate import simulate

        simulate(case, MPI.COMM_WORLD, quiet=True)
        return 0
    record = timed_fit(case)
    if MPI.COMM_WORLD.rank == 0:
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
