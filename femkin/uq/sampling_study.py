"""MCMC of an inversion's posterior with the Laplace posterior as proposal (``femkin sample``).

``femkin uq`` saves the MAP point and the eigenpairs of the Laplace posterior
(:func:`save_laplace`, ``CASE/checkpoints/laplace.npz``, partition independent). :func:`sample`
then

1. splits the communicator into ``min(chains, size)`` groups; each group builds the problem
   on its sub-communicator and runs the chains ``c`` with ``c % groups == group``;
2. runs each chain with the gpCN kernel (:mod:`femkin.uq.mcmc`; ``[sample] proposal =
   "prior"`` gives plain pCN; ``langevin = true`` adds the drift along the
   Laplace-preconditioned gradient, at the cost of an adjoint run per step; ``leapfrog = L``
   makes it infinity-HMC, ``L`` gradients per step), whose reference
   Gaussian is the Laplace posterior centred on the MAP point or on its mean (where ``femkin
   uq`` moved the coefficients to their marginal mode, that point with the fields at their
   conditional mean), whichever fits the posterior better (:func:`choose_centre`), started from
   that centre plus a Laplace sample, recording the global coefficients after every step;
3. checkpoints every chain (``CASE/checkpoints/mcmc_chain<c>.npz``: the state, the records,
   the settings' hash) every ``checkpoint_every`` steps; a later run resumes each chain where it
   stopped (the same random numbers: the uninterrupted answer) and extends it when ``steps``
   grew;
4. gathers the records on rank 0 and computes, per global coefficient, the mean, std,
   effective sample size, split-R-hat, skewness and excess kurtosis and their distance from the
   Laplace values, the verdict of :func:`laplace_check` (where the Laplace approximation fails,
   and which is right), and the 95% bands of ``mu_h(c)`` and ``j0(c)`` from the samples.

Each proposal is judged on the step times frozen at the MAP point (:func:`_fixed_steps_misfit`):
a forward run that had to re-adapt them does not change the target of later steps.

All functions are collective on the communicator they are given.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from femkin._fem import MPI, PETSc
from femkin.uq.laplace import LowRankPosterior
from femkin.uq.mcmc import (
    ChainState,
    GpcnKernel,
    effective_sample_size,
    run_chain,
    split_rhat,
    start_chain,
)

__all__ = [
    "START_SEED_OFFSET",
    "field_agreement",
    "laplace_check",
    "load_laplace",
    "load_laplace_with_centre",
    "sample",
    "save_laplace",
    "summarise",
]

#: Chain ``c`` starts from the MAP point plus the Laplace sample of seed
#: ``seed + START_SEED_OFFSET + c``.
START_SEED_OFFSET = 6_000_011


def _flatten(prefix: str, d: dict) -> dict:
    return {f"{prefix}|{k}": v for k, v in d.items()}


def _unflatten(prefix: str, data) -> dict:
    p = prefix + "|"
    return {k[len(p) :]: data[k] for k in data.files if k.startswith(p)}


def _fields(d: dict) -> dict:
    """A global dict without its coordinates (saved once, with the point)."""
    return {k: a for k, a in d.items() if "coordinates" not in k}


def _read_vector(space, prefix: str, data, point: dict | None, path: Path) -> PETSc.Vec:
    """The vector saved under ``prefix``, with the coordinates of the saved point's dict
    ``point`` (collective; ``data`` and ``point`` are read on rank 0 only).
    """
    d = None
    if data is not None and point is not None:
        d = _unflatten(prefix, data)
        d.update({k: a for k, a in point.items() if k.endswith("/coordinates")})
    v = space.create_vector()
    space.from_global_dict(d, v, source=str(path))
    return v


def save_laplace(
    path: Path,
    space,
    posterior: LowRankPosterior,
    x: PETSc.Vec,
    centre: PETSc.Vec | None = None,
) -> None:
    """Write the MAP point, the eigenpairs (``V^T B V = I``) and, where the coefficients were
    moved to their marginal mode, the Laplace mean ``centre`` (the fields at their conditional
    mean) to ``path`` (collective).
    """
    from femkin.io.atomic import atomic_write

    arrays = {"eigenvalues": np.asarray(posterior.eigenvalues, dtype=float)}
    d = space.to_global_dict(x)
    if d is not None:
        arrays.update(_flatten("map", d))
    if centre is not None:
        d = space.to_global_dict(centre)
        if d is not None:
            arrays.update(_flatten("centre", _fields(d)))
    for i, v in enumerate(posterior.eigenvectors):
        d = space.to_global_dict(v)
        if d is not None:
            arrays.update(_flatten(f"v{i}", _fields(d)))
    if space.comm.rank == 0:
        Path(path).parent.mkdir(parents=True, exist_ok=True)

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)  # type: ignore[arg-type]

        atomic_write(Path(path), write)
    space.comm.barrier()


def load_laplace(path: Path, space, prior) -> tuple[PETSc.Vec, LowRankPosterior]:
    """The MAP point and the low-rank posterior saved by :func:`save_laplace`.

    Collective; works on any number of ranks.
    """
    x, post, centre = load_laplace_with_centre(path, space, prior)
    if centre is not None:
        centre.destroy()
    return x, post


def load_laplace_with_centre(
    path: Path, space, prior
) -> tuple[PETSc.Vec, LowRankPosterior, PETSc.Vec | None]:
    """:func:`load_laplace` and the saved Laplace mean (None where none was saved: the
    posterior is centred on the MAP point). Collective.
    """
    comm = space.comm
    data = np.load(path) if comm.rank == 0 else None
    lam = comm.bcast(data["eigenvalues"] if data is not None else None, root=0)
    x = space.create_vector()
    m = _unflatten("map", data) if data is not None else None
    space.from_global_dict(m, x, source=str(path))
    has_centre = comm.bcast(
        data is not None and any(k.startswith("centre|") for k in data.files), root=0
    )
    centre = _read_vector(space, "centre", data, m, path) if has_centre else None
    vs = [_read_vector(space, f"v{i}", data, m, path) for i in range(lam.size)]
    post = LowRankPosterior(
        lam, vs, prior.covariance_mult, apply_prior_precision=prior.precision_mult
    )
    return x, post, centre


def uses_gradient(settings: dict) -> bool:
    """Whether the ``[sample]`` kernel takes a gradient per step (Langevin or HMC)."""
    return bool(settings.get("langevin")) or int(settings.get("leapfrog", 0)) > 0


def runs_per_step(settings: dict) -> int:
    """Forward runs (gradients for Langevin and HMC kernels) per step of a ``[sample]`` chain."""
    return max(int(settings.get("leapfrog", 0)), 1)


def kernel_name(settings: dict) -> str:
    """The name of the ``[sample]`` kernel, as the report gives it."""
    leapfrog = int(settings.get("leapfrog", 0))
    if leapfrog:
        return f"infinity-HMC ({leapfrog} leapfrog steps)"
    return "pCN-Langevin" if settings.get("langevin") else "gpCN"


def hmc_step_check(settings: dict, uq: dict) -> dict | None:
    """For an HMC kernel, its leapfrog angle against the stiffest direction the reference omits.

    Along a direction the reference Gaussian leaves out, with ``lambda`` the prior-preconditioned
    Hessian's eigenvalue there, the kicks add a frequency ``sqrt(lambda)`` to the exactly
    rotated reference; the leapfrog is stable for ``eps sqrt(lambda) < 2`` and accurate for
    ``eps sqrt(lambda) <~ 1``. The largest omitted eigenvalue is ``uq``'s estimate where the
    rank was capped, below the threshold where the spectrum was cut by it, and the top
    eigenvalue with the prior as reference.

    Returns:
        None for other kernels, else ``{"angle", "largest_omitted_eigenvalue", "angle_limit",
        "ok", "note"}`` (``angle_limit = 1 / sqrt(lambda)``).
    """
    if int(settings.get("leapfrog", 0)) <= 0:
        return None
    eigenvalues = [float(v) for v in uq.get("eigenvalues", [])]
    spectrum = uq.get("spectrum", {})
    if settings.get("proposal") == "prior":
        lam = max(eigenvalues, default=0.0)
    elif spectrum.get("truncated"):
        lam = float(spectrum.get("omitted", {}).get("largest", eigenvalues[-1]))
    else:
        lam = float(uq.get("threshold", 0.0))
    angle = float(np.arcsin(float(settings["beta"])))
    limit = 1.0 / np.sqrt(lam) if lam > 0 else float("inf")
    ok = bool(angle <= limit)
    note = (
        f"leapfrog angle {angle:.3g} rad against 1/sqrt(largest omitted eigenvalue "
        f"{lam:.3g}) = {limit:.3g}: "
        + (
            "the reference holds the posterior's stiff directions"
            if ok
            else "trajectories along the directions the reference omits are inaccurate or "
            f"unstable; take beta <= {np.sin(min(limit, np.pi / 2)):.3g} (or a higher [uq] "
            "max_rank)"
        )
    )
    return {
        "angle": angle,
        "largest_omitted_eigenvalue": lam,
        "angle_limit": float(limit),
        "ok": ok,
        "note": note,
    }


def _settings_hash(settings: dict, laplace_path: Path) -> str:
    keep = {k: v for k, v in settings.items() if k not in ("steps", "checkpoint_every")}
    h = hashlib.sha256(json.dumps(keep, sort_keys=True).encode())
    h.update(Path(laplace_path).read_bytes())
    return h.hexdigest()[:16]


def _chain_path(case_dir: Path, chain: int) -> Path:
    return Path(case_dir) / "checkpoints" / f"mcmc_chain{chain}.npz"


def _save_chain(path: Path, space, state: ChainState, digest: str) -> None:
    from femkin.io.atomic import atomic_write

    d = space.to_global_dict(state.x)
    g = None if state.drift is None else space.to_global_dict(state.drift.grad)
    if space.comm.rank != 0:
        return
    arrays = _flatten("x", d)
    if g is not None:  # the Langevin drift's gradient: a resumed chain continues exactly
        arrays.update(_flatten("g", _fields(g)))
    arrays.update(
        step=state.step,
        eta=state.eta,
        phi=state.phi,
        accepted=state.accepted,
        failed=state.failed,
        records=state.records,
        digest=np.array(digest),
    )

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def _load_chain(
    path: Path, space, chain: int, digest: str, kernel: GpcnKernel | None = None
) -> ChainState | None:
    """The checkpointed state if it exists and belongs to these settings (collective).

    With a Langevin ``kernel`` the saved gradient gives the drift at the saved point.
    """
    comm = space.comm
    data = None
    if comm.rank == 0 and path.exists():
        data = np.load(path)
        if str(data["digest"]) != digest:
            data = None
    ok = comm.bcast(data is not None, root=0)
    if not ok:
        return None
    x = space.create_vector()
    xd = _unflatten("x", data) if data is not None else None
    space.from_global_dict(xd, x, str(path))
    drift = None
    has_g = comm.bcast(data is not None and any(k.startswith("g|") for k in data.files), 0)
    if kernel is not None and kernel.needs_gradient and has_g:
        drift = kernel.drift_of(_read_vector(space, "g", data, xd, path))
    meta = None
    if data is not None:
        meta = {k: data[k] for k in ("step", "eta", "phi", "accepted", "failed", "records")}
    meta = comm.bcast(meta, root=0)
    return ChainState(
        chain,
        int(meta["step"]),
        x,
        float(meta["eta"]),
        float(meta["phi"]),
        int(meta["accepted"]),
        int(meta["failed"]),
        np.asarray(meta["records"], dtype=float),
        drift,
    )


def _record(space, blocks):
    def record(x):
        if not blocks:
            return np.zeros(0)
        return np.concatenate([space.get_scalars(x, b) for b, _ in blocks])

    return record


def _fixed_steps_misfit(problem):
    """``problem.misfit`` on the step times frozen now (at the MAP point), whatever ran before.

    A forward run whose frozen steps are too long re-adapts them and keeps the new ones
    (:meth:`femkin.problem.InverseProblem.misfit`, right for a fit). In a chain that would make
    the target depend on the chain's history (not a Markov chain, and a resumed chain would not
    be the uninterrupted one): the MAP point's steps are restored after every run, so each
    proposal is judged by one fixed discrete model (re-adapted only for itself where it fails).
    """
    return _on_fixed_steps(problem, problem.misfit)


def _fixed_steps_gradient(problem):
    """``problem.gradient`` on the step times frozen now, as :func:`_fixed_steps_misfit`."""
    return _on_fixed_steps(problem, problem.gradient)


def _on_fixed_steps(problem, evaluate):
    """``evaluate(*args)`` with the problem's step times restored afterwards to those now."""
    saved = problem.schedules()

    def on_fixed_steps(*args):
        try:
            return evaluate(*args)
        finally:
            problem.set_schedules(saved)

    return on_fixed_steps


def run_group_chains(
    problem,
    prior,
    laplace_path: Path,
    case_dir: Path,
    settings: dict,
    chains,
    *,
    log=None,
    record=None,
    world=None,
    info: dict | None = None,
) -> dict[int, dict]:
    """Run (or resume) the given chains on the problem's communicator.

    ``record(x)``: what to keep after every step (default: the global coefficients, in the
    order of :func:`~femkin.uq.laplace_study.coefficient_layout`); it must be right on the
    communicator's rank 0, whose records are returned.

    The Laplace reference is centred where ``settings["centre"]`` says (:func:`choose_centre`);
    with ``world`` (the communicator over all groups, every rank calling) the choice of world
    rank 0 is taken by every group. ``info`` (a dict) receives ``centre`` and ``pilot``.

    Returns:
        ``{chain: {"records", "accepted", "failed", "steps", "resumed_from"}}`` (every rank).
    """
    from femkin.uq.laplace_study import coefficient_layout, prior_sample

    space = problem.space
    comm = problem.comm
    x_map, post, laplace_mean = load_laplace_with_centre(laplace_path, space, prior)
    seed = int(settings["seed"])
    misfit = _fixed_steps_misfit(problem)

    def make_kernel(reference, centre):
        return GpcnKernel(
            misfit,
            prior.precision_mult,
            prior.mean(),
            reference,
            centre,
            lambda s: prior_sample(prior, space, s),
            beta=float(settings["beta"]),
            gradient=_fixed_steps_gradient(problem) if uses_gradient(settings) else None,
            leapfrog=int(settings.get("leapfrog", 0)),
        )

    candidates = {"map": x_map}
    if laplace_mean is not None:
        candidates["laplace"] = laplace_mean
    choice, pilot = choose_centre(
        settings.get("centre", "auto"),
        {k: make_kernel(post, v) for k, v in candidates.items()},
        lambda i: post.sample(prior_sample(prior, space, seed + PILOT_SEED_OFFSET + i)),
    )
    if world is not None:
        choice = world.bcast(choice, root=0)
    start = candidates[choice]
    resolved = {**settings, "centre": choice}  # a checkpoint belongs to the centre it ran with
    digest = comm.bcast(_settings_hash(resolved, laplace_path) if comm.rank == 0 else None, 0)
    if info is not None:
        info.update(centre=choice, pilot=pilot)
    if settings["proposal"] == "prior":
        reference = LowRankPosterior(
            np.zeros(0), [], prior.covariance_mult, apply_prior_precision=prior.precision_mult
        )
        kernel = make_kernel(reference, prior.mean())
    else:
        kernel = make_kernel(post, start)
    if record is None:
        record = _record(space, coefficient_layout(space))
    out = {}
    for c in chains:
        path = _chain_path(case_dir, c)
        state = _load_chain(path, space, c, digest, kernel)
        resumed_from = 0 if state is None else state.step
        if state is None:
            z = prior_sample(prior, space, seed + START_SEED_OFFSET + c)
            x0 = post.sample(z)
            x0.axpy(1.0, start)
            z.destroy()
            state = start_chain(kernel, c, x0, record)
            x0.destroy()
        t0 = time.perf_counter()
        state = run_chain(
            kernel,
            state,
            int(settings["steps"]),
            seed=seed,
            record=record,
            checkpoint=functools.partial(_save_chain, path, space, digest=digest),
            every=int(settings["checkpoint_every"]),
        )
        if log is not None and comm.rank == 0:
            log(
                f"chain {c}: {state.step} steps (from {resumed_from}), acceptance "
                f"{state.accepted / max(state.step, 1):.2f}, {time.perf_counter() - t0:.1f} s"
            )
        out[c] = {
            "records": state.records,
            "accepted": state.accepted,
            "failed": state.failed,
            "steps": state.step,
            "resumed_from": resumed_from,
        }
        state.x.destroy()
        if state.drift is not None:
            state.drift.destroy()
    # leave the problem at the MAP point
    problem.misfit(x_map)
    if laplace_mean is not None:
        laplace_mean.destroy()
    return out


#: The pilot draws of :func:`choose_centre` use the seeds ``seed + PILOT_SEED_OFFSET + i``.
PILOT_SEED_OFFSET = 5_000_017
#: Pilot draws per candidate centre.
PILOT_DRAWS = 8
#: Above this std of the log weight over the pilot draws the reference counts as a poor fit.
POOR_FIT_ETA_STD = 3.0


def choose_centre(
    setting: str, kernels: dict[str, GpcnKernel], draw, n: int = PILOT_DRAWS
) -> tuple[str, dict]:
    """Where the Laplace reference of the chains is centred.

    ``"map"``: the MAP point; ``"laplace"``: the Laplace mean ``femkin uq`` saved (the
    coefficients' marginal mode, the fields at their conditional mean; the MAP point where it
    saved none); ``"auto"``: of the candidates, the one under whose reference Gaussian the log
    weight ``eta = log pi - log N(centre, Gamma)`` varies least over ``n`` draws of it. That
    spread is what gpCN's acceptance rests on (for an exact Gaussian reference ``eta`` is
    constant and every proposal is accepted); a draw whose forward run fails counts as an
    infinite spread. The two centres serve different ends: the marginal mode describes the
    coefficients' marginals best, but a Gaussian moved there can fit the joint posterior of
    coefficients and fields worse than the one at the joint mode.

    Args:
        setting: ``"auto"``, ``"map"`` or ``"laplace"``.
        kernels: ``{"map": kernel, ["laplace": kernel]}``, each centred on its point.
        draw: ``draw(i)``: the ``i``-th zero-mean draw of the reference Gaussian (new vector).
        n: pilot draws per candidate.

    Returns:
        ``(choice, pilot)``, ``pilot = {candidate: {"eta_std", "failed"}}`` (for ``"auto"``,
        even with one candidate: the spread says how well the reference fits; empty
        otherwise).
    """
    if setting == "map":
        return "map", {}
    if setting == "laplace":
        return ("laplace" if "laplace" in kernels else "map"), {}
    pilot = {}
    for name, kernel in kernels.items():
        etas = []
        for i in range(n):
            x = draw(i)
            x.axpy(1.0, kernel.centre)
            etas.append(kernel.log_weight(x)[0])
            x.destroy()
        finite = np.isfinite(etas)
        pilot[name] = {
            "eta_std": float(np.std(np.asarray(etas)[finite])) if finite.all() else float("inf"),
            "failed": int(np.sum(~finite)),
        }
    choice = min(pilot, key=lambda k: (pilot[k]["eta_std"], k != "laplace"))
    return choice, pilot


def summarise(
    chains: dict[int, dict],
    names: list[str],
    burn: float,
    laplace: dict | None,
    runs_per_step: int = 1,
) -> dict:
    """Diagnostics per global coefficient from the gathered chains (rank 0).

    Args:
        chains: ``{chain: {"records": (steps, n_q), "accepted", "failed", "steps"}}``.
        names: the coefficient names (columns of the records).
        burn: the fraction of each chain discarded.
        laplace: ``{"mean": (n_q,), "std": (n_q,)}`` of the Laplace posterior, or None.
        runs_per_step: forward (or gradient) runs per chain step (HMC: the leapfrog steps).

    Returns:
        The ``mcmc.json`` content (without settings).
    """
    order = sorted(chains)
    n = min(chains[c]["records"].shape[0] for c in order)
    start = int(np.floor(burn * n))
    draws = np.array([chains[c]["records"][start:n] for c in order])  # (chains, draws, q)
    coefficients = {}
    for q, name in enumerate(names):
        d = draws[:, :, q]
        entry = {
            "mean": float(d.mean()),
            "std": float(d.std(ddof=1)) if d.size > 1 else float("nan"),
            "q025": float(np.percentile(d, 2.5)),
            "q975": float(np.percentile(d, 97.5)),
            "ess": effective_sample_size(d),
            "rhat": split_rhat(d),
            **_shape(d.ravel()),
        }
        entry["mean_mcse"] = entry["std"] / np.sqrt(entry["ess"]) if entry["ess"] > 0 else np.nan
        if laplace is not None:
            ls = float(laplace["std"][q])
            entry["laplace_mean"] = float(laplace["mean"][q])
            entry["laplace_std"] = ls
            entry["mean_difference_in_std"] = (entry["mean"] - entry["laplace_mean"]) / ls
            entry["std_ratio"] = entry["std"] / ls
        coefficients[name] = entry
    steps = sum(chains[c]["steps"] for c in order)
    ess = [v["ess"] for v in coefficients.values() if np.isfinite(v["ess"])]
    return {
        "chains": len(order),
        "steps_per_chain": [int(chains[c]["steps"]) for c in order],
        "draws_used_per_chain": int(n - start),
        "burn_in_per_chain": start,
        "acceptance": {str(c): chains[c]["accepted"] / max(chains[c]["steps"], 1) for c in order},
        "acceptance_overall": sum(chains[c]["accepted"] for c in order) / max(steps, 1),
        "failed_forward_runs": int(sum(chains[c]["failed"] for c in order)),
        "forward_runs": int(steps * runs_per_step),
        "min_ess": float(min(ess)) if ess else float("nan"),
        "max_rhat": float(max(v["rhat"] for v in coefficients.values())) if names else 0.0,
        "forward_runs_per_effective_sample": (
            float(steps * runs_per_step / min(ess)) if ess else float("nan")
        ),
        "coefficients": coefficients,
    }


def _shape(d: np.ndarray) -> dict[str, float]:
    """Skewness and excess kurtosis of samples (0 and 0 for a Gaussian)."""
    if d.size < 4:
        return {"skewness": float("nan"), "excess_kurtosis": float("nan")}
    z = d - d.mean()
    var = float(np.mean(z * z))
    if not var > 0:
        return {"skewness": 0.0, "excess_kurtosis": 0.0}
    return {
        "skewness": float(np.mean(z**3) / var**1.5),
        "excess_kurtosis": float(np.mean(z**4) / var**2 - 3.0),
    }


#: The issue's agreement targets: means within 0.3 Laplace std, stds within 25%.
MEAN_TOLERANCE = 0.3
STD_TOLERANCE = 0.25
#: Chains count as converged below this split-R-hat and above this effective sample size.
RHAT_MAX = 1.05
ESS_MIN = 100.0


def laplace_check(
    summary: dict,
    *,
    mean_tolerance: float = MEAN_TOLERANCE,
    std_tolerance: float = STD_TOLERANCE,
    rhat_max: float = RHAT_MAX,
    ess_min: float = ESS_MIN,
) -> dict:
    """Where the Laplace approximation agrees with the chains, and which is right where not.

    A coefficient agrees when ``|mean_mcmc - mean_laplace| <= mean_tolerance * std_laplace``
    and ``|std_mcmc / std_laplace - 1| <= std_tolerance``. The chains are trusted when every
    coefficient's split-R-hat is below ``rhat_max`` and its ESS above ``ess_min``: they then
    sample the actual posterior, and where the two disagree the MCMC is right; the Laplace
    approximation is a Gaussian at the MAP point, and the samples' skewness and excess kurtosis
    (each against its standard error ``sqrt(6/ESS)``, ``sqrt(24/ESS)``) tell whether the
    posterior is non-Gaussian there. Untrusted chains give no verdict.

    Args:
        summary: the output of :func:`summarise` with Laplace values.
        mean_tolerance: largest ``|dmean|`` in Laplace stds that agrees.
        std_tolerance: largest ``|std ratio - 1|`` that agrees.
        rhat_max: split-R-hat below which the chains count as converged.
        ess_min: effective sample size above which they do.

    Returns:
        ``{"trusted", "agree", "disagreeing": {name: {...}}, "tolerances", "verdict"}``
        (``agree`` is None when the chains are not trusted or no Laplace values were given).
    """
    coefficients = summary["coefficients"]
    tolerances = {
        "mean_in_laplace_std": mean_tolerance,
        "std_ratio": std_tolerance,
        "rhat_max": rhat_max,
        "ess_min": ess_min,
    }
    rhat = [v["rhat"] for v in coefficients.values()]
    ess = [v["ess"] for v in coefficients.values()]
    trusted = bool(
        coefficients
        and all(np.isfinite(r) and r < rhat_max for r in rhat)
        and all(np.isfinite(e) and e >= ess_min for e in ess)
    )
    has_laplace = all("std_ratio" in v for v in coefficients.values())
    disagreeing = {}
    for name, v in coefficients.items():
        if not has_laplace:
            break
        dm, ratio = float(v["mean_difference_in_std"]), float(v["std_ratio"])
        if abs(dm) <= mean_tolerance and abs(ratio - 1.0) <= std_tolerance:
            continue
        e = max(float(v["ess"]), 1.0)
        disagreeing[name] = {
            "mean_difference_in_std": dm,
            "std_ratio": ratio,
            "skewness": v["skewness"],
            "skewness_error": float(np.sqrt(6.0 / e)),
            "excess_kurtosis": v["excess_kurtosis"],
            "excess_kurtosis_error": float(np.sqrt(24.0 / e)),
        }
    if not has_laplace:
        verdict = "no Laplace values to compare with"
        agree = None
    elif not trusted:
        verdict = (
            f"the chains have not converged (max split-R-hat {max(rhat):.3f}, target "
            f"< {rhat_max}; min ESS {min(ess):.0f}, target >= {ess_min:.0f}): no verdict on "
            "the Laplace approximation; run more steps ([sample] steps), or try another "
            "kernel ([sample] leapfrog: infinity-HMC, which follows a curved posterior at a "
            "gradient per leapfrog step)"
        )
        agree = None
    elif not disagreeing:
        verdict = (
            f"Laplace and MCMC agree on every global coefficient (means within "
            f"{mean_tolerance} Laplace std, stds within {100 * std_tolerance:.0f}%): the "
            "Laplace bands describe the posterior"
        )
        agree = True
    else:
        parts = []
        for name, d in disagreeing.items():
            what = []
            if abs(d["mean_difference_in_std"]) > mean_tolerance:
                what.append(f"mean shifted {d['mean_difference_in_std']:+.2f} Laplace std")
            if abs(d["std_ratio"] - 1.0) > std_tolerance:
                what.append(f"std {d['std_ratio']:.2f}x Laplace's")
            shape = []
            if abs(d["skewness"]) > 2.0 * d["skewness_error"]:
                shape.append(f"skewness {d['skewness']:+.2f} +- {d['skewness_error']:.2f}")
            if abs(d["excess_kurtosis"]) > 2.0 * d["excess_kurtosis_error"]:
                shape.append(
                    f"excess kurtosis {d['excess_kurtosis']:+.2f} +- "
                    f"{d['excess_kurtosis_error']:.2f}"
                )
            why = (
                "non-Gaussian marginal (" + ", ".join(shape) + ")"
                if shape
                else "Gaussian-shaped marginal of another mean/width than the Hessian at the "
                "MAP point gives (the curvature changes over the posterior's width)"
            )
            parts.append(f"{name}: {', '.join(what)}; {why}")
        verdict = (
            "Laplace and MCMC disagree on "
            + "; ".join(parts)
            + ". The converged chains sample the actual posterior: trust the MCMC values and "
            "bands (mcmc_lo/mcmc_hi); the Laplace approximation, a Gaussian at the MAP point, "
            "does not hold over the posterior's width for these coefficients"
        )
        agree = False
    return {
        "trusted": trusted,
        "agree": agree,
        "disagreeing": disagreeing,
        "tolerances": tolerances,
        "verdict": verdict,
    }


def field_agreement(
    mcmc_std: np.ndarray,
    laplace_std: np.ndarray,
    prior_std: np.ndarray,
    *,
    informed: float = 0.5,
    tolerance: float = STD_TOLERANCE,
) -> dict:
    """The ratio MCMC/Laplace of pointwise posterior stds (e.g. of ln k at the dofs).

    A point is *informed* by the data where ``laplace_std / prior_std < informed``.

    Returns:
        ``{"points", "informed_points", "informed_threshold", "tolerance", "informed",
        "all"}``; the last
        two hold the ratio's ``median``, ``q10``, ``q90``, ``min``, ``max`` and the fraction of
        points with ``|ratio - 1| <= tolerance`` (``within``), None where there are no points.
    """
    mcmc_std, laplace_std, prior_std = (
        np.asarray(a, dtype=float).ravel() for a in (mcmc_std, laplace_std, prior_std)
    )
    ratio = mcmc_std / laplace_std
    mask = laplace_std / prior_std < informed

    def stats(r: np.ndarray) -> dict | None:
        if r.size == 0:
            return None
        return {
            "median": float(np.median(r)),
            "q10": float(np.percentile(r, 10)),
            "q90": float(np.percentile(r, 90)),
            "min": float(r.min()),
            "max": float(r.max()),
            "within": float(np.mean(np.abs(r - 1.0) <= tolerance)),
        }

    return {
        "points": int(ratio.size),
        "informed_points": int(mask.sum()),
        "informed_threshold": float(informed),
        "tolerance": float(tolerance),
        "informed": stats(ratio[mask]),
        "all": stats(ratio),
    }


def sample_bands(draws: np.ndarray, blocks, params, c: np.ndarray) -> dict[str, tuple]:
    """95% bands (2.5 and 97.5 percentiles) of mu_h(c) and j0(c) over the samples.

    Each draw's curves are those of the case's kinetic law
    (:meth:`femkin.forward.ModelParameters.j0_curve`): the learned ln j0 of ``"bv"``, a fixed
    law's curve (no spread), or CIET's at the draw's lambda.

    Args:
        draws: ``(n_samples, n_q)`` global coefficients in the order of ``blocks``.
        blocks: ``[(name, size)]``.
        params: the MAP :class:`~femkin.forward.ModelParameters` (blocks not in ``blocks``
            keep their values).
        c: the grid.
    """
    from femkin.blocks import GLOBAL_BLOCKS
    from femkin.physics.acr import mu_h

    starts = {}
    i = 0
    for name, size in blocks:
        starts[name] = (i, size)
        i += size
    curves_mu, curves_j0 = [], []
    for row in draws:
        values = {
            name: row[a : a + size] for name, (a, size) in starts.items() if name in GLOBAL_BLOCKS
        }
        drawn = params.with_blocks(values)
        curves_mu.append(mu_h(c, drawn.mu_h, np.log))
        curves_j0.append(drawn.j0_curve(c))
    out = {}
    for name, curves in (("mu_h", np.array(curves_mu)), ("j0", np.array(curves_j0))):
        out[name] = (np.percentile(curves, 2.5, axis=0), np.percentile(curves, 97.5, axis=0))
    return out


def sample(case_path, comm=MPI.COMM_WORLD, *, quiet: bool = False) -> dict | None:
    """``femkin sample``: run the chains of a case; returns ``mcmc.json`` on rank 0.

    Raises:
        InputError: when the case has no Laplace posterior (run ``femkin uq`` first).
    """
    from femkin.errors import InputError
    from femkin.inversion.checkpoint import read_checkpoint
    from femkin.inversion.fit import build_prior
    from femkin.study import (
        build_problem,
        checkpoint_path,
        checkpoint_settings,
        collective,
        open_study,
    )
    from femkin.uq.laplace_study import coefficient_layout, coefficient_names

    t0 = time.perf_counter()
    log = None if quiet else (lambda msg: print(f"sample: {msg}", flush=True))
    study = open_study(case_path, comm)
    case = study.case
    settings = dict(case.sample)
    laplace_path = case.dir / "checkpoints" / "laplace.npz"
    uq_path = case.dir / "results" / "uq.json"

    def check():
        for path, what in ((laplace_path, "the Laplace posterior"), (uq_path, "uq results")):
            if not path.exists():
                raise InputError(path, None, f"{what} (run 'femkin uq CASE' first)", "no such file")

    collective(comm, check)
    n_chains = int(settings["chains"])
    n_groups = min(n_chains, comm.size)
    group = comm.rank * n_groups // comm.size
    sub = comm.Split(group, comm.rank)
    mine = [c for c in range(n_chains) if c % n_groups == group]
    problem = build_problem(study, sub, quiet=True)
    x = problem.initial_vector()
    prior = build_prior(problem, case.inversion["prior"], x)
    _, case_hash = checkpoint_settings(study, problem)
    state = read_checkpoint(checkpoint_path(case), problem.space, x, case_hash=case_hash)
    if state:
        problem.set_schedules(state.get("schedules", {}))
    problem.misfit(x)  # adapt and freeze the time steps at the MAP point, as the fit did
    blocks = coefficient_layout(problem.space)
    names = coefficient_names(blocks)
    params = problem.parameters_at(x)
    info: dict = {}
    results = run_group_chains(
        problem, prior, laplace_path, case.dir, settings, mine, log=log, world=comm, info=info
    )
    gathered = comm.gather(results if sub.rank == 0 else {}, root=0)
    payload = None
    if comm.rank == 0:
        chains = {}
        for part in gathered:
            chains.update(part)
        uq = json.loads(uq_path.read_text())
        lap_mean = np.concatenate([uq["coefficients"][b]["mean"] for b, _ in blocks])
        lap_std = np.concatenate([uq["coefficients"][b]["std"] for b, _ in blocks])
        payload = summarise(
            chains,
            names,
            float(settings["burn"]),
            {"mean": lap_mean, "std": lap_std},
            runs_per_step=runs_per_step(settings),
        )
        payload["laplace_check"] = laplace_check(payload)
        payload["settings"] = settings
        payload["proposal_centre"] = (
            "prior mean"
            if settings["proposal"] == "prior"
            else (
                "the coefficients' marginal mode"
                if info["centre"] == "laplace"
                else "the MAP point"
            )
        )
        payload["centre_pilot"] = info["pilot"]
        if info["pilot"]:
            spread = info["pilot"][info["centre"]]["eta_std"]
            payload["reference_fit"] = (
                f"log weight std {spread:.2f} over {PILOT_DRAWS} draws of the reference: "
                + (
                    "the Laplace Gaussian fits the posterior well"
                    if spread <= POOR_FIT_ETA_STD
                    else "the Laplace Gaussian fits the posterior poorly, expect slow mixing "
                    '(a smaller beta; with [uq] hessian = "full" it includes the residuals\' '
                    "curvature; or infinity-HMC, [sample] leapfrog)"
                )
            )
        step_check = hmc_step_check(settings, uq)
        if step_check is not None:
            payload["hmc_step"] = step_check
        payload["kernel"] = kernel_name(settings) + (
            " (prior reference: pCN)" if settings["proposal"] == "prior" else ""
        )
        payload["wall_time"] = time.perf_counter() - t0
        payload["seconds_per_effective_sample"] = (
            payload["wall_time"] / payload["min_ess"] if payload["min_ess"] > 0 else float("nan")
        )
        payload["resumed_from"] = {str(c): chains[c]["resumed_from"] for c in sorted(chains)}
        _write_results(case, payload, chains, blocks, params, settings)
        if log is not None:
            log(
                f"{payload['chains']} chains, acceptance {payload['acceptance_overall']:.2f}, "
                f"min ESS {payload['min_ess']:.1f}, max R-hat {payload['max_rhat']:.3f}; "
                f"results in {case.dir / 'results' / 'mcmc.json'}"
            )
            log(payload["laplace_check"]["verdict"])
            if "reference_fit" in payload:
                log(f"proposal: {payload['reference_fit']}")
            if step_check is not None and not step_check["ok"]:
                log(f"warning: HMC {step_check['note']}")
    comm.barrier()
    return payload


def _write_results(case, payload, chains, blocks, params, settings) -> None:
    """mcmc.json, the sample band columns of mu_h.csv/j0.csv, mcmc_bands.png (rank 0)."""
    from femkin.inversion import results as res
    from femkin.report import add_mcmc_section
    from femkin.uq_report import mcmc_figure

    out = case.dir / "results"
    out.mkdir(parents=True, exist_ok=True)
    n = min(chains[c]["records"].shape[0] for c in chains)
    start = int(np.floor(float(settings["burn"]) * n))
    draws = np.concatenate([chains[c]["records"][start:n] for c in sorted(chains)])
    figure_bands = {}
    for name in ("mu_h", "j0"):
        path = out / f"{name}.csv"
        if not path.exists():
            continue
        table = np.genfromtxt(path, delimiter=",", names=True)
        c = np.atleast_1d(table["c"])
        lo, hi = sample_bands(draws, blocks, params, c)[name]
        columns = {k: np.atleast_1d(table[k]) for k in (table.dtype.names or ())}
        columns["mcmc_lo"], columns["mcmc_hi"] = lo, hi
        res.write_csv(path, columns)
        payload.setdefault("bands", {})[name] = {
            "c": c.tolist(),
            "lo": lo.tolist(),
            "hi": hi.tolist(),
        }
        if "lo" in columns:
            figure_bands[name] = {
                "c": c,
                "value": columns[name],
                "laplace": (columns["lo"], columns["hi"]),
                "mcmc": (lo, hi),
            }
    res.write_json(out / "mcmc.json", payload)
    mcmc_figure(out, figure_bands)
    add_mcmc_section(out, payload)
