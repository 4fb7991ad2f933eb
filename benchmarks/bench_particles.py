"""Eight-particle synthetic study fitted on 1 and on 2 ranks: the parallel speed-up (issue #4).

Writes an 8-particle twin case (:mod:`_synthetic`), simulates it once under ``mpirun -n 2``,
copies it, and runs the same fit (a fixed number of TAO iterations, ``--iterations``) serially
and under ``.venv/bin/mpirun -n 2``, each in a fresh process. Prints one JSON object: both
runs' records (wall and CPU times, per-phase times, solves, load average) and

    speedup_wall = T_fit(1 rank) / T_fit(2 ranks)          (target >= 1.7)
    speedup_cpu  = CPU(1 rank) / max over ranks CPU(2 ranks)

The machine is shared: the wall-clock speed-up is only meaningful when the load average is
below ~2; the CPU-time ratio is what the speed-up would be with two idle cores.

    .venv/bin/python benchmarks/bench_particles.py [--particles 8] [--iterations 4] [--keep DIR]

Measured (2026-11-25, 2-core machine at load ~1, BLAS on one thread per rank; defaults: 8
particles x ~450 px x 11 frames = 35,020 observed values, 6 TAO iterations each): fit 45.9 s on
1 rank vs 16.1 s on 2 ranks, speed-up 2.85 (CPU of the busiest rank 53.7 s vs 20.8 s, 2.58);
the two fits' coefficients agree to 2.7e-9 relative. The speed-up is super-linear: every phase
(forward 28.8 vs 10.2 s, adjoint 7.8 vs 2.7 s, Hessian 11.2 vs 4.1 s) runs more than 2x faster
with half the particles per process (not investigated further; one rank holds twice the
particles' meshes, forms, trajectories and kept factorisations). With tiny particles (60 px,
5 frames: fits of 3-4 s) fixed costs dominate and the speed-up was 1.49.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
MPIRUN = ROOT / ".venv" / "bin" / "mpirun"
WORKER = HERE / "_synthetic.py"


def run_worker(verb: str, case: pathlib.Path, ranks: int) -> dict | None:
    """Run the worker in a fresh process on ``ranks`` ranks; its JSON record (fit) or None."""
    cmd = [str(PYTHON), str(WORKER), verb, str(case)]
    if ranks > 1:
        cmd = [str(MPIRUN), "-n", str(ranks)] + cmd
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--pixels", type=float, default=450.0, help="pixels per particle")
    parser.add_argument("--frames", type=int, default=11)
    parser.add_argument("--iterations", type=int, default=6, help="TAO iterations of each fit")
    parser.add_argument("--keep", type=pathlib.Path, help="work directory to keep")
    args = parser.parse_args(argv)
    from twin_case import write_synthetic_case

    work = args.keep or pathlib.Path(tempfile.mkdtemp(prefix="femkin-bench-particles-"))
    base = work / "case"
    if base.exists():
        shutil.rmtree(base)
    write_synthetic_case(
        base,
        args.particles,
        pixels=args.pixels,
        n_frames=args.frames,
        max_iterations=args.iterations,
    )
    t0 = time.perf_counter()
    run_worker("simulate", base, 2)
    t_sim = time.perf_counter() - t0
    runs = {}
    for ranks in (1, 2):
        case = work / f"np{ranks}"
        if case.exists():
            shutil.rmtree(case)
        shutil.copytree(base, case, ignore=shutil.ignore_patterns("meshes", "results"))
        runs[ranks] = run_worker("fit", case, ranks)
    one, two = runs[1], runs[2]
    record = {
        "particles": one["particles"],
        "n_observed": one["n_observed"],
        "iterations": [one["iterations"], two["iterations"]],
        "simulate_s": t_sim,
        "speedup_wall": one["wall_s"]["fit"] / two["wall_s"]["fit"],
        "speedup_cpu": one["cpu_s"]["max_rank"] / two["cpu_s"]["max_rank"],
        "coefficients_max_rel_diff": max(
            abs(a - b) / max(abs(b), 1e-12)
            for k in ("mu_h", "j0")
            for a, b in zip(two["coefficients"][k], one["coefficients"][k], strict=True)
        ),
        "cpu_count": os.cpu_count(),
        "runs": {"1": one, "2": two},
    }
    print(json.dumps(record, indent=1))
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
