"""Benchmark: fits that converge. Newton–CG against today's TAO settings, side by side.

Twin experiments like the demo (noise 0.07, mu_h, j0, k0 and the m field learned; a
lithiating-then-delithiating mu_e ramp) made by :mod:`benchmarks._synthetic` and fitted with
``femkin invert``'s :func:`~femkin.commands.invert.invert`, each in its own process:

- ``old``: the settings before issue #11 (``method = "tao"``, ``bnls``, CG capped at 20 Hessian
  actions with relative tolerance 0.05, ``gatol = 1e-6``, ``grtol = 1e-8``, no ``gttol``, 100
  iterations);
- ``new``: the default Newton–CG (``decrement_tol = 1e-3`` nats).

Cases: 1 particle (old and new), 2 and 8 particles (new), the 1-particle twin on a mesh refined
2x (element size halved) and with twice the frames (new): the Newton iteration counts should
stay flat. Each record has the stop reason, iterations, the final decrement and gradient norm,
forward/gradient/Hessian counts, wall and CPU time, and the recovery of the truth (mu_h max
error on c in [0.1, 0.9], Pearson correlation of ln k). Prints one JSON object; ratios
(old/new) are measured in the same run.

The default sizes fit a shared 2-core machine (``--pixels 100 --frames 6``); ``--full`` runs
the issue's size (about 600 pixels x 20 frames per particle), which took 100 TAO iterations
and about 45 minutes on one core before.

Run: ``python benchmarks/bench_convergence.py [--full] [--skip-old] [--no-8] [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

OLD = """method = "tao"
tao_type = "bnls"
max_iterations = 100
gatol = 1e-6
grtol = 1e-8
gttol = 0.0
[inversion.petsc_options]
tao_bnk_ksp_max_it = 20
tao_bnk_ksp_rtol = 0.05
"""
NEW = """method = "newton"
max_iterations = 50
decrement_tol = 1e-3
"""


def make_case(
    root: pathlib.Path, *, particles, pixels, frames, mesh_size, settings
) -> pathlib.Path:
    """A demo-like twin: noise 0.07, full ramp, the optimiser ``settings`` in [inversion]."""
    from _synthetic import write_synthetic_case

    case = write_synthetic_case(
        root,
        particles,
        pixels=pixels,
        n_frames=frames,
        mesh_size=mesh_size,
        sim_mesh_size=mesh_size / 1.5,
    )
    text = (case / "case.toml").read_text()
    text = text.replace("mu_e = [1.0, 2.5]", "mu_e = [1.0, 2.5, 1.0]")
    text = text.replace("t = [0.0, 400.0]", "t = [0.0, 200.0, 400.0]")
    text = text.replace("noise = 0.05", "noise = 0.07")
    text = text.replace("max_iterations = 4\n", "")
    text = text.replace("[inversion.prior]", settings + "[inversion.prior]")
    (case / "case.toml").write_text(text)
    return case


def run_worker(case: pathlib.Path, verb: str) -> dict | None:
    """Run ``_synthetic.py verb case`` in a child process; its JSON record and CPU time."""
    before = os.times()
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "_synthetic.py"), verb, str(case)],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    after = os.times()
    if proc.returncode != 0:
        raise RuntimeError(f"{verb} {case} failed:\n{proc.stderr[-3000:]}")
    if verb != "fit":
        return None
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    record["process_wall_s"] = wall
    record["process_cpu_s"] = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return record


def fit_record(case: pathlib.Path) -> dict:
    """Fit ``case`` and condense its record and summary."""
    rec = run_worker(case, "fit")
    summary = json.loads((case / "results" / "summary.json").read_text())
    conv = summary.get("convergence", {})
    return {
        "stop_reason": summary["tao_reason"],
        "converged": summary["converged"],
        "iterations": summary["iterations"],
        "decrement_nats": conv.get("decrement"),
        "gradient_norm": conv.get("gradient_norm"),
        "relative_gradient": conv.get("relative_gradient"),
        "gradient_evaluations": conv.get("gradient_evaluations"),
        "hessian_actions": conv.get("hessian_actions"),
        "forward_solves": summary["solves"].get("forward"),
        "objective": summary["objective"],
        "misfit_rms_over_sigma": summary["misfit_rms"] / 0.07,
        "fit_wall_s": rec["wall_s"]["fit"],
        "fit_cpu_s": rec["process_cpu_s"],
        "n_observed": rec["n_observed"],
        "truth": summary.get("truth_comparison"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the issue's 600 px x 20 frames")
    parser.add_argument("--pixels", type=float, default=100.0)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--mesh-size", type=float, default=1.5)
    parser.add_argument("--skip-old", action="store_true", help="no TAO baseline")
    parser.add_argument("--no-8", action="store_true", help="skip the 8-particle twin")
    parser.add_argument("--keep", type=pathlib.Path, help="keep the cases in this directory")
    parser.add_argument("--only", nargs="+", help="run only these (new_1, old_1, new_2, ...)")
    args = parser.parse_args(argv)
    if args.full:
        args.pixels, args.frames = 628.0, 20
    root = args.keep or pathlib.Path(tempfile.mkdtemp(prefix="femkin-bench-conv-"))
    size = {"pixels_per_particle": args.pixels, "frames": args.frames, "mesh_size": args.mesh_size}
    runs = [("new_1", 1, args.frames, args.mesh_size, NEW)]
    if not args.skip_old:
        runs.append(("old_1", 1, args.frames, args.mesh_size, OLD))
    runs += [
        ("new_1_mesh_2x", 1, args.frames, args.mesh_size / 2, NEW),
        ("new_1_frames_2x", 1, 2 * args.frames - 1, args.mesh_size, NEW),
        ("new_2", 2, args.frames, args.mesh_size, NEW),
    ]
    if not args.no_8:
        runs.append(("new_8", 8, args.frames, args.mesh_size, NEW))
    if args.only:
        runs = [r for r in runs if r[0] in args.only]
    out = {"size": size, "runs": {}}
    for name, particles, frames, mesh_size, settings in runs:
        case = make_case(
            root / name,
            particles=particles,
            pixels=args.pixels,
            frames=frames,
            mesh_size=mesh_size,
            settings=settings,
        )
        run_worker(case, "simulate")
        out["runs"][name] = {"particles": particles, "frames": frames, "mesh_size": mesh_size}
        out["runs"][name] |= fit_record(case)
        print(json.dumps({name: out["runs"][name]}), file=sys.stderr, flush=True)
    r = out["runs"]
    if "old_1" in r and "new_1" in r:
        out["old_over_new_1"] = {
            k: r["old_1"][k] / r["new_1"][k]
            for k in ("iterations", "fit_wall_s", "fit_cpu_s", "hessian_actions")
            if r["new_1"].get(k)
        }
    its = [r[k]["iterations"] for k in ("new_1", "new_1_mesh_2x", "new_1_frames_2x") if k in r]
    out["iterations_base_mesh2x_frames2x"] = its
    out["all_new_converged"] = all(v["converged"] for k, v in r.items() if k.startswith("new"))
    out["load_average"] = list(os.getloadavg())
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
