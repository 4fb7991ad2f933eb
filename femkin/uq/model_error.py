"""Model error in the likelihood: the approximation-error approach (Kaipio and Somersalo).

The data are ``d = F(x) + e + noise`` with ``F`` the forward model at the fit's resolution and
``e = F_ref(x) - F(x)`` its discretisation error, estimated by a refined model ``F_ref`` (the
``[mesh] size`` and the step control, ``[solver] time_tol`` and ``dc_max``, multiplied by
``[uq] model_error_mesh`` and ``model_error_time``). ``e`` is evaluated at ``K`` points ``x_k``:
the MAP point (``[uq] model_error = "map"``: one refined forward run) or the MAP point and
``model_error_samples`` draws of the Laplace posterior without model error (``"samples"``), and
enters the noise model as the low-rank covariance

    Gamma_e = s^2 / K sum_k e_k e_k^T        (s = [uq] model_error_scale)

added per particle to the pixel noise (:meth:`femkin.misfit.PixelMisfit.with_model_error`;
couplings between particles are left out), or with ``[uq] model_error_form = "diagonal"`` only
its diagonal (each pixel's variance grows by ``s^2 / K sum_k e_k^2``; correlations dropped).
The second moment, not the centred covariance, is
used because the MAP point was fitted without the mean ``E[e]``: its systematic part counts
as uncertainty, which by Woodbury widens the posterior in the directions the error biases.
With one point and ``e^T W e >> 1`` the posterior variance of a quantity ``q`` grows by about
``(q^T dx)^2``, ``dx`` the linearised bias of the MAP point that ``e`` causes.

:func:`analyse_with_model_error` runs the Laplace analysis with the term and, for the
comparison, the exact marginals of the global coefficients without it (CG preconditioned by
the posterior with it: in the low-rank form the two Hessians differ by rank ``K``; it bounds
the posterior without it from above in either form; ``"samples"`` runs the full
analysis without it anyway, for its draws). It returns the result with the term and a summary:
the size of ``e`` against the noise and how much the bands of mu_h and ln j0 widen (median
widths over c in [0.1, 0.9]). Refined = fit settings
(both factors 1) gives ``e = 0`` (to round-off, :data:`ROUNDOFF`) and the plain result.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from femkin._fem import PETSc, dolfinx
from femkin.errors import ConvergenceError
from femkin.misfit import PixelMisfit
from femkin.uq.laplace_study import (
    SAMPLE_SEED_OFFSET,
    UQResult,
    analyse,
    coefficient_layout,
    credible_bands,
    prior_sample,
)
from femkin.uq.marginals import marginal_covariance

__all__ = [
    "FORMS",
    "MODES",
    "ROUNDOFF",
    "SEED_OFFSET",
    "analyse_with_model_error",
    "band_widths",
    "difference_videos",
    "install",
    "model_error_note",
    "restore",
    "transfer",
]

#: ``[uq] model_error`` values.
MODES = ("none", "map", "samples")
#: ``[uq] model_error_form`` values: the low-rank covariance, or only its diagonal.
FORMS = ("low-rank", "diagonal")
#: Posterior draw ``i`` of the ``"samples"`` estimate uses the normals of seed
#: ``seed + SEED_OFFSET + i`` (other offsets: :mod:`femkin.uq.laplace_study`).
SEED_OFFSET = 3 * SAMPLE_SEED_OFFSET
#: Refined-minus-fit differences (units of c) at most this large are round-off, not model error:
#: two runs of the same model in parallel differ by that much (parallel reductions, MUMPS).
ROUNDOFF = 1e-10
#: The c range over which band widths are summarised.
C_RANGE = (0.1, 0.9)


def transfer(problem, refined, x: PETSc.Vec) -> PETSc.Vec:
    """The point ``x`` of ``problem`` in the parameter space of ``refined`` (collective).

    Global and per-particle scalars are copied; fields (``m``, ``initial``) interpolated from
    the fit's mesh to the refined one (both meshes of a particle live on the same
    sub-communicator: the same case distributes the particles the same way).
    """
    space, rspace = problem.space, refined.space
    out = rspace.create_vector()
    for name, label in space.scalar_keys:
        rspace.set_scalars(out, name, space.get_scalars(x, name, label), label)
    for name, label in space.field_keys:
        if not space.holds(name, label):
            continue
        V = problem.particles[label].model.V
        V_ref = refined.particles[label].model.V
        f = dolfinx.fem.Function(V)
        space.to_function(x, name, label, f)
        g = dolfinx.fem.Function(V_ref)
        tdim = V_ref.mesh.topology.dim
        cells = np.arange(V_ref.mesh.topology.index_map(tdim).size_local, dtype=np.int32)
        # Both meshes fill the same smoothed polygon; padding catches round-off at its edge.
        data = dolfinx.fem.create_interpolation_data(V_ref, V, cells, padding=1e-8)
        g.interpolate_nonmatching(f, cells, data)
        g.x.scatter_forward()
        rspace.from_function(out, name, label, g)
    out.assemble()
    return out


def difference_videos(problem, refined, points: Sequence[PETSc.Vec]) -> np.ndarray:
    """``F_ref(x_k) - F(x_k)`` on the pixel grid, (K, T, H, W), NaN outside (every rank).

    A point where either model fails (a posterior draw too far out) is left out; the MAP point
    (the first) may not fail.
    """
    comm = problem.comm
    out: list[Any] = []
    for i, x in enumerate(points):
        xr = transfer(problem, refined, x)
        try:
            problem.misfit(x)
            coarse = problem.fitted_video()
            refined.misfit(xr)
        except ConvergenceError:  # raised on every rank together
            if i == 0:
                raise
            continue
        finally:
            xr.destroy()
        fine = refined.fitted_video()
        out.append(fine - coarse if comm.rank == 0 else None)
    diffs = comm.bcast(np.stack(out) if comm.rank == 0 else None, root=0)
    return np.asarray(diffs, dtype=float)


def install(problem, directions: np.ndarray, *, form: str = "low-rank") -> dict:
    """Add the model error to every particle's noise model (collective).

    Args:
        problem: the inverse problem.
        directions: (K, T, H, W) the columns of ``U`` on the pixel grid.
        form: ``"low-rank"``: ``Gamma_e = U U^T``; ``"diagonal"``: only its diagonal, the
            pixel variances ``sum_k U_k^2`` (correlations dropped).

    Returns:
        The misfits it replaced, for :func:`restore`.
    """
    if form not in FORMS:
        raise ValueError(f"{form=} is not one of {FORMS}")
    replaced = {}
    for label, p in problem.particles.items():
        U = np.stack(
            [np.stack([d[f].ravel()[p.obs.pixels] for f in range(d.shape[0])]) for d in directions]
        )
        U = np.nan_to_num(U)
        replaced[label] = p.misfit
        if form == "low-rank":
            p.misfit = p.misfit.with_model_error(U, p.model.comm)
        else:
            m = p.misfit
            seen = m.weight > 0
            variance = np.where(seen, 1.0 / np.where(seen, m.weight, 1.0), 0.0)
            weight = np.where(seen, 1.0 / (variance + np.sum(U**2, axis=0)), 0.0)
            p.misfit = PixelMisfit(
                m.obs, m.data, weight, include_first=m.include_first, observed=m.observed
            )
    return replaced


def restore(problem, replaced: dict) -> None:
    """Put back the misfits :func:`install` replaced."""
    for label, misfit in replaced.items():
        problem.particles[label].misfit = misfit


def band_widths(bands: dict, c_range: tuple[float, float] = C_RANGE) -> dict[str, float]:
    """Median widths of the 95% bands over ``c_range``: mu_h (kT) and ln j0."""
    c = np.asarray(bands["c"])
    inside = (c >= c_range[0]) & (c <= c_range[1])
    _, lo, hi = bands["mu_h"]
    out = {"mu_h": float(np.median((np.asarray(hi) - np.asarray(lo))[inside]))}
    _, lo, hi = bands["j0"]
    out["ln_j0"] = float(np.median((np.log(hi) - np.log(lo))[inside]))
    return out


def _global_dofs(problem) -> int:
    """P1 dofs of c over all particles (every rank)."""
    local = sum(
        p.model.V.dofmap.index_map.size_global
        for p in problem.particles.values()
        if p.model.comm.rank == 0
    )
    return int(problem.comm.allreduce(local))


def _noise_rms(problem) -> float:
    """RMS noise std over the counted pixels of all particles (every rank)."""
    var = count = 0.0
    for p in problem.particles.values():
        w = p.misfit.weight.copy()
        if not p.misfit.include_first:
            w[0] = 0.0
        seen = w > 0
        var += float(np.sum(1.0 / w[seen]))
        count += float(seen.sum())
    var = problem.comm.allreduce(var)
    count = problem.comm.allreduce(count)
    return float(np.sqrt(var / max(count, 1.0)))


def analyse_with_model_error(
    problem,
    prior,
    x: PETSc.Vec,
    settings: dict,
    build_refined: Callable[[], Any],
    *,
    log=None,
    fit_converged: bool | None = None,
) -> tuple[UQResult, dict]:
    """The Laplace analysis at ``x`` with the model error in the noise model.

    Args:
        problem: the inverse problem at the fit's resolution.
        prior: its prior.
        x: the MAP point.
        settings: the case's ``[uq]`` section (``model_error``, ``model_error_mesh``,
            ``model_error_time``, ``model_error_samples``, ``model_error_scale`` and what
            :func:`femkin.uq.laplace_study.analyse` reads).
        build_refined: returns the refined problem (same case, refined mesh and steps).
        log: optional ``log(message)`` (rank 0).
        fit_converged: passed to :func:`femkin.uq.laplace_study.analyse`.

    Returns:
        The analysis with the model-error term (the problem's misfits are restored after it),
        and the summary for ``uq.json`` (``model_error``).
    """
    comm = problem.comm
    say = (lambda msg: log(msg)) if (log is not None and comm.rank == 0) else (lambda msg: None)
    mode = settings["model_error"]
    if mode not in MODES[1:]:
        raise ValueError(f"{mode=} is not one of {MODES[1:]}")
    mesh_factor = float(settings["model_error_mesh"])
    time_factor = float(settings["model_error_time"])
    scale = float(settings["model_error_scale"])
    timings: dict[str, float] = {}
    schedules = problem.schedules()
    base = None
    points = [x]
    t0 = time.perf_counter()
    if mode == "samples":
        # only its covariance is used (the points, band widths): the MAP centre will do
        base = analyse(
            problem, prior, x, {**settings, "samples": 0, "coefficient_mean": "map"}, log=log
        )
        seed = int(settings["seed"])
        for i in range(int(settings["model_error_samples"])):
            z = prior_sample(prior, problem.space, seed + SEED_OFFSET + i)
            xs = problem.space.create_vector()
            base.posterior.sample(z, out=xs)
            xs.axpy(1.0, x)
            z.destroy()
            points.append(xs)
        timings["analysis_without"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    refined = build_refined()
    if time_factor == 1.0:  # the fit's own steps; only the mesh is refined
        refined.set_schedules(schedules)
    timings["refined_setup"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    diffs = difference_videos(problem, refined, points)
    timings["refined_runs"] = time.perf_counter() - t1
    problem.set_schedules(schedules)
    for v in points[1:]:
        v.destroy()
    n_refined, n_fit = (_global_dofs(pr) for pr in (refined, problem))
    del refined
    gc.collect()  # its PETSc objects go together on every rank
    finite = np.nan_to_num(diffs)
    noise = _noise_rms(problem)
    rms = [float(np.sqrt(np.nanmean(d[1:] ** 2))) for d in diffs]
    summary: dict[str, Any] = {
        "mode": mode,
        "mesh_factor": mesh_factor,
        "time_factor": time_factor,
        "scale": scale,
        "form": settings.get("model_error_form", "low-rank"),
        "points": len(diffs),
        "failed_points": len(points) - len(diffs),
        "rank": len(diffs),
        "mesh_refined": n_refined > n_fit,
        "p1_dofs": {"fit": int(n_fit), "refined": int(n_refined)},
        "difference_rms": rms,
        "difference_max": float(np.max(np.abs(finite))),
        "noise_rms": noise,
        "added_error_zero": bool(np.max(np.abs(finite)) <= ROUNDOFF),
    }
    say(
        f"model error: {len(diffs)} refined run(s), rms difference "
        + ", ".join(f"{r:.3g}" for r in rms)
        + f" (noise {noise:.3g})"
    )
    if summary["added_error_zero"]:
        # Nothing to add: the plain analysis, unchanged.
        result = analyse(problem, prior, x, settings, log=log, fit_converged=fit_converged)
        without = with_ = band_widths(result.bands)
        std_without = result.std
    else:
        replaced = install(
            problem,
            scale * finite / np.sqrt(len(diffs)),
            form=settings.get("model_error_form", "low-rank"),
        )
        try:
            t1 = time.perf_counter()
            result = analyse(problem, prior, x, settings, log=log, fit_converged=fit_converged)
            timings["analysis_with"] = time.perf_counter() - t1
        finally:
            restore(problem, replaced)
        with_ = band_widths(result.bands)
        if base is not None:
            without = band_widths(base.bands)
            std_without = base.std
            summary["without"] = {"method": "Laplace analysis"}
        else:
            t1 = time.perf_counter()
            covariance, summary["without"] = _marginals_without(problem, prior, x, settings, result)
            timings["marginals_without"] = time.perf_counter() - t1
            blocks = coefficient_layout(problem.space)
            without = band_widths(credible_bands(problem, x, blocks, covariance))
            std_without = np.sqrt(np.maximum(np.diag(covariance), 0.0))
    summary["band_median_width"] = {
        name: {
            "without": without[name],
            "with": with_[name],
            "ratio": with_[name] / without[name] if without[name] > 0 else float("nan"),
        }
        for name in without
    }
    summary["c_range"] = list(C_RANGE)
    summary["std_without"] = {n: float(s) for n, s in zip(result.names, std_without, strict=True)}
    summary["std_with"] = {n: float(s) for n, s in zip(result.names, result.std, strict=True)}
    summary["wall_time"] = timings
    summary["wall_time"]["total"] = time.perf_counter() - t0
    return result, summary


def _marginals_without(problem, prior, x: PETSc.Vec, settings: dict, result: UQResult):
    """The global coefficients' exact marginal covariance without the model-error term.

    The Hessian without the term exceeds the one with it by a rank-``K`` part, so the low-rank
    posterior with it is a preconditioner (and, being larger than the posterior without it,
    keeps the bracket of :func:`femkin.uq.marginals.marginal_covariance` certified): a few CG
    iterations instead of a second eigensolver. Leaves the problem linearised at ``x``.
    """
    gauss_newton = settings["hessian"] == "gauss-newton"
    space = problem.space
    g = space.create_vector()
    problem.gradient(x, g)  # the plain misfit's trajectories and adjoints at x
    g.destroy()
    h0 = problem.counters["hessian"]
    functionals = []
    for name, size in coefficient_layout(space):
        for i in range(size):
            v = space.create_vector()
            space.set_scalars(v, name, np.eye(size)[i])
            functionals.append(v)
    marg = marginal_covariance(
        functionals,
        lambda v, out: problem.hessian_mult(v, out, gauss_newton=gauss_newton),
        prior.precision_mult,
        result.posterior.covariance_mult,
        apply_H_batch=lambda vs, outs: problem.hessian_mult_batch(
            vs, outs, gauss_newton=gauss_newton
        ),
        tolerance=float(settings["marginal_tolerance"]),
        max_iterations=max(int(settings["marginal_max_iterations"]), 1),
    )
    for v in [*functionals, *marg.columns]:
        v.destroy()
    info = {
        "method": "exact coefficient marginals preconditioned by the posterior with the term",
        "iterations": marg.iterations,
        "hessian_actions": problem.counters["hessian"] - h0,
        "converged": marg.converged,
        "relative_gap": marg.relative_gap,
    }
    return marg.covariance, info


def model_error_note(summary: dict) -> str:
    """One line for the report: what the model error is and how much it widens the bands."""
    rms = summary["difference_rms"]
    w = summary["band_median_width"]
    head = (
        f"Model error ({summary['mode']}: mesh size x{summary['mesh_factor']:g}, step "
        f"tolerance x{summary['time_factor']:g}, {summary['points']} point(s)): refined minus "
        f"fit model rms {max(rms):.3g} in c against noise {summary['noise_rms']:.3g}"
    )
    if not summary["mesh_refined"] and summary["mesh_factor"] < 1:
        head += " (own meshes: only the steps were refined)"
    if summary["added_error_zero"]:
        return head + "; the refined model gives the same result, nothing added."
    return head + (
        f"; it widens the median 95% band of mu_h over c in [0.1, 0.9] from "
        f"{w['mu_h']['without']:.3g} to {w['mu_h']['with']:.3g} kT (x{w['mu_h']['ratio']:.2f}) "
        f"and of ln j0 from {w['ln_j0']['without']:.3g} to {w['ln_j0']['with']:.3g} "
        f"(x{w['ln_j0']['ratio']:.2f})."
    )
