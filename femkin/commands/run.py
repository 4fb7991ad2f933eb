"""``femkin run CASE``: the whole study — prepare, mesh, simulate (twin experiments), invert, uq.

A case whose ``[prepare]`` section names raw stacks starts from them: ``femkin prepare`` makes
the ``[data]`` video first, and again only when the stacks, the reference spectra or the
``[prepare]`` settings changed since (see :mod:`femkin.stxm.provenance`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    """Add the ``run`` verb."""
    parser = subparsers.add_parser(
        "run",
        help="the whole study: (prepare), mesh, (simulate), invert, uq, report",
        description="Run a case end to end. A case whose [prepare] section names raw STXM "
        "stacks is prepared first (skipped while its video is newer than the stacks, the "
        "references and the [prepare] settings). A case with a [simulate] section is a twin "
        "experiment: its data are simulated first (if CASE/simulated/video.npz is missing).",
    )
    parser.add_argument("case", type=Path, help="case directory (or its case.toml)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the fit from its checkpoint"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Prepare (when needed), mesh, (simulate), invert and sample the posterior of a case."""
    from femkin._fem import MPI

    comm = MPI.COMM_WORLD
    case = run_case(args.case, resume=args.resume, quiet=args.quiet, comm=comm)
    if comm.rank == 0 and not args.quiet:
        import json

        summary = json.loads((case.dir / "results" / "summary.json").read_text())
        print(
            f"misfit RMS {summary['misfit_rms']:.4f}; "
            + ", ".join(f"{k} {v:.3g}" for k, v in summary.get("truth_comparison", {}).items())
            + f"; report: {case.dir / 'results' / 'report.md'}",
            flush=True,
        )
    return 0


def run_case(
    case_path, *, resume: bool = False, resume_or_start: bool = False, quiet: bool = False, comm
):
    """The whole study of one case (collective): (prepare), (simulate), invert, uq.

    ``resume_or_start`` continues a fit from its checkpoint when there is one (``femkin
    compare``); a fit that had finished goes straight to the UQ step. Returns the loaded case.
    """
    from femkin.case import load_case
    from femkin.commands.invert import AlreadyFinished, invert
    from femkin.commands.prepare import prepare_case
    from femkin.commands.simulate import simulate
    from femkin.commands.uq import uq, uq_at
    from femkin.study import collective, open_study

    case = collective(comm, load_case, case_path)
    if case.prepare["stacks"]:
        _check_prepare_target(case)
        prepare_case(case_path, comm, quiet=quiet)
    if case.simulate is not None and not (case.dir / "simulated" / "video.npz").exists():
        simulate(case_path, comm, quiet=quiet)
    out = invert(case_path, resume=resume, resume_or_start=resume_or_start, quiet=quiet, comm=comm)
    if isinstance(out, AlreadyFinished):  # the fit had finished: UQ from its checkpoint
        if comm.rank == 0 and not quiet:
            print(f"invert: already finished ({out.iterations} iterations, {out.reason})")
        uq(case_path, quiet=quiet, comm=comm)
    else:  # the UQ step on the in-memory problem at the MAP point (see femkin.commands.uq)
        problem, result, timings, prior = out
        uq_at(
            open_study(case_path, comm),
            problem,
            prior,
            result.x,
            result.history,
            quiet=quiet,
            fit_converged=bool(result.converged),
        )
    return case


def _check_prepare_target(case) -> None:
    """The video that prepare writes must be the one that ``[data]`` reads."""
    from femkin.errors import CaseError

    out, video = case.resolve(case.prepare["out"]), case.resolve(case.data["video"])
    if out.resolve() != video.resolve():
        raise CaseError(
            case.file,
            "prepare.out",
            f"the video that [data] reads ('{case.data['video']}') when [prepare] names stacks",
            f"'{case.prepare['out']}'",
        )
