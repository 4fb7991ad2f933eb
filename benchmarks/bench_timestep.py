"""BDF2 with error control vs backward Euler: cost at equal accuracy, derivative cost ratios.

Problem: the demo particle (label 1 of ``cases/demo/data/video.npz``, or the synthetic
stand-in of :mod:`_common`) meshed at ``--size`` pixels (default 1.5, the demo's fitting
mesh), the demo's truth model, a smooth coordinate-seeded k(x) (|m| <= 0.5) and c0, over a
full lithiation/delithiation cycle (25 frames over 3000 s, the particle mean going
0.1 -> 0.99 -> 0.02; see ``tests/physics/test_timestep.py``).

1. Reference: BDF2 at ``time_tol = 1e-6``.
2. Accuracy sweep, in one run: BDF2 at several ``time_tol`` and backward Euler at several
   ``dc_max``; per run the steps, Newton iterations (rejected steps included), rejected
   steps, wall time, the largest error of the particle-average c over the frames and the
   largest pixel error. For each scheme the steps / Newton iterations / wall time needed for
   a particle-average error of 0.005 are interpolated log-log between the two runs that
   bracket it, and their ratio Euler / BDF2 is reported (goal: >= 3 in steps).
3. Derivative cost relative to the forward run (pixel misfit, every J_n refactorised, best of
   two after a warm-up): gradient / forward and Gauss-Newton action / forward, for BDF2 at its
   default tolerance and for Euler at its default ``dc_max`` (today's setting).

Prints one JSON object. Run: ``python benchmarks/bench_timestep.py [--size 1.5]`` (about
6-8 minutes at size 1.5 on one busy core).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np
from _common import demo_mask

from femkin._fem import MPI
from femkin.adjoint import Direction, ParticleDerivatives
from femkin.driving import Driving
from femkin.forward import ModelParameters, ParticleModel, SolverOptions
from femkin.meshing import mesh_particle
from femkin.observation import build_observation

TRUTH = ModelParameters(mu_h=(3.2, 0.0, 0.6), j0=(-0.6, 0.3), k0=1.5e-3, kappa=0.005)
FRAMES = np.linspace(0.0, 3000.0, 25)
DRIVING = Driving([0.0, 1000.0, 1500.0, 2500.0, 3000.0], [1.0, 2.5, 0.0, -2.0, -2.0])
TARGET = 0.005
BDF2_TOLS = (3e-3, 1e-3, 5e-4, 2e-4)
EULER_DC = (0.02, 0.01, 0.005, 0.0035)
SIGMA = 0.07


class Case:
    def __init__(self, size: float):
        self.mask, self.label, self.px, self.source = demo_mask()
        self.mesh = mesh_particle(self.mask, self.label, self.px, MPI.COMM_WORLD, size=size).mesh
        self.size = size
        self.obs = None

    def model(self, scheme: str, **opts) -> ParticleModel:
        model = ParticleModel(
            self.mesh,
            TRUTH,
            solver=SolverOptions(scheme=scheme, **opts),
            options_prefix=f"bench_timestep_{scheme}_",
        )
        if self.obs is None:
            self.obs = build_observation(model.W.sub(0), self.mask, self.label, self.px)
        x = model.V.tabulate_dof_coordinates()
        model.set_m(0.5 * np.sin(6 * x[:, 0] + 1.0) * np.cos(5 * x[:, 1]))
        self.c0 = 0.1 + 0.03 * np.sin(9 * x[:, 0]) * np.cos(7 * x[:, 1])
        return model

    def run(self, model: ParticleModel):
        t0 = time.perf_counter()
        traj = model.solve(FRAMES, DRIVING, self.c0)
        wall = time.perf_counter() - t0
        avg = np.array([traj.cbar[n] for n in traj.frame_steps])
        pix = np.array([self.obs.apply(traj.state(n)) for n in traj.frame_steps])
        info = {
            "steps": traj.n_steps,
            "newton_iterations": traj.newton_total,
            "rejected_steps": traj.rejected,
            "wall_s": wall,
        }
        return traj, info, avg, pix


def _at_target(runs: list[dict]) -> dict:
    """Steps, Newton iterations and wall time at error TARGET.

    Interpolated log-log between the two runs that bracket it; empty if no pair does.
    """
    runs = sorted(runs, key=lambda r: r["avg_error"])
    for lo, hi in zip(runs[:-1], runs[1:], strict=True):
        if lo["avg_error"] <= TARGET <= hi["avg_error"]:
            s = np.log(TARGET / hi["avg_error"]) / np.log(lo["avg_error"] / hi["avg_error"])
            out = {
                k: float(np.exp((1 - s) * np.log(hi[k]) + s * np.log(lo[k])))
                for k in ("steps", "newton_iterations", "wall_s")
            }
            out["bracket"] = [hi["setting"], lo["setting"]]
            return out
    return {}


def _derivative_ratios(case: Case, scheme: str, **opts) -> dict:
    model = case.model(scheme, factor_cache_mb=0.0, **opts)
    traj, info, _, _ = case.run(model)
    der = ParticleDerivatives(model)
    obs = case.obs
    frames = set(traj.frame_steps[1:])
    data = {n: obs.apply(traj.state(n)) + 0.5 * SIGMA * np.cos(0.37 * obs.pixels) for n in frames}

    def source(n, out):
        if n in frames:
            obs.apply_transpose((obs.apply(traj.state(n)) - data[n]) / SIGMA**2, out)

    x = model.V.tabulate_dof_coordinates()
    direction = Direction(
        {"mu_h": np.array([0.1, 0.0, 0.05]), "j0": np.array([0.1, -0.1]), "k0": np.array([0.1])},
        m=0.2 * np.cos(7 * x[:, 0]),
    )

    def gn_action():
        tangents = der.tangent(traj, direction)

        def src(n, out):
            if n in frames:
                obs.apply_transpose(obs.apply(tangents[n]) / SIGMA**2, out)

        return der.adjoint(traj, src)

    def best(fn):
        fn()  # warm-up (JIT)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_fwd = best(lambda: model.solve(FRAMES, DRIVING, case.c0))
    t_grad = best(lambda: der.adjoint(traj, source))
    t_gn = best(gn_action)
    return {
        "setting": opts,
        "steps": info["steps"],
        "forward_s": t_fwd,
        "gradient_s": t_grad,
        "gn_action_s": t_gn,
        "gradient_over_forward": t_grad / t_fwd,
        "gn_action_over_forward": t_gn / t_fwd,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=1.5, help="element size, pixels")
    args = parser.parse_args()
    case = Case(args.size)
    ref_model = case.model("bdf2", time_tol=1e-6)
    n_dofs = ref_model.W.dofmap.index_map.size_global * ref_model.W.dofmap.index_map_bs
    ref_traj, ref_info, ref_avg, ref_pix = case.run(ref_model)
    comm = MPI.COMM_WORLD

    def errors(avg, pix):
        pe = comm.allreduce(float(np.max(np.abs(pix - ref_pix), initial=0.0)), op=MPI.MAX)
        return float(np.max(np.abs(avg - ref_avg))), pe

    sweep = {"bdf2": [], "euler": []}
    for scheme, key, values in (("bdf2", "time_tol", BDF2_TOLS), ("euler", "dc_max", EULER_DC)):
        for v in values:
            _, info, avg, pix = case.run(case.model(scheme, **{key: v}))
            ea, ep = errors(avg, pix)
            sweep[scheme].append({"setting": {key: v}, **info, "avg_error": ea, "pixel_error": ep})
            print(scheme, key, v, sweep[scheme][-1], file=sys.stderr, flush=True)
    at = {s: _at_target(r) for s, r in sweep.items()}
    ratio = {
        k: at["euler"][k] / at["bdf2"][k]
        for k in ("steps", "newton_iterations", "wall_s")
        if at["euler"] and at["bdf2"]
    }
    default_tol = SolverOptions().time_tol
    default = [r for r in sweep["bdf2"] if r["setting"]["time_tol"] == default_tol]
    out = {
        "benchmark": "bench_timestep",
        "problem": {
            "particle": case.source,
            "element_size_px": case.size,
            "dofs": n_dofs,
            "frames": len(FRAMES),
            "cycle_s": float(FRAMES[-1]),
            "particle_average_range": [float(ref_avg.min()), float(ref_avg.max())],
            "ranks": comm.size,
        },
        "reference": {"time_tol": 1e-6, **ref_info},
        "sweep": sweep,
        "at_avg_error_0.005": at,
        "euler_over_bdf2_at_equal_accuracy": ratio,
        "default_time_tol": default_tol,
        "default_accuracy": default[0] if default else None,
        "derivative_cost": {
            "bdf2_default": _derivative_ratios(case, "bdf2"),
            "euler_default": _derivative_ratios(case, "euler"),
        },
        "machine": platform.node(),
        "note": "one run, wall clock on a shared machine; errors against BDF2 at time_tol 1e-6",
    }
    if comm.rank == 0:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
