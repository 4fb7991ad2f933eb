"""The Laplace evidence (log marginal likelihood) of a fitted model, and a brute-force check.

With ``N`` data ``d_i`` of Gaussian noise ``sigma_i``, the misfit
``J(x) = 1/2 sum_i ((B c(x))_i - d_i)^2 / sigma_i^2`` and a Gaussian prior
``N(x_0, Gamma_prior)`` on the ``n`` parameters, the evidence of the model is

    Z = int p(d | x) pi(x) dx,
    log p(d | x) = -J(x) - N/2 log(2 pi) - sum_i log sigma_i,
    log pi(x)    = -R(x) - n/2 log(2 pi) - 1/2 log det Gamma_prior,
    R(x)         = 1/2 (x - x_0)^T Gamma_prior^{-1} (x - x_0).

The Laplace approximation expands ``J + R`` to second order at the MAP point ``x*`` (``H`` the
misfit Hessian there, Gauss-Newton or full; ``P = H + Gamma_prior^{-1}`` the posterior
precision) and integrates the Gaussian: ``int exp(-1/2 z^T P z) dz = (2 pi)^{n/2}
det(P)^{-1/2}``. The ``(2 pi)^{n/2}`` cancels the prior's, and its ``det Gamma_prior`` combines
with ``det P`` into ``det(Gamma_prior P) = det(I + H~)``, ``H~ = Gamma_prior^{1/2} H
Gamma_prior^{1/2}`` the prior-preconditioned misfit Hessian:

    log Z ~ -J(x*) - N/2 log(2 pi) - sum_i log sigma_i - R(x*) - 1/2 log det(I + H~),
    log det(I + H~) = sum_i log(1 + lambda_i),

with ``lambda_i`` the eigenvalues of ``H v = lambda Gamma_prior^{-1} v``, the ones the
uncertainty step computes (:mod:`femkin.uq.randomized`). No determinant of the prior (of a
BiLaplacian field: a sparse-matrix determinant) is ever needed. Only the frames that the misfit
counts are data here: frame 0 is the initial state unless it is learned, so the evidence is
``p(d_1..T | d_0, model)``; two evidences compare only over the same data.

**The truncated tail.** The eigensolver keeps ``k`` pairs; the rest of the spectrum (the tail)
contributes ``Delta = sum_{j > k} log(1 + lambda_j)``. For a Gauss-Newton Hessian the tail is
non-negative, and with its trace ``T = sum_{j > k} lambda_j`` (estimated by
:func:`femkin.uq.randomized.omitted_spectrum`, Hutchinson in the prior's geometry)

    log(1 + T)  <=  Delta  <=  T

(``log(1 + x) <= x`` termwise; ``prod (1 + lambda_j) >= 1 + sum lambda_j``). When the tail's
eigenvalues lie below ``lambda_bar`` (the larger of the last kept eigenvalue and the estimated
largest omitted one), ``log(1 + x) / x`` decreasing gives the sharper
``Delta >= T log(1 + lambda_bar) / lambda_bar``. The exact marginal covariance ``C`` of the
global coefficients (:mod:`femkin.uq.marginals`) gives a third lower bound: the low-rank
precision ``P_k = B + B V L V^T B`` satisfies ``P_k <= P``, ``Delta = log det(P_k^{-1} P)``, and
compressing ``P_k^{1/2} P^{-1} P_k^{1/2}`` onto the coefficients' directions (Cauchy interlacing)
gives ``Delta >= log det C_k - log det C`` (``C_k`` the low-rank marginal; any upper bound of
``C`` keeps it valid). When this bracket is wider than :data:`LANCZOS_WIDTH` (a field such
as k(x) leaves a long tail), the tail is estimated by stochastic Lanczos quadrature
(:func:`tail_log_det_lanczos`, ``[uq] evidence_lanczos`` steps on ``[uq] omitted_samples``
probes) and the bracket narrowed to the estimate's two standard errors; Gauss quadrature
overestimates ``log(1 + x)`` forms (its even derivatives are negative), so with too few steps
the estimate errs towards a lower, conservative evidence. Otherwise the reported evidence takes
``Delta`` at the middle of the bracket. In either case half the bracket is the evidence's
stated uncertainty; the bounds use ``T +- 2`` standard errors. A spectrum computed to full rank
has no tail (exact). With the full Hessian the tail's sign is not known and the bracket assumes
it non-negative.

**Effective number of data-informed directions**: ``sum_i lambda_i / (1 + lambda_i)`` (each
direction counts by how far the data shrink its prior variance), with the tail's part bracketed
by ``[T / (1 + lambda_bar), T]``.

:func:`importance_log_evidence` is the brute-force reference: importance sampling from the
Laplace posterior itself, one forward run per sample (for problems with few parameters; the
tests check the Laplace value against it on a small nonlinear twin).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from femkin._fem import MPI, PETSc

__all__ = [
    "Evidence",
    "TailBounds",
    "analyse_evidence",
    "importance_log_evidence",
    "laplace_log_evidence",
    "marginal_tail_bound",
    "noise_normalisation",
    "problem_evidence",
    "tail_bounds",
    "tail_log_det_lanczos",
]

LOG_2PI = math.log(2.0 * math.pi)
#: The tail's log det is estimated by stochastic Lanczos quadrature when its bracket is wider
#: than this (nats; half of it is the evidence's uncertainty).
LANCZOS_WIDTH = 1.0
#: The Lanczos probes use seeds ``seed + LANCZOS_SEED_OFFSET + i`` (apart from the others).
LANCZOS_SEED_OFFSET = 3_000_017


@dataclasses.dataclass(frozen=True)
class TailBounds:
    """What the omitted part of the spectrum contributes to ``log det(I + H~)``.

    Attributes:
        lower: a lower bound of ``Delta = sum_{j > k} log(1 + lambda_j)``.
        upper: an upper bound (the omitted trace plus two standard errors).
        estimate: the value used (the Lanczos estimate, else the middle of the bracket; 0 for an
            exact spectrum).
        effective_lower: lower bound of the tail's ``sum lambda_j / (1 + lambda_j)``.
        effective_upper: its upper bound.
        method: ``"exact"`` (full rank: no tail), ``"bracket"`` or ``"lanczos"``.
        details: the numbers behind the bounds (trace, its error, lambda_bar, the bound of the
            coefficient marginals), for ``uq.json``.
    """

    lower: float
    upper: float
    estimate: float
    effective_lower: float
    effective_upper: float
    method: str
    details: dict

    @classmethod
    def exact(cls) -> TailBounds:
        """No tail: the spectrum was computed to full rank."""
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, "exact", {})


def tail_bounds(
    trace: float,
    trace_error: float,
    *,
    last_kept: float | None = None,
    largest: float | None = None,
    marginal_bound: float | None = None,
    lanczos: dict | None = None,
) -> TailBounds:
    """Bracket the omitted part of ``log det(I + H~)`` (see the module docstring).

    Args:
        trace: estimate of the omitted eigenvalues' sum ``T``.
        trace_error: its standard error (0 for an exact trace).
        last_kept: the smallest kept eigenvalue (the tail lies below it for exact pairs).
        largest: estimate of the largest omitted eigenvalue (power steps).
        marginal_bound: ``log det C_k - log det C`` from the coefficients' exact marginals.
        lanczos: a :func:`tail_log_det_lanczos` estimate; the bracket is then narrowed to its
            two-standard-error interval and the estimate is its value.

    Returns:
        The :class:`TailBounds`.
    """
    t_hi = max(trace + 2.0 * trace_error, 0.0)
    t_lo = max(trace - 2.0 * trace_error, 0.0)
    lower = math.log1p(t_lo)
    spectral = None
    bars = [v for v in (last_kept, largest) if v is not None and v > 0]
    lam_bar = min(max(bars), t_hi) if bars else t_hi
    if lam_bar > 0:
        spectral = t_lo * math.log1p(lam_bar) / lam_bar
        lower = max(lower, spectral)
    if marginal_bound is not None and np.isfinite(marginal_bound):
        lower = max(lower, float(marginal_bound))
    upper = max(t_hi, lower)
    estimate = 0.5 * (lower + upper)
    eff_lo = t_lo / (1.0 + lam_bar) if lam_bar > 0 else t_lo
    eff_hi = t_hi
    details: dict[str, Any] = {}
    method = "bracket"
    if lanczos is not None:
        est, se = float(lanczos["estimate"]), float(lanczos["standard_error"])
        lo, hi = max(lower, est - 2.0 * se), min(upper, est + 2.0 * se)
        if lo <= hi:
            lower, upper = lo, hi
        estimate = min(max(est, lower), upper)
        if "effective" in lanczos:
            e, e_se = float(lanczos["effective"]), float(lanczos["effective_error"])
            lo, hi = max(eff_lo, e - 2.0 * e_se), min(eff_hi, e + 2.0 * e_se)
            if lo <= hi:
                eff_lo, eff_hi = lo, hi
        details["lanczos"] = dict(lanczos)
        method = "lanczos"
    return TailBounds(
        lower=lower,
        upper=upper,
        estimate=estimate,
        effective_lower=eff_lo,
        effective_upper=eff_hi,
        method=method,
        details={
            "trace": float(trace),
            "trace_error": float(trace_error),
            "lambda_bar": float(lam_bar),
            "spectral_lower": None if spectral is None else float(spectral),
            "marginal_lower": None if marginal_bound is None else float(marginal_bound),
            **details,
        },
    )


@dataclasses.dataclass(frozen=True)
class Evidence:
    """The Laplace evidence and its parts (nats).

    Attributes:
        log_evidence: the estimate of ``log Z`` (the tail taken at its estimate).
        lower: ``log Z`` with the tail at its upper bound.
        upper: ``log Z`` with the tail at its lower bound.
        log_likelihood: ``-J(x*) - N/2 log 2 pi - sum log sigma_i``.
        misfit: ``J(x*)``.
        prior_penalty: ``R(x*)``.
        log_det_kept: ``sum_{kept} log(1 + lambda_i)``.
        tail: the bracket of the omitted part.
        n_data: ``N``.
        sum_log_sigma: ``sum_i log sigma_i``.
        n_parameters: ``n``.
        rank: the number of eigenvalues used.
        effective_parameters: ``sum lambda_i / (1 + lambda_i)`` over the kept pairs plus the
            middle of the tail's bracket.
    """

    log_evidence: float
    lower: float
    upper: float
    log_likelihood: float
    misfit: float
    prior_penalty: float
    log_det_kept: float
    tail: TailBounds
    n_data: int
    sum_log_sigma: float
    n_parameters: int
    rank: int
    effective_parameters: float

    def to_json(self) -> dict[str, Any]:
        """The ``evidence`` record of ``uq.json``."""
        half = 0.5 * (self.tail.effective_upper - self.tail.effective_lower)
        return {
            "log_evidence": self.log_evidence,
            "bounds": [self.lower, self.upper],
            "uncertainty": 0.5 * (self.upper - self.lower),
            "log_likelihood": self.log_likelihood,
            "misfit": self.misfit,
            "prior_penalty": self.prior_penalty,
            "log_det_kept": self.log_det_kept,
            "log_det_tail": {
                "method": self.tail.method,
                "lower": self.tail.lower,
                "upper": self.tail.upper,
                "estimate": self.tail.estimate,
                **self.tail.details,
            },
            "n_data": self.n_data,
            "sum_log_sigma": self.sum_log_sigma,
            "n_parameters": self.n_parameters,
            "rank": self.rank,
            "effective_parameters": self.effective_parameters,
            "effective_parameters_bounds": [
                self.effective_parameters - half,
                self.effective_parameters + half,
            ],
        }

    def note(self) -> str:
        """One line for the report."""
        width = 0.5 * (self.upper - self.lower)
        line = (
            f"Laplace log evidence {self.log_evidence:.2f} nats"
            + (
                f" +- {width:.2g} (the truncated tail, "
                + ("by Lanczos quadrature" if "lanczos" in self.tail.details else "bracketed")
                + ")"
                if width > 0
                else " (full spectrum)"
            )
            + f": log-likelihood {self.log_likelihood:.2f} at the MAP point, prior penalty "
            f"{self.prior_penalty:.2f}, 1/2 log det(I + H~) "
            f"{0.5 * (self.log_det_kept + self.tail.estimate):.2f}; {self.n_data} data, "
            f"{self.n_parameters} parameters, {self.effective_parameters:.1f} data-informed "
            "directions."
        )
        return line


def laplace_log_evidence(
    misfit: float,
    prior_penalty: float,
    n_data: int,
    sum_log_sigma: float,
    eigenvalues: Sequence[float] | np.ndarray,
    *,
    n_parameters: int,
    tail: TailBounds | None = None,
) -> Evidence:
    """``log Z ~ -J - N/2 log 2 pi - sum log sigma - R - 1/2 log det(I + H~)``.

    Args:
        misfit: ``J(x*)`` (with the ``1/2`` and the ``1/sigma^2`` weights).
        prior_penalty: ``R(x*) = 1/2 |x* - x_0|^2_{Gamma_prior^{-1}}``.
        n_data: the number of data the misfit counts.
        sum_log_sigma: ``sum_i log sigma_i`` over those data.
        eigenvalues: the computed eigenvalues of ``H v = lambda Gamma_prior^{-1} v`` (each
            ``> -1``).
        n_parameters: the dimension ``n`` of the parameter vector.
        tail: the omitted part (:func:`tail_bounds`); ``None`` when the eigenvalues are the
            whole spectrum (``len(eigenvalues) == n_parameters``, or the Hessian's rank).

    Returns:
        The :class:`Evidence`.

    Raises:
        ValueError: an eigenvalue ``<= -1`` (no positive posterior covariance).
    """
    lam = np.asarray(eigenvalues, dtype=float).ravel()
    if lam.size and lam.min() <= -1.0:
        raise ValueError(f"eigenvalues must exceed -1; found min {lam.min()!r}")
    tail = TailBounds.exact() if tail is None else tail
    log_likelihood = -float(misfit) - 0.5 * n_data * LOG_2PI - float(sum_log_sigma)
    log_det = float(np.sum(np.log1p(lam)))
    base = log_likelihood - float(prior_penalty) - 0.5 * log_det
    effective = float(np.sum(lam / (1.0 + lam))) + 0.5 * (
        tail.effective_lower + tail.effective_upper
    )
    return Evidence(
        log_evidence=base - 0.5 * tail.estimate,
        lower=base - 0.5 * tail.upper,
        upper=base - 0.5 * tail.lower,
        log_likelihood=log_likelihood,
        misfit=float(misfit),
        prior_penalty=float(prior_penalty),
        log_det_kept=log_det,
        tail=tail,
        n_data=int(n_data),
        sum_log_sigma=float(sum_log_sigma),
        n_parameters=int(n_parameters),
        rank=int(lam.size),
        effective_parameters=effective,
    )


def noise_normalisation(problem) -> tuple[int, float]:
    """``(N, sum_i log sigma_i)`` over the data the problem's misfit counts (collective).

    The frames of :meth:`femkin.misfit.PixelMisfit.frames` (frame 0 only when the initial
    state is learned) and their observed pixels; each pixel is held by one rank, as in the
    misfit itself.
    """
    n, s = 0, 0.0
    for p in problem.particles.values():
        mf = p.misfit
        first = 0 if mf.include_first else 1
        seen = mf.observed[first:] & (mf.weight[first:] > 0)
        n += int(seen.sum())
        s += float(-0.5 * np.sum(np.log(mf.weight[first:][seen])))
    n = problem.comm.allreduce(n, op=MPI.SUM)
    s = problem.comm.allreduce(s, op=MPI.SUM)
    return int(n), float(s)


def marginal_tail_bound(low_rank: np.ndarray | None, covariance: np.ndarray | None) -> float | None:
    """``log det C_k - log det C``: a lower bound of the omitted ``log det`` (module docstring).

    ``covariance`` must be the exact marginal covariance or an upper bound of it.
    """
    if low_rank is None or covariance is None or np.size(covariance) == 0:
        return None
    s1, ld1 = np.linalg.slogdet(np.asarray(low_rank, dtype=float))
    s2, ld2 = np.linalg.slogdet(np.asarray(covariance, dtype=float))
    if s1 <= 0 or s2 <= 0:
        return None
    return max(float(ld1 - ld2), 0.0)


def problem_evidence(
    problem,
    prior,
    x: PETSc.Vec,
    misfit: float,
    eigenvalues: np.ndarray,
    *,
    omitted: dict | None = None,
    estimate_omitted=None,
    marginal_bound: float | None = None,
    estimate_lanczos=None,
) -> Evidence:
    """The Laplace evidence of an inverse problem at its MAP point ``x`` (collective).

    Args:
        problem: the :class:`~femkin.problem.InverseProblem`.
        prior: its :class:`~femkin.prior.Prior`.
        x: the MAP point.
        misfit: ``J(x)`` (the problem's misfit there).
        eigenvalues: the kept eigenvalues of the prior-preconditioned Hessian.
        omitted: the uncertainty step's omitted-spectrum record (``trace``, ``trace_error``,
            ``largest``), when it made one.
        estimate_omitted: ``() -> dict`` making that record when ``omitted`` is ``None`` and the
            spectrum is not of full rank (a few Hessian actions).
        marginal_bound: :func:`marginal_tail_bound` of the coefficient marginals.
        estimate_lanczos: ``() -> dict`` (:func:`tail_log_det_lanczos`), called when the
            bracket of the tail is wider than :data:`LANCZOS_WIDTH` nats; ``None``: bracket only.

    Returns:
        The :class:`Evidence` (identical on every rank).
    """
    lam = np.asarray(eigenvalues, dtype=float)
    n = int(problem.space.global_size)
    n_data, sum_log_sigma = noise_normalisation(problem)
    penalty = float(prior.cost(x))
    tail = None
    if lam.size < n:
        if omitted is None and estimate_omitted is not None:
            omitted = estimate_omitted()
        if omitted is None:
            raise ValueError(
                f"{lam.size} of {n} eigenvalues and no omitted-spectrum estimate: the tail of "
                "log det(I + H~) cannot be bounded"
            )
        kw: dict[str, Any] = {
            "last_kept": float(lam[-1]) if lam.size else None,
            "largest": float(omitted["largest"]),
            "marginal_bound": marginal_bound,
        }
        tail = tail_bounds(float(omitted["trace"]), float(omitted["trace_error"]), **kw)
        if estimate_lanczos is not None and tail.upper - tail.lower > LANCZOS_WIDTH:
            tail = tail_bounds(
                float(omitted["trace"]),
                float(omitted["trace_error"]),
                lanczos=estimate_lanczos(),
                **kw,
            )
    return laplace_log_evidence(
        misfit, penalty, n_data, sum_log_sigma, lam, n_parameters=n, tail=tail
    )


def importance_log_evidence(
    problem,
    prior,
    x: PETSc.Vec,
    posterior,
    *,
    samples: int,
    seed: int = 0,
    scale: float = 1.0,
) -> dict[str, float]:
    """Brute-force ``log Z`` by importance sampling from the (scaled) Laplace posterior.

    ``z = scale * S w`` with ``S w ~ N(0, Gamma_post)`` (:meth:`LowRankPosterior.sample` of a
    prior sample), ``x_s = x + z``, weight ``p(d | x_s) pi(x_s) / q(x_s)``:

        log w = -J(x_s) - R(x_s) + 1/2 z^T P z / scale^2 + n log(scale)
                - 1/2 sum log(1 + lambda_i) - N/2 log 2 pi - sum log sigma_i,

    (``P = Gamma_prior^{-1} + B V L V^T B``, the Laplace posterior's precision; the prior's
    determinant cancels against ``q``'s). The estimate ``log mean w`` is consistent whatever the
    proposal; its standard error comes from the weights (delta method). One forward run per
    sample; meant for few parameters with the spectrum at full rank. Samples whose forward run
    fails count with weight 0 (reported). Collective; the result is identical on every rank.

    Args:
        problem: the inverse problem.
        prior: its prior.
        x: the MAP point.
        posterior: the :class:`~femkin.uq.laplace.LowRankPosterior` at ``x``.
        samples: the number of forward runs.
        seed: sample ``i`` uses the prior sample of seed ``seed + i``.
        scale: proposal std relative to the Laplace posterior's (>1 fattens the tails).

    Returns:
        ``{"log_evidence", "standard_error", "ess", "samples", "failed"}``.
    """
    from femkin.errors import ConvergenceError
    from femkin.uq.laplace_study import prior_sample

    space = problem.space
    n = space.global_size
    n_data, sum_log_sigma = noise_normalisation(problem)
    lam = posterior.eigenvalues
    const = (
        -0.5 * n_data * LOG_2PI - sum_log_sigma - 0.5 * float(np.sum(np.log1p(lam)))
    ) + n * math.log(scale)
    log_w = []
    failed = 0
    xs = space.create_vector()
    bz = space.create_vector()
    for i in range(samples):
        w = prior_sample(prior, space, seed + i)
        z = posterior.sample(w)
        w.destroy()
        z.scale(scale)
        prior.precision_mult(z, bz)
        quad = z.dot(bz)
        if posterior.rank:
            vtb = np.array([v.dot(bz) for v in posterior.eigenvectors])
            quad += float(np.sum(lam * vtb**2))
        x.copy(xs)
        xs.axpy(1.0, z)
        z.destroy()
        try:
            j = problem.misfit(xs)
        except ConvergenceError:
            failed += 1
            log_w.append(-np.inf)
            continue
        log_w.append(-j - prior.cost(xs) + 0.5 * quad / scale**2 + const)
    xs.destroy()
    bz.destroy()
    a = np.asarray(log_w)
    top = float(np.max(a))
    w = np.exp(a - top)
    mean = float(np.mean(w))
    # delta method: se(log mean w) = std(w) / (sqrt(n) mean w)
    se = float(np.std(w, ddof=1) / (math.sqrt(len(w)) * mean)) if len(w) > 1 else float("inf")
    ess = float(np.sum(w) ** 2 / np.sum(w * w))
    return {
        "log_evidence": top + math.log(mean),
        "standard_error": se,
        "ess": ess,
        "samples": int(samples),
        "failed": int(failed),
    }


def analyse_evidence(
    problem,
    prior,
    x: PETSc.Vec,
    misfit: float,
    posterior,
    spectrum: dict,
    marginals,
    settings: dict,
    *,
    apply_H,
    apply_H_batch=None,
) -> Evidence:
    """The evidence step of :func:`femkin.uq.laplace_study.analyse` (collective).

    Uses the uncertainty step's omitted-spectrum estimate when the rank cap cut the spectrum;
    otherwise, unless the spectrum has full rank, makes one (``[uq] omitted_samples`` trace
    samples, at least 2, and 4 power steps: about ``samples + 5`` Hessian actions), since the
    eigenvalues below the threshold still add to ``log det(I + H~)``. With a Gauss-Newton
    Hessian and coefficient marginals that are exact or an upper bound
    (:class:`femkin.uq.marginals.Marginals` ``method`` ``"certified"`` or ``"bound"``), they
    sharpen the tail's lower bound.

    Args:
        problem: the inverse problem, linearised at ``x`` (its last gradient point).
        prior: its prior.
        x: the MAP point.
        misfit: ``J(x)``.
        posterior: the :class:`~femkin.uq.laplace.LowRankPosterior` (its eigenpairs).
        spectrum: the uncertainty step's rank record (``omitted`` when it made one).
        marginals: the :class:`~femkin.uq.marginals.Marginals` of the global coefficients, or
            ``None``.
        settings: the ``[uq]`` section (``hessian``, ``seed``, ``omitted_samples``).
        apply_H: the misfit Hessian action at ``x``.
        apply_H_batch: its batched form.
    """
    from femkin.uq.laplace_study import OMITTED_SEED_OFFSET, prior_sample
    from femkin.uq.randomized import Eigenpairs, omitted_spectrum

    seed = int(settings["seed"])
    gauss_newton = settings["hessian"] == "gauss-newton"

    def estimate() -> dict:
        om = omitted_spectrum(
            apply_H,
            prior.precision_mult,
            prior.covariance_mult,
            Eigenpairs(posterior.eigenvalues, posterior.eigenvectors),
            lambda i: prior_sample(prior, problem.space, seed + OMITTED_SEED_OFFSET + i),
            samples=max(int(settings.get("omitted_samples", 10)), 2),
            power_steps=4,
            apply_H_batch=apply_H_batch,
        )
        return {"trace": om.trace, "trace_error": om.trace_error, "largest": om.largest}

    def lanczos() -> dict:
        return tail_log_det_lanczos(
            apply_H,
            prior.precision_mult,
            prior.covariance_mult,
            posterior.eigenvectors,
            lambda i: prior_sample(prior, problem.space, seed + LANCZOS_SEED_OFFSET + i),
            samples=max(int(settings.get("omitted_samples", 10)), 2),
            steps=min(steps, problem.space.global_size),
            apply_H_batch=apply_H_batch,
        )

    steps = int(settings.get("evidence_lanczos", 12))
    bound = None
    if gauss_newton and marginals is not None and marginals.method in ("certified", "bound"):
        bound = marginal_tail_bound(marginals.low_rank, marginals.covariance)
    return problem_evidence(
        problem,
        prior,
        x,
        misfit,
        posterior.eigenvalues,
        omitted=spectrum.get("omitted"),
        estimate_omitted=estimate,
        marginal_bound=bound,
        estimate_lanczos=lanczos if steps > 0 else None,
    )


def tail_log_det_lanczos(
    apply_H,
    apply_B,
    apply_Binv,
    eigenvectors,
    prior_sample,
    *,
    samples: int = 10,
    steps: int = 20,
    apply_H_batch=None,
) -> dict[str, float]:
    """Stochastic Lanczos quadrature of the omitted ``sum_{j > k} log(1 + lambda_j)``.

    The omitted operator ``A = Pi Gamma_prior H Pi`` (``Pi = I - V V^T B``, self-adjoint in the
    B inner product; see :func:`femkin.uq.randomized.omitted_spectrum`) has the omitted
    eigenvalues and zeros on the kept directions, so ``tr log(I + A)`` is the tail. For
    ``z ~ N(0, Gamma_prior)``, ``E[(Pi z)^T B log(I + A) (Pi z)] = tr log(I + A)`` (Hutchinson in
    the prior's geometry), and each quadratic form is the Gauss quadrature of ``steps`` Lanczos
    steps of ``A`` from ``Pi z`` in the B inner product (Ubaru, Chen & Saad 2017):
    ``|Pi z|_B^2 sum_i tau_i^2 log(1 + theta_i)`` with ``theta_i``, ``tau_i`` the Ritz values and
    the first components of the tridiagonal matrix's eigenvectors (full reorthogonalisation).
    The probes run in lock step: one batched Hessian action per Lanczos step.

    Args:
        apply_H: ``out = H x`` (or a ``Mat``).
        apply_B: ``out = B x``, the prior precision.
        apply_Binv: ``out = B^{-1} x``, the prior covariance.
        eigenvectors: the kept vectors ``V`` (``V^T B V = I``).
        prior_sample: ``prior_sample(i)``: the ``i``-th sample of ``N(0, Gamma_prior)``.
        samples: probes (>= 2).
        steps: Lanczos steps per probe (Hessian actions per probe).
        apply_H_batch: optional batched Hessian action.

    Returns:
        ``{"estimate", "standard_error", "samples", "steps", "trace", "effective",
        "effective_error"}`` (``trace``: the Hutchinson estimate of the omitted trace from the
        same probes; ``effective``: the same quadrature of ``sum lambda_j / (1 + lambda_j)``),
        identical on every rank.
    """
    from femkin.uq.randomized import apply_many, as_apply, gram

    if samples < 2 or steps < 1:
        raise ValueError(f"need samples >= 2 and steps >= 1; found {samples=}, {steps=}")
    apply_H, apply_B, apply_Binv = as_apply(apply_H), as_apply(apply_B), as_apply(apply_Binv)
    vs = list(eigenvectors)

    def project(x: PETSc.Vec) -> None:
        for _ in range(2 if vs else 0):
            bx = x.duplicate()
            apply_B(x, bx)
            coef = gram(vs, [bx])[:, 0]
            bx.destroy()
            for c, v in zip(coef, vs, strict=True):
                x.axpy(-float(c), v)

    def b_dot(x: PETSc.Vec, y: PETSc.Vec) -> float:
        by = y.duplicate()
        apply_B(y, by)
        value = x.dot(by)
        by.destroy()
        return float(value)

    basis: list[list[PETSc.Vec]] = []
    norms2 = np.zeros(samples)
    for i in range(samples):
        z = prior_sample(i)
        project(z)
        norms2[i] = b_dot(z, z)
        z.scale(1.0 / math.sqrt(norms2[i]) if norms2[i] > 0 else 0.0)
        basis.append([z])
    alpha = np.zeros((samples, steps))
    beta = np.zeros((samples, steps))
    done = np.array([n <= 0 for n in norms2])
    used = np.zeros(samples, dtype=int)
    for j in range(steps):
        active = [i for i in range(samples) if not done[i]]
        if not active:
            break
        hq = apply_many(apply_H, apply_H_batch, [basis[i][j] for i in active])
        for i, h in zip(active, hq, strict=True):
            q = basis[i][j]
            alpha[i, j] = float(q.dot(h))  # q^T B (Gamma H q) = q^T H q
            w = q.duplicate()
            apply_Binv(h, w)
            h.destroy()
            project(w)
            for _ in range(2):  # full reorthogonalisation against this probe's basis
                for u in basis[i]:
                    w.axpy(-b_dot(u, w), u)
            used[i] = j + 1
            b = math.sqrt(max(b_dot(w, w), 0.0))
            if j + 1 == steps or b <= 1e-12 * max(abs(alpha[i, j]), 1e-300):
                done[i] = True
                w.destroy()
                continue
            beta[i, j] = b
            w.scale(1.0 / b)
            basis[i].append(w)
    values = np.zeros(samples)
    effective = np.zeros(samples)
    traces = np.zeros(samples)
    for i in range(samples):
        m = int(used[i])
        if m == 0 or norms2[i] <= 0:
            continue
        t = np.diag(alpha[i, :m]) + np.diag(beta[i, : m - 1], 1) + np.diag(beta[i, : m - 1], -1)
        theta, w = np.linalg.eigh(t)
        theta = np.maximum(theta, -1.0 + 1e-12)
        values[i] = norms2[i] * float(np.sum(w[0] ** 2 * np.log1p(theta)))
        effective[i] = norms2[i] * float(np.sum(w[0] ** 2 * theta / (1.0 + theta)))
        traces[i] = norms2[i] * alpha[i, 0]
    for qs in basis:
        for q in qs:
            q.destroy()
    return {
        "estimate": float(np.mean(values)),
        "standard_error": float(np.std(values, ddof=1) / math.sqrt(samples)),
        "samples": int(samples),
        "steps": int(steps),
        "trace": float(np.mean(traces)),
        "effective": float(np.mean(effective)),
        "effective_error": float(np.std(effective, ddof=1) / math.sqrt(samples)),
    }
