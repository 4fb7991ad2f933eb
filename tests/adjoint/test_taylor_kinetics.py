"""Taylor tests of the adjoint, tangent and second-order adjoint under each fixed kinetic law.

The derivative code is derived from the residual by UFL, so a new law must get exact
derivatives with no new code; this checks it, block by block and in a direction spanning all
blocks at once (mixed second derivatives such as lambda x m), with the production pixel misfit
of :mod:`test_taylor` (BDF2, one particle, 8 x 8 mesh). The CIET law's reorganisation energy
is a block (coordinate ln lambda). The default law "bv" is covered by test_taylor.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_taylor import PARAMS, Problem, _direction, _perturbed

from femkin._fem import MPI

#: The laws, with k0 scaled so that each moves c by a similar amount over the frames.
LAWS = {
    "bv-constant": dataclasses.replace(PARAMS, kinetics="bv-constant", j0=(), k0=4e-4),
    "bv-lim": dataclasses.replace(PARAMS, kinetics="bv-lim", j0=(), k0=1.5e-3, alpha=0.4),
    "ciet": dataclasses.replace(PARAMS, kinetics="ciet", j0=(), k0=4e-2, lambda_=8.3),
}
BLOCKS = ("mu_h", "k0", "coherency", "m", "mu_e", "initial")


@pytest.fixture(scope="module", params=list(LAWS))
def law_problem(request):
    return Problem(MPI.COMM_WORLD, "bdf2", LAWS[request.param])


def _rates(problem: Problem, d: dict) -> tuple[float, float, float]:
    gd = problem.pair(problem.grad, d)
    dHd = problem.pair(problem.hessian(d), d)
    hs = 0.1 * 2.0 ** -np.arange(4)
    r1, r2 = [], []
    theta = problem.base()
    for h in hs:
        Jh, _ = problem.misfit(_perturbed(theta, d, h))
        r1.append(abs(Jh - problem.J0 - h * gd))
        r2.append(abs(Jh - problem.J0 - h * gd - 0.5 * h * h * dHd))
    rate1 = np.min(np.log2(np.array(r1[:-1]) / np.array(r1[1:])))
    rate2 = np.min(np.log2(np.array(r2[:-1]) / np.array(r2[1:])))
    return gd, rate1, rate2


@pytest.mark.parametrize("block", BLOCKS + ("lambda", "all"))
def test_taylor_rates_per_law(law_problem, block):
    """Gradient rate >= 1.9 and full-Hessian rate >= 2.9 under each law."""
    law = law_problem.params.kinetics
    if block == "lambda" and law != "ciet":
        pytest.skip("lambda enters the CIET law only")
    if block == "all":
        blocks = BLOCKS + (("lambda",) if law == "ciet" else ())
    else:
        blocks = (block,)
    d = _direction(law_problem, blocks)
    gd, rate1, rate2 = _rates(law_problem, d)
    assert abs(gd) > 1e-6, f"{law} {block}: the gradient in this direction is ~0: {gd}"
    assert rate1 >= 1.9, f"{law} {block}: gradient Taylor rate {rate1:.3f}"
    assert rate2 >= 2.9, f"{law} {block}: Hessian Taylor rate {rate2:.3f}"


def test_ciet_hessian_symmetric(law_problem):
    """<H u, v> = <u, H v> (full Hessian) for directions spanning every block, lambda too."""
    if law_problem.params.kinetics != "ciet":
        pytest.skip("one law suffices for the symmetry check")
    blocks = BLOCKS + ("lambda",)
    u = _direction(law_problem, blocks, seed=0.0)
    v = _direction(law_problem, blocks, seed=1.3)
    huv = law_problem.pair(law_problem.hessian(u), v)
    hvu = law_problem.pair(law_problem.hessian(v), u)
    assert abs(huv - hvu) <= 1e-6 * max(abs(huv), abs(hvu)), (huv, hvu)
