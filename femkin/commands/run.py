"""``femkin run CASE``: the whole study — mesh, simulate (twin experiments), invert, uq, report."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="the whole study: mesh, (simulate), invert, uq, report",
        description="Run a case end to end. A case with a [simulate] section is a twin "
        "experiment: its data are simulated first (if CASE/simulated/video.npz is missing).",
    )
    parser.add_argument("case", type=Path, help="case directory (or its case.toml)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the fit from its checkpoint"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from femkin._fem import MPI
    from femkin.case import load_case
    from femkin.commands.invert import invert
    from femkin.commands.simulate import simulate
    from femkin.study import collective

    comm = MPI.COMM_WORLD
    case = collective(comm, load_case, args.case)
    if case.simulate is not None and not (case.dir / "simulated" / "video.npz").exists():
        simulate(args.case, comm, quiet=args.quiet)
    problem, result, timings, prior = invert(args.case, resume=args.resume, quiet=args.quiet)
    # The UQ step on the in-memory problem at the MAP point (see femkin.commands.uq).
    from femkin.commands.uq import uq_at
    from femkin.study import open_study

    uq_at(open_study(args.case, comm), problem, prior, result.x, result.history, quiet=args.quiet)
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
