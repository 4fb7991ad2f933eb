"""``femkin invert CASE``: fit mu_h, j0, k0 and k(x) (the ``[inversion] learn`` blocks).

Meshes (cached), fits by inexact Newton–CG (:mod:`femkin.inversion.newton`; or PETSc TAO with
``[inversion] method = "tao"``), checkpoints after every iteration
(``CASE/checkpoints/state.npz``, written atomically, with a fingerprint of the inputs;
``--resume`` continues from it and repeats the uninterrupted run's steps) and writes
``CASE/results/`` (:func:`femkin.report.write_fit_results`; ``summary.json`` says whether the
fit converged and why it stopped).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import NamedTuple


def register(subparsers) -> None:
    """Add the ``invert`` verb."""
    parser = subparsers.add_parser(
        "invert",
        help="fit the model to the video (PETSc TAO)",
        description="Fit the [inversion] learn blocks to the case's video and write "
        "CASE/results/. PETSc options such as -femkin_tao_monitor pass through.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser) -> None:
    """The arguments of ``invert`` (shared with ``run``)."""
    parser.add_argument("case", type=Path, help="case directory (or its case.toml)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue from CASE/checkpoints/state.npz (an error when there is none)",
    )
    group.add_argument(
        "--resume-or-start",
        action="store_true",
        help="continue from the checkpoint if there is one, else start afresh",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")


class AlreadyFinished(NamedTuple):
    """What ``invert(..., resume=True)`` returns for a fit that had already finished."""

    iterations: int
    reason: str
    results: Path


def _resume_state(ckpt, study, fingerprint, *, required: bool, comm):
    """The checkpoint state to resume from (None: start afresh), or AlreadyFinished."""
    from femkin.errors import InputError
    from femkin.inversion.checkpoint import fingerprint_changes, peek_state

    state = peek_state(ckpt, comm)
    if state is None:
        if required:
            raise InputError(
                ckpt, None, "a checkpoint to resume (use --resume-or-start to start afresh)", "none"
            )
        return None
    changed = fingerprint_changes(state.get("fingerprint"), fingerprint)
    if changed:
        raise InputError(
            ckpt,
            None,
            "a checkpoint of this case's inputs",
            f"one written for other inputs ({', '.join(changed)} changed); remove it or run "
            "without --resume",
        )
    summary = study.case.dir / "results" / "summary.json"
    finished = (
        state.get("converged") or state["iteration"] >= study.case.inversion["max_iterations"]
    )
    if state.get("done") and finished and summary.exists():
        return AlreadyFinished(int(state["iteration"]), str(state.get("reason", "")), summary)
    return state


def invert(
    case_path, *, resume: bool = False, resume_or_start: bool = False, quiet=False, comm=None
):
    """Run the fit of a case.

    Returns:
        (problem, result, timings, prior), or an :class:`AlreadyFinished` when resuming a
        finished fit (results untouched).
    """
    from femkin._fem import MPI
    from femkin.errors import CaseError
    from femkin.inversion.checkpoint import (
        exit_after_checkpoint_hook,
        read_checkpoint,
        write_checkpoint,
    )
    from femkin.inversion.fit import build_prior, solve_map
    from femkin.inversion.tao import tao_types
    from femkin.outputs import ResultSet, shared_run_id
    from femkin.report import write_fit_results
    from femkin.study import (
        build_problem,
        checkpoint_path,
        checkpoint_settings,
        open_study,
        require_writable,
    )

    comm = comm or MPI.COMM_WORLD
    timings = {}
    t0 = time.perf_counter()
    study = open_study(case_path, comm)
    case = study.case
    inv = case.inversion
    if inv["method"] == "tao" and inv["tao_type"] not in tao_types():
        raise CaseError(
            case.file,
            "inversion.tao_type",
            "a PETSc TAO type (" + ", ".join(sorted(tao_types())) + ")",
            repr(inv["tao_type"]),
        )
    if inv["method"] == "newton" and inv["petsc_options"] and comm.rank == 0:
        print(
            "femkin: warning: [inversion.petsc_options] ("
            + ", ".join(inv["petsc_options"])
            + ') apply to method = "tao" only; Newton-CG ignores them',
            flush=True,
        )
    prints, case_hash = checkpoint_settings(study)
    ckpt = checkpoint_path(case)
    state = None
    if resume or resume_or_start:
        state = _resume_state(ckpt, study, prints, required=resume, comm=comm)
        if isinstance(state, AlreadyFinished):
            return state
    require_writable(comm, study, "meshes", "checkpoints", "results", ".femkin")
    # a resumed fit is the same run (uq checks that results/ holds this run's fit)
    run_id = state.get("run_id") if state is not None else None
    run_id = run_id or shared_run_id(comm)
    problem = build_problem(study, comm, quiet=quiet, require_data=True)
    timings["setup"] = time.perf_counter() - t0
    x0 = problem.initial_vector()
    prior = build_prior(problem, inv["prior"], x0)
    x_start = x0.copy()
    solver_state = None
    if state is not None:
        read_checkpoint(ckpt, problem.space, x_start)
        problem.set_schedules(state.get("schedules", {}))
        solver_state = state.get("solver")
        if comm.rank == 0 and not quiet:
            print(f"resuming from {ckpt} at iteration {state['iteration']}", flush=True)

    def monitor(rec, x, snapshot):
        if comm.rank == 0 and not quiet:
            extra = f"  decrement {rec['decrement']:.2e}" if "decrement" in rec else ""
            print(
                f"it {rec['iteration']:3d}  J {rec['objective']:.6e}  |g| "
                f"{rec['gradient_norm']:.3e}  RMS/sigma {rec['misfit_rms']:.3f}  "
                f"{rec['time']:.1f} s{extra}",
                flush=True,
            )
        if rec["iteration"] % inv["checkpoint_every"] == 0:
            write_checkpoint(
                ckpt,
                problem.space,
                x,
                {
                    "fingerprint": prints,
                    "case_hash": case_hash,
                    "iteration": int(snapshot["iteration"]),
                    "history": snapshot["history"],
                    "solver": snapshot,
                    "schedules": problem.schedules(),
                    "run_id": run_id,
                },
            )
            exit_after_checkpoint_hook(int(snapshot["iteration"]), comm)

    t1 = time.perf_counter()
    result = solve_map(
        problem,
        prior,
        x_start,
        method=inv["method"],
        tao_type=inv["tao_type"],
        max_iterations=inv["max_iterations"],
        decrement_tol=inv["decrement_tol"],
        gatol=inv["gatol"],
        grtol=inv["grtol"],
        gttol=inv["gttol"],
        cg_max_iterations=inv["cg_max_iterations"],
        gauss_newton=inv["hessian"] == "gauss-newton",
        petsc_options=inv["petsc_options"],
        monitor=monitor,
        state=solver_state,
    )
    if not result.converged and comm.rank == 0:
        print(
            f"femkin: warning: the fit stopped with {result.reason} after {result.iterations} "
            f"iterations: {result.stop_reason}",
            flush=True,
        )
    timings["fit"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    problem.misfit(result.x)
    # One consistent set: results/ is replaced only once every file is written.
    with ResultSet(case.dir, comm, verb="invert", run_id=run_id):
        write_fit_results(study, problem, result, timings)
    write_checkpoint(
        ckpt,
        problem.space,
        result.x,
        {
            "fingerprint": prints,
            "case_hash": case_hash,
            "iteration": int(result.iterations),
            "history": result.history,
            "solver": result.state,
            "converged": bool(result.converged),
            "done": True,
            "reason": result.reason,
            "schedules": problem.schedules(),
            "run_id": run_id,
        },
    )
    comm.barrier()  # every rank returns once the result files exist
    timings["results"] = time.perf_counter() - t2
    return problem, result, timings, prior


def run(args: argparse.Namespace) -> int:
    """``femkin invert``: exit 0 after a fit, or after saying that it had already finished."""
    from femkin._fem import MPI

    out = invert(
        args.case, resume=args.resume, resume_or_start=args.resume_or_start, quiet=args.quiet
    )
    if isinstance(out, AlreadyFinished):
        if MPI.COMM_WORLD.rank == 0:
            print(
                f"femkin: the fit of {args.case} already finished ({out.iterations} iterations, "
                f"{out.reason}); results in {out.results.parent} left as they are",
                flush=True,
            )
        return 0
    problem, result, timings, _ = out
    if MPI.COMM_WORLD.rank == 0 and not args.quiet:
        print(
            f"done: {result.iterations} iterations, {result.reason}; results in "
            f"{Path(args.case) / 'results'}",
            flush=True,
        )
    return 0
