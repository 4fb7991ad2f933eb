"""Derivative checks as library code (hIPPYlib's ``modelVerify``, pyadjoint's ``taylor_test``).

For a random direction d in one parameter block, the Taylor remainders

    r1(h) = |J(x + h d) - J(x) - h g.d|               (falls as h^2 if g is right)
    r2(h) = |J(x + h d) - J(x) - h g.d - h^2/2 d.H d|  (falls as h^3 if H is right)

are computed on a frozen time-step schedule. The verdict (:func:`taylor_verdict`) chooses the
step range from the data. A pair of successive steps is *roundoff-dominated* when a remainder
lies below the evaluation noise of J, which is set by the Newton tolerance of the forward
solves (``NOISE * |J|``); such pairs are shown but not used. The largest steps may lie outside
the asymptotic range (there the next Taylor term cancels part of the leading one, and the
observed rate can be anything), while a wrong derivative shows at the *small* steps: its
remainder falls only as h^(p-1) once the error term dominates. So the verdict is taken at the
small-step end: the asymptotic range is the longest run of usable pairs ending at the smallest
usable one whose rates reach ``p - RATE_TOLERANCE``; the derivative passes when that range is
not empty, and the rate reported is the least-squares slope over it. Directions come from
:meth:`ParameterSpace.random_normal`, so they do not depend on the number of ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from femkin._fem import PETSc

#: Relative evaluation noise of J below which a Taylor remainder is not used for a rate.
NOISE = 1e-11

#: Scale of the probe direction per block (the initial state must stay inside (0, 1)).
DIRECTION_SCALE = {
    "initial": 0.02,
    "kappa": 0.002,
    "coherency": 0.5,
    "k0": 0.3,
    "lambda": 0.2,
    "psf_fwhm": 0.3,
}


#: A pair's rate must reach ``order - RATE_TOLERANCE`` to count as asymptotic.
RATE_TOLERANCE = 0.2


class TaylorVerdict(NamedTuple):
    """The verdict on one Taylor remainder sequence (expected order ``order``).

    Attributes:
        order: the expected rate (2 for a gradient, 3 for a Hessian).
        passed: whether the asymptotic range is not empty (or every remainder is at the noise
            level of J, i.e. the expansion is exact to roundoff).
        rate: least-squares slope of log r over log h on the pairs used (NaN if none).
        pair_rates: the rate of every pair of successive steps (NaN where undefined).
        pairs: indices i of the pairs ``(steps[i], steps[i+1])`` used for the verdict.
        roundoff: indices of the pairs with a remainder below the noise of J (not used).
        reason: one line explaining the verdict.
    """

    order: int
    passed: bool
    rate: float
    pair_rates: list[float]
    pairs: list[int]
    roundoff: list[int]
    reason: str

    def as_dict(self) -> dict:
        """A JSON-ready dictionary."""
        return {
            "order": self.order,
            "passed": self.passed,
            "rate": _finite_or_none(self.rate),
            "pair_rates": [_finite_or_none(q) for q in self.pair_rates],
            "pairs": self.pairs,
            "roundoff": self.roundoff,
            "reason": self.reason,
        }


def _finite_or_none(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def taylor_verdict(
    steps: Sequence[float],
    remainders: Sequence[float],
    order: int,
    *,
    floor: float = 0.0,
    tolerance: float = RATE_TOLERANCE,
) -> TaylorVerdict:
    """Judge a Taylor remainder sequence on its asymptotic range (see the module docstring).

    Args:
        steps: the step sizes h, decreasing.
        remainders: the remainders r(h), one per step.
        order: the rate a correct derivative gives (2: gradient, 3: Hessian).
        floor: the evaluation noise of J; pairs with a remainder at or below it are not used.
        tolerance: a pair is asymptotic when its rate is at least ``order - tolerance``.

    Returns:
        The :class:`TaylorVerdict`.

    Raises:
        ValueError: steps and remainders of different lengths, or steps not decreasing.
    """
    h = np.asarray(steps, dtype=float)
    r = np.asarray(remainders, dtype=float)
    if h.shape != r.shape or h.ndim != 1:
        raise ValueError(f"{len(steps)=} steps but {len(remainders)=} remainders")
    if np.any(np.diff(h) >= 0):
        raise ValueError(f"steps must decrease, found {list(steps)}")
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.log(r[:-1] / r[1:]) / np.log(h[:-1] / h[1:])
    pair_rates = [float(v) for v in q]
    roundoff = [i for i in range(q.size) if min(r[i], r[i + 1]) <= floor]
    usable = [i for i in range(q.size) if i not in roundoff and np.isfinite(q[i])]
    if not usable:
        if r.size and np.all(r <= floor):
            reason = f"every remainder is below the noise of J ({floor:.1e}): exact to roundoff"
            return TaylorVerdict(order, True, float("nan"), pair_rates, [], roundoff, reason)
        reason = "no pair of steps above the noise of J: try larger steps"
        return TaylorVerdict(order, False, float("nan"), pair_rates, [], roundoff, reason)
    pairs: list[int] = []
    for i in reversed(usable):
        if q[i] < order - tolerance or (pairs and i + 1 != pairs[0]):
            break
        pairs.insert(0, i)
    if not pairs:
        last = usable[-1]
        reason = (
            f"rate {q[last]:.2f} at the smallest usable steps ({h[last]:.3g}, {h[last + 1]:.3g})"
            f", expected {order} (at least {order - tolerance:.2f})"
        )
        return TaylorVerdict(order, False, float(q[last]), pair_rates, [last], roundoff, reason)
    points = np.arange(pairs[0], pairs[-1] + 2)
    rate = float(np.polyfit(np.log(h[points]), np.log(r[points]), 1)[0])
    skipped = sum(1 for i in usable if i < pairs[0])
    reason = f"rate {rate:.2f} over steps {h[points[0]]:.3g} .. {h[points[-1]]:.3g}" + (
        f" ({skipped} larger-step pair(s) outside the asymptotic range)" if skipped else ""
    )
    return TaylorVerdict(order, True, rate, pair_rates, pairs, roundoff, reason)


class TaylorResult(NamedTuple):
    """Remainders of one block's Taylor test and the verdicts on them.

    Attributes:
        block: the parameter block.
        steps: the step sizes h.
        gradient_remainders: r1(h).
        hessian_remainders: r2(h) (equal to r1 when the Hessian was not checked).
        gradient: the verdict on r1 (order 2).
        hessian: the verdict on r2 (order 3), or None when the Hessian was not checked.
        floor: the evaluation noise of J.
    """

    block: str
    steps: list[float]
    gradient_remainders: list[float]
    hessian_remainders: list[float]
    gradient: TaylorVerdict
    hessian: TaylorVerdict | None
    floor: float = 0.0

    @property
    def gradient_rate(self) -> float:
        """The gradient's observed rate on its asymptotic range."""
        return self.gradient.rate

    @property
    def hessian_rate(self) -> float:
        """The Hessian's observed rate on its asymptotic range (NaN if not checked)."""
        return float("nan") if self.hessian is None else self.hessian.rate

    @property
    def passed(self) -> bool:
        """Whether every checked derivative passed."""
        return self.gradient.passed and (self.hessian is None or self.hessian.passed)


def block_direction(problem, block: str, seed: int) -> PETSc.Vec:
    """A random direction that is zero outside ``block`` (all particles of a field block)."""
    space = problem.space
    d = space.random_normal(seed)
    arr = d.getArray()
    arr[~space.block_mask(block)] = 0.0
    arr *= DIRECTION_SCALE.get(block, 1.0)
    return d


def taylor_test(
    problem,
    x: PETSc.Vec,
    block: str,
    *,
    steps: Sequence[float],
    seed: int = 1,
    hessian: bool = True,
) -> TaylorResult:
    """Taylor test of the misfit gradient (and full Hessian) of ``problem`` in one block."""
    d = block_direction(problem, block, seed)
    g = x.duplicate()
    J0 = problem.gradient(x, g)
    problem.freeze_schedule()
    gd = g.dot(d)
    dHd = 0.0
    if hessian:
        Hd = x.duplicate()
        problem.hessian_mult(d, Hd, gauss_newton=False)
        dHd = Hd.dot(d)
    r1, r2 = [], []
    xh = x.duplicate()
    for h in steps:
        x.copy(xh)
        xh.axpy(h, d)
        Jh = problem.misfit(xh)
        r1.append(abs(Jh - J0 - h * gd))
        r2.append(abs(Jh - J0 - h * gd - 0.5 * h * h * dHd))
    problem.misfit(x)  # restore the state at x
    floor = NOISE * abs(J0)
    return TaylorResult(
        block,
        list(steps),
        r1,
        r2,
        taylor_verdict(steps, r1, 2, floor=floor),
        taylor_verdict(steps, r2, 3, floor=floor) if hessian else None,
        floor,
    )


def hessian_symmetry(problem, x: PETSc.Vec, *, seed: int = 2, gauss_newton: bool = False) -> float:
    """Relative asymmetry |<H u, v> - <u, H v>| / max(|<H u, v>|, |<u, H v>|)."""
    g = x.duplicate()
    problem.gradient(x, g)
    u = problem.space.random_normal(seed)
    v = problem.space.random_normal(seed + 1)
    for vec in (u, v):
        for name, scale in DIRECTION_SCALE.items():
            vec.getArray()[problem.space.block_mask(name)] *= scale
    Hu, Hv = x.duplicate(), x.duplicate()
    problem.hessian_mult(u, Hu, gauss_newton=gauss_newton)
    problem.hessian_mult(v, Hv, gauss_newton=gauss_newton)
    a, b = Hu.dot(v), u.dot(Hv)
    return float(abs(a - b) / max(abs(a), abs(b), 1e-300))
