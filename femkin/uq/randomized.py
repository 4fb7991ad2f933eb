"""Randomised double-pass eigensolver for the prior-preconditioned Hessian.

Solves the generalised symmetric eigenproblem ``H v = lambda B v`` for its dominant pairs,
where ``H`` is the (Gauss-Newton or full) Hessian of the data misfit and ``B`` the prior
precision ``Gamma_prior^{-1}``, with only operator actions (hIPPYlib's
``algorithms/randomizedEigensolver.py::doublePassG``; Halko, Martinsson & Tropp 2011, Alg. 5.3,
generalised by Saibaba, Lee & Kitanidis 2016):

1. ``Y = B^{-1} H Omega`` for the caller's probes ``Omega`` (first pass);
2. ``Q``: a B-orthonormal basis of ``range(Y)``, ``Q^T B Q = I`` (Gram-Schmidt twice in the
   B inner product, see :func:`b_orthonormalize`);
3. ``T = Q^T H Q`` (second pass) and its small dense eigendecomposition ``T = W L W^T``;
4. ``V = Q W``, so ``V^T B V = I`` and ``H V ~ B V L``.

The Hessian actions of one pass are independent, so a caller may supply ``apply_H_batch``
(a callable applying ``H`` to a list of vectors) and spread them over ranks or particles.

Operators are given as callables ``apply(x, out)`` that write ``out = Op x`` (petsc4py
``Vec`` in and out), or as objects with ``mult(x, out)`` (a PETSc ``Mat``) or
``solve(b, x)`` (a PETSc ``KSP``). Every function here is collective on the vectors'
communicator; the dense linear algebra on the small ``(k+p) x (k+p)`` matrices is done
redundantly on every rank from allreduced Gram matrices, so all ranks agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from femkin._fem import MPI, PETSc

Apply = Callable[[PETSc.Vec, PETSc.Vec], None]
ApplyBatch = Callable[[Sequence[PETSc.Vec], Sequence[PETSc.Vec]], None]

__all__ = [
    "Apply",
    "ApplyBatch",
    "Eigenpairs",
    "adaptive_rank",
    "apply_many",
    "OmittedSpectrum",
    "as_apply",
    "b_orthonormalize",
    "double_pass_generalized",
    "omitted_spectrum",
    "symmetric",
]


class Eigenpairs(NamedTuple):
    """Dominant eigenpairs of ``H v = lambda B v``.

    Attributes:
        eigenvalues: descending, shape ``(k,)``.
        eigenvectors: ``k`` vectors with ``V^T B V = I``.
    """

    eigenvalues: np.ndarray
    eigenvectors: list[PETSc.Vec]


def as_apply(op) -> Apply:
    """Turn an operator into a callable ``apply(x, out)``.

    Args:
        op: a callable ``op(x, out)``, a PETSc ``Mat`` (``mult``) or a PETSc ``KSP``
            (``solve``, i.e. the operator is the inverse of the KSP's matrix).

    Returns:
        A callable writing ``out = Op x``.
    """
    if isinstance(op, PETSc.KSP):
        return lambda x, out: op.solve(x, out)
    if isinstance(op, PETSc.Mat):
        return lambda x, out: op.mult(x, out)
    if callable(op):
        return op
    raise TypeError(f"operator must be callable, a PETSc Mat or a PETSc KSP; found {type(op)!r}")


def apply_many(apply: Apply, batch: ApplyBatch | None, xs: Sequence[PETSc.Vec]) -> list:
    """New vectors ``apply(x)`` for every ``x`` in ``xs`` (through ``batch`` when given)."""
    outs = [x.duplicate() for x in xs]
    if not xs:
        return outs
    if batch is not None:
        batch(list(xs), outs)
    else:
        for x, y in zip(xs, outs, strict=True):
            apply(x, y)
    return outs


def _mpi_comm(v: PETSc.Vec) -> MPI.Comm:
    return v.getComm().tompi4py()


def _local(vs: Sequence[PETSc.Vec]) -> np.ndarray:
    """Owned entries of ``vs`` as the columns of an ``(n_local, len(vs))`` array (a copy)."""
    n = vs[0].getLocalSize()
    out = np.empty((n, len(vs)), dtype=PETSc.ScalarType)
    for j, v in enumerate(vs):
        out[:, j] = v.getArray(readonly=True)
    return out


def gram(us: Sequence[PETSc.Vec], ws: Sequence[PETSc.Vec]) -> np.ndarray:
    """Dense matrix ``G[i, j] = us[i] . ws[j]`` (Euclidean), allreduced; collective."""
    if not us or not ws:
        return np.zeros((len(us), len(ws)))
    local = _local(us).T @ _local(ws)
    return _mpi_comm(us[0]).allreduce(local, op=MPI.SUM)


def symmetric(a: np.ndarray) -> np.ndarray:
    """The symmetric part ``(a + a^T) / 2`` of a dense matrix (a Gram matrix of a symmetric
    operator, up to round-off).
    """
    return 0.5 * (a + a.T)


def combine(vs: Sequence[PETSc.Vec], coefficients: np.ndarray) -> list[PETSc.Vec]:
    """New vectors ``out[j] = sum_i vs[i] * coefficients[i, j]``; local, no communication."""
    coefficients = np.asarray(coefficients)
    local = _local(vs) @ coefficients
    out = []
    for j in range(coefficients.shape[1]):
        w = vs[0].duplicate()
        w.setArray(local[:, j])
        out.append(w)
    return out


def b_orthonormalize(
    ys: Sequence[PETSc.Vec],
    apply_B: Apply,
    *,
    drop_tolerance: float = 1e-10,
) -> tuple[list[PETSc.Vec], list[PETSc.Vec]]:
    """B-orthonormal basis of ``span(ys)`` by Gram-Schmidt twice in the B inner product.

    Classical Gram-Schmidt with one full reorthogonalisation ("twice is enough", Giraud et al.
    2005), column by column: ``w <- w - Q (BQ)^T w`` twice, then ``q = w / |w|_B``. A column
    whose B-norm falls below ``drop_tolerance`` times its original B-norm is numerically
    dependent on the earlier ones (e.g. more probes than the rank of ``H``) and is dropped.
    Unlike Gram-matrix methods (CholQR, SVQB), which lose directions whose relative size is
    below ``sqrt(eps)``, this keeps directions down to ``drop_tolerance``: ``Y = B^{-1} H Omega``
    spans eigenvalues from ``lambda_max`` down to the threshold, often six orders apart.
    ``B`` is applied afresh to every kept vector (two actions per column), so ``BQ`` does not
    inherit the cancellation of the subtraction.

    Args:
        ys: the vectors to orthonormalise (not modified).
        apply_B: ``apply_B(x, out)``, ``out = B x`` with ``B`` symmetric positive definite.
        drop_tolerance: relative B-norm below which a column counts as dependent.

    Returns:
        ``(Q, BQ)``: the basis, ``Q^T B Q = I``, possibly with fewer vectors than ``ys``,
        and ``B`` applied to it.
    """
    apply_B = as_apply(apply_B)
    q: list[PETSc.Vec] = []
    bq: list[PETSc.Vec] = []
    if not ys:
        return q, bq
    comm = _mpi_comm(ys[0])
    n_local = ys[0].getLocalSize()
    # Owned entries of Q and BQ as columns, kept alongside the Vecs for cheap projections.
    q_local = np.empty((n_local, len(ys)), dtype=PETSc.ScalarType)
    bq_local = np.empty_like(q_local)
    for y in ys:
        m = len(q)
        w = y.copy()
        bw = y.duplicate()
        apply_B(w, bw)
        norm0 = np.sqrt(max(w.dot(bw), 0.0))
        if norm0 == 0.0:
            w.destroy()
            bw.destroy()
            continue
        if m:
            w_arr = w.getArray()
            for _ in range(2):
                c = comm.allreduce(bq_local[:, :m].T @ w_arr, op=MPI.SUM)
                w_arr -= q_local[:, :m] @ c
            w.setArray(w_arr)
            apply_B(w, bw)
        norm = np.sqrt(max(w.dot(bw), 0.0))
        if norm <= drop_tolerance * norm0:
            w.destroy()
            bw.destroy()
            continue
        w.scale(1.0 / norm)
        bw.scale(1.0 / norm)
        q_local[:, m] = w.getArray(readonly=True)
        bq_local[:, m] = bw.getArray(readonly=True)
        q.append(w)
        bq.append(bw)
    return q, bq


def _rayleigh_ritz(q: list[PETSc.Vec], hq: list[PETSc.Vec], k: int) -> Eigenpairs:
    t = gram(q, hq)
    t = 0.5 * (t + t.T)
    d, w = np.linalg.eigh(t)
    order = np.argsort(d)[::-1][:k]
    return Eigenpairs(d[order].copy(), combine(q, w[:, order]))


def double_pass_generalized(
    apply_H,
    apply_B,
    apply_Binv,
    probes: Sequence[PETSc.Vec],
    k: int,
    *,
    apply_H_batch: ApplyBatch | None = None,
) -> Eigenpairs:
    """Dominant eigenpairs of ``H v = lambda B v`` by the randomised double-pass algorithm.

    Costs ``2 * len(probes)`` Hessian actions (two passes; fewer in the second when the
    probed range is rank deficient), ``len(probes)`` actions of ``B^{-1}`` and two of ``B``
    per probe.

    Args:
        apply_H: ``apply_H(x, out)``: ``out = H x`` (symmetric), or a ``Mat``.
        apply_B: ``out = B x``, the prior precision (symmetric positive definite), or a
            ``Mat``.
        apply_Binv: ``out = B^{-1} x``, the prior covariance, or a ``KSP`` solving with B.
        probes: ``k + p`` random vectors (``p`` the oversampling, about 10), drawn by the
            caller from global indices or coordinates so the result is partition
            independent; not modified.
        k: number of pairs wanted, ``1 <= k <= len(probes)``.
        apply_H_batch: optional ``apply_H_batch(xs, outs)`` applying ``H`` to a list of
            vectors at once (independent actions the caller may batch or spread over ranks);
            used instead of ``apply_H`` for both passes when given.

    Returns:
        ``Eigenpairs(eigenvalues, eigenvectors)``: the ``k`` largest eigenvalues (by value,
        descending: with a full Hessian, large negative ones are not returned) and the
        eigenvectors, ``V^T B V = I``. When the probed range has numerical rank ``r < k``
        (``H`` of rank ``r``), only ``r`` pairs are returned: the others are zero.

    Raises:
        ValueError: when ``k`` is not in ``[1, len(probes)]``.
    """
    if not 1 <= k <= len(probes):
        raise ValueError(f"k must satisfy 1 <= k <= len(probes); found {k=}, {len(probes)=}")
    apply_H = as_apply(apply_H)
    apply_B = as_apply(apply_B)
    apply_Binv = as_apply(apply_Binv)
    h_omega = apply_many(apply_H, apply_H_batch, probes)
    y = apply_many(apply_Binv, None, h_omega)
    for h in h_omega:
        h.destroy()
    return _second_pass(apply_H, apply_H_batch, apply_B, y, k)


def _second_pass(apply_H, apply_H_batch, apply_B, y, k) -> Eigenpairs:
    q, _ = b_orthonormalize(y, apply_B)
    hq = apply_many(apply_H, apply_H_batch, q)
    return _rayleigh_ritz(q, hq, k)


def adaptive_rank(
    apply_H,
    apply_B,
    apply_Binv,
    make_probe: Callable[[int], PETSc.Vec],
    *,
    threshold: float = 0.1,
    max_rank: int = 50,
    oversampling: int = 10,
    start: int = 10,
    apply_H_batch: ApplyBatch | None = None,
) -> Eigenpairs:
    """Double-pass eigensolver whose rank doubles until the spectrum falls below a threshold.

    Starts with ``k = start`` and ``k + oversampling`` probes; while the smallest of the ``k``
    computed eigenvalues is still ``>= threshold`` and ``k < max_rank``, ``k`` doubles (capped
    at ``max_rank``), new probes ``make_probe(i)`` are added and the second pass is redone.
    The first-pass products ``B^{-1} H omega_i`` of earlier probes are kept, so each doubling
    costs the new probes' first pass plus one full second pass.

    Args:
        apply_H: as in :func:`double_pass_generalized`.
        apply_B: as in :func:`double_pass_generalized`.
        apply_Binv: as in :func:`double_pass_generalized`.
        apply_H_batch: as in :func:`double_pass_generalized`.
        make_probe: ``make_probe(i)`` returns the ``i``-th random probe vector (seeded by ``i``
            and global indices/coordinates, so identical on any number of ranks).
        threshold: stop once an eigenvalue below this is computed (hIPPYlib's 0.1: beyond it
            the data add less than 10% to the prior's information in that direction).
        max_rank: the cap on ``k``.
        oversampling: extra probes ``p``.
        start: initial ``k``.

    Returns:
        ``Eigenpairs`` with all ``k`` computed pairs (fewer if ``H`` has lower rank),
        eigenvalues descending; the caller may drop the pairs below ``threshold``.

    Raises:
        ValueError: on ``start < 1``, ``max_rank < 1``, ``oversampling < 0`` or
            ``threshold < 0``.
    """
    if start < 1 or max_rank < 1 or oversampling < 0 or threshold < 0:
        raise ValueError(
            "adaptive_rank needs start >= 1, max_rank >= 1, oversampling >= 0, threshold >= 0; "
            f"found {start=}, {max_rank=}, {oversampling=}, {threshold=}"
        )
    apply_H = as_apply(apply_H)
    apply_B = as_apply(apply_B)
    apply_Binv = as_apply(apply_Binv)
    k = min(start, max_rank)
    y: list[PETSc.Vec] = []
    while True:
        new = [make_probe(i) for i in range(len(y), k + oversampling)]
        h_new = apply_many(apply_H, apply_H_batch, new)
        y.extend(apply_many(apply_Binv, None, h_new))
        for v in h_new:
            v.destroy()
        pairs = _second_pass(apply_H, apply_H_batch, apply_B, y, k)
        found = len(pairs.eigenvalues)
        if found < k or pairs.eigenvalues[-1] < threshold or k >= max_rank:
            return pairs
        k = min(2 * k, max_rank)


class OmittedSpectrum(NamedTuple):
    """What a truncated eigendecomposition leaves out of ``Gamma_prior H``.

    Attributes:
        trace: randomized estimate of the trace of ``Gamma_prior H`` on the B-orthogonal
            complement of the kept vectors: the sum of the omitted eigenvalues (the
            information the low-rank posterior ignores).
        trace_error: its standard error (the samples' std over sqrt(samples)).
        largest: estimate of the largest omitted eigenvalue (a Rayleigh quotient of the
            projected operator after a few power steps: a lower bound, up to sampling).
        samples: prior samples used (Hessian actions: ``samples + power_steps + 1``).
    """

    trace: float
    trace_error: float
    largest: float
    samples: int


def omitted_spectrum(
    apply_H,
    apply_B,
    apply_Binv,
    pairs: Eigenpairs,
    prior_sample: Callable[[int], PETSc.Vec],
    *,
    samples: int = 10,
    power_steps: int = 4,
    apply_H_batch: ApplyBatch | None = None,
) -> OmittedSpectrum:
    """Estimate the part of ``H v = lambda B v`` that ``pairs`` does not hold.

    With ``Pi = I - V V^T B`` the B-orthogonal projector onto the complement of the kept
    vectors, the omitted operator is ``T = Pi Gamma_prior H Pi`` (self-adjoint in the B inner
    product, positive semi-definite for a semi-definite ``H``, and equal to the deflated
    ``Gamma_prior H - V L V^T B`` when ``V`` holds exact eigenvectors; with Ritz vectors the
    projection keeps it semi-definite). For ``z ~ N(0, Gamma_prior)``,
    ``E[(Pi z)^T H (Pi z)] = tr(T)`` (Hutchinson's estimator in the prior's geometry, one
    Hessian action per sample). The largest omitted eigenvalue is estimated by ``power_steps``
    power iterations of ``T`` started from the sum of the projected samples (the Rayleigh
    quotient ``x^T H x / x^T B x``: a lower bound up to sampling; the trace bounds it above).

    Args:
        apply_H: ``out = H x`` (or a ``Mat``).
        apply_B: ``out = B x``, the prior precision (or a ``Mat``).
        apply_Binv: ``out = B^{-1} x``, the prior covariance (or a ``KSP``).
        pairs: the computed pairs (``V^T B V = I``).
        prior_sample: ``prior_sample(i)``: the ``i``-th sample of ``N(0, Gamma_prior)``, seeded
            from global indices (partition independent).
        samples: trace samples (>= 2).
        power_steps: power iterations for the largest omitted eigenvalue (>= 0).
        apply_H_batch: optional batched Hessian action.

    Returns:
        :class:`OmittedSpectrum` (identical on every rank).

    Raises:
        ValueError: on ``samples < 2`` or ``power_steps < 0``.
    """
    if samples < 2 or power_steps < 0:
        raise ValueError(f"need samples >= 2, power_steps >= 0; found {samples=}, {power_steps=}")
    apply_H, apply_B, apply_Binv = as_apply(apply_H), as_apply(apply_B), as_apply(apply_Binv)
    vs = list(pairs.eigenvectors)

    def project(xs):
        """``x <- Pi x`` in place (twice, for round-off); returns ``B x`` of the result."""
        bx = apply_many(apply_B, None, xs)
        for _ in range(2 if vs else 0):
            coef = gram(vs, bx)
            for j, x in enumerate(xs):
                for c, v in zip(coef[:, j], vs, strict=True):
                    x.axpy(-float(c), v)
            for b in bx:
                b.destroy()
            bx = apply_many(apply_B, None, xs)
        return bx

    zs = [prior_sample(i) for i in range(samples)]
    bzs = project(zs)
    hzs = apply_many(apply_H, apply_H_batch, zs)
    quad = np.array([z.dot(hz) for z, hz in zip(zs, hzs, strict=True)])
    trace = float(np.mean(quad))
    trace_error = float(np.std(quad, ddof=1) / np.sqrt(samples))
    x = zs[0].duplicate()
    x.set(0.0)
    for z in zs:
        x.axpy(1.0, z)
    for v in (*zs, *hzs, *bzs):
        v.destroy()
    largest = 0.0
    for step in range(power_steps + 1):
        (bx,) = project([x])
        (hx,) = apply_many(apply_H, apply_H_batch, [x])
        bnorm2 = x.dot(bx)
        largest = float(x.dot(hx) / bnorm2) if bnorm2 > 0 else 0.0
        if step < power_steps and bnorm2 > 0:
            y = x.duplicate()
            apply_Binv(hx, y)  # Gamma_prior H x; projected at the next step
            y.scale(1.0 / np.sqrt(bnorm2))
            x.destroy()
            x = y
        bx.destroy()
        hx.destroy()
    x.destroy()
    return OmittedSpectrum(trace, trace_error, largest, samples)
