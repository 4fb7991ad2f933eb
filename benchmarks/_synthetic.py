"""Synthetic many-particle twin cases and an instrumented fit, for the inversion benchmarks.

:func:`write_synthetic_case` lays out ``n_particles`` elliptical particles (sizes, aspect ratios,
orientations and initial Li fractions drawn from a generator seeded by the particle index) on
a grid of 0.05 um pixels and writes a twin-experiment case like ``tests/workflow_case.py``'s
(``femkin simulate`` makes the data). :func:`timed_fit` runs ``femkin invert``'s
:func:`~femkin.commands.invert.invert` with per-phase timers patched onto
:class:`femkin.problem.InverseProblem` (forward runs, adjoint solves of gradients, Hessian
actions), and returns wall and CPU times reduced over the ranks.

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

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
PIXEL_SIZE = 0.05

CASE_TOML = """
[data]
video = "data/video.npz"
[mesh]
size = {mesh_size}
[model]
kappa = 0.004
mu_h = [2.5, 0.0]
j0 = [0.0]
k0 = 1.0e-3
[solver]
scheme = "euler"
dc_max = 0.08
[driving]
t = [0.0, 400.0]
mu_e = [1.0, 2.5]
[simulate]
noise = 0.05
seed = 3
m_std = 0.4
m_length = 0.2
mesh_size = {sim_mesh_size}
outputs = ["npz"]
[simulate.model]
mu_h = [3.0, 0.3]
j0 = [-0.4]
k0 = 2.0e-3
[inversion]
learn = {learn}
max_iterations = {max_iterations}
checkpoint_every = 1000000
[inversion.prior]
m_std = 0.5
m_length = 0.15
"""


def synthetic_mask(n_particles: int, pixels: float, seed: int = 11) -> tuple[np.ndarray, list]:
    """Label image of ``n_particles`` ellipses of about ``pixels`` pixels each.

    Returns (mask, per-particle (cy, cx, c_init)). Every particle's shape and initial Li
    fraction come from ``default_rng([seed, index])``, independent of the other particles.
    """
    shapes = []
    for i in range(n_particles):
        rng = np.random.default_rng([seed, i])
        area = pixels * rng.uniform(0.85, 1.15)
        aspect = rng.uniform(1.1, 1.8)
        b = np.sqrt(area / (np.pi * aspect))
        shapes.append((aspect * b, b, rng.uniform(0, np.pi), rng.uniform(0.06, 0.2)))
    cell = int(np.ceil(2 * max(s[0] for s in shapes))) + 4
    n_cols = int(np.ceil(np.sqrt(n_particles)))
    n_rows = int(np.ceil(n_particles / n_cols))
    mask = np.zeros((n_rows * cell, n_cols * cell), dtype=np.int64)
    ii, jj = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    placed = []
    for i, (a, b, theta, c_init) in enumerate(shapes):
        cy, cx = (i // n_cols + 0.5) * cell - 0.5, (i % n_cols + 0.5) * cell - 0.5
        u = (jj - cx) * np.cos(theta) + (ii - cy) * np.sin(theta)
        v = -(jj - cx) * np.sin(theta) + (ii - cy) * np.cos(theta)
        mask[(u / a) ** 2 + (v / b) ** 2 <= 1.0] = i + 1
        placed.append((cy, cx, c_init))
    return mask, placed


def write_synthetic_case(
    root,
    n_particles: int,
    *,
    pixels: float = 60.0,
    n_frames: int = 5,
    max_iterations: int = 4,
    learn=("mu_h", "j0", "k0", "m"),
    mesh_size: float = 1.5,
    sim_mesh_size: float = 1.0,
    seed: int = 11,
) -> pathlib.Path:
    """Write a twin case of ``n_particles`` particles into ``root`` (run ``simulate`` next).

    Args:
        root: the case directory (created).
        n_particles: number of particles (labels 1..n).
        pixels: mean pixel count per particle.
        n_frames: frames over 0..400 s (frame 0 is the given initial state).
        max_iterations: TAO iterations of the fit.
        learn: the ``[inversion] learn`` blocks.
        mesh_size: fitting mesh element size (pixels); ``sim_mesh_size`` for the simulation.
        seed: seed of the particle shapes.

    Returns:
        The case directory.
    """
    from femkin.io.video import Video, write_video

    root = pathlib.Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    mask, placed = synthetic_mask(n_particles, pixels, seed)
    ii, jj = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    t = np.linspace(0.0, 400.0, n_frames)
    c = np.full((n_frames,) + mask.shape, np.nan)
    for i, (cy, cx, c_init) in enumerate(placed):
        inside = mask == i + 1
        c[0][inside] = c_init + 0.02 * np.cos((ii[inside] - cy) / 3.0) * np.sin(
            (jj[inside] - cx) / 4.0
        )
    write_video(
        root / "data" / "video.npz", Video(c, mask, t, PIXEL_SIZE, mu_e=np.full(n_frames, 1.0))
    )
    (root / "case.toml").write_text(
        CASE_TOML.format(
            mesh_size=mesh_size,
            sim_mesh_size=sim_mesh_size,
            max_iterations=max_iterations,
            learn=json.dumps(list(learn)),
        )
    )
    return root


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
    sys.path.insert(0, str(ROOT))
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
