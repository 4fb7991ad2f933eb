"""``femkin compare CASE_A CASE_B ...``: which model do the data support (Laplace evidence).

Every case directory is one model variant fitted to the same data (its own ``case.toml``:
kinetic law, learned blocks, priors; a twin's data simulated in one case can be read by the
others through ``[data] video``). For each case whose ``results/`` do not yet hold a finished
fit with the evidence of that fit, the whole study runs first (``femkin run`` with the fit
resumed from its checkpoint where there is one). Cases whose data differ are refused before
any fit, in one line. Writes ``compare.json``, ``compare.md`` and ``compare_curves.png``
(:mod:`femkin.compare`) into ``--out``, by default ``CASE_A/compare/`` (inside the first case
directory: nothing is written outside the case directories and ``--out``).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    """Add the ``compare`` verb."""
    parser = subparsers.add_parser(
        "compare",
        help="compare model variants fitted on the same data by their Laplace evidence",
        description="Fit (where needed) and compare cases on the same data: log evidence, "
        "log Bayes factors against the best, misfit RMS, parameters, data-informed directions, "
        "and the learned curves side by side. Writes compare.json, compare.md and "
        "compare_curves.png into --out (default: CASE_A/compare).",
    )
    parser.add_argument("cases", type=Path, nargs="+", help="case directories (two or more)")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: CASE_A/compare)"
    )
    parser.add_argument(
        "--no-run",
        action="store_true",
        help="only read the results; a case without current results is an error",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run)


def compare(cases, *, out=None, run_missing: bool = True, quiet: bool = False, comm=None):
    """Compare cases (collective); returns the ``compare.json`` content on rank 0.

    Raises:
        InputError: fewer than two cases, the same case twice, data that differ, or (with
            ``run_missing=False``) a case without current results.
    """
    from femkin._fem import MPI
    from femkin.case import load_case
    from femkin.commands.run import run_case
    from femkin.commands.simulate import simulate
    from femkin.compare import check_same_data, read_entry, results_current, write_comparison
    from femkin.errors import InputError
    from femkin.inversion.checkpoint import fingerprint_changes, peek_state
    from femkin.outputs import check_writable
    from femkin.study import checkpoint_path, checkpoint_settings, collective, open_study

    comm = comm or MPI.COMM_WORLD

    def load_all():
        loaded = [load_case(c) for c in cases]
        dirs = [c.dir.resolve() for c in loaded]
        if len(loaded) < 2:
            raise InputError("femkin compare", "cases", "two or more case directories", len(loaded))
        if len(set(dirs)) < len(dirs):
            raise InputError("femkin compare", "cases", "distinct case directories", cases)
        return loaded

    loaded = collective(comm, load_all)
    out_dir = Path(out) if out is not None else loaded[0].dir / "compare"
    # The data first (a twin's simulated video), so that differing data stop before any fit.
    for path, case in zip(cases, loaded, strict=True):
        if case.simulate is not None and not (case.dir / "simulated" / "video.npz").exists():
            if not run_missing:
                raise InputError(
                    case.dir / "simulated" / "video.npz",
                    None,
                    "the simulated video of this twin (compare without --no-run simulates it)",
                    "no such file",
                )
            simulate(path, comm, quiet=quiet)
    studies = [open_study(path, comm) for path in cases]
    collective(comm, check_same_data, studies)
    check_writable(comm, out_dir)  # before any fit
    for path, study in zip(cases, studies, strict=True):
        state = peek_state(checkpoint_path(study.case), comm)
        changed = bool(
            state and fingerprint_changes(state.get("fingerprint"), checkpoint_settings(study)[0])
        )
        current = comm.bcast(results_current(study.case.dir) if comm.rank == 0 else None, root=0)
        if current and not changed:
            continue
        if not run_missing:
            raise InputError(
                study.case.dir / "results" / "uq.json",
                "evidence",
                "the evidence of this case's finished fit (run 'femkin run CASE', or compare "
                "without --no-run)",
                "a fit of other inputs" if changed else "none",
            )
        if comm.rank == 0 and not quiet:
            why = " (the case changed since its fit: fitting afresh)" if changed else ""
            print(f"compare: running {study.case.dir}{why}", flush=True)
        run_case(path, resume_or_start=not changed, quiet=quiet, comm=comm)
    entries = collective(comm, lambda: [read_entry(s) for s in studies])

    def write():
        return write_comparison(out_dir, entries) if comm.rank == 0 else None

    table = collective(comm, write)
    return table


def run(args: argparse.Namespace) -> int:
    """The ``compare`` verb."""
    from femkin._fem import MPI

    comm = MPI.COMM_WORLD
    table = compare(
        args.cases, out=args.out, run_missing=not args.no_run, quiet=args.quiet, comm=comm
    )
    if comm.rank == 0 and table is not None and not args.quiet:
        out = args.out if args.out is not None else Path(args.cases[0]) / "compare"
        for r in table["rows"]:
            lo, hi = r["log_evidence_bounds"]
            print(
                f"{r['case']:>20s}  log Z {r['log_evidence']:10.2f} [{lo:.2f}, {hi:.2f}]  "
                f"log BF vs best {r['log_bf_vs_best']:7.2f}  {r['strength']}",
                flush=True,
            )
        print(f"compare: {out / 'compare.md'}", flush=True)
    return 0
