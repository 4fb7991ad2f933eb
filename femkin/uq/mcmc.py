"""Markov chain Monte Carlo with the Laplace posterior as proposal, and chain diagnostics.

The target is ``pi(x) ~ exp(-Phi(x) - 0.5 |x - m0|^2_B)`` (``Phi`` the data misfit, ``B`` the
prior precision, ``m0`` the prior mean). The generalised preconditioned Crank-Nicolson kernel
(gpCN; Rudolf & Sprungk 2018, used by hippylib2muq) proposes

    v = m + sqrt(1 - beta^2) (u - m) + beta w,    w ~ N(0, Gamma),

which is reversible with respect to the Gaussian ``N(m, Gamma)``; it is accepted with
probability ``min(1, exp(eta(v) - eta(u)))``, ``eta = log pi - log N(m, Gamma)``:

    eta(x) = -Phi(x) - 0.5 |x - m0|^2_B + 0.5 |x - m|^2_{Gamma^{-1}}.

With ``(m, Gamma)`` the Laplace posterior (MAP point, ``Gamma_post = Gamma_prior - V D V^T``,
``Gamma_post^{-1} = B + B V L V^T B``) the chain moves with the posterior's own scales; with
``(m0, Gamma_prior)`` it is plain pCN (``eta = -Phi``), the dimension-robust baseline. When the
posterior is Gaussian and the Laplace approximation exact, ``eta`` is constant and every
proposal is accepted: the chain is an exact AR(1) process in the posterior.

With ``gradient`` given, the kernel is the Langevin version (pCN-Langevin, Cotter, Roberts,
Stuart & White 2013, sec. 4.3, with the reference Gaussian ``N(m, Gamma)`` in place of the prior):
with ``a = sqrt(1 - beta^2)``, ``y = x - m`` and ``g(x) = -grad eta(x)`` (dual; ``Gamma g`` is
the Laplace-preconditioned gradient)

    v = m + a (u - m) - (1 - a) Gamma g(u) + beta w,

the Crank-Nicolson discretisation of the Langevin diffusion preconditioned by ``Gamma``. It is
accepted with ``log alpha = eta(v) - eta(u) - (t_v - t_u) / (1 + a) - (1 - a) (n_v - n_u) /
(2 (1 + a))``, ``t_v = <y_u - a y_v, g(v)>``, ``t_u = <y_v - a y_u, g(u)>``, ``n = <g, Gamma g>``:
the Metropolis-Hastings ratio of the drifted Gaussian proposal, whose reference-Gaussian parts
cancel, so it stays well defined as the mesh is refined. Where the Laplace approximation is
exact ``g = 0`` and it is gpCN; where not, the drift follows the posterior's curvature (a skewed
ridge of the coefficients) that a Gaussian proposal crosses only in small steps. Each step
costs a gradient (one forward and one adjoint run) instead of a forward run.

With ``leapfrog = L > 0`` (and ``gradient``) the kernel is Hamiltonian Monte Carlo on Hilbert
spaces (infinity-HMC; Beskos, Pinski, Sanz-Serna & Stuart 2011; with the Laplace Gaussian as the
reference, Beskos, Girolami, Lan, Farrell & Stuart 2017): with a velocity ``p ~ N(0, Gamma)``
and ``y = x - m``, the Hamiltonian ``H = -eta(x) + |y|^2_{Gamma^{-1}} / 2 + |p|^2_{Gamma^{-1}} /
2`` is integrated by ``L`` Strang steps of angle ``eps``: a half kick ``p <- p - (eps / 2) Gamma
g(x)``, the exact rotation ``(y, p) <- (cos eps y + sin eps p, -sin eps y + cos eps p)`` of the
Gaussian part, and a half kick. The map is volume preserving and reversible, and the proposal is
accepted with ``log alpha = -Delta H = eta(x_L) - eta(x_0) - sum_kicks (-(eps / 2) <g, p> +
(eps^2 / 8) <g, Gamma g>)``: the rotation keeps the Gaussian parts exactly, so only the kicks'
change of the kinetic energy enters, and every term stays well defined as the mesh is refined.
Where the Laplace approximation is exact every proposal is accepted, for any ``eps``; where not,
a trajectory of ``L eps ~ pi / 2`` follows the posterior's curvature (a curved ridge of the
coefficients) as far as an independent draw of the reference would go, at ``L`` gradients per
step. ``eps = arcsin(beta)`` (the angle of pCN's step ``beta``), jittered per step by a factor
in ``[1 - JITTER, 1 + JITTER]`` against periodic orbits. With ``L = 1`` it is a Langevin kernel
of the pCN-Langevin family.

Every random number of step ``n`` of chain ``c`` comes from seeds computed from ``(seed, c,
n)``: the prior sample behind ``w`` from ``prior_sample(seed_of(seed, c, n))`` (partition
independent; for HMC the velocity) and the uniforms (acceptance, then the HMC angle's jitter)
from ``numpy.random.default_rng([seed, c, n])``, so a chain
restarted from a checkpoint reproduces the uninterrupted one exactly, on any number of ranks.

Diagnostics (Gelman et al., *BDA3* sec. 11.4-11.5; Geyer 1992): split-R-hat and the effective
sample size from the initial monotone sequence of autocorrelations, pooled over chains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from femkin._fem import PETSc
from femkin.errors import ConvergenceError
from femkin.uq.laplace import LowRankPosterior
from femkin.uq.randomized import as_apply, gram

__all__ = [
    "ChainState",
    "Drift",
    "GpcnKernel",
    "effective_sample_size",
    "run_chain",
    "seed_of",
    "split_rhat",
]

#: Relative jitter of the HMC step angle.
JITTER = 0.2
#: Seeds of chain steps: ``seed + CHAIN_SEED_OFFSET + chain * CHAIN_STRIDE + step``.
CHAIN_SEED_OFFSET = 7_000_003
CHAIN_STRIDE = 10_000_000


def seed_of(seed: int, chain: int, step: int) -> int:
    """The seed of the prior sample behind step ``step`` of chain ``chain``."""
    if not 0 <= step < CHAIN_STRIDE:
        raise ValueError(f"step must be in [0, {CHAIN_STRIDE}); found {step}")
    return int(seed) + CHAIN_SEED_OFFSET + int(chain) * CHAIN_STRIDE + int(step)


class GpcnKernel:
    """The gpCN proposal and acceptance for a target ``exp(-Phi - prior)``.

    Args:
        misfit: ``misfit(x) -> Phi(x)``; may raise :class:`~femkin.errors.ConvergenceError`
            (the proposal is then rejected: a forward model that fails has zero likelihood).
        apply_prior_precision: ``out = B x``.
        prior_mean: ``m0`` (not modified).
        reference: the Gaussian ``N(centre, Gamma)`` as a :class:`LowRankPosterior` (rank 0:
            the prior itself, i.e. plain pCN); needs ``apply_prior_precision``.
        centre: ``m`` (the MAP point for gpCN, the prior mean for pCN; not modified).
        prior_sample: ``prior_sample(seed)``: a zero-mean prior sample.
        beta: the step, in (0, 1].
        gradient: ``gradient(x, g) -> Phi(x)``, writing the misfit's dual gradient to ``g``;
            given, the kernel is pCN-Langevin (see the module docstring).
        leapfrog: with ``gradient``, ``L > 0`` makes the kernel infinity-HMC with ``L``
            leapfrog steps of angle ``arcsin(beta)`` per proposal.

    Raises:
        ValueError: on ``beta`` outside (0, 1], a negative ``leapfrog``, or HMC without the
            gradient.
    """

    def __init__(
        self,
        misfit: Callable[[PETSc.Vec], float],
        apply_prior_precision,
        prior_mean: PETSc.Vec,
        reference: LowRankPosterior,
        centre: PETSc.Vec,
        prior_sample: Callable[[int], PETSc.Vec],
        *,
        beta: float,
        gradient: Callable[[PETSc.Vec, PETSc.Vec], float] | None = None,
        leapfrog: int = 0,
    ) -> None:
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must lie in (0, 1]; found {beta!r}")
        if int(leapfrog) < 0:
            raise ValueError(f"leapfrog must be >= 0; found {leapfrog!r}")
        if leapfrog and gradient is None:
            raise ValueError("an HMC kernel (leapfrog > 0) needs the gradient")
        self.misfit = misfit
        self._B = as_apply(apply_prior_precision)
        self.prior_mean = prior_mean
        self.reference = reference
        self.centre = centre
        self.prior_sample = prior_sample
        self.beta = float(beta)
        self.gradient = gradient
        self.leapfrog = int(leapfrog)

    @property
    def needs_gradient(self) -> bool:
        """Whether a chain state carries the drift (Langevin and HMC kernels)."""
        return self.gradient is not None

    @property
    def hmc(self) -> bool:
        """Whether proposals are infinity-HMC trajectories."""
        return self.leapfrog > 0

    @property
    def langevin(self) -> bool:
        """Whether proposals drift along the preconditioned gradient (one pCN-Langevin step)."""
        return self.gradient is not None and not self.hmc

    def _b_norm2(self, d: PETSc.Vec) -> tuple[float, PETSc.Vec]:
        bd = d.duplicate()
        self._B(d, bd)
        return float(d.dot(bd)), bd

    def log_weight(self, x: PETSc.Vec) -> tuple[float, float]:
        """``(eta(x), Phi(x))``; ``eta = -inf`` when the forward model fails."""
        eta, phi, drift = self.evaluate(x, with_drift=False)
        return eta, phi

    def evaluate(
        self, x: PETSc.Vec, *, with_drift: bool | None = None
    ) -> tuple[float, float, Drift | None]:
        """``(eta(x), Phi(x), drift)``: the drift (Langevin kernels only, or ``with_drift``)
        is ``g = -grad eta`` at ``x`` with ``Gamma g``; ``(-inf, inf, None)`` when the forward
        model fails.
        """
        with_drift = self.needs_gradient if with_drift is None else with_drift
        g = None
        try:
            if with_drift:
                if self.gradient is None:
                    raise ValueError("the kernel was built without a gradient")
                g = x.duplicate()
                phi = float(self.gradient(x, g))
            else:
                phi = float(self.misfit(x))
        except ConvergenceError:
            if g is not None:
                g.destroy()
            return -np.inf, np.inf, None
        if not np.isfinite(phi) or (g is not None and not np.isfinite(g.norm())):
            # a diverging trajectory (or proposal): zero likelihood, as a failed forward run
            if g is not None:
                g.destroy()
            return -np.inf, np.inf, None
        d = x.copy()
        d.axpy(-1.0, self.prior_mean)
        prior2, bd = self._b_norm2(d)
        e = x.copy()
        e.axpy(-1.0, self.centre)
        ref2, be = self._b_norm2(e)
        post = self.reference
        c = gram(post.eigenvectors, [be])[:, 0] if post.rank else np.zeros(0)
        ref2 += float(np.sum(post.eigenvalues * c * c))
        eta = -phi - 0.5 * prior2 + 0.5 * ref2
        drift = None
        if g is not None:
            # g = grad Phi + B (x - m0) - Gamma^{-1} (x - m),  Gamma^{-1} = B + B V L V^T B
            g.axpy(1.0, bd)
            g.axpy(-1.0, be)
            if post.rank:
                w = x.duplicate()
                w.set(0.0)
                for lam_c, v in zip(post.eigenvalues * c, post.eigenvectors, strict=True):
                    w.axpy(float(lam_c), v)
                bw = w.duplicate()
                self._B(w, bw)
                g.axpy(-1.0, bw)
                w.destroy()
                bw.destroy()
            drift = self.drift_of(g)
        d.destroy()
        bd.destroy()
        e.destroy()
        be.destroy()
        return eta, phi, drift

    def drift_of(self, g: PETSc.Vec) -> Drift:
        """The :class:`Drift` of ``g = -grad eta`` (kept, not copied).

        Computes ``Gamma g`` and ``<g, Gamma g>``.
        """
        pre = g.duplicate()
        self.reference.covariance_mult(g, pre)
        return Drift(g, pre, float(g.dot(pre)))

    def log_ratio(
        self,
        u: PETSc.Vec,
        eta_u: float,
        drift_u: Drift | None,
        v: PETSc.Vec,
        eta_v: float,
        drift_v: Drift | None,
    ) -> float:
        """The log Metropolis-Hastings ratio of moving from ``u`` to the proposal ``v``."""
        if not self.langevin:
            return eta_v - eta_u
        if drift_u is None or drift_v is None:
            raise ValueError("a Langevin kernel needs the drift at both points")
        a = np.sqrt(1.0 - self.beta**2)
        yu = u.copy()
        yu.axpy(-1.0, self.centre)
        yv = v.copy()
        yv.axpy(-1.0, self.centre)
        r = yu.copy()
        r.axpy(-a, yv)  # y_u - a y_v
        t_v = float(r.dot(drift_v.grad))
        yv.axpy(-a, yu)  # y_v - a y_u
        t_u = float(yv.dot(drift_u.grad))
        for vec in (yu, yv, r):
            vec.destroy()
        return (
            eta_v
            - eta_u
            - (t_v - t_u) / (1.0 + a)
            - (1.0 - a) * (drift_v.norm2 - drift_u.norm2) / (2.0 * (1.0 + a))
        )

    def trajectory(
        self, u: PETSc.Vec, eta_u: float, drift_u: Drift, velocity: PETSc.Vec, angle: float
    ) -> tuple[PETSc.Vec | None, float, float, Drift | None, float]:
        """The infinity-HMC proposal from ``u`` with the initial ``velocity`` (not modified):
        ``leapfrog`` Strang steps of ``angle`` (see the module docstring).

        Returns:
            ``(x, eta(x), Phi(x), drift at x, log alpha)``; ``(None, -inf, inf, None, -inf)``
            when the forward model fails on the way.
        """
        h = 0.5 * float(angle)
        cos, sin = np.cos(angle), np.sin(angle)
        y = u.copy()
        y.axpy(-1.0, self.centre)
        p = velocity.copy()
        t = p.duplicate()
        drift, eta, phi = drift_u, eta_u, np.nan
        x = None
        d_kinetic = 0.0
        try:
            for _ in range(self.leapfrog):
                d_kinetic += -h * float(p.dot(drift.grad)) + 0.5 * h * h * drift.norm2
                p.axpy(-h, drift.pre)
                y.copy(t)
                y.scale(cos)
                y.axpy(sin, p)
                p.scale(cos)
                p.axpy(-sin, t)
                if x is not None:
                    x.destroy()
                x = y.copy()
                x.axpy(1.0, self.centre)
                if drift is not drift_u:
                    drift.destroy()
                eta, phi, new = self.evaluate(x, with_drift=True)
                if new is None:
                    x.destroy()
                    return None, -np.inf, np.inf, None, -np.inf
                drift = new
                d_kinetic += -h * float(p.dot(drift.grad)) + 0.5 * h * h * drift.norm2
                p.axpy(-h, drift.pre)
        finally:
            for vec in (y, p, t):
                vec.destroy()
        return x, eta, phi, drift, eta - eta_u - d_kinetic

    def hmc_proposal(
        self, u: PETSc.Vec, eta_u: float, drift_u: Drift, seed: int, jitter: float
    ) -> tuple[PETSc.Vec | None, float, float, Drift | None, float]:
        """:meth:`trajectory` with the velocity from ``prior_sample(seed)`` and the angle
        ``arcsin(beta) (1 + JITTER (2 jitter - 1))``, ``jitter`` uniform in [0, 1).
        """
        z = self.prior_sample(seed)
        velocity = self.reference.sample(z)
        z.destroy()
        angle = np.arcsin(self.beta) * (1.0 + JITTER * (2.0 * float(jitter) - 1.0))
        try:
            return self.trajectory(u, eta_u, drift_u, velocity, angle)
        finally:
            velocity.destroy()

    def propose(self, u: PETSc.Vec, seed: int, drift: Drift | None = None) -> PETSc.Vec:
        """``v = m + a (u - m) [- (1 - a) Gamma g(u)] + beta w``, ``a = sqrt(1 - beta^2)``.

        ``w`` comes from ``prior_sample(seed)``; the drift term is there for Langevin kernels.
        """
        if self.langevin and drift is None:
            raise ValueError("a Langevin kernel needs the drift at the current point")
        z = self.prior_sample(seed)
        w = self.reference.sample(z)
        z.destroy()
        a = np.sqrt(1.0 - self.beta**2)
        v = u.copy()
        v.axpy(-1.0, self.centre)
        v.scale(a)
        v.axpy(1.0, self.centre)
        v.axpy(self.beta, w)
        if self.langevin and drift is not None:
            v.axpy(-(1.0 - a), drift.pre)
        w.destroy()
        return v


class Drift(NamedTuple):
    """The Langevin drift at a point.

    Attributes:
        grad: ``g = -grad eta`` (dual).
        pre: ``Gamma g``.
        norm2: ``<g, Gamma g>``.
    """

    grad: PETSc.Vec
    pre: PETSc.Vec
    norm2: float

    def destroy(self) -> None:
        """Free both vectors."""
        self.grad.destroy()
        self.pre.destroy()


class ChainState(NamedTuple):
    """Where a chain is: everything needed to continue it exactly.

    Attributes:
        chain: the global chain index.
        step: steps done.
        x: the current point.
        eta: its log weight.
        phi: its misfit.
        accepted: proposals accepted so far.
        failed: proposals whose forward model failed.
        records: ``record(x)`` after every step, shape ``(step, n_q)``.
        drift: the Langevin drift at ``x`` (None for gpCN).
    """

    chain: int
    step: int
    x: PETSc.Vec
    eta: float
    phi: float
    accepted: int
    failed: int
    records: np.ndarray
    drift: Drift | None = None


def start_chain(kernel: GpcnKernel, chain: int, x0: PETSc.Vec, record) -> ChainState:
    """The state before the first step, at ``x0`` (copied)."""
    eta, phi, drift = kernel.evaluate(x0)
    if not np.isfinite(eta):
        raise ConvergenceError(f"chain {chain}: the forward model fails at the starting point")
    n_q = np.asarray(record(x0)).size
    return ChainState(chain, 0, x0.copy(), eta, phi, 0, 0, np.zeros((0, n_q)), drift)


def run_chain(
    kernel: GpcnKernel,
    state: ChainState,
    n_steps: int,
    *,
    seed: int,
    record: Callable[[PETSc.Vec], np.ndarray],
    checkpoint: Callable[[ChainState], None] | None = None,
    every: int = 50,
    progress: Callable[[], None] | None = None,
) -> ChainState:
    """Advance a chain to ``n_steps`` steps in total (from ``state.step``).

    Args:
        kernel: the proposal and acceptance.
        state: where the chain is (from :func:`start_chain` or a checkpoint).
        n_steps: the total number of steps wanted.
        seed: the run's seed (see the module docstring).
        record: the quantities to keep from each step (identical on every rank).
        checkpoint: called with the state every ``every`` steps and at the end.
        every: checkpoint interval, steps.
        progress: called once per step.

    Returns:
        The final state.
    """
    x, eta, phi, drift = state.x, state.eta, state.phi, state.drift
    if kernel.needs_gradient and drift is None:  # e.g. a gpCN state continued by a Langevin kernel
        eta, phi, drift = kernel.evaluate(x)
    accepted, failed = state.accepted, state.failed
    records = [state.records] if state.records.size else []
    rows = []
    for n in range(state.step, n_steps):
        rng = np.random.default_rng([int(seed), int(state.chain), n])
        u = rng.uniform()
        if kernel.hmc:
            assert drift is not None  # evaluated above for every kernel that needs it
            v, eta_v, phi_v, drift_v, log_alpha = kernel.hmc_proposal(
                x, eta, drift, seed_of(seed, state.chain, n), rng.uniform()
            )
        else:
            v = kernel.propose(x, seed_of(seed, state.chain, n), drift)
            eta_v, phi_v, drift_v = kernel.evaluate(v)
            if np.isfinite(eta_v):
                log_alpha = kernel.log_ratio(x, eta, drift, v, eta_v, drift_v)
        if v is None or not np.isfinite(eta_v):
            failed += 1
            if v is not None:
                v.destroy()
        elif np.log(u) < log_alpha:
            x.destroy()
            if drift is not None:
                drift.destroy()
            x, eta, phi, drift = v, eta_v, phi_v, drift_v
            accepted += 1
        else:
            v.destroy()
            if drift_v is not None:
                drift_v.destroy()
        rows.append(np.asarray(record(x), dtype=float).ravel())
        if progress is not None:
            progress()
        done = n + 1
        if checkpoint is not None and (done % every == 0 or done == n_steps):
            records.append(np.array(rows))
            rows = []
            all_rec = np.concatenate(records)
            records = [all_rec]
            checkpoint(ChainState(state.chain, done, x, eta, phi, accepted, failed, all_rec, drift))
    if rows:
        records.append(np.array(rows))
    all_rec = np.concatenate(records) if records else state.records
    return ChainState(
        state.chain, max(n_steps, state.step), x, eta, phi, accepted, failed, all_rec, drift
    )


# -- diagnostics ---------------------------------------------------------------------------
def _autocovariance(x: np.ndarray) -> np.ndarray:
    """Autocovariance of a 1-d series at all lags (FFT, biased estimator)."""
    n = x.size
    d = x - x.mean()
    f = np.fft.rfft(d, n=2 * n)
    acov = np.fft.irfft(f * np.conj(f))[:n] / n
    return acov


def effective_sample_size(chains: np.ndarray) -> float:
    """ESS of one quantity from ``(n_chains, n_draws)`` draws.

    Geyer's initial monotone sequence on the chain-averaged autocorrelation, combined with
    the between-chain variance as in Stan / BDA3 eq. 11.8.

    Returns:
        The effective sample size (``n_chains * n_draws / tau``, ``tau`` the integrated
        autocorrelation time); ``nan`` for fewer than 4 draws or a constant quantity.
    """
    chains = np.atleast_2d(np.asarray(chains, dtype=float))
    m, n = chains.shape
    if n < 4:
        return float("nan")
    acov = np.array([_autocovariance(c) for c in chains])
    chain_var = acov[:, 0] * n / (n - 1.0)
    w = chain_var.mean()
    b_over_n = chains.mean(axis=1).var(ddof=1) if m > 1 else 0.0
    var_plus = w * (n - 1.0) / n + b_over_n
    if not var_plus > 0:
        return float("nan")
    rho = 1.0 - (w - acov.mean(axis=0)) / var_plus
    rho[0] = 1.0
    # Geyer: sums of adjacent pairs, truncated at the first negative, made monotone.
    sums: list[float] = []
    for t in range(0, n - 1, 2):
        p = rho[t] + rho[t + 1]
        if p < 0:
            break
        sums.append(float(p))
    pairs = np.minimum.accumulate(np.array(sums)) if sums else np.array([1.0])
    tau = -1.0 + 2.0 * float(pairs.sum())
    tau = max(tau, 1.0 / np.log10(m * n + 10))  # Stan's guard against absurd antithetic values
    return float(m * n / tau)


def split_rhat(chains: np.ndarray) -> float:
    """Split-R-hat of one quantity from ``(n_chains, n_draws)`` draws (BDA3 eq. 11.4).

    Each chain is split in halves; ``R = sqrt(var_plus / W)`` over the ``2 n_chains`` halves.
    Values near 1 (below ~1.01-1.05) mean the chains agree with each other and with
    themselves over time.
    """
    chains = np.atleast_2d(np.asarray(chains, dtype=float))
    m, n = chains.shape
    half = n // 2
    if half < 2:
        return float("nan")
    split = np.concatenate([chains[:, :half], chains[:, n - half :]])
    w = split.var(axis=1, ddof=1).mean()
    b_over_n = split.mean(axis=1).var(ddof=1)
    if not w > 0:
        return float("nan")
    var_plus = w * (half - 1.0) / half + b_over_n
    return float(np.sqrt(var_plus / w))
