"""``femkin invert CASE``: fit mu_h, j0, k0 and k(x) (the ``[inversion] learn`` blocks).

Meshes (cached), fits with PETSc TAO (options prefix ``femkin_``: ``-femkin_tao_type``; PETSc
options from the case's ``[inversion] petsc_options`` and the command line), checkpoints after
every iteration (``CASE/checkpoints/state.npz``, written atomically; ``--resume`` continues
from it) and writes ``CASE/results/`` (:func:`femkin.report.write_fit_results`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "invert",
        help="fit the model to the video (PETSc TAO)",
        description="Fit the [inversion] learn blocks to the case's video and write "
        "CASE/results/. PETSc options such as -femkin_tao_monitor pass through.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser) -> None:
    parser.add_argument("case", type=Path, help="case directory (or its case.toml)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from CASE/checkpoints/state.npz"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def invert(case_path, *, resume: bool = False, quiet: bool = False, comm=None):
    """Run the fit of a case; returns (problem, result, timings)."""
    from femkin._fem import MPI
    from femkin.inversion.checkpoint import read_checkpoint, write_checkpoint
    from femkin.inversion.fit import build_prior, solve_map
    from femkin.report import write_fit_results
    from femkin.study import build_problem, checkpoint_path, checkpoint_settings, open_study

    comm = comm or MPI.COMM_WORLD
    timings = {}
    t0 = time.perf_counter()
    study = open_study(case_path, comm)
    case = study.case
    problem = build_problem(study, comm, quiet=quiet, require_data=True)
    timings["setup"] = time.perf_counter() - t0
    x0 = problem.initial_vector()
    prior = build_prior(problem, case.inversion["prior"], x0)
    inv = case.inversion
    settings, case_hash = checkpoint_settings(study, problem)
    ckpt = checkpoint_path(case)
    history = []
    x_start = x0.copy()
    if resume:
        state = read_checkpoint(ckpt, problem.space, x_start, case_hash=case_hash)
        if state is not None:
            history = state["history"]
            problem.set_schedules(state.get("schedules", {}))
            if comm.rank == 0 and not quiet:
                at = len(history) and history[-1]["iteration"]
                print(f"resuming from {ckpt} at iteration {at}", flush=True)
    start_it = history[-1]["iteration"] if history else 0

    def monitor(rec, x):
        if comm.rank == 0 and not quiet:
            print(
                f"it {rec['iteration']:3d}  J {rec['objective']:.6e}  |g| "
                f"{rec['gradient_norm']:.3e}  RMS/sigma {rec['misfit_rms']:.3f}  "
                f"{rec['time']:.1f} s",
                flush=True,
            )
        if rec["iteration"] % inv["checkpoint_every"] == 0:
            write_checkpoint(
                ckpt,
                problem.space,
                x,
                {
                    "case_hash": case_hash,
                    "history": history,
                    "settings": settings,
                    "schedules": problem.schedules(),
                },
            )

    t1 = time.perf_counter()
    result = solve_map(
        problem,
        prior,
        x_start,
        tao_type=inv["tao_type"],
        max_iterations=inv["max_iterations"],
        gatol=inv["gatol"],
        grtol=inv["grtol"],
        gauss_newton=inv["hessian"] == "gauss-newton",
        petsc_options=inv["petsc_options"],
        monitor=monitor,
        start_iteration=start_it,
        history=history,
    )
    history[:] = result.history
    if (
        result.reason.startswith("DIVERGED")
        and result.reason != "DIVERGED_MAXITS"
        and comm.rank == 0
    ):
        print(
            f"femkin: warning: TAO stopped with {result.reason} after {result.iterations} "
            "iterations; results are written for the last iterate",
            flush=True,
        )
    write_checkpoint(
        ckpt,
        problem.space,
        result.x,
        {
            "case_hash": case_hash,
            "history": history,
            "settings": settings,
            "done": True,
            "schedules": problem.schedules(),
        },
    )
    timings["fit"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    problem.misfit(result.x)
    write_fit_results(study, problem, result, timings)
    comm.barrier()  # every rank returns once the result files exist
    timings["results"] = time.perf_counter() - t2
    return problem, result, timings, prior


def run(args: argparse.Namespace) -> int:
    from femkin._fem import MPI

    problem, result, timings, _ = invert(args.case, resume=args.resume, quiet=args.quiet)
    if MPI.COMM_WORLD.rank == 0 and not args.quiet:
        print(
            f"done: {result.iterations} iterations, {result.reason}; results in "
            f"{Path(args.case) / 'results'}",
            flush=True,
        )
    return 0
