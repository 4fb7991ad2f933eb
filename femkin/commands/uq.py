"""``femkin uq CASE``: the Laplace approximation of the posterior at the MAP point.

Runs after ``femkin invert`` (``femkin run`` includes it): rebuilds the problem, loads the MAP
point from ``CASE/checkpoints/state.npz``, computes the dominant eigenpairs of the
prior-preconditioned Hessian (``[uq] hessian``, ``max_rank``, ``threshold``, ``oversampling``)
and the low-rank posterior (:mod:`femkin.uq.laplace_study`), and writes into ``CASE/results/``:

- ``uq.json``: ``eigenvalues``, ``rank``, ``coefficients`` (``{block: {"mean", "map", "std",
  "prior_std"}}``, ``k0`` in its coordinate ln k0, see :mod:`femkin.blocks`; ``mean`` is the
  joint MAP value ``map``, or the mode of the coefficients' Laplace marginal, with
  ``marginal_mode`` saying how far it moved; ``coefficient_mean``: ``setting``, ``used`` and
  the ``reason`` where ``[uq] coefficient_mean`` (default ``"auto"``: the marginal mode where a
  field is learned, the fit converged and the coefficient marginals converged) was not followed),
  ``coefficient_names`` and ``correlation`` (in the order of ``coefficients``), ``ln_k_std``
  summaries, ``c_t`` (the 95% band of the particle-average c(t) from ``[uq] samples``
  posterior samples), ``hessian_actions`` and ``wall_time``; ``evidence``: the Laplace log
  evidence of the fit (``log_evidence``, ``bounds`` and ``uncertainty`` from the truncated
  spectrum's tail, its terms, ``n_data``, ``n_parameters``, ``effective_parameters``; see
  :mod:`femkin.uq.evidence`), which ``femkin compare`` ranks;
  with ``[uq] model_error``
  (:mod:`femkin.uq.model_error`) also ``model_error``: the refined-minus-fit difference
  against the noise and the median band widths of mu_h and ln j0 without and with it;
- ``mu_h.csv`` and ``j0.csv`` with the 95% band columns ``lo`` and ``hi``;
- ``k_std_<label>.npy`` (posterior std of ln k on the pixel grid, NaN outside) and
  ``k_prior_std_<label>.npy`` (the prior's);
- figures with the bands (``curves.png``, ``uq_c_t.png``), ``uq_k_std.png`` (the posterior std
  of ln k and its ratio to the prior std, which shows where the data inform k) and the report;
- ``particle_<label>_fields.xdmf`` with the posterior std of ln k beside k and m.

The files are written by :func:`femkin.report.write_uq_results`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


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
    parser.add_argument(
        "--allow-unfinished",
        action="store_true",
        help="run at the last iterate of a fit that did not finish (recorded in uq.json)",
    )
    parser.set_defaults(func=run)


def uq(case_path, *, quiet: bool = False, comm=None, allow_unfinished: bool = False) -> dict | None:
    """Run the UQ step of an inverted case; returns the ``uq.json`` content on rank 0.

    Raises:
        InputError: when the case has no MAP checkpoint (run ``femkin invert`` first), the
            checkpoint belongs to other inversion settings, the fit did not finish (unless
            ``allow_unfinished``) or ``results/`` holds another fit run's files.
    """
    from femkin._fem import MPI
    from femkin.errors import InputError
    from femkin.inversion.checkpoint import read_checkpoint
    from femkin.inversion.fit import build_prior
    from femkin.outputs import fit_record
    from femkin.study import (
        build_problem,
        checkpoint_path,
        checkpoint_settings,
        collective,
        open_study,
        require_writable,
    )

    comm = comm or MPI.COMM_WORLD
    t0 = time.perf_counter()
    study = open_study(case_path, comm)
    case = study.case
    ckpt = checkpoint_path(case)
    require_writable(comm, study, "meshes", "results", ".femkin")

    def check():
        if not ckpt.exists():
            raise InputError(
                ckpt,
                None,
                "the MAP checkpoint of an inversion (run 'femkin invert CASE' first)",
                "no such file",
            )

    collective(comm, check)
    problem = build_problem(study, comm, quiet=quiet, require_data=True)
    x = problem.initial_vector()
    prior = build_prior(problem, case.inversion["prior"], x)
    _, case_hash = checkpoint_settings(study, problem)
    state = read_checkpoint(ckpt, problem.space, x, case_hash=case_hash)
    fit = collective(comm, fit_record, state, case.dir, ckpt, allow_unfinished=allow_unfinished)
    if comm.rank == 0 and not fit["finished"]:
        print(
            f"femkin: warning: the fit did not finish (iteration {fit['iterations']}); the "
            "Laplace approximation is taken at its last iterate (--allow-unfinished)",
            flush=True,
        )
    elif comm.rank == 0 and not fit["converged"]:
        print(
            f"femkin: warning: the fit stopped with {fit['stop_reason']} without converging; "
            "the Laplace approximation is taken at a point that is not the MAP point",
            flush=True,
        )
    history = state["history"] if state else []
    if state:
        problem.set_schedules(state.get("schedules", {}))
    setup = time.perf_counter() - t0
    return uq_at(
        study,
        problem,
        prior,
        x,
        history or [],
        quiet=quiet,
        extra_timings={"setup": setup},
        fit=fit,
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
    fit: dict | None = None,
    fit_converged: bool | None = None,
) -> dict | None:
    """The UQ step on a built problem at its MAP point ``x`` (also used by ``femkin run``).

    ``fit``: the fit's record (:func:`femkin.outputs.fit_record`), written into ``uq.json``;
    the files are added to the fit's result set and replace ``results/`` together.
    ``fit_converged``: whether the fit converged, where ``fit`` is not given (``femkin run``);
    the coefficients' centre depends on it.

    Returns:
        The ``uq.json`` content on rank 0, ``None`` elsewhere.
    """
    from femkin.outputs import ResultSet, read_run_record, shared_run_id
    from femkin.report import write_uq_results
    from femkin.uq.laplace_study import analyse
    from femkin.uq.model_error import analyse_with_model_error, model_error_note
    from femkin.uq.sampling_study import save_laplace

    comm = problem.comm
    log = None if quiet else (lambda msg: print(f"uq: {msg}", flush=True))
    t0 = time.perf_counter()
    settings = study.case.uq
    model_error = None
    if fit is not None:
        fit_converged = fit.get("converged")
    if settings["model_error"] == "none":
        result = analyse(problem, prior, x, settings, log=log, fit_converged=fit_converged)
    else:
        from femkin.study import build_problem

        factors = (
            settings["model_error_mesh"],
            settings["model_error_time"],
            "uq.model_error_mesh",
        )
        result, model_error = analyse_with_model_error(
            problem,
            prior,
            x,
            settings,
            lambda: build_problem(study, comm, learn=problem.learn, refined=factors),
            log=log,
            fit_converged=fit_converged,
        )
    # the proposal of 'femkin sample'
    save_laplace(
        study.case.dir / "checkpoints" / "laplace.npz",
        problem.space,
        result.posterior,
        x,
        centre=result.mean_vector,
    )
    timings = dict(extra_timings or {})
    timings.update(result.wall_time)
    timings["total"] = time.perf_counter() - t0 + timings.get("setup", 0.0)
    result.wall_time = timings
    payload = result.to_json(study.case.uq) if comm.rank == 0 else None
    if fit is None:  # called right after the fit (femkin run): the result set's own fit
        runs = comm.bcast(read_run_record(study.case.dir) if comm.rank == 0 else None, root=0)
        fit = {"run_id": runs.get("invert", {}).get("run_id"), "finished": True}
        if fit_converged is not None:
            fit["converged"] = bool(fit_converged)
    if payload is not None:
        payload["fit"] = fit
        if model_error is not None:
            payload["model_error"] = model_error
            payload["notes"].append(model_error_note(model_error))
    # One consistent set: the fit's results plus these replace results/ together.
    with ResultSet(
        study.case.dir,
        comm,
        verb="uq",
        run_id=shared_run_id(comm),
        keep_existing=True,
        record={"fit_run_id": fit.get("run_id")},
    ):
        write_uq_results(study, problem, x, result, payload, history)
    if payload is not None and not quiet:  # rank 0
        print(
            f"uq: rank {payload['rank']}, {payload['hessian_actions']} Hessian actions, "
            f"{timings['total']:.1f} s; results in {study.case.dir / 'results'}",
            flush=True,
        )
    return payload


def run(args: argparse.Namespace) -> int:
    from femkin._fem import MPI

    uq(args.case, quiet=args.quiet, comm=MPI.COMM_WORLD, allow_unfinished=args.allow_unfinished)
    return 0
