"""Tests of the BiLaplacian, scalar and composite Gaussian priors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special

from femkin._fem import MPI, dolfinx
from femkin.errors import InputError
from femkin.parameters import FieldBlock, ParameterSpace, ParticleScalarBlock, ScalarBlock
from femkin.prior import BiLaplacianPrior, GaussianScalarPrior, Prior, bilaplacian_coefficients

STD, LENGTH = 0.5, 0.25


def square_space(comm, n, half=1.0):
    mesh = dolfinx.mesh.create_rectangle(comm, [[-half, -half], [half, half]], [n, n])
    return dolfinx.fem.functionspace(mesh, ("Lagrange", 1))


def unit_at(prior, point):
    """A vector that is 1 at the dof located at ``point`` and 0 elsewhere (any partition)."""
    X = prior.V.tabulate_dof_coordinates()[: prior.n_local]
    e = prior.create_vector()
    hit = np.flatnonzero(np.linalg.norm(X[:, :2] - point, axis=1) < 1e-10)
    e.getArray()[hit] = 1.0
    assert prior.comm.allreduce(hit.size) == 1
    return e


def value_at(prior, vec, point):
    X = prior.V.tabulate_dof_coordinates()[: prior.n_local]
    hit = np.flatnonzero(np.linalg.norm(X[:, :2] - point, axis=1) < 1e-10)
    return prior.comm.allreduce(float(vec.getArray(readonly=True)[hit].sum()))


def test_coefficients_match_matern_formulas():
    gamma, delta = bilaplacian_coefficients(STD, LENGTH)
    assert 1.0 / (4 * np.pi * gamma * delta) == pytest.approx(STD**2, rel=1e-14)
    assert np.sqrt(8 * gamma / delta) == pytest.approx(LENGTH, rel=1e-14)


@pytest.mark.mpi
def test_variance_and_correlation_length(comm):
    """Centre of [-1, 1]^2: variance ~ std^2, correlation at r = length ~ (kr) K1(kr)."""
    prior = BiLaplacianPrior(square_space(comm, 48), STD, LENGTH)
    columns = []
    for point in ([0.0, 0.0], [LENGTH, 0.0]):
        y = prior.create_vector()
        prior.covariance_mult(unit_at(prior, point), y)
        columns.append(y)
    var_0 = value_at(prior, columns[0], [0.0, 0.0])
    var_r = value_at(prior, columns[1], [LENGTH, 0.0])
    cov = value_at(prior, columns[0], [LENGTH, 0.0])
    kr = np.sqrt(8.0)
    matern = kr * scipy.special.k1(kr)
    assert 0.13 < matern < 0.14
    assert var_0 == pytest.approx(STD**2, rel=0.03)
    assert cov / np.sqrt(var_0 * var_r) == pytest.approx(matern, abs=0.01)


@pytest.mark.mpi
def test_robin_reduces_boundary_inflation(comm):
    V = square_space(comm, 24)
    corner = [-1.0, -1.0]
    variances = {}
    for robin in (False, True):
        prior = BiLaplacianPrior(V, STD, LENGTH, robin=robin)
        y = prior.create_vector()
        prior.covariance_mult(unit_at(prior, corner), y)
        variances[robin] = value_at(prior, y, corner)
    # Neumann alone inflates the corner variance several-fold; Robin brings it near std^2.
    assert variances[False] > 3 * STD**2
    assert variances[True] < 0.6 * variances[False]


@pytest.mark.mpi
def test_precision_inverts_covariance(comm):
    prior = BiLaplacianPrior(square_space(comm, 16), STD, LENGTH)
    r = prior.create_vector()
    lo, hi = r.getOwnershipRange()
    r.getArray()[:] = np.sin(np.arange(lo, hi) * 0.37)
    c, back = prior.create_vector(), prior.create_vector()
    prior.covariance_mult(r, c)
    prior.precision_mult(c, back)
    back.axpy(-1.0, r)
    assert back.norm() < 1e-9 * r.norm()
    # cost is the quadratic form of the precision, gradient its derivative.
    assert prior.cost(c) == pytest.approx(0.5 * c.dot(r), rel=1e-9)
    g = prior.create_vector()
    prior.gradient(c, g)
    g.axpy(-1.0, r)
    assert g.norm() < 1e-9 * r.norm()


@pytest.mark.mpi
def test_pointwise_variance_exact_and_randomized(comm):
    prior = BiLaplacianPrior(square_space(comm, 10), STD, LENGTH)
    exact = prior.pointwise_variance("exact")
    y = prior.create_vector()
    prior.covariance_mult(unit_at(prior, [0.0, 0.0]), y)
    X = prior.V.tabulate_dof_coordinates()[: prior.n_local]
    hit = np.flatnonzero(np.linalg.norm(X[:, :2], axis=1) < 1e-10)
    assert comm.allreduce(float(np.abs(exact[hit] - y.getArray()[hit]).sum())) < 1e-12
    # The randomized estimate samples Gamma = A^{-1} M A^{-1} itself; the lumped-mass samples
    # A^{-1} M_L^{1/2} w (covariance A^{-1} M_L A^{-1}), probed here, would be far off.
    lumped = np.zeros(prior.n_local)
    e, w, z = prior.create_vector(), prior.create_vector(), prior.create_vector()
    lo, hi = e.getOwnershipRange()
    for i in range(prior.n_global):
        e.set(0.0)
        if lo <= i < hi:
            e.setValue(i, 1.0)
        e.assemble()
        prior.Asolver.solve(e, w)
        w.pointwiseMult(w, prior.sqrt_ML)
        w.pointwiseMult(w, prior.sqrt_ML)
        prior.Asolver.solve(w, z)
        if lo <= i < hi:
            lumped[i - lo] = z.getValue(i)
    rand = prior.pointwise_variance("randomized", n_samples=400, seed=3)
    mean_lumped = comm.allreduce(lumped.sum()) / prior.n_global
    mean_exact = comm.allreduce(exact.sum()) / prior.n_global
    mean_rand = comm.allreduce(rand.sum()) / prior.n_global
    assert mean_rand == pytest.approx(mean_exact, rel=0.05)
    assert mean_lumped / mean_exact > 1.15


@pytest.mark.mpi
def test_sqrt_mass_factor(comm):
    """R R^T = M for the sampler's factor R, so samples have covariance A^{-1} M A^{-1}."""
    prior = BiLaplacianPrior(square_space(comm, 6), STD, LENGTH)
    n = prior.n_global
    e, r = prior.create_vector(), prior.create_vector()
    lo, hi = e.getOwnershipRange()
    R = np.zeros((n, n))
    M = np.zeros((n, n))
    for i in range(n):
        e.set(0.0)
        if lo <= i < hi:
            e.setValue(i, 1.0)
        e.assemble()
        prior.sqrt_mass_mult(e, r)
        R[lo:hi, i] = r.getArray(readonly=True)
        prior.M.mult(e, r)
        M[lo:hi, i] = r.getArray(readonly=True)
    R, M = comm.allreduce(R), comm.allreduce(M)
    assert np.abs(R @ R.T - M).max() < 1e-12 * np.abs(M).max()
    lumped = np.diag(M.sum(axis=1))
    assert np.abs(lumped - M).max() > 0.3 * np.abs(M).max()  # a test the lumped factor fails


def test_invalid_inputs():
    V = square_space(MPI.COMM_SELF, 2)
    with pytest.raises(InputError, match="std"):
        BiLaplacianPrior(V, -1.0, LENGTH)
    with pytest.raises(InputError, match="length"):
        BiLaplacianPrior(V, STD, 0.0)
    with pytest.raises(InputError, match="coefficient_std"):
        GaussianScalarPrior([0.0, 1.0], [1.0, 0.0])


def composite(comm):
    V = square_space(comm, 12)
    space = ParameterSpace(
        comm,
        [ScalarBlock("mu_h", 3)],
        [FieldBlock("m", 1, V)],
        [ParticleScalarBlock("mu_e", 1, 2, 0)],
    )
    priors = {
        ("mu_h", None): GaussianScalarPrior([1.0, -2.0, 0.5], [2.0, 1.0, 0.5]),
        ("m", 1): BiLaplacianPrior(V, STD, LENGTH),
        ("mu_e", 1): GaussianScalarPrior([0.0, 0.0], 0.1),
    }
    return space, Prior(space, priors)


@pytest.mark.mpi
def test_composite_prior(comm):
    space, prior = composite(comm)
    assert np.allclose(space.get_scalars(prior.mean(), "mu_h"), [1.0, -2.0, 0.5])
    r = space.random_normal(seed=2)
    c, back = r.duplicate(), r.duplicate()
    prior.covariance_mult(r, c)
    prior.precision_mult(c, back)
    back.axpy(-1.0, r)
    assert back.norm() < 1e-9 * r.norm()
    assert np.allclose(space.get_scalars(c, "mu_e", 1), 0.01 * space.get_scalars(r, "mu_e", 1))
    # Gradient of the quadratic cost by a central difference (exact for a quadratic).
    x, v = prior.sample(seed=4), space.random_normal(seed=5)
    g = x.duplicate()
    value = prior.cost_gradient(x, g)
    assert value == pytest.approx(prior.cost(x), rel=1e-12)
    xp, xm = x.copy(), x.copy()
    xp.axpy(1e-3, v)
    xm.axpy(-1e-3, v)
    fd = (prior.cost(xp) - prior.cost(xm)) / 2e-3
    assert fd == pytest.approx(g.dot(v), rel=1e-7)
    assert prior.cost(prior.mean()) == 0.0


@pytest.mark.mpi
def test_composite_sample_partition_independent(comm):
    space, prior = composite(comm)
    d = space.to_global_dict(prior.sample(seed=9))
    ok = True
    if comm.rank == 0:
        sspace, sprior = composite(MPI.COMM_SELF)
        ref = sspace.to_global_dict(sprior.sample(seed=9))
        ok = all(np.allclose(d[k], ref[k], rtol=1e-10, atol=1e-12) for k in ref)
    assert comm.bcast(ok, root=0)


def test_composite_validation():
    space, prior = composite(MPI.COMM_SELF)
    priors = dict(prior.priors)
    del priors[("mu_e", 1)]
    with pytest.raises(InputError, match="blocks"):
        Prior(space, priors)
    priors[("mu_e", 1)] = GaussianScalarPrior([0.0, 0.0, 0.0], 1.0)
    with pytest.raises(InputError, match="mu_e/1"):
        Prior(space, priors)
