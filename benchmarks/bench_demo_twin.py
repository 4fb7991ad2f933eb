"""Benchmark: the demo twin experiment end to end, with CPU and wall time per phase.

Copies ``cases/demo`` (case.toml, data) into a temporary directory and runs its phases as
separate ``femkin`` processes, the steps of ``femkin run``: ``simulate`` (the data, on the
finer mesh, noise 0.07), ``invert`` (the TAO fit) and ``uq`` (the Laplace posterior). CPU time
(user + sys of each child process) is the number to compare on this shared 2-core machine,
where wall times are inflated by other jobs. Prints one JSON object: per-phase ``wall_s`` and
``cpu_s``, their totals, the fit's iterations and solve counts, and the twin metrics from
``results/summary.json`` against the issue's thresholds (misfit RMS within 10 % of the noise,
Pearson correlation of ln k with the truth >= 0.85, mu_h within 0.3 kT on c in [0.1, 0.9]).

Run: ``.venv/bin/python benchmarks/bench_demo_twin.py [--keep DIR] [--no-uq]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "cases" / "demo"
FEMKIN = Path(sys.executable).parent / "femkin"

#: The issue's verification thresholds for the demo twin experiment.
THRESHOLDS = {"misfit_rms_relative_error": 0.10, "ln_k_pearson": 0.85, "mu_h_max_error_kT": 0.3}


def copy_case(dest: Path) -> Path:
    """Copy the demo's inputs (case.toml, data/) into ``dest/demo``; no outputs."""
    case = dest / "demo"
    case.mkdir(parents=True)
    shutil.copy2(DEMO / "case.toml", case / "case.toml")
    shutil.copytree(DEMO / "data", case / "data")
    return case


def timed(argv: list[str], log: Path) -> dict[str, float]:
    """Run one child process; its wall time and CPU time (user + sys, children included)."""
    before = os.times()
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - start
    after = os.times()
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({proc.returncode}); see {log}:\n" + log.read_text()[-3000:]
        )
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


def run_demo(case: Path, *, uq: bool = True) -> dict:
    """Run simulate, invert (and uq) on ``case``; return the timings and the twin metrics."""
    phases = {}
    verbs = ["simulate", "invert"] + (["uq"] if uq else [])
    for verb in verbs:
        phases[verb] = timed([str(FEMKIN), verb, str(case)], case / f"{verb}.log")
    summary = json.loads((case / "results" / "summary.json").read_text())
    truth = summary["truth_comparison"]
    noise = truth["noise"]
    metrics = {
        "misfit_rms": summary["misfit_rms"],
        "noise": noise,
        "misfit_rms_relative_error": abs(summary["misfit_rms"] - noise) / noise,
        "ln_k_pearson": truth.get("ln_k_pearson"),
        "mu_h_max_error_kT": truth["mu_h_max_error_kT"],
    }
    passed = {
        "misfit_rms_relative_error": metrics["misfit_rms_relative_error"]
        <= THRESHOLDS["misfit_rms_relative_error"],
        "ln_k_pearson": (metrics["ln_k_pearson"] or 0.0) >= THRESHOLDS["ln_k_pearson"],
        "mu_h_max_error_kT": metrics["mu_h_max_error_kT"] <= THRESHOLDS["mu_h_max_error_kT"],
    }
    return {
        "phases": phases,
        "total": {
            "wall_s": round(sum(p["wall_s"] for p in phases.values()), 2),
            "cpu_s": round(sum(p["cpu_s"] for p in phases.values()), 2),
        },
        "fit": {
            "iterations": summary["iterations"],
            "tao_reason": summary["tao_reason"],
            "solves": summary.get("solves"),
            "n_observed": summary["n_observed"],
            "coefficients": summary["coefficients"],
        },
        "metrics": metrics,
        "thresholds": THRESHOLDS,
        "passed": passed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it")
    parser.add_argument("--no-uq", action="store_true", help="skip the uq phase")
    args = parser.parse_args(argv)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = run_demo(copy_case(args.keep), uq=not args.no_uq)
    else:
        with tempfile.TemporaryDirectory(prefix="femkin-demo-") as tmp:
            result = run_demo(copy_case(Path(tmp)), uq=not args.no_uq)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
