"""The kinetic laws of :mod:`femkin.physics.acr` against independent NumPy transcriptions.

Each law's UFL rate is compiled by FFCx (as the forward model compiles it) and evaluated at
cell midpoints of a DG0 field of (c, mu, m); the reference values are the published formulas
written out again here in NumPy/SciPy (``scipy.special.erfc``, not the ``1 - erf`` of the UFL):

- Butler-Volmer, R = k j0 [exp(-alpha eta) - exp((1 - alpha) eta)], with j0 = 1 or
  j0 = c^alpha (1 - c)^(1 - alpha) / gamma, gamma = 1 / (1 - c) (Lim et al. 2016);
- CIET (Fraggedakis et al. 2021, as in MPET's ``CIET``): R = k (1 - c) / sqrt(4 pi lambda)
  [k_red(eta_f) - c k_ox(eta_f)], eta_f = eta + ln(1 / c), with the Zeng et al. (2014) MHC rates
  k_red/ox(x) = sqrt(pi lambda) / (1 + exp(+-x)) erfc((lambda - sqrt(1 + sqrt(lambda) + x^2)) /
  (2 sqrt(lambda))).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import erfc

from femkin._fem import MPI, PETSc, dolfinx, ufl
from femkin.blocks import KINETICS
from femkin.forward import ModelParameters
from femkin.physics import acr

K0 = 2.5e-3


def _points():
    """(c, eta, m) on a grid covering the range a fit visits."""
    c = np.array([0.003, 0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98, 0.997])
    eta = np.array([-12.0, -6.0, -2.0, -0.5, 0.0, 0.3, 1.0, 4.0, 9.0])
    cc, ee = np.meshgrid(c, eta, indexing="ij")
    m = 0.4 * np.sin(3.0 * cc + ee)
    return cc.ravel(), ee.ravel(), m.ravel()


def _reference(kinetics: str, c, eta, m, alpha: float, lam: float):
    """The insertion and extraction rates (R = insertion - extraction), 1/s."""
    k = K0 * np.exp(m)
    if kinetics in ("bv-constant", "bv-lim"):
        if kinetics == "bv-constant":
            j0 = np.ones_like(c)
        else:
            gamma = 1.0 / (1.0 - c)
            j0 = c**alpha * (1.0 - c) ** (1.0 - alpha) / gamma
        return k * j0 * np.exp(-alpha * eta), k * j0 * np.exp((1.0 - alpha) * eta)
    assert kinetics == "ciet"
    eta_f = eta + np.log(1.0 / c)
    erfc_term = erfc((lam - np.sqrt(1.0 + np.sqrt(lam) + eta_f**2)) / (2.0 * np.sqrt(lam)))
    k_red = np.sqrt(np.pi * lam) / (1.0 + np.exp(eta_f)) * erfc_term
    k_ox = np.sqrt(np.pi * lam) / (1.0 + np.exp(-eta_f)) * erfc_term
    prefactor = k * (1.0 - c) / np.sqrt(4.0 * np.pi * lam)
    return prefactor * k_red, prefactor * c * k_ox


def _compiled_rate(kinetics: str, c, eta, m, alpha: float, lam: float) -> np.ndarray:
    """The UFL rate of ``kinetics`` compiled by FFCx, one value per point (serial)."""
    n = c.size
    mesh = dolfinx.mesh.create_interval(MPI.COMM_SELF, n, [0.0, 1.0])
    Q = dolfinx.fem.functionspace(mesh, ("DG", 0))
    cells = np.arange(n, dtype=np.int32)
    midpoints = dolfinx.mesh.compute_midpoints(mesh, 1, cells)[:, 0]
    order = np.argsort(np.argsort(midpoints))  # cell i holds point order[i] (serial mesh)
    fields = {}
    for name, values in (("c", c), ("mu", eta), ("m", m)):
        f = dolfinx.fem.Function(Q)
        f.x.array[Q.dofmap.list[:, 0]] = values[order]
        fields[name] = f

    def const(v):
        return dolfinx.fem.Constant(mesh, PETSc.ScalarType(v))

    coeffs = acr.ACRCoefficients(
        a=[],
        b=[],
        p=const(0.5),
        q=const(0.5),
        ln_k0=const(np.log(K0)),
        m=fields["m"],
        kappa=const(0.0),
        coherency=const(0.0),
        alpha=const(alpha),
        kinetics=kinetics,
        reorganization=ufl.exp(const(np.log(lam))),
    )
    rate = acr.reaction_rate(fields["c"], fields["mu"], const(0.0), coeffs)
    expr = dolfinx.fem.Expression(rate, np.array([[0.5]]))
    values = expr.eval(mesh, cells).reshape(-1)
    out = np.empty(n)
    out[order] = values
    return out


LAWS = [
    ("bv-constant", 0.5, 8.3),
    ("bv-constant", 0.3, 8.3),
    ("bv-lim", 0.5, 8.3),
    ("bv-lim", 0.35, 8.3),
    ("ciet", 0.5, 8.3),
    ("ciet", 0.5, 3.0),
    ("ciet", 0.5, 20.0),
]


@pytest.mark.parametrize("kinetics,alpha,lam", LAWS)
def test_rate_matches_published_formula(kinetics, alpha, lam):
    """The compiled UFL rate equals the NumPy transcription to 1e-12.

    Relative to the larger of the two one-way rates at each point, so that the cancellation
    near eta = 0 is measured against what cancels.
    """
    c, eta, m = _points()
    ufl_values = _compiled_rate(kinetics, c, eta, m, alpha, lam)
    forward, backward = _reference(kinetics, c, eta, m, alpha, lam)
    ref = forward - backward
    err = np.abs(ufl_values - ref) / np.maximum(forward, backward)
    assert np.all(np.isfinite(ufl_values))
    assert np.max(err) < 1e-12, f"{kinetics}: largest relative error {np.max(err):.3g}"
    # detailed balance: no net rate at eta = 0
    assert np.max(np.abs(ufl_values[eta == 0]) / forward[eta == 0]) < 1e-14


@pytest.mark.parametrize("kinetics,alpha,lam", LAWS)
def test_j0_curve_is_the_insertion_rate_at_equilibrium(kinetics, alpha, lam):
    """j0_curve(c) = R_in(c, eta = 0) / k, from the NumPy transcriptions: the one-way rate."""
    c = np.linspace(0.01, 0.99, 37)
    params = ModelParameters(alpha=alpha, kinetics=kinetics, lambda_=lam)
    got = params.j0_curve(c)
    if kinetics == "bv-constant":
        want = np.ones_like(c)
    elif kinetics == "bv-lim":
        want = c**alpha * (1 - c) ** (1 - alpha) * (1 - c)
    else:  # the insertion half of CIET at eta = 0: eta_f = -ln c
        x = -np.log(c)
        k_red = (
            np.sqrt(np.pi * lam)
            / (1 + np.exp(x))
            * erfc((lam - np.sqrt(1 + np.sqrt(lam) + x**2)) / (2 * np.sqrt(lam)))
        )
        want = (1 - c) / np.sqrt(4 * np.pi * lam) * k_red
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


def test_ciet_j0_vanishes_at_full_and_is_skewed_to_low_c():
    """The CIET exchange factor vanishes as c -> 1 and peaks below c = 1/2 (the paper's shape)."""
    c = np.linspace(0.001, 0.999, 999)
    j0 = ModelParameters(kinetics="ciet", lambda_=8.3).j0_curve(c)
    assert j0[-1] < 5e-3 * j0.max()  # linearly in (1 - c): 2.6e-3 at c = 0.999
    assert 0.3 < c[np.argmax(j0)] < 0.4, c[np.argmax(j0)]  # 0.342 at lambda = 8.3 kT


def test_bv_rate_is_todays_expression():
    """The default law is the expression of femkin before the laws were added (same UFL)."""
    mesh = dolfinx.mesh.create_unit_interval(MPI.COMM_SELF, 2)
    V = dolfinx.fem.functionspace(mesh, ("Lagrange", 1))
    c, mu, m = (dolfinx.fem.Function(V) for _ in range(3))
    k, b1, b2, p, q, alpha, mu_e = (dolfinx.fem.Constant(mesh, 0.1 * i) for i in range(1, 8))
    b = [ufl.variable(b1), ufl.variable(b2)]
    coeffs = acr.ACRCoefficients([], b, p, q, ufl.variable(k), m, 0.0, 0.0, alpha)
    assert coeffs.kinetics == KINETICS[0] == "bv"
    eta = mu - mu_e
    prefactor = coeffs.ln_k0 + m + acr.ln_j0(c, b, p, q)
    legacy = ufl.exp(prefactor - alpha * eta) - ufl.exp(prefactor + (1 - alpha) * eta)
    rate = acr.reaction_rate(c, mu, mu_e, coeffs)
    assert (rate * ufl.dx).signature() == (legacy * ufl.dx).signature()


def test_unknown_law_is_refused():
    with pytest.raises(ValueError, match="kinetics"):
        acr.reaction_rate(
            0.5, 0.0, 0.0, acr.ACRCoefficients([], [], 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.5, "tafel")
        )


@pytest.mark.parametrize("kinetics,block", [("ciet", "j0"), ("bv-lim", "j0"), ("bv", "lambda")])
def test_inverse_problem_refuses_blocks_outside_the_law(kinetics, block):
    """The library refuses what the case file refuses (before any mesh or video is touched)."""
    from femkin.errors import InputError
    from femkin.forward import SolverOptions
    from femkin.problem import InverseProblem

    params = ModelParameters(kinetics=kinetics)
    with pytest.raises(InputError, match=f"kinetics '{kinetics}'") as info:
        InverseProblem(
            MPI.COMM_SELF, None, {}, None, params, ["k0", block], SolverOptions(), 0.1, {}
        )
    assert block in str(info.value)
