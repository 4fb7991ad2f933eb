"""Derivative checks as library code (hIPPYlib's ``modelVerify``, pyadjoint's ``taylor_test``).

For a random direction d in one parameter block, the Taylor remainders

    r1(h) = |J(x + h d) - J(x) - h g.d|               (falls as h^2 if g is right)
    r2(h) = |J(x + h d) - J(x) - h g.d - h^2/2 d.H d|  (falls as h^3 if H is right)

are computed on a frozen time-step schedule; the observed rate is the smallest log2 ratio of
successive remainders that both lie above the evaluation noise of J. That noise is set by the
Newton tolerance of the forward solves (J itself is only known to about that relative
accuracy): remainders below ``NOISE * |J|`` measure it, not the derivative, and are reported
but not used for the rate. Directions come from :meth:`ParameterSpace.random_normal`, so they
do not depend on the number of ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from femkin._fem import PETSc

#: Relative evaluation noise of J below which a Taylor remainder is not used for a rate.
NOISE = 1e-11

#: Scale of the probe direction per block (the initial state must stay inside (0, 1)).
DIRECTION_SCALE = {"initial": 0.02, "kappa": 0.002, "coherency": 0.5, "k0": 0.3}


class TaylorResult(NamedTuple):
    block: str
    steps: list[float]
    gradient_remainders: list[float]
    hessian_remainders: list[float]
    gradient_rate: float
    hessian_rate: float
    floor: float = 0.0


def _rates(r: Sequence[float], floor: float = 0.0) -> float:
    """Smallest observed rate over successive pairs whose remainders both exceed ``floor``."""
    r = np.asarray(r, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        rates = np.log2(r[:-1] / r[1:])
    usable = np.isfinite(rates) & (r[:-1] > floor) & (r[1:] > floor)
    rates = rates[usable]
    return float(rates.min()) if rates.size else float("nan")


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
        _rates(r1, floor),
        _rates(r2, floor) if hessian else float("nan"),
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
