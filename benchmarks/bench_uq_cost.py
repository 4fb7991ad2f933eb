"""Cost of the uncertainty step against the inversion, in Hessian actions and wall time.

Default: the tiny twin case of ``tests/workflow_case.py`` (simulated, inverted with
``--max-iterations`` TAO iterations, then ``femkin uq`` with ``--samples`` forward samples).
With ``--case DIR`` an already inverted case (e.g. ``cases/demo`` after ``femkin invert``) is
analysed instead; the inversion's cost then comes from its ``results/summary.json``.

Reported: the inversion's wall time (fit) and its solve counts (forward runs, gradients,
Hessian actions inside Newton-CG), the UQ's Hessian actions (eigensolver), forward samples and
wall time per stage, and the ratios UQ / inversion. The issue's target: the uncertainty step
costs no more than the inversion itself. Counting one Hessian action as about one gradient
(a tangent plus an adjoint solve), ``work`` compares ``gradients + hessian actions``.
Prints one JSON object.

Run: ``.venv/bin/python benchmarks/bench_uq_cost.py [--case cases/demo]``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def measure(
    case: pathlib.Path, *, prepare: bool, max_iterations: int, samples: int, max_rank: int | None
) -> dict:
    from femkin.cli import main

    if prepare:
        from twin_case import write_case

        write_case(case, max_iterations=max_iterations)
        extra = f"\n[uq]\nsamples = {samples}\n"
        if max_rank is not None:
            extra += f"max_rank = {max_rank}\n"
        with open(case / "case.toml", "a") as f:
            f.write(extra)
        assert main(["simulate", str(case), "--quiet"]) == 0
        t0 = time.perf_counter()
        assert main(["invert", str(case), "--quiet"]) == 0
        invert_wall = time.perf_counter() - t0
    else:
        invert_wall = None
    t0 = time.perf_counter()
    assert main(["uq", str(case), "--quiet"]) == 0
    uq_wall = time.perf_counter() - t0
    summary = json.loads((case / "results" / "summary.json").read_text())
    uq = json.loads((case / "results" / "uq.json").read_text())
    solves = summary["solves"]
    inv_work = solves["gradient"] + solves["hessian"]
    uq_work = uq["hessian_actions"] + 2  # + the gradient at the MAP point, + restoring it
    fit = summary["wall_time"]["fit"]
    return {
        "case": str(case),
        "inversion": {
            "iterations": summary["iterations"],
            "tao_reason": summary["tao_reason"],
            "solves": solves,
            "fit_wall": fit,
            "command_wall": invert_wall,
        },
        "uq": {
            "rank": uq["rank"],
            "smallest_eigenvalue": uq["eigenvalues"][-1],
            "hessian_actions": uq["hessian_actions"],
            "samples": (uq.get("c_t") or {}).get("samples", 0),
            "wall_time": uq["wall_time"],
            "command_wall": uq_wall,
        },
        "ratios": {
            "work_uq_over_inversion": uq_work / max(inv_work, 1),
            "wall_uq_over_fit": uq["wall_time"]["total"] / fit,
        },
        "target": "uq cost <= inversion cost (ratios <= 1)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--case",
        type=pathlib.Path,
        default=None,
        help="an inverted case to analyse (default: the tiny twin case)",
    )
    parser.add_argument("--max-iterations", type=int, default=20)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--max-rank", type=int, default=None)
    args = parser.parse_args()
    if args.case is not None:
        out = measure(args.case, prepare=False, max_iterations=0, samples=0, max_rank=None)
    else:
        with tempfile.TemporaryDirectory(prefix="femkin-uqcost-") as tmp:
            out = measure(
                pathlib.Path(tmp) / "case",
                prepare=True,
                max_iterations=args.max_iterations,
                samples=args.samples,
                max_rank=args.max_rank,
            )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
