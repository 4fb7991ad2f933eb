"""The Allen-Cahn reaction (ACR) model of a LiFePO4 platelet as pure UFL.

Units: length um, time s, chemical potentials kT. Unknowns ``c`` (Li fraction) and ``mu``
(chemical potential), mixed P1 x P1::

    mu   = mu_h(c) - kappa lap(c) + B (c - cbar),       grad(c).n = 0 on the boundary
    dc/dt = R(c, eta),   eta = mu - mu_e(t)
    mu_h(c)  = ln(c / (1 - c)) + sum_n a_n P_n(1 - 2c)
    k(x) = exp(ln_k0 + m(x))

The reaction rate R is one of the kinetic laws of :data:`KINETICS` (``[model] kinetics``):

- ``"bv"`` (default): Butler-Volmer with a learned exchange factor,
  R = k j0(c) [exp(-alpha eta) - exp((1 - alpha) eta)],
  ln j0(c) = sum_n b_n P_n(1 - 2c) + p ln c + q ln(1 - c);
- ``"bv-constant"``: the same with j0(c) = 1 (k carries the magnitude);
- ``"bv-lim"``: the same with j0(c) = c^alpha (1 - c)^(1 - alpha) / gamma, gamma = 1 / (1 - c),
  the excess activity of the transition state on a lattice (Lim et al., Science 353, 566
  (2016)), i.e. c^(1/2) (1 - c)^(3/2) at alpha = 1/2;
- ``"ciet"``: coupled ion-electron transfer (Fraggedakis et al., Electrochim. Acta 367,
  137432 (2021)), Marcus-Hush-Chidsey electron transfer into the (1 - c) vacant sites,
  R = k (1 - c) / sqrt(4 pi lambda) [k_red(eta_f) - c k_ox(eta_f)],
  eta_f = eta - ln c (the formal overpotential; the reservoir's ion activity is 1, folded
  into mu_e), with the closed form of the MHC rates of Zeng, Smith, Bai and Bazant
  (J. Electroanal. Chem. 735, 77 (2014)) as used by MPET:
  k_ox(x) = k_red(-x) = sqrt(pi lambda) / (1 + exp(-x))
  erfc((lambda - sqrt(1 + sqrt(lambda) + x^2)) / (2 sqrt(lambda))),
  where 1 / (1 + exp(-x)) is the occupation of the electron states that take part and
  lambda the reorganisation energy (kT).

Every law vanishes at eta = 0 (detailed balance: the forward/backward ratio is exp(-eta)).
Its exchange factor, :func:`j0_curve`, is the forward (insertion) rate at eta = 0 per unit k,
the same quantity in every law, so that learned and fixed curves compare directly.

``cbar`` is the particle mean of ``c`` at the previous time level (semi-implicit coherency),
so that the Newton Jacobian stays sparse; the adjoint carries its dependence exactly.
Two time discretisations: backward Euler (:func:`residual`) and the variable-step
second-order backward differentiation formula (:func:`residual_multistep`, BDF2, whose
``cbar`` is the mean extrapolated linearly from the two previous levels, see
:func:`bdf2_weights`). Every function here takes UFL expressions and returns UFL
expressions or forms; parameters enter as whatever UFL the caller passes (``ufl.variable``
wrapped constants so that ``ufl.diff`` gives parameter derivatives).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import ufl

from femkin.blocks import KINETICS

#: Li fractions at which mu_h(c) and j0(c) are tabulated in results, bands and figures.
C_GRID = np.linspace(0.01, 0.99, 99)


class ACRCoefficients(NamedTuple):
    """UFL expressions of the model parameters.

    Attributes:
        a: mu_h Legendre coefficients a_1..a_N (kT).
        b: ln j0 Legendre coefficients b_1..b_M.
        p: exponent of c in j0 (fixed per case).
        q: exponent of (1 - c) in j0 (fixed per case).
        ln_k0: log of the rate prefactor k0 (1/s).
        m: log-rate field m(x), k = k0 exp(m).
        kappa: gradient-energy coefficient (kT um^2).
        coherency: coherency-strain coefficient B (kT).
        alpha: charge-transfer symmetry factor (the Butler-Volmer laws).
        kinetics: the kinetic law, one of :data:`KINETICS`; it selects the form of the rate.
        reorganization: the reorganisation energy lambda (kT) of ``"ciet"``.
    """

    a: Sequence[ufl.core.expr.Expr]
    b: Sequence[ufl.core.expr.Expr]
    p: float | ufl.core.expr.Expr
    q: float | ufl.core.expr.Expr
    ln_k0: ufl.core.expr.Expr
    m: ufl.core.expr.Expr
    kappa: ufl.core.expr.Expr
    coherency: ufl.core.expr.Expr
    alpha: float | ufl.core.expr.Expr
    kinetics: str = "bv"
    reorganization: float | ufl.core.expr.Expr = 8.3


def legendre(n: int, x):
    """Return ``[P_0(x), ..., P_n(x)]`` by Bonnet's recursion (works on UFL and numpy)."""
    polys = [1.0 + 0.0 * x, x]
    for k in range(1, n):
        polys.append(((2 * k + 1) * x * polys[k] - k * polys[k - 1]) / (k + 1))
    return polys[: n + 1]


def legendre_sum(coefficients, x):
    """``sum_{n>=1} coefficients[n-1] P_n(x)``; zero for no coefficients."""
    if len(coefficients) == 0:
        return 0.0 * x
    polys = legendre(len(coefficients), x)
    return sum(a * polys[n + 1] for n, a in enumerate(coefficients))


def mu_h(c, a, log=ufl.ln):
    """Homogeneous chemical potential ln(c/(1-c)) + sum a_n P_n(1-2c) in kT."""
    return log(c / (1 - c)) + legendre_sum(a, 1 - 2 * c)


def ln_j0(c, b, p, q, log=ufl.ln):
    """Log exchange-current factor sum b_n P_n(1-2c) + p ln c + q ln(1-c)."""
    return legendre_sum(b, 1 - 2 * c) + p * log(c) + q * log(1 - c)


def mhc_oxidation(x, lam, exp=ufl.exp, erf=ufl.erf, sqrt=ufl.sqrt):
    """Marcus-Hush-Chidsey oxidation rate k_ox(x) at overpotential x (kT), closed form.

    The approximation of Zeng et al. (2014) to the MHC integral over the electron states,
    ``sqrt(pi lambda) / (1 + exp(-x)) erfc((lambda - sqrt(1 + sqrt(lambda) + x^2)) /
    (2 sqrt(lambda)))``; the reduction rate is ``k_red(x) = k_ox(-x)``, and
    ``k_red(x) / k_ox(x) = exp(-x)``. erfc is written ``1 - erf`` (UFL has no erfc), which
    keeps ~13 digits while the erfc is above 1e-3 (lambda up to ~30 kT near equilibrium).
    """
    erfc = 1 - erf((lam - sqrt(1 + sqrt(lam) + x * x)) / (2 * sqrt(lam)))
    return sqrt(np.pi * lam) / (1 + exp(-x)) * erfc


def _ln_bv_j0(c, coeffs: ACRCoefficients, log):
    """The ln j0(c) of the Butler-Volmer laws (``None`` for j0 = 1)."""
    if coeffs.kinetics == "bv":
        return ln_j0(c, coeffs.b, coeffs.p, coeffs.q, log)
    if coeffs.kinetics == "bv-constant":
        return None
    if coeffs.kinetics == "bv-lim":  # c^alpha (1 - c)^(1 - alpha) (1 - c)
        return coeffs.alpha * log(c) + (2 - coeffs.alpha) * log(1 - c)
    raise ValueError(f"kinetics {coeffs.kinetics!r} is not a Butler-Volmer law")


def reaction_rate(
    c, mu, mu_e, coeffs: ACRCoefficients, exp=ufl.exp, log=ufl.ln, erf=ufl.erf, sqrt=ufl.sqrt
):
    """The reaction rate R = dc/dt (1/s) of the law ``coeffs.kinetics`` (see the module).

    Works on UFL (the defaults) and on NumPy arrays (pass ``np.exp``, ``np.log``,
    ``scipy.special.erf``, ``np.sqrt``); ``erf`` and ``sqrt`` only enter ``"ciet"``.
    """
    eta = mu - mu_e
    if coeffs.kinetics == "ciet":
        lam = coeffs.reorganization
        eta_f = eta - log(c)
        k_red = mhc_oxidation(-eta_f, lam, exp, erf, sqrt)
        k_ox = mhc_oxidation(eta_f, lam, exp, erf, sqrt)
        k = exp(coeffs.ln_k0 + coeffs.m)
        return k * (1 - c) / sqrt(4 * np.pi * lam) * (k_red - c * k_ox)
    if coeffs.kinetics not in KINETICS:
        raise ValueError(f"kinetics {coeffs.kinetics!r} is not one of {KINETICS}")
    alpha = coeffs.alpha
    ln_rate_prefactor = coeffs.ln_k0 + coeffs.m
    lnj = _ln_bv_j0(c, coeffs, log)
    if lnj is not None:
        ln_rate_prefactor = ln_rate_prefactor + lnj
    return exp(ln_rate_prefactor - alpha * eta) - exp(ln_rate_prefactor + (1 - alpha) * eta)


def j0_curve(c, coeffs: ACRCoefficients) -> np.ndarray:
    """The exchange factor j0(c) of a law, in NumPy: its insertion rate at eta = 0 per unit k.

    Butler-Volmer laws: j0(c) itself; ``"ciet"``: ``(1 - c) k_red(-ln c) / sqrt(4 pi lambda)``
    = ``c (1 - c) / (2 (1 + c)) erfc((lambda - sqrt(1 + sqrt(lambda) + ln^2 c)) /
    (2 sqrt(lambda)))``. ``coeffs`` holds numbers; its ``ln_k0`` and ``m`` are not used.
    """
    from scipy.special import erf

    c = np.asarray(c, dtype=float)
    if coeffs.kinetics == "ciet":
        lam = float(coeffs.reorganization)
        k_red = mhc_oxidation(np.log(c), lam, np.exp, erf, np.sqrt)
        return (1 - c) / np.sqrt(4 * np.pi * lam) * k_red
    lnj = _ln_bv_j0(c, coeffs, np.log)
    return np.ones_like(c) if lnj is None else np.exp(lnj)


def residual(u, u_old, tests, dt, mu_e, cbar, coeffs: ACRCoefficients, dx):
    """Backward-Euler residual of one ACR step from ``u_old`` to ``u`` over ``dt``.

    Args:
        u: the new state (c, mu) as a pair of UFL expressions (e.g. ``ufl.split(w)``).
        u_old: the previous state (c_old, mu_old); only c_old enters.
        tests: the pair of test functions (v, w).
        dt: step size (s).
        mu_e: reservoir chemical potential at the new time (kT).
        cbar: particle mean of c_old.
        coeffs: model coefficients.
        dx: the cell measure (with its quadrature degree).

    Returns:
        The residual form F(u; v, w); F = 0 defines the step.
    """
    c, mu = u
    c_old = u_old[0]
    v, w = tests
    rate = reaction_rate(c, mu, mu_e, coeffs)
    f_c = ((c - c_old) / dt - rate) * v * dx
    f_mu = (mu - mu_h(c, coeffs.a) - coeffs.coherency * (c - cbar)) * w * dx
    f_mu -= coeffs.kappa * ufl.inner(ufl.grad(c), ufl.grad(w)) * dx
    return f_c + f_mu


def bdf2_weights(h: float, h_prev: float | None) -> tuple[tuple[float, float, float], tuple]:
    """Weights of one variable-step BDF2 step (backward Euler when ``h_prev`` is None).

    The step from t_{n-1} to t_n = t_{n-1} + h with previous step ``h_prev``, ratio
    w = h / h_prev, approximates dc/dt(t_n) by (a0 c_n + a1 c_{n-1} + a2 c_{n-2}) / h with
    a = ((1 + 2w)/(1 + w), -(1 + w), w^2/(1 + w)) (the derivative at t_n of the quadratic
    through the three levels), and the mean of c at t_n by the linear extrapolation
    g1 cbar_{n-1} + g2 cbar_{n-2}, g = (1 + w, -w), which keeps the semi-implicit coherency
    term second order.

    Returns:
        ((a0, a1, a2), (g1, g2)); ((1, -1, 0), (1, 0)) for backward Euler.
    """
    if h_prev is None:
        return (1.0, -1.0, 0.0), (1.0, 0.0)
    w = h / h_prev
    return ((1 + 2 * w) / (1 + w), -(1 + w), w * w / (1 + w)), (1 + w, -w)


def residual_multistep(u, u_old, u_old2, tests, dt, weights, mu_e, cbar, coeffs, dx):
    """Residual of one variable-step BDF2 step from ``u_old`` (t_{n-1}) and ``u_old2`` (t_{n-2}).

    Args:
        u: the new state (c, mu) as a pair of UFL expressions.
        u_old: the state at t_{n-1}; only its c enters.
        u_old2: the state at t_{n-2}; only its c enters.
        tests: the pair of test functions (v, w).
        dt: step size t_n - t_{n-1} (s).
        weights: (a0, a1, a2) of :func:`bdf2_weights` (UFL constants; (1, -1, 0) gives a
            backward-Euler step, used for the first step).
        mu_e: reservoir chemical potential at the new time (kT).
        cbar: the extrapolated particle mean of c at t_n (see :func:`bdf2_weights`).
        coeffs: model coefficients.
        dx: the cell measure.

    Returns:
        The residual form F(u; v, w).
    """
    c, mu = u
    a0, a1, a2 = weights
    v, w = tests
    rate = reaction_rate(c, mu, mu_e, coeffs)
    f_c = ((a0 * c + a1 * u_old[0] + a2 * u_old2[0]) / dt - rate) * v * dx
    f_mu = (mu - mu_h(c, coeffs.a) - coeffs.coherency * (c - cbar)) * w * dx
    f_mu -= coeffs.kappa * ufl.inner(ufl.grad(c), ufl.grad(w)) * dx
    return f_c + f_mu


def chemical_potential_form(c, mu_trial, w, coeffs: ACRCoefficients, cbar, dx):
    """Residual of mu = mu_h(c) - kappa lap c + B (c - cbar) for given c (projection of mu)."""
    f = (mu_trial - mu_h(c, coeffs.a) - coeffs.coherency * (c - cbar)) * w * dx
    return f - coeffs.kappa * ufl.inner(ufl.grad(c), ufl.grad(w)) * dx
