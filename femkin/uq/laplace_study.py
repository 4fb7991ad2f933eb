"""The Laplace approximation of an inversion's posterior at its MAP point (``femkin uq``).

Given an :class:`~femkin.problem.InverseProblem`, its :class:`~femkin.prior.Prior` and
the MAP point ``x``, :func:`analyse`

1. evaluates the gradient at ``x`` (the Hessian actions are taken at the last gradient point);
2. computes the dominant eigenpairs of ``H v = lambda Gamma_prior^{-1} v`` (``H`` the
   Gauss-Newton or full misfit Hessian) with the randomised double-pass solver
   (:func:`femkin.uq.randomized.adaptive_rank`; probe ``i`` is
   ``space.random_normal(seed + i)``, so the result does not depend on the partition);
3. builds the low-rank posterior ``Gamma_post = Gamma_prior - V D V^T``
   (:class:`femkin.uq.laplace.LowRankPosterior`) and from it
   - the marginal std and correlations of all global coefficients (unit-vector functionals;
     their prior variances are the diagonal coefficient prior),
   - the pointwise posterior std of ``ln k = ln k0 + m`` at every dof of every particle
     (the prior diagonal of the BiLaplacian prior from :func:`bilaplacian_pointwise_variance`,
     the ``ln k0``-``m`` cross covariance from the eigenvectors), interpolated to the pixels,
   - 95% credible bands of ``mu_h(c)`` and ``ln j0(c)`` by linear propagation (both are linear
     in the global coefficients: ``J C J^T`` with ``C`` their posterior covariance), centred
     on the joint MAP values or, where :func:`centre_choice` says so (``[uq]
     coefficient_mean``, default ``"auto"``), on the coefficients' Laplace-marginal mode
     (:func:`marginal_mode`, :mod:`femkin.uq.volume`);
4. draws ``N`` posterior samples ``x + S z`` (``z`` a prior sample from seeded, partition
   independent normals) and runs the forward model at each for a band of the predicted
   particle-average ``c(t)``.

All functions are collective on the problem's communicator; arrays meant for output are
complete on rank 0 (``None`` elsewhere where stated).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from femkin._fem import PETSc, dolfinx
from femkin.errors import ConvergenceError
from femkin.physics.acr import legendre
from femkin.progress import Progress
from femkin.uq.evidence import analyse_evidence
from femkin.uq.laplace import LowRankPosterior, correlation
from femkin.uq.marginals import marginal_covariance
from femkin.uq.predictive import average_noise_std, predictive_c_t, residual_check
from femkin.uq.randomized import adaptive_rank, combine, gram, omitted_spectrum, symmetric
from femkin.uq.volume import field_basis, volume_correction

__all__ = [
    "EXACT_VARIANCE_LIMIT",
    "SAMPLE_SEED_OFFSET",
    "Z95",
    "UQResult",
    "analyse",
    "bilaplacian_pointwise_variance",
    "coefficient_layout",
    "prior_sample",
    "scalar_prior_variances",
]

#: Standard-normal quantile of a two-sided 95% interval.
Z95 = 1.959963984540054
#: Fields with at most this many dofs get the exact prior diagonal (one prior solve per dof);
#: larger ones a sampled estimate.
EXACT_VARIANCE_LIMIT = 6000
#: Posterior sample ``i`` uses the normals of seed ``seed + SAMPLE_SEED_OFFSET + i`` (probes use
#: ``seed + i``), so samples and probes never share numbers.
SAMPLE_SEED_OFFSET = 1_000_003
#: The trace samples bounding the omitted spectrum use seeds ``seed + OMITTED_SEED_OFFSET + i``.
OMITTED_SEED_OFFSET = 2_000_003
#: A marginal-mode move beyond this many posterior std gets a note: the one Newton step is a
#: local approximation (the twins' moves measured 1-1.3 std, benchmarks/README.md).
FAR_MOVE = 3.0


@dataclasses.dataclass
class UQResult:
    """What :func:`analyse` computes.

    Attributes:
        posterior: the low-rank Laplace posterior (all computed pairs with ``lambda > -1``).
        eigenvalues: all computed eigenvalues, descending.
        names: the global coefficients in the order of ``covariance`` (``"mu_h[1]"``, ...,
            ``"k0"`` for ln k0).
        blocks: ``[(block, size), ...]`` in that order.
        mean: the MAP values of the global coefficients.
        covariance: their posterior covariance (dense).
        prior_variance: their prior variances.
        ln_k_std: ``{label: (H, W) map}`` of the posterior std of ln k, NaN outside the
            particle (rank 0; empty elsewhere).
        ln_k_prior_std: the same for the prior.
        bands: ``{"c": grid, "mu_h": (value, lo, hi), "j0": (value, lo, hi)}`` (every rank).
        c_t: ``{"t", "samples", "failed", "particles": {label: {"map", "lo", "hi",
            "observed"}}}`` (rank 0; ``None`` elsewhere or without samples).
        fitted: the fitted video at the MAP point (rank 0).
        variance_method: ``"exact"`` or ``"sampled(N)"``: how the prior diagonal was found.
        hessian_actions: Hessian actions spent in all (eigensolver, omitted spectrum, marginals).
        wall_time: seconds per stage.
        ln_k_std_dofs: ``{label: values}`` of the posterior std of ln k on the P1 space of
            each particle held by this rank (owned + ghost values; for field output).
        low_rank_covariance: the global coefficients' covariance from the low-rank posterior
            alone (what a truncated Hessian gives; ``covariance`` is the exact marginal).
        marginals: how ``covariance`` was found (``iterations``, ``hessian_actions``,
            ``converged``, ``relative_gap``, ``tolerance``).
        spectrum: the rank decision: ``truncated`` (the cap cut the spectrum above the
            threshold), ``max_rank`` and, when truncated, ``omitted`` (estimates of the trace
            and the largest eigenvalue of the part left out).
        residuals: the standardised residuals at the MAP point
            (:func:`femkin.uq.predictive.residual_check`).
        evidence: the Laplace log evidence (:class:`femkin.uq.evidence.Evidence`).
        map_values: the joint MAP values of the global coefficients (``mean`` unless it is
            their Laplace-marginal mode).
        marginal_mode: where ``mean`` is the Laplace-marginal mode: how it moved from the MAP
            point (:func:`marginal_mode`); None otherwise.
        mean_vector: where ``mean`` is the marginal mode: the Laplace mean as a parameter
            vector (the coefficients moved, the fields at their conditional mean), the centre
            of ``femkin sample``'s proposal; None otherwise.
        fields_learned: whether a field (m, the initial state) was learned beside the
            coefficients (then the joint MAP values can be biased: a note says so).
        centre: ``{"setting", "used", "reason"}``: ``[uq] coefficient_mean``, the centre
            taken (``"map"`` or ``"marginal"``) and, where it differs from what was asked,
            why (:func:`centre_choice`).
    """

    posterior: LowRankPosterior
    eigenvalues: np.ndarray
    names: list[str]
    blocks: list[tuple[str, int]]
    mean: np.ndarray
    covariance: np.ndarray
    prior_variance: np.ndarray
    ln_k_std: dict[int, np.ndarray]
    ln_k_prior_std: dict[int, np.ndarray]
    bands: dict[str, Any]
    c_t: dict | None
    fitted: np.ndarray | None
    variance_method: str
    hessian_actions: int
    wall_time: dict[str, float]
    ln_k_std_dofs: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    low_rank_covariance: np.ndarray | None = None
    marginals: dict = dataclasses.field(default_factory=dict)
    spectrum: dict = dataclasses.field(default_factory=dict)
    residuals: dict = dataclasses.field(default_factory=dict)
    evidence: Any = None
    map_values: np.ndarray | None = None
    marginal_mode: dict | None = None
    mean_vector: PETSc.Vec | None = None
    fields_learned: bool = False
    centre: dict = dataclasses.field(default_factory=dict)

    @property
    def std(self) -> np.ndarray:
        """Posterior marginal std of the global coefficients."""
        return np.sqrt(np.maximum(np.diag(self.covariance), 0.0))

    def to_json(self, settings: dict) -> dict:
        """The public ``results/uq.json`` content (see the module docstring of the command)."""
        std = self.std
        prior_std = np.sqrt(self.prior_variance)
        low_rank_std = (
            np.sqrt(np.maximum(np.diag(self.low_rank_covariance), 0.0))
            if self.low_rank_covariance is not None
            else std
        )
        coefficients = {}
        i = 0
        map_values = self.mean if self.map_values is None else self.map_values
        for block, size in self.blocks:
            coefficients[block] = {
                "mean": self.mean[i : i + size].tolist(),
                "map": map_values[i : i + size].tolist(),
                "std": std[i : i + size].tolist(),
                "prior_std": prior_std[i : i + size].tolist(),
                "low_rank_std": low_rank_std[i : i + size].tolist(),
            }
            i += size
        out = {
            "hessian": settings["hessian"],
            "threshold": settings["threshold"],
            "eigenvalues": self.eigenvalues.tolist(),
            "rank": int(self.posterior.rank),
            "coefficients": coefficients,
            "coefficient_names": list(self.names),
            "correlation": _finite(correlation(self.covariance)).tolist() if self.names else [],
            "ln_k_std": {
                str(lb): {
                    "mean": float(np.nanmean(s)),
                    "max": float(np.nanmax(s)),
                    "min": float(np.nanmin(s)),
                    "prior_mean": float(np.nanmean(self.ln_k_prior_std[lb])),
                }
                for lb, s in self.ln_k_std.items()
            },
            "prior_pointwise_variance": self.variance_method,
            "hessian_actions": int(self.hessian_actions),
            "wall_time": dict(self.wall_time),
            "marginals": dict(self.marginals),
            "spectrum": dict(self.spectrum),
            "notes": self.notes(settings),
            "predictive_check": {"residuals": dict(self.residuals)},
        }
        if self.evidence is not None:
            out["evidence"] = self.evidence.to_json()
        if self.centre:
            out["coefficient_mean"] = dict(self.centre)
        if self.marginal_mode is not None:
            out["marginal_mode"] = {
                k: (v.tolist() if isinstance(v, np.ndarray) else v)
                for k, v in self.marginal_mode.items()
            }
        if self.c_t is not None:
            out["c_t"] = self.c_t
            out["predictive_check"]["c_t"] = {
                "coverage": self.c_t.get("coverage"),
                "z_rms": self.c_t.get("z_rms"),
            }
        return out

    def _ppc_note(self) -> list[str]:
        r = self.residuals
        if not r:
            return []
        line = (
            f"Posterior predictive check: standardised residuals mean {r['mean']:.3g}, std "
            f"{r['std']:.3g}, beyond 2 sigma {100 * r['beyond_2']:.2f}% (N(0,1): 4.55%), beyond "
            f"3 sigma {100 * r['beyond_3']:.3f}% (0.27%)"
        )
        if self.c_t is not None and self.c_t.get("coverage") is not None:
            line += (
                f"; observed particle-average c(t) inside the 95% predictive band on "
                f"{100 * self.c_t['coverage']:.0f}% of the frames (z rms {self.c_t['z_rms']:.2f})"
            )
        return [line + "."]

    def notes(self, settings: dict) -> list[str]:
        """One-line statements for the report: how the rank was chosen and what was cut."""
        out = []
        sp = self.spectrum
        lam = self.eigenvalues
        if sp.get("truncated"):
            line = (
                f"The rank cap max_rank = {sp['max_rank']} cut the spectrum at eigenvalue "
                f"{lam[-1]:.3g} (threshold {settings['threshold']}): the field directions "
                "beyond it fall back to the prior (ln k std maps and c(t) samples are "
                "conservative)."
            )
            om = sp.get("omitted")
            if om:
                line += (
                    f" Left out: largest eigenvalue ~{om['largest']:.3g}, trace "
                    f"{om['trace']:.3g} +- {om['trace_error']:.2g} ({om['samples']} samples)."
                )
            out.append(line)
        elif lam.size:
            out.append(
                f"Rank {lam.size} reached the threshold {settings['threshold']} "
                f"(smallest eigenvalue {lam[-1]:.3g}): nothing above it was cut."
            )
        mg = self.marginals
        if mg:
            head = {
                "certified": "Coefficient marginals exact (certified), independent of the rank",
                "estimated": "Coefficient marginals exact to the CG error estimate "
                f"({mg['estimated_error']:.2g}), independent of the rank",
                "bound": "Coefficient marginals NOT converged: reported as the tightest upper "
                "bound (conservative); lower bounds of their std in uq.json",
            }[mg.get("method", "bound")]
            out.append(
                f"{head}: {mg['iterations']} CG iterations, {mg['hessian_actions']} Hessian "
                f"actions, certified relative variance gap {mg['relative_gap']:.2g}."
            )
        if self.evidence is not None:
            out.append(self.evidence.note())
        mm = self.marginal_mode
        reason = self.centre.get("reason")
        if reason:
            out.append(reason)
        if mm is None and self.fields_learned and self.names:
            out.append(
                "Coefficient means are the joint MAP values. With a learned field they can sit "
                "a posterior std or more from the coefficients' posterior mean (the fields' "
                "posterior volume, benchmarks/README.md); [uq] coefficient_mean = "
                '"auto" or "marginal" moves them to the mode of their Laplace marginal.'
            )
        if mm is not None:
            out.append(
                "Coefficient means at the mode of their Laplace marginal (the fields' posterior "
                "volume included), moved from the joint MAP point by "
                + ", ".join(
                    f"{n} {s:+.2f}" for n, s in zip(self.names, mm["shift_over_std"], strict=True)
                )
                + f" posterior std ({mm['hessian_actions']} Hessian actions, "
                f"{mm['forward_runs']} forward runs"
                + (f"; no slope for {', '.join(mm['failed'])}" if mm["failed"] else "")
                + ")."
                + (
                    " The rank cap cut informed field directions, whose share of the volume "
                    "term is missing: raise max_rank for the full move."
                    if sp.get("truncated")
                    else ""
                )
            )
            far = max((abs(s) for s in mm["shift_over_std"]), default=0.0)
            if far > FAR_MOVE:
                out.append(
                    f"The marginal mode moved a coefficient by {far:.1f} posterior std: one "
                    "Newton step is a local approximation that far out; check the centre with "
                    "'femkin sample' (MCMC)."
                )
        return out + self._ppc_note()


def _finite(a: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(a), a, 0.0)


# -- prior pieces ------------------------------------------------------------------------------
def coefficient_layout(space) -> list[tuple[str, int]]:
    """The global scalar blocks of a parameter space, ``[(name, size), ...]`` in storage order."""
    return [(b.name, b.size) for b in space.scalar_blocks]


def coefficient_names(blocks: list[tuple[str, int]]) -> list[str]:
    """``["mu_h[1]", "mu_h[2]", "j0[1]", "k0", ...]``: one-size blocks keep their bare name."""
    return [name if size == 1 else f"{name}[{n + 1}]" for name, size in blocks for n in range(size)]


def scalar_prior_variances(prior, space) -> np.ndarray:
    """Prior variances of the global coefficients, in storage order (every rank)."""
    values = [
        np.asarray(prior.priors[(name, None)].std, dtype=float) ** 2
        for name, _ in coefficient_layout(space)
    ]
    return np.concatenate(values) if values else np.zeros(0)


def _unit_functionals(space) -> list[PETSc.Vec]:
    """Unit vectors of every global coefficient (the entry lives on rank 0)."""
    out = []
    for name, size in coefficient_layout(space):
        for n in range(size):
            e = space.create_vector()
            view = space.scalar_view(e, name)
            if view is not None:
                view[n] = 1.0
            out.append(e)
    return out


def bilaplacian_pointwise_variance(
    bl, *, samples: int = 400, seed: int = 0, exact_limit: int = EXACT_VARIANCE_LIMIT
) -> tuple[np.ndarray, str]:
    """The diagonal of a :class:`femkin.prior.BiLaplacianPrior` covariance on its owned dofs:
    exact (one pair of solves per global dof) up to ``exact_limit`` dofs, else the randomized
    estimate from ``samples`` coordinate-seeded samples (relative error ~ sqrt(2/samples)).
    """
    if bl.n_global <= exact_limit:
        return bl.pointwise_variance("exact"), "exact"
    return bl.pointwise_variance("randomized", n_samples=samples, seed=seed), f"sampled({samples})"


def prior_sample(prior, space, seed: int) -> PETSc.Vec:
    """A zero-mean prior sample, partition independent (:meth:`femkin.prior.Prior.sample`)."""
    out = prior.sample(seed)
    mean = prior.mean()
    out.axpy(-1.0, mean)
    mean.destroy()
    return out


# -- the analysis ------------------------------------------------------------------------------
def _curves_jacobian(blocks, name: str, c: np.ndarray) -> np.ndarray:
    """``d curve(c_j) / d coefficient_i`` for mu_h (a_n) or ln j0 (b_n): ``P_n(1 - 2 c_j)``."""
    n_total = sum(size for _, size in blocks)
    jac = np.zeros((c.size, n_total))
    start = 0
    for block, size in blocks:
        if block == name and size:
            polys = legendre(size, 1.0 - 2.0 * c)
            for n in range(size):
                jac[:, start + n] = polys[n + 1]
        start += size
    return jac


def credible_bands(
    problem,
    x: PETSc.Vec,
    blocks,
    covariance: np.ndarray,
    c: np.ndarray | None = None,
    z: float = Z95,
) -> dict[str, Any]:
    """95% bands of ``mu_h(c)`` and ``j0(c)`` (the latter from the band of ln j0).

    Both curves are linear in the global coefficients, so ``Var g(c_j) = J_j C J_j^T`` with
    ``C`` their posterior covariance: linear propagation, exact for the Gaussian posterior.

    Returns:
        ``{"c": c, "mu_h": (value, lo, hi), "j0": (value, lo, hi)}``.
    """
    from femkin.physics.acr import C_GRID, ln_j0, mu_h

    c = C_GRID if c is None else np.asarray(c, dtype=float)
    params = problem.parameters_at(x)
    out: dict[str, Any] = {"c": c}
    p, q = params.j0_prefactor
    mu = mu_h(c, params.mu_h, np.log)
    lnj = ln_j0(c, params.j0, p, q, np.log)
    for name, centre in (("mu_h", mu), ("j0", lnj)):
        jac = _curves_jacobian(blocks, name, c)
        std = np.sqrt(np.maximum(np.einsum("ji,ik,jk->j", jac, covariance, jac), 0.0))
        lo, hi = centre - z * std, centre + z * std
        if name == "j0":
            centre, lo, hi = np.exp(centre), np.exp(lo), np.exp(hi)
        out[name] = (centre, lo, hi)
    return out


def _particle_averages(problem, fitted: np.ndarray) -> dict[int, np.ndarray]:
    """Mean over each particle's pixels of a (T, H, W) video (rank 0)."""
    mask = problem.video.mask
    return {lb: np.nanmean(fitted[:, mask == lb], axis=1) for lb in problem.labels}


def _ln_k_maps(
    problem,
    prior,
    posterior: LowRankPosterior,
    prior_var: np.ndarray,
    covariance: np.ndarray,
    blocks,
    *,
    samples: int,
    seed: int,
    k0_column: PETSc.Vec | None = None,
):
    """Posterior and prior std of ln k = ln k0 + m on the pixels, per particle (rank 0).

    ``Var(ln k0 + m_i) = Var(ln k0) + Var(m_i) + 2 Cov(ln k0, m_i)`` with each term taken from
    the posterior (``covariance`` holds the global coefficients' one). ``k0_column``, when
    given, is ``Gamma_post e_k0`` (exact, see :mod:`femkin.uq.marginals`): its field entries
    are ``Cov(ln k0, m_i)``; otherwise they come from the low-rank eigenvectors. ``Var(m_i)``
    is the low-rank one, an upper bound.
    """
    space = problem.space
    names = [b for b, _ in blocks]
    k0_var = k0_prior_var = 0.0
    k0_v = np.zeros(posterior.rank)
    if "k0" in names:
        i_k0 = coefficient_names(blocks).index("k0")
        k0_var = float(covariance[i_k0, i_k0])
        k0_prior_var = float(prior_var[i_k0])
        k0_v = np.array([space.get_scalars(v, "k0")[0] for v in posterior.eigenvectors])
    prior_diag = space.create_vector()
    methods = set()
    for name, label in space.field_keys:
        if name != "m" or not space.holds(name, label):
            continue
        diag, method = bilaplacian_pointwise_variance(
            prior.priors[(name, label)], samples=samples, seed=seed
        )
        prior_diag.getArray()[space.local_slice(name, label)] = diag
        methods.add(method)
    method_names = sorted(set().union(*problem.comm.allgather(methods)))
    post_diag = posterior.pointwise_variance(prior_diag)
    # Cov(ln k0, m_i) = -sum_j d_j v_j[k0] v_j[i]: the prior has no cross covariance.
    if k0_column is not None:
        cross = k0_column.copy()
    else:
        cross = space.create_vector()
        for d, kv, v in zip(posterior.d, k0_v, posterior.eigenvectors, strict=True):
            cross.axpy(-float(d * kv), v)
    post_arrays: dict[int, np.ndarray] = {}
    prior_arrays: dict[int, np.ndarray] = {}
    has_m = "m" in problem.learn
    for label, p in problem.particles.items():
        V = p.model.V
        n_owned = V.dofmap.index_map.size_local
        if has_m:
            sl = space.local_slice("m", label)
            var_m = post_diag.getArray(readonly=True)[sl]
            cov = cross.getArray(readonly=True)[sl]
            pri_m = prior_diag.getArray(readonly=True)[sl]
        else:
            var_m = cov = pri_m = np.zeros(n_owned)
        var = np.maximum(var_m + k0_var + 2.0 * cov, 0.0)
        pvar = pri_m + k0_prior_var
        for store, values in ((post_arrays, var), (prior_arrays, pvar)):
            f = dolfinx.fem.Function(V)
            f.x.array[:n_owned] = np.sqrt(values)
            f.x.scatter_forward()
            store[label] = f.x.array.copy()
    post_img = problem.field_on_pixels("m", arrays=post_arrays)
    prior_img = problem.field_on_pixels("m", arrays=prior_arrays)
    for v in (prior_diag, post_diag, cross):
        v.destroy()
    post_maps, prior_maps = {}, {}
    if problem.comm.rank == 0:
        mask = problem.video.mask
        for lb in problem.labels:
            post_maps[lb] = np.where(mask == lb, post_img, np.nan)
            prior_maps[lb] = np.where(mask == lb, prior_img, np.nan)
    return post_maps, prior_maps, ",".join(method_names) or "none", post_arrays


def analyse(
    problem,
    prior,
    x: PETSc.Vec,
    settings: dict,
    *,
    variance_samples: int = 400,
    log=None,
    fit_converged: bool | None = None,
) -> UQResult:
    """The Laplace approximation at the MAP point ``x`` (see the module docstring).

    Args:
        problem: the inverse problem.
        prior: its prior (:class:`femkin.prior.Prior`).
        x: the MAP point (not modified).
        settings: the case's ``[uq]`` section (``hessian``, ``max_rank``, ``threshold``,
            ``oversampling``, ``samples``, ``seed``).
        variance_samples: samples of the prior-diagonal estimator for fields too large for the
            exact diagonal (:data:`EXACT_VARIANCE_LIMIT`).
        log: optional ``log(message)`` called on rank 0 for progress.
        fit_converged: whether the fit that found ``x`` converged (None: not known); the
            coefficients' centre depends on it (:func:`centre_choice`).

    Returns:
        The :class:`UQResult`.
    """
    comm = problem.comm
    space = problem.space
    say = (lambda msg: log(msg)) if (log is not None and comm.rank == 0) else (lambda msg: None)
    timings: dict[str, float] = {}
    gauss_newton = settings["hessian"] == "gauss-newton"
    seed = int(settings["seed"])

    t0 = time.perf_counter()
    g = space.create_vector()
    misfit_value = problem.gradient(x, g)
    g.destroy()
    fitted = problem.fitted_video()
    residuals = residual_check(problem)
    timings["gradient"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    h_before = problem.counters["hessian"]

    # The adaptive rank makes the number of actions unknown in advance: count only.
    bar = Progress("uq: Hessian actions", None, comm=comm, quiet=log is None)

    def apply_H(v, out):
        problem.hessian_mult(v, out, gauss_newton=gauss_newton)
        bar.update()

    def apply_H_batch(vs, outs):
        # The actions of one pass share each step's Jacobian factorisation.
        problem.hessian_mult_batch(vs, outs, gauss_newton=gauss_newton)
        bar.update(len(vs))

    max_rank = min(int(settings["max_rank"]), space.global_size)
    pairs = adaptive_rank(
        apply_H,
        prior.precision_mult,
        prior.covariance_mult,
        lambda i: space.random_normal(seed + i),
        threshold=float(settings["threshold"]),
        max_rank=max_rank,
        oversampling=int(settings["oversampling"]),
        start=min(10, max_rank),
        apply_H_batch=apply_H_batch,
    )
    bar.close()
    hessian_actions = problem.counters["hessian"] - h_before
    timings["eigensolver"] = time.perf_counter() - t0
    lam = np.asarray(pairs.eigenvalues)
    threshold = float(settings["threshold"])
    # Cut by the cap (not by the spectrum falling below the threshold, nor by H's rank).
    truncated = bool(lam.size >= max_rank and lam.size and lam[-1] >= threshold)
    spectrum: dict[str, Any] = {"truncated": truncated, "max_rank": max_rank}
    n_omitted = int(settings.get("omitted_samples", 10))
    if truncated and n_omitted >= 2:
        t1 = time.perf_counter()
        h1 = problem.counters["hessian"]
        bar = Progress("uq: omitted spectrum", n_omitted + 5, comm=comm, quiet=log is None)
        om = omitted_spectrum(
            apply_H,
            prior.precision_mult,
            prior.covariance_mult,
            pairs,
            lambda i: prior_sample(prior, space, seed + OMITTED_SEED_OFFSET + i),
            samples=n_omitted,
            power_steps=4,
            apply_H_batch=apply_H_batch,
        )
        bar.close()
        spectrum["omitted"] = {
            "trace": om.trace,
            "trace_error": om.trace_error,
            "largest": om.largest,
            "samples": om.samples,
            "hessian_actions": problem.counters["hessian"] - h1,
        }
        timings["omitted_spectrum"] = time.perf_counter() - t1
        say(
            f"rank capped at {max_rank}: omitted trace {om.trace:.3g} +- {om.trace_error:.2g}, "
            f"largest omitted eigenvalue ~{om.largest:.3g}"
        )
    keep = [i for i, v in enumerate(lam) if v > -1.0 + 1e-8]
    say(f"eigenvalues ({hessian_actions} Hessian actions): " + " ".join(f"{v:.3g}" for v in lam))
    posterior = LowRankPosterior(
        lam[keep],
        [pairs.eigenvectors[i] for i in keep],
        prior.covariance_mult,
        apply_prior_precision=prior.precision_mult,
    )

    t0 = time.perf_counter()
    blocks = coefficient_layout(space)
    names = coefficient_names(blocks)
    prior_var = scalar_prior_variances(prior, space)
    functionals = _unit_functionals(space)
    # The global coefficients' marginals, exact whatever the rank (femkin.uq.marginals).
    h1 = problem.counters["hessian"]
    bar = Progress("uq: coefficient marginals", None, comm=comm, quiet=log is None)
    marg = marginal_covariance(
        functionals,
        apply_H,
        prior.precision_mult,
        posterior.covariance_mult,
        apply_H_batch=apply_H_batch,
        tolerance=float(settings.get("marginal_tolerance", 0.01)),
        max_iterations=int(settings.get("marginal_max_iterations", 20)),
    )
    bar.close()
    covariance = marg.covariance
    marginals = {
        "iterations": marg.iterations,
        "hessian_actions": problem.counters["hessian"] - h1,
        "converged": marg.converged,
        "relative_gap": marg.relative_gap,
        "estimated_error": marg.estimated_error,
        "method": marg.method,
        "tolerance": float(settings.get("marginal_tolerance", 0.01)),
        "lower_std": np.sqrt(np.maximum(np.diag(marg.lower), 0.0)).tolist(),
        "lower_variance_history": (
            [] if marg.lower_history is None else marg.lower_history.tolist()
        ),
    }
    say(
        f"coefficient marginals: {marg.iterations} CG iterations, relative gap "
        f"{marg.relative_gap:.2g}" + ("" if marg.converged else " (not converged)")
    )
    for f in functionals:
        f.destroy()
    t_evidence = time.perf_counter()
    evidence = analyse_evidence(
        problem,
        prior,
        x,
        misfit_value,
        posterior,
        spectrum,
        marg,
        settings,
        apply_H=apply_H,
        apply_H_batch=apply_H_batch,
    )
    say(evidence.note())
    timings["evidence"] = time.perf_counter() - t_evidence
    k0_column = None
    if "k0" in names and marg.converged:  # an unconverged column is no covariance
        k0_column = marg.columns[names.index("k0")]
    map_values = (
        np.concatenate([space.get_scalars(x, b) for b, _ in blocks]) if blocks else np.zeros(0)
    )
    mean = map_values
    volume = None
    mean_vector = None
    fields_learned = any(name in problem.learn for name in ("m", "initial"))
    use_marginal, centre_reason = centre_choice(
        settings.get("coefficient_mean", "auto"),
        coefficients=bool(names),
        fields_learned=fields_learned,
        fit_converged=fit_converged,
        marginals_converged=bool(marg.converged),
    )
    if use_marginal:
        t_volume = time.perf_counter()
        bar = Progress("uq: marginal mode", None, comm=comm, quiet=log is None)
        volume = marginal_mode(problem, prior, x, posterior, marg, covariance)
        mean_vector = volume.pop("mean_vector")
        bar.close()
        timings["marginal_mode"] = time.perf_counter() - t_volume
        mean = map_values + volume["shift"]
        for (b, _), values in zip(blocks, _split(mean, blocks), strict=True):
            # exactly the reported values (the conditional directions move the coefficients
            # by the shift only to the marginals' CG tolerance)
            space.set_scalars(mean_vector, b, values)
        say(
            "marginal mode: the coefficients move by "
            + " ".join(f"{s:+.2f}" for s in volume["shift_over_std"])
            + " posterior std from the joint MAP point"
        )
    # the curves depend on the coefficients alone: centred on the reported means
    bands = credible_bands(problem, x if mean_vector is None else mean_vector, blocks, covariance)
    ln_k_std, ln_k_prior_std, method, ln_k_std_dofs = _ln_k_maps(
        problem,
        prior,
        posterior,
        prior_var,
        covariance,
        blocks,
        samples=variance_samples,
        seed=seed,
        k0_column=k0_column,
    )
    for v in marg.columns:
        v.destroy()
    timings["posterior"] = time.perf_counter() - t0 - timings["evidence"]

    t0 = time.perf_counter()
    c_t = _sample_band(
        problem, prior, posterior, x, fitted, int(settings["samples"]), seed, say, quiet=log is None
    )
    timings["samples"] = time.perf_counter() - t0
    noise_std = average_noise_std(problem)
    if c_t is not None:
        predictive_c_t(c_t, noise_std)
    return UQResult(
        posterior,
        lam,
        names,
        blocks,
        mean,
        covariance,
        prior_var,
        ln_k_std,
        ln_k_prior_std,
        bands,
        c_t,
        fitted,
        method,
        problem.counters["hessian"] - h_before,
        timings,
        ln_k_std_dofs=ln_k_std_dofs,
        low_rank_covariance=marg.low_rank,
        marginals=marginals,
        spectrum=spectrum,
        residuals=residuals,
        evidence=evidence,
        map_values=map_values,
        marginal_mode=volume,
        mean_vector=mean_vector,
        fields_learned=fields_learned,
        centre={
            "setting": settings.get("coefficient_mean", "auto"),
            "used": "marginal" if use_marginal else "map",
            "reason": centre_reason,
        },
    )


def centre_choice(
    setting: str,
    *,
    coefficients: bool,
    fields_learned: bool,
    fit_converged: bool | None,
    marginals_converged: bool,
) -> tuple[bool, str | None]:
    """Whether the coefficients are centred on their Laplace-marginal mode, and why not.

    ``setting`` is ``[uq] coefficient_mean``. The one Newton step from the MAP point
    (:func:`marginal_mode`) assumes the gradient of the joint objective vanishes there: at a
    fit that did not converge it would move by the distance to the MAP point as well (8
    posterior std at the initial point of a test twin), so it is never taken there. ``"auto"``
    also needs a learned field (without one the coefficients' marginal is the joint posterior
    and the move is zero) and converged coefficient marginals (an upper-bound covariance
    lengthens the step). ``fit_converged`` None (not known, e.g. a library call) counts as
    converged.

    Returns:
        ``(use_marginal, reason)``: ``reason`` is a sentence for the report when the setting
        asked for the marginal mode (explicitly or by ``"auto"``) and it was not, or was taken
        with a caveat; None otherwise.
    """
    if not coefficients or setting == "map":
        return False, None
    if fit_converged is False:
        return False, (
            "Coefficient means left at the fit's last point: the fit did not converge, and "
            "the marginal mode's one Newton step holds only from a converged MAP point."
        )
    if setting == "auto":
        if not fields_learned:
            return False, None
        if not marginals_converged:
            return False, (
                "Coefficient means left at the joint MAP point: their marginals did not "
                "converge (raise [uq] marginal_max_iterations), and the marginal mode's step "
                "needs their covariance."
            )
        return True, None
    if not marginals_converged:  # "marginal", asked for explicitly
        return True, (
            "The marginal mode's step used the coefficients' unconverged (upper-bound) "
            "covariance: it may overshoot; raise [uq] marginal_max_iterations."
        )
    return True, None


def _split(values: np.ndarray, blocks) -> list[np.ndarray]:
    """``values`` in storage order, cut into one array per block."""
    out, start = [], 0
    for _, size in blocks:
        out.append(values[start : start + size])
        start += size
    return out


def marginal_mode(problem, prior, x, posterior, marg, covariance) -> dict:
    """The coefficients' Laplace-marginal mode, one Newton step from the MAP point ``x``
    (:mod:`femkin.uq.volume`; the log det of the Gauss-Newton field block). The forward state
    is at ``x`` again afterwards.
    """
    space = problem.space
    blocks = coefficient_layout(space)
    h0 = problem.counters["hessian"]

    def zero_coefficients(v):
        for b, _ in blocks:
            view = space.scalar_view(v, b)
            if view is not None:
                view[:] = 0.0

    basis = field_basis(posterior.eigenvectors, zero_coefficients, prior.precision_mult)
    # t_j = X (F^T X)^{-1} e_j: coefficient j moves by one, the fields follow their
    # conditional mean (X = Gamma F, the marginals' columns).
    functionals = _unit_functionals(space)
    ftx = gram(functionals, marg.columns)
    for f in functionals:
        f.destroy()
    directions = combine(marg.columns, np.linalg.inv(symmetric(ftx)))
    std = np.sqrt(np.maximum(np.diag(covariance), 0.0))
    # Each point runs with its own adaptive time steps (error-controlled, BDF2 or Euler): a
    # frozen step sequence, the MAP point's, often fails at the perturbed points near c = 1.
    # The differences then carry the time-step control's noise, small against the log det's
    # change over a posterior std (on a benchmark twin the MAP point's log det agreed with the
    # frozen steps' to 1e-12 relative).
    schedules = problem.schedules()
    freeze = problem.freeze
    problem.freeze = False
    for part in problem.particles.values():
        part.schedule = None

    def set_point(y) -> bool:
        try:
            problem.misfit(y)
        except ConvergenceError:
            return False
        return True

    def apply_gn(vs, outs):
        problem.hessian_mult_batch(vs, outs, gauss_newton=True)

    try:
        res = volume_correction(set_point, apply_gn, basis, x, directions, std, covariance)
    finally:  # the MAP point on its own steps again, for what follows
        problem.freeze = freeze
        problem.set_schedules(schedules)
        problem.misfit(x)
    # the Laplace mean: the coefficients moved, the fields at their conditional mean
    mean_vector = x.copy()
    for shift, t in zip(res.shift, directions, strict=True):
        mean_vector.axpy(float(shift), t)
    for v in (*basis, *directions):
        v.destroy()
    names = coefficient_names(blocks)
    return {
        "mean_vector": mean_vector,
        "shift": res.shift,
        "shift_over_std": (res.shift / np.where(std > 0, std, 1.0)).tolist(),
        "half_log_det_gradient": res.gradient.tolist(),
        "half_log_det": res.half_log_det,
        "field_rank": res.rank,
        "failed": [names[j] for j in res.failed],
        "steps_over_std": (res.steps / np.where(std > 0, std, 1.0)).tolist(),
        "hessian_actions": problem.counters["hessian"] - h0,
        "forward_runs": res.forward_runs + 1,
    }


def _sample_band(
    problem, prior, posterior, x, fitted, n_samples: int, seed: int, say, *, quiet: bool = True
):
    """Posterior samples through the forward model: 95% band of particle-average c(t)."""
    if n_samples <= 0:
        return None
    bar = Progress("uq: posterior samples", n_samples, comm=problem.comm, quiet=quiet)
    comm = problem.comm
    space = problem.space
    averages: list[dict[int, np.ndarray]] = []
    failed = 0
    xs = space.create_vector()
    for i in range(n_samples):
        z = prior_sample(prior, space, seed + SAMPLE_SEED_OFFSET + i)
        posterior.sample(z, out=xs)
        xs.axpy(1.0, x)
        z.destroy()
        try:
            problem.misfit(xs)
        except ConvergenceError:
            failed += 1
            continue
        finally:
            bar.update()
        sample_video = problem.fitted_video()  # collective; the video on rank 0 only
        if sample_video is not None:
            averages.append(_particle_averages(problem, sample_video))
    bar.close()
    say(f"{n_samples - failed} posterior samples through the forward model ({failed} failed)")
    # Leave the problem at the MAP point (trajectories, Hessian linearisation point).
    g = space.create_vector()
    problem.gradient(x, g)
    g.destroy()
    xs.destroy()
    if comm.rank != 0:
        return None
    map_avg = _particle_averages(problem, fitted)
    observed = _particle_averages(problem, problem.video.c)
    particles = {}
    for lb in problem.labels:
        entry = {"map": map_avg[lb].tolist(), "observed": observed[lb].tolist()}
        if averages:
            stack = np.stack([a[lb] for a in averages])
            entry["lo"] = np.percentile(stack, 2.5, axis=0).tolist()
            entry["hi"] = np.percentile(stack, 97.5, axis=0).tolist()
            entry["std"] = stack.std(axis=0, ddof=1 if len(stack) > 1 else 0).tolist()
        particles[str(lb)] = entry
    return {
        "t": np.asarray(problem.video.t, dtype=float).tolist(),
        "samples": n_samples,
        "failed": failed,
        "particles": particles,
    }
