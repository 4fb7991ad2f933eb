"""``femkin verify CASE``: Taylor tests of the adjoint gradient and Hessian, per block.

Prints a Taylor table per parameter block (the blocks of ``[verify] blocks``, else the case's
``[inversion] learn``), and the Hessian symmetry; ``--json`` prints one JSON object instead:
``{"gradient": {block: rate}, "hessian": {block: rate}, "symmetry": asymmetry}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: Newton tolerances of the forward solves inside the Taylor tests.
TAYLOR_NEWTON_RTOL = 1e-13
TAYLOR_NEWTON_ATOL = 1e-15


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="Taylor tests of gradients and Hessians for each parameter block",
        description="Check the adjoint gradient (rate 2) and the full Hessian (rate 3) of the "
        "misfit with Taylor tests along random directions in each parameter block, and the "
        "symmetry <H u, v> = <u, H v>.",
    )
    parser.add_argument("case", type=Path, help="case directory (or its case.toml)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--blocks",
        nargs="+",
        help="blocks to check (default: [verify] blocks, else [inversion] learn)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from femkin._fem import MPI
    from femkin.study import build_problem, open_study
    from femkin.verification import hessian_symmetry, taylor_test

    comm = MPI.COMM_WORLD
    study = open_study(args.case, comm)
    case = study.case
    blocks = args.blocks or case.verify["blocks"] or case.inversion["learn"]
    learn = list(dict.fromkeys(list(case.inversion["learn"]) + list(blocks)))
    problem = build_problem(study, comm, learn=learn)
    # J is only as accurate as the Newton solves: with the case's tolerances (1e-10) the
    # third-order remainder of the smallest steps reaches that noise. Tighter here; SNES's
    # step-length test still ends Newton where the residual stagnates at roundoff.
    problem.set_newton_tolerances(TAYLOR_NEWTON_RTOL, TAYLOR_NEWTON_ATOL)
    x = problem.initial_vector()
    out = {"gradient": {}, "hessian": {}, "symmetry": None}
    for block in blocks:
        if block not in problem.learn:
            continue
        res = taylor_test(problem, x, block, steps=case.verify["steps"], seed=case.verify["seed"])
        out["gradient"][block] = res.gradient_rate
        out["hessian"][block] = res.hessian_rate
        if comm.rank == 0 and not args.json:
            print(f"block {block}")
            print(f"  {'h':>10} {'|J(x+hd)-J-hg.d|':>20} {'... - h^2/2 d.H.d':>20}")
            for h, a, b in zip(res.steps, res.gradient_remainders, res.hessian_remainders):
                mark = "  (below the noise of J: not used)" if min(a, b) <= res.floor else ""
                print(f"  {h:10.3e} {a:20.6e} {b:20.6e}{mark}")
            print(
                f"  rates: gradient {res.gradient_rate:.3f}, Hessian {res.hessian_rate:.3f}",
                flush=True,
            )
    out["symmetry"] = hessian_symmetry(problem, x)
    if comm.rank == 0:
        if args.json:
            print(json.dumps(out))
        else:
            print(f"Hessian symmetry: relative asymmetry {out['symmetry']:.3e}", flush=True)
    return 0
