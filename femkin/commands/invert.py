"""``femkin invert CASE``: fit mu_h, j0, k0 and k(x) (the ``[inversion] learn`` blocks).

Meshes (cached), fits with PETSc TAO (options prefix ``femkin_tao_``; PETSc options from the
case's ``[inversion] petsc_options`` and the command line), checkpoints after every iteration
(``CASE/checkpoints/state.npz``, written atomically; ``--resume`` continues from it) and writes
``CASE/results/``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "invert",
        help="fit the model to the video (PETSc TAO)",
        description="Fit the [inversion] learn blocks to the case's video and write "
        "CASE/results/. PETSc options such as -femkin_tao_monitor pass through.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser) -> None:
    parser.add_argument("case", type=Path, help="case directory (or its case.toml)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from CASE/checkpoints/state.npz"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def _checkpoint_path(case) -> Path:
    return case.dir / "checkpoints" / "state.npz"


def checkpoint_settings(study, problem) -> tuple[dict, str]:
    """The settings a checkpoint belongs to, and their hash."""
    import hashlib
    import json

    inv = study.case.inversion
    settings = {
        "learn": list(problem.learn),
        "tao_type": inv["tao_type"],
        "hessian": inv["hessian"],
        "video": str(study.video_path.name),
        "prior": inv["prior"],
        "model": study.case.model,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return settings, digest


def invert(case_path, *, resume: bool = False, quiet: bool = False, comm=None):
    """Run the fit of a case; returns (problem, result, timings)."""
    from femkin._fem import MPI
    from femkin.inversion.checkpoint import read_checkpoint, write_checkpoint
    from femkin.inversion.fit import build_prior, solve_map
    from femkin.study import build_problem, open_study

    comm = comm or MPI.COMM_WORLD
    timings = {}
    t0 = time.perf_counter()
    study = open_study(case_path, comm)
    case = study.case
    problem = build_problem(study, comm, quiet=quiet)
    timings["setup"] = time.perf_counter() - t0
    x0 = problem.initial_vector()
    prior = build_prior(problem, case.inversion["prior"], x0)
    inv = case.inversion
    settings, case_hash = checkpoint_settings(study, problem)
    ckpt = _checkpoint_path(case)
    history = []
    x_start = x0.copy()
    if resume:
        state = read_checkpoint(ckpt, problem.space, x_start, case_hash=case_hash)
        if state is not None:
            history = state["history"]
            problem.set_schedules(state.get("schedules", {}))
            if comm.rank == 0 and not quiet:
                at = len(history) and history[-1]["iteration"]
                print(f"resuming from {ckpt} at iteration {at}", flush=True)
    start_it = history[-1]["iteration"] if history else 0

    def monitor(rec, x):
        if comm.rank == 0 and not quiet:
            print(
                f"it {rec['iteration']:3d}  J {rec['objective']:.6e}  |g| "
                f"{rec['gradient_norm']:.3e}  RMS/sigma {rec['misfit_rms']:.3f}  "
                f"{rec['time']:.1f} s",
                flush=True,
            )
        if rec["iteration"] % inv["checkpoint_every"] == 0:
            write_checkpoint(
                ckpt,
                problem.space,
                x,
                {
                    "case_hash": case_hash,
                    "history": history,
                    "settings": settings,
                    "schedules": problem.schedules(),
                },
            )

    t1 = time.perf_counter()
    result = solve_map(
        problem,
        prior,
        x_start,
        tao_type=inv["tao_type"],
        max_iterations=inv["max_iterations"],
        gatol=inv["gatol"],
        grtol=inv["grtol"],
        gauss_newton=inv["hessian"] == "gauss-newton",
        petsc_options=inv["petsc_options"],
        monitor=monitor,
        start_iteration=start_it,
        history=history,
    )
    history[:] = result.history
    if (
        result.reason.startswith("DIVERGED")
        and result.reason != "DIVERGED_MAXITS"
        and comm.rank == 0
    ):
        print(
            f"femkin: warning: TAO stopped with {result.reason} after {result.iterations} "
            "iterations; results are written for the last iterate",
            flush=True,
        )
    write_checkpoint(
        ckpt,
        problem.space,
        result.x,
        {
            "case_hash": case_hash,
            "history": history,
            "settings": settings,
            "done": True,
            "schedules": problem.schedules(),
        },
    )
    timings["fit"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    problem.misfit(result.x)
    write_results(study, problem, result, timings, prior)
    comm.barrier()  # every rank returns once the result files exist
    timings["results"] = time.perf_counter() - t2
    return problem, result, timings, prior


def write_results(study, problem, result, timings, prior) -> dict | None:
    from femkin.inversion import results as res

    case, video = study.case, study.video
    comm = problem.comm
    out = case.dir / "results"
    fitted = problem.fitted_video()
    params = problem.parameters_at(result.x)
    k_maps = {}
    m_pix = problem.field_on_pixels("m", result.x) if "m" in problem.learn else None
    if comm.rank != 0:
        return None
    out.mkdir(parents=True, exist_ok=True)
    obs = video.c.copy()
    first = 0 if problem.include_first else 1
    resid = (fitted - obs)[first:]
    summary_particles = {}
    for label in problem.labels:
        inside = video.mask == label
        r = resid[:, inside]
        r = r[np.isfinite(r)]
        summary_particles[str(label)] = {
            "misfit_rms": float(np.sqrt(np.mean(r**2))),
            "n_pixels": int(inside.sum()),
        }
        m = m_pix if m_pix is not None else np.zeros(video.mask.shape)
        k = np.where(inside, params.k0 * np.exp(np.nan_to_num(m)), np.nan)
        k_maps[label] = k
        np.save(out / f"k_{label}.npy", k)
    all_r = resid[np.isfinite(resid)]
    coeffs = {
        "mu_h": list(params.mu_h),
        "j0": list(params.j0),
        "k0": params.k0,
        "kappa": params.kappa,
        "coherency": params.coherency,
    }
    summary = {
        "misfit_rms": float(np.sqrt(np.mean(all_r**2))),
        "particles": summary_particles,
        "iterations": int(result.iterations),
        "tao_reason": result.reason,
        "wall_time": dict(timings),
        "coefficients": coeffs,
        "objective": result.value,
        "misfit": result.misfit,
        "n_observed": int(problem.n_observed),
        "solves": dict(problem.counters),
    }
    truth = None
    cv = res.curves(params)
    if study.truth_path is not None and Path(study.truth_path).exists():
        from femkin.forward import ModelParameters

        with np.load(study.truth_path) as z:
            truth = {k: z[k] for k in z.files}
        tp = ModelParameters(
            mu_h=tuple(truth["mu_h"]),
            j0=tuple(truth["j0"]),
            j0_prefactor=tuple(truth["j0_prefactor"]),
        )
        tv = res.curves(tp)
        sel = (cv["c"] >= 0.1) & (cv["c"] <= 0.9)
        comp = {"mu_h_max_error_kT": float(np.max(np.abs(cv["mu_h"] - tv["mu_h"])[sel]))}
        if m_pix is not None:
            inside = video.mask > 0
            comp["ln_k_pearson"] = float(
                np.corrcoef(np.log(params.k0) + m_pix[inside], np.log(truth["k"][inside]))[0, 1]
            )
        comp["noise"] = float(truth.get("noise", np.nan))
        summary["truth_comparison"] = comp
    np.savez(out / "fitted.npz", c=fitted, t=video.t)
    res.write_csv(out / "mu_h.csv", {"c": cv["c"], "mu_h": cv["mu_h"]})
    res.write_csv(out / "j0.csv", {"c": cv["c"], "j0": cv["j0"]})
    names = res.figures(out, params, truth, fitted, obs, video.t, k_maps, result.history)
    res.write_json(out / "summary.json", summary)
    res.write_report(out, summary, names)
    return summary


def run(args: argparse.Namespace) -> int:
    from femkin._fem import MPI

    _petsc_argv(args)
    problem, result, timings, _ = invert(args.case, resume=args.resume, quiet=args.quiet)
    if MPI.COMM_WORLD.rank == 0 and not args.quiet:
        print(
            f"done: {result.iterations} iterations, {result.reason}; results in "
            f"{Path(args.case) / 'results'}",
            flush=True,
        )
    return 0


def _petsc_argv(args) -> None:
    """Put -femkin_* options from the command line into the PETSc options database."""
    from femkin._fem import PETSc

    opts = PETSc.Options()
    extra = list(getattr(args, "petsc_options", []) or [])
    i = 0
    while i < len(extra):
        key = extra[i].lstrip("-")
        if i + 1 < len(extra) and not extra[i + 1].startswith("-"):
            opts[key] = extra[i + 1]
            i += 2
        else:
            opts[key] = ""
            i += 1
