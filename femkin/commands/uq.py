"""``femkin uq CASE``: the Laplace approximation of the posterior at the MAP point.

Runs after ``femkin invert`` (``femkin run`` includes it): rebuilds the problem, loads the MAP
point from ``CASE/checkpoints/state.npz``, computes the dominant eigenpairs of the
prior-preconditioned Hessian (``[uq] hessian``, ``max_rank``, ``threshold``, ``oversampling``)
and the low-rank posterior (:mod:`femkin.uq.laplace_study`), and writes into ``CASE/results/``:

- ``uq.json``: ``eigenvalues``, ``rank``, ``coefficients`` (``{block: {"mean", "std",
  "prior_std"}}``, ``k0`` as ln k0), ``coefficient_names`` and ``correlation`` (in the order of
  ``coefficients``), ``ln_k_std`` summaries, ``c_t`` (the 95% band of the particle-average c(t)
  from ``[uq] samples`` posterior samples), ``hessian_actions`` and ``wall_time``;
- ``mu_h.csv`` and ``j0.csv`` with the 95% band columns ``lo`` and ``hi``;
- ``k_std_<label>.npy`` (posterior std of ln k on the pixel grid, NaN outside) and
  ``k_prior_std_<label>.npy`` (the prior's);
- figures with the bands (``curves.png``, ``uq_c_t.png``), ``uq_k_std.png`` (the posterior std
  of ln k and its ratio to the prior std, which shows where the data inform k) and the report.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "uq",
        help="posterior uncertainty at the MAP point (Laplace approximation)",
        description="After 'femkin invert': eigenpairs of the prior-preconditioned Hessian, "
        "posterior std and correlations of the coefficients, std of ln k, 95% bands of "
        "mu_h, j0 and c(t); writes CASE/results/uq.json and updates the report.",
    )
    parser.add_argument("case", type=Path, help="case directory (or its case.toml)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run)


def uq(case_path, *, quiet: bool = False, comm=None) -> dict | None:
    """Run the UQ step of an inverted case; returns the ``uq.json`` content on rank 0.

    Raises:
        InputError: when the case has no MAP checkpoint (run ``femkin invert`` first) or the
            checkpoint belongs to other inversion settings.
    """
    from femkin._fem import MPI
    from femkin.commands.invert import _checkpoint_path, checkpoint_settings
    from femkin.errors import InputError
    from femkin.inversion.checkpoint import read_checkpoint
    from femkin.inversion.fit import build_prior
    from femkin.study import build_problem, collective, open_study

    comm = comm or MPI.COMM_WORLD
    t0 = time.perf_counter()
    study = open_study(case_path, comm)
    case = study.case
    ckpt = _checkpoint_path(case)

    def check():
        if not ckpt.exists():
            raise InputError(
                ckpt,
                None,
                "the MAP checkpoint of an inversion (run 'femkin invert CASE' first)",
                "no such file",
            )

    collective(comm, check)
    problem = build_problem(study, comm, quiet=quiet)
    x = problem.initial_vector()
    prior = build_prior(problem, case.inversion["prior"], x)
    _, case_hash = checkpoint_settings(study, problem)
    state = read_checkpoint(ckpt, problem.space, x, case_hash=case_hash)
    history = state["history"] if state else []
    if state:
        problem.set_schedules(state.get("schedules", {}))
    setup = time.perf_counter() - t0
    return uq_at(
        study, problem, prior, x, history or [], quiet=quiet, extra_timings={"setup": setup}
    )


def uq_at(
    study,
    problem,
    prior,
    x,
    history: list,
    *,
    quiet: bool = False,
    extra_timings: dict | None = None,
) -> dict | None:
    """The UQ step on a built problem at its MAP point ``x`` (also used by ``femkin run``).

    Returns:
        The ``uq.json`` content on rank 0, ``None`` elsewhere.
    """
    from femkin.uq.laplace_study import analyse
    from femkin.uq.sampling_study import save_laplace

    comm = problem.comm
    log = None if quiet else (lambda msg: print(f"uq: {msg}", flush=True))
    t0 = time.perf_counter()
    result = analyse(problem, prior, x, study.case.uq, log=log)
    # the proposal of 'femkin sample'
    save_laplace(study.case.dir / "checkpoints" / "laplace.npz", problem.space, result.posterior, x)
    params = problem.parameters_at(x)
    timings = dict(extra_timings or {})
    timings.update(result.wall_time)
    timings["total"] = time.perf_counter() - t0 + timings.get("setup", 0.0)
    result.wall_time = timings
    payload = None
    if comm.rank == 0:
        payload = result.to_json(study.case.uq)
        write_uq_results(study, problem, params, result, payload, history)
        if not quiet:
            print(
                f"uq: rank {payload['rank']}, {payload['hessian_actions']} Hessian actions, "
                f"{timings['total']:.1f} s; results in {study.case.dir / 'results'}",
                flush=True,
            )
    comm.barrier()  # every rank returns once the result files exist
    return payload


def write_uq_results(study, problem, params, result, payload: dict, history: list) -> None:
    """Write uq.json, the banded CSVs, the std maps, the figures and the report (rank 0)."""
    import json

    from femkin.inversion import results as res

    case, video = study.case, study.video
    out = case.dir / "results"
    out.mkdir(parents=True, exist_ok=True)
    res.write_json(out / "uq.json", payload)
    bands = result.bands
    for name in ("mu_h", "j0"):
        value, lo, hi = bands[name]
        res.write_csv(out / f"{name}.csv", {"c": bands["c"], name: value, "lo": lo, "hi": hi})
    for lb in problem.labels:
        np.save(out / f"k_std_{lb}.npy", result.ln_k_std[lb])
        np.save(out / f"k_prior_std_{lb}.npy", result.ln_k_prior_std[lb])
    truth = None
    if study.truth_path is not None and Path(study.truth_path).exists():
        with np.load(study.truth_path) as z:
            truth = {k: z[k] for k in z.files}
    k_maps = {}
    for lb in problem.labels:
        path = out / f"k_{lb}.npy"
        if path.exists():
            k_maps[lb] = np.load(path)
    names = res.figures(
        out,
        params,
        truth,
        result.fitted,
        video.c,
        video.t,
        k_maps,
        history,
        band={"mu_h": bands["mu_h"][1:], "j0": bands["j0"][1:]},
    )
    names += _uq_figures(out, result, payload)
    summary_path = out / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        res.write_report(out, summary, names, uq=payload)


def _uq_figures(out: Path, result, payload: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    labels = list(result.ln_k_std)
    if labels:
        # top: posterior std of ln k; bottom: over the prior std (the data's effect alone)
        fig, axes = plt.subplots(2, len(labels), figsize=(4.2 * len(labels), 7.0), squeeze=False)
        for col, lb in enumerate(labels):
            std, prior_std = result.ln_k_std[lb], result.ln_k_prior_std[lb]
            for ax, image, title in (
                (axes[0, col], std, f"posterior std of ln k, particle {lb}"),
                (axes[1, col], std / prior_std, f"posterior / prior std, particle {lb}"),
            ):
                im = ax.imshow(image, cmap="viridis")
                ax.set_title(title, fontsize=9)
                fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / "uq_k_std.png", dpi=110)
        plt.close(fig)
        names.append("uq_k_std.png")
    lam = np.asarray(payload["eigenvalues"])
    if lam.size:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        pos = lam > 0
        ax.semilogy(np.arange(1, lam.size + 1)[pos], lam[pos], "o-")
        ax.axhline(payload["threshold"], color="k", ls="--", lw=0.8, label="threshold")
        ax.set_xlabel("index")
        ax.set_ylabel("eigenvalue of the prior-preconditioned Hessian")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "uq_eigenvalues.png", dpi=110)
        plt.close(fig)
        names.append("uq_eigenvalues.png")
    c_t = payload.get("c_t")
    if c_t:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        t = np.asarray(c_t["t"])
        for lb, entry in c_t["particles"].items():
            (line,) = ax.plot(t, entry["map"], label=f"particle {lb} (MAP)")
            if "lo" in entry:
                ax.fill_between(t, entry["lo"], entry["hi"], color=line.get_color(), alpha=0.3)
            ax.plot(t, entry["observed"], "x", color=line.get_color())
        ax.set_xlabel("t (s)")
        ax.set_ylabel("particle-average c")
        ax.set_title(
            f"95% band from {c_t['samples'] - c_t['failed']} posterior samples", fontsize=9
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "uq_c_t.png", dpi=110)
        plt.close(fig)
        names.append("uq_c_t.png")
    from femkin.uq_report import predictive_figure

    return names + predictive_figure(out, payload)


def run(args: argparse.Namespace) -> int:
    from femkin._fem import MPI, PETSc  # noqa: F401 - PETSc reads command-line options
    from femkin.commands.invert import _petsc_argv

    _petsc_argv(args)
    uq(args.case, quiet=args.quiet, comm=MPI.COMM_WORLD)
    return 0
