"""``femkin verify CASE``: Taylor tests of the adjoint gradient and Hessian, per block.

Prints a Taylor table per parameter block (the blocks of ``[verify] blocks``, else the case's
``[inversion] learn``) with each pair of steps marked as used, outside the asymptotic range or
below the noise of J, the verdicts (:func:`femkin.verification.taylor_verdict`) and the Hessian
symmetry. ``--json`` prints one JSON object instead: ``{"gradient": {block: rate}, "hessian":
{block: rate}, "symmetry": asymmetry, "passed": bool, "blocks": {block: {"steps": [...],
"gradient": verdict, "hessian": verdict}}}``, each verdict with its rate, pass/fail, the pairs
used and the roundoff-dominated pairs. The exit status is 1 when a derivative fails.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: Newton tolerances of the forward solves inside the Taylor tests.
TAYLOR_NEWTON_RTOL = 1e-13
TAYLOR_NEWTON_ATOL = 1e-15
#: Largest relative asymmetry |<H u, v> - <u, H v>| accepted for the full Hessian.
SYMMETRY_TOLERANCE = 1e-6


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
    from femkin.study import build_problem, open_study, require_writable
    from femkin.verification import hessian_symmetry, taylor_test

    comm = MPI.COMM_WORLD
    study = open_study(args.case, comm)
    require_writable(comm, study, "meshes")
    case = study.case
    blocks = args.blocks or case.verify["blocks"] or case.inversion["learn"]
    learn = list(dict.fromkeys(list(case.inversion["learn"]) + list(blocks)))
    problem = build_problem(study, comm, learn=learn, require_data=True)
    # J is only as accurate as the Newton solves: with the case's tolerances (1e-10) the
    # third-order remainder of the smallest steps reaches that noise. Tighter here; SNES's
    # step-length test still ends Newton where the residual stagnates at roundoff.
    problem.set_newton_tolerances(TAYLOR_NEWTON_RTOL, TAYLOR_NEWTON_ATOL)
    x = problem.initial_vector()
    out: dict = {"gradient": {}, "hessian": {}, "symmetry": None, "passed": True, "blocks": {}}
    for block in blocks:
        if block not in problem.learn:
            continue
        res = taylor_test(problem, x, block, steps=case.verify["steps"], seed=case.verify["seed"])
        out["gradient"][block] = res.gradient_rate
        out["hessian"][block] = res.hessian_rate
        out["blocks"][block] = {
            "steps": res.steps,
            "gradient_remainders": res.gradient_remainders,
            "hessian_remainders": res.hessian_remainders,
            "noise": res.floor,
            "gradient": res.gradient.as_dict(),
            "hessian": None if res.hessian is None else res.hessian.as_dict(),
        }
        out["passed"] = out["passed"] and res.passed
        if comm.rank == 0 and not args.json:
            print(_table(res), flush=True)
    out["symmetry"] = hessian_symmetry(problem, x)
    out["symmetry_passed"] = out["symmetry"] < SYMMETRY_TOLERANCE
    out["passed"] = out["passed"] and out["symmetry_passed"]
    if comm.rank == 0:
        if args.json:
            print(json.dumps(out))
        else:
            print(
                f"Hessian symmetry: relative asymmetry {out['symmetry']:.3e} "
                f"({'ok' if out['symmetry_passed'] else 'FAILED'}, "
                f"tolerance {SYMMETRY_TOLERANCE:.0e})",
                flush=True,
            )
            print("all derivatives pass" if out["passed"] else "a derivative FAILED", flush=True)
    return 0 if out["passed"] else 1


def _mark(verdict, i: int) -> str:
    if i in verdict.roundoff:
        return "noise"
    if i in verdict.pairs:
        return "used"
    return "-"


def _table(res) -> str:
    """The Taylor table of one block: remainders, pair rates and their use, the verdicts."""
    lines = [f"block {res.block}"]
    head = f"  {'h':>10} {'|J(x+hd)-J-hg.d|':>20} {'rate':>6} {'':5}"
    lines.append(head + (f" {'... - h^2/2 d.H.d':>20} {'rate':>6}" if res.hessian else ""))
    verdicts = [res.gradient] + ([res.hessian] if res.hessian else [])
    remainders = [res.gradient_remainders, res.hessian_remainders]
    for i, h in enumerate(res.steps):
        row = f"  {h:10.3e}"
        for v, r in zip(verdicts, remainders, strict=False):
            if i == 0:
                row += f" {r[i]:20.6e} {'':>6} {'':5}"
            else:
                rate = v.pair_rates[i - 1]
                row += f" {r[i]:20.6e} {rate:6.2f} {_mark(v, i - 1):5}"
        lines.append(row)
    for name, v in zip(("gradient", "Hessian"), verdicts, strict=False):
        lines.append(f"  {name}: {'ok' if v.passed else 'FAILED'}, {v.reason}")
    return "\n".join(lines)
