"""Randomised double-pass eigensolver against dense eigensolves and the SLEPc oracle."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sla
from uq_problems import make_problem, rel, unit_vectors

from femkin._fem import MPI
from femkin.uq import (
    LowRankPosterior,
    adaptive_rank,
    b_orthonormalize,
    double_pass_generalized,
)
from femkin.uq.slepc_oracle import slepc_generalized

# A decaying spectrum: 60 smooth local-average observations on a 10 x 10 mesh.
SPECTRUM = dict(n=10, n_obs=60, sigma=0.02, width=0.2, gamma=0.05)


def _dense_eigenvalues(p) -> np.ndarray:
    return sla.eigh(p.dense_H, p.dense_B, eigvals_only=True)[::-1]


def _b_gram(p, vs) -> np.ndarray:
    V = np.column_stack([p.gather(v) for v in vs])
    return V.T @ p.dense_B @ V


@pytest.mark.mpi
def test_full_rank_posterior_matches_closed_form(comm):
    p = make_problem(comm, n=6, n_obs=12)
    probes = [p.make_probe(i) for i in range(p.n_obs + 10)]
    lam, vs = double_pass_generalized(p.apply_H, p.apply_B, p.apply_Binv, probes, p.n_obs)
    assert len(lam) == p.n_obs
    assert np.all(np.diff(lam) <= 0)
    assert np.abs(_b_gram(p, vs) - np.eye(p.n_obs)).max() < 1e-10
    post = LowRankPosterior(lam, vs, p.apply_Binv, apply_prior_precision=p.apply_B)
    dense_post = np.linalg.inv(p.dense_H + p.dense_B)
    dense_prior = np.linalg.inv(p.dense_B)
    assert rel(dense_prior, dense_post) > 1.0  # the data matter: a prior-only answer fails

    units = unit_vectors(p)
    columns = []
    for e in units:
        out = e.duplicate()
        post.covariance_mult(e, out)
        columns.append(p.gather(out))
    assert rel(np.column_stack(columns), dense_post) < 1e-6
    assert rel(post.covariance_matrix(units), dense_post) < 1e-6
    assert rel(post.variance_of(units), np.diag(dense_post)) < 1e-6
    assert rel(post.variance_of(units, np.diag(dense_prior)), np.diag(dense_post)) < 1e-6


def test_rank_deficient_range_returns_the_rank(comm):
    p = make_problem(comm, n_obs=6)
    probes = [p.make_probe(i) for i in range(20)]
    lam, vs = double_pass_generalized(p.apply_H, p.apply_B, p.apply_Binv, probes, 15)
    assert len(lam) == len(vs) == 6
    np.testing.assert_allclose(lam, _dense_eigenvalues(p)[:6], rtol=1e-8)


@pytest.mark.mpi
def test_eigenvalues_match_dense_and_slepc(comm):
    p = make_problem(comm, **SPECTRUM)
    k, oversampling = 8, 10
    dense = _dense_eigenvalues(p)[:k]
    probes = [p.make_probe(i) for i in range(k + oversampling)]
    lam, vs = double_pass_generalized(p.apply_H, p.apply_B, p.apply_Binv, probes, k)
    oracle, ovs = slepc_generalized(p.apply_H, p.apply_B, p.apply_Binv, p.template, k)
    assert np.abs(oracle - dense).max() / dense[-1] < 1e-8
    assert (np.abs(lam - dense) / dense).max() < 1e-3
    assert (np.abs(lam - oracle) / oracle).max() < 1e-3
    assert np.abs(_b_gram(p, vs) - np.eye(k)).max() < 1e-10
    assert np.abs(np.diag(_b_gram(p, ovs)) - 1).max() < 1e-10
    # Leading eigenvectors: residual of H v = lambda B v, relative.
    V = np.column_stack([p.gather(v) for v in vs[:4]])
    res = p.dense_H @ V - p.dense_B @ V * lam[:4]
    assert (np.linalg.norm(res, axis=0) / np.linalg.norm(p.dense_H @ V, axis=0)).max() < 1e-2


def test_without_oversampling_is_less_accurate(comm):
    """The oversampling is what buys the accuracy above (guards a test that cannot fail)."""
    p = make_problem(comm, **SPECTRUM)
    k = 8
    dense = _dense_eigenvalues(p)[:k]
    probes = [p.make_probe(i) for i in range(k)]
    lam, _ = double_pass_generalized(p.apply_H, p.apply_B, p.apply_Binv, probes, k)
    assert (np.abs(lam - dense) / dense).max() > 1e-3


@pytest.mark.mpi
def test_partition_independent(comm):
    """Probes seeded by coordinates: the same eigenvalues on COMM_WORLD and on one rank."""
    k = 6
    results = []
    for c in (comm, MPI.COMM_SELF):
        p = make_problem(c, **SPECTRUM)
        probes = [p.make_probe(i) for i in range(k + 4)]
        lam, _ = double_pass_generalized(p.apply_H, p.apply_B, p.apply_Binv, probes, k)
        results.append(lam)
    diff = np.abs(results[0] - results[1]).max() / results[1][0]
    assert comm.allreduce(diff, op=MPI.MAX) < 1e-9


def test_batch_hook_is_used_and_equivalent(comm):
    p = make_problem(comm, **SPECTRUM)
    calls = []

    def batch(xs, outs):
        calls.append(len(xs))
        for x, y in zip(xs, outs, strict=True):
            p.apply_H(x, y)

    probes = [p.make_probe(i) for i in range(12)]
    lam_b, _ = double_pass_generalized(
        p.apply_H, p.apply_B, p.apply_Binv, probes, 5, apply_H_batch=batch
    )
    lam, _ = double_pass_generalized(p.apply_H, p.apply_B, p.apply_Binv, probes, 5)
    assert calls == [12, 12]
    np.testing.assert_allclose(lam_b, lam, rtol=1e-12)


@pytest.mark.mpi
def test_adaptive_rank_grows_until_threshold(comm):
    p = make_problem(comm, **SPECTRUM)
    count = [0]

    def apply_H(x, y):
        count[0] += 1
        p.apply_H(x, y)

    lam, vs = adaptive_rank(
        apply_H, p.apply_B, p.apply_Binv, p.make_probe, threshold=10.0, start=2, oversampling=10
    )
    dense = _dense_eigenvalues(p)
    # Doubling 2 -> 4 -> 8 -> 16: the first k with lambda_k < 10 among 2, 4, 8, 16, ...
    first_below = int(np.argmax(dense < 10.0)) + 1
    expected_k = 2
    while expected_k < first_below:
        expected_k *= 2
    assert len(lam) == expected_k
    assert lam[-1] < 10.0 <= lam[expected_k // 2 - 1]
    assert expected_k == 16  # this spectrum needs three doublings
    lead = dense[: len(lam) // 2]
    assert (np.abs(lam[: len(lead)] - lead) / lead).max() < 1e-3
    # First passes are reused: each probe once, plus one second pass per round.
    ks = [2]
    while ks[-1] < expected_k:
        ks.append(2 * ks[-1])
    assert count[0] == (expected_k + 10) + sum(k + 10 for k in ks)


def test_adaptive_rank_stops_at_max_rank(comm):
    p = make_problem(comm, **SPECTRUM)
    lam, vs = adaptive_rank(
        p.apply_H,
        p.apply_B,
        p.apply_Binv,
        p.make_probe,
        threshold=0.0,
        start=2,
        max_rank=6,
        oversampling=5,
    )
    assert len(lam) == len(vs) == 6


def test_bad_arguments(comm):
    p = make_problem(comm, n=4, n_obs=3)
    probes = [p.make_probe(i) for i in range(3)]
    with pytest.raises(ValueError, match="k must satisfy"):
        double_pass_generalized(p.apply_H, p.apply_B, p.apply_Binv, probes, 4)
    with pytest.raises(ValueError, match="start >= 1"):
        adaptive_rank(p.apply_H, p.apply_B, p.apply_Binv, p.make_probe, start=0)


@pytest.mark.mpi
def test_b_orthonormalize_keeps_small_directions(comm):
    """Y = B^{-1} H Omega spans eigenvalues 1e5 down to 1e-2: none may be lost (CholQR/SVQB
    on the Gram matrix lose the directions below sqrt(eps) relative and return fewer)."""
    p = make_problem(comm, **SPECTRUM)
    ys = []
    for i in range(40):
        h, y = p.template.duplicate(), p.template.duplicate()
        p.apply_H(p.make_probe(i), h)
        p.apply_Binv(h, y)
        ys.append(y)
    q, bq = b_orthonormalize(ys, p.apply_B)
    assert len(q) == 40
    Q, BQ, Y = (np.column_stack([p.gather(v) for v in vs]) for vs in (q, bq, ys))
    assert np.abs(Q.T @ p.dense_B @ Q - np.eye(40)).max() < 1e-9
    assert rel(BQ, p.dense_B @ Q) < 1e-10
    assert rel(Q @ (BQ.T @ Y), Y) < 1e-10
    lam, _ = double_pass_generalized(
        p.apply_H, p.apply_B, p.apply_Binv, [p.make_probe(i) for i in range(40)], 20
    )
    dense = _dense_eigenvalues(p)[:20]
    assert (np.abs(lam - dense) / dense).max() < 1e-3
