"""The global coefficients' Laplace marginal: the field volume term that the joint MAP ignores.

Split the parameters into the global coefficients ``theta`` (mu_h, j0, ln k0, ...) and the
rest ``u`` (the m fields, initial states, mu_e knots). The coefficients' marginal posterior
integrates ``u`` out; its Laplace approximation at fixed ``theta`` is

    -log p(theta | d) ~ J(theta, u*(theta)) + 1/2 log det P_uu(theta, u*(theta)) + const,

with ``J`` the negative log posterior, ``u*(theta)`` the best fields for those coefficients and
``P_uu = H_uu + B_uu`` the field block of the posterior precision (misfit Hessian plus prior
precision). The joint MAP point minimises ``J`` alone. The second term, the posterior volume
of the fields (smaller where the data inform them more), moves the marginal's mode away from
the joint MAP point, by an amount that grows with the number of informed field directions:
with a few dozen informed m dofs per particle it reaches a sizeable fraction of a posterior
std, always in the same direction, which biases the coefficients and their coverage.

One Newton step on the marginal from the MAP point (where ``grad J`` vanishes along the
conditional path) gives its mode:

    theta_marg = theta_MAP - C g,     g_j = d/dtheta_j 1/2 log det(I + B_uu^{-1} H_uu),

``C`` the coefficients' exact marginal covariance (:mod:`femkin.uq.marginals`). The derivative
is total: along ``t_j = (e_j, du*/dtheta_j)``, the posterior's conditional-mean direction,
``t_j = sum_k Gamma e_k (C^{-1})_kj`` from the marginals' columns ``Gamma e_k``. The log det is
taken on the informed field subspace: the field parts of the low-rank Hessian eigenvectors,
B-orthonormalised (``W^T B W = I``), as ``log det(I + W^T H W)``. Its slope comes from central
differences at ``x +- h sigma_j t_j`` (h = 1, halved where a perturbed run fails): per point
one forward run and one batched pass of ``rank(W)`` Hessian actions (they share each step's
factorisation). :func:`femkin.uq.laplace_study.marginal_mode` runs every point on its own
error-controlled time steps (a frozen step sequence often fails at perturbed points near
c = 1; on a benchmark twin the MAP point's log det agreed to 1e-12 relative either way).
Directions the eigenvectors do not reach (the cut spectrum) are left out; their eigenvalues are
below the rank decision's threshold, so their share of the log det and of its slope is small.

The routines take callables, not an inverse problem (``set_point(x)``: linearise at ``x``,
False if the forward model failed there), so they are tested on problems with a known log det.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from femkin._fem import PETSc
from femkin.uq.randomized import ApplyBatch, apply_many, as_apply, combine, gram, symmetric

__all__ = ["VolumeCorrection", "field_basis", "half_log_det", "volume_correction"]


class VolumeCorrection(NamedTuple):
    """The one-step move from the joint MAP point to the coefficients' marginal mode.

    Attributes:
        shift: ``theta_marg - theta_MAP``, in the coefficients' order.
        gradient: ``d/dtheta 1/2 log det(I + W^T H W)`` (total, along the conditional path).
        half_log_det: ``1/2 log det(I + W^T H W)`` at the MAP point.
        rank: the dimension of the field basis ``W``.
        hessian_actions: Hessian actions spent.
        forward_runs: forward runs spent (two per coefficient).
        failed: indices of coefficients whose perturbed forward runs failed at every step
            tried (slope taken 0).
        steps: the difference step used per coefficient.
    """

    shift: np.ndarray
    gradient: np.ndarray
    half_log_det: float
    rank: int
    hessian_actions: int
    forward_runs: int
    failed: list[int]
    steps: np.ndarray


def field_basis(
    vectors: Sequence[PETSc.Vec],
    zero_coefficients: Callable[[PETSc.Vec], None],
    apply_B,
    *,
    rtol: float = 1e-8,
) -> list[PETSc.Vec]:
    """A ``B``-orthonormal basis of the field parts of ``vectors`` (collective).

    Args:
        vectors: primal vectors (e.g. the low-rank Hessian eigenvectors); not modified.
        zero_coefficients: sets the global coefficients' entries of a vector to 0 in place.
        apply_B: ``out = B x``, the prior precision (block diagonal: fields and coefficients
            do not couple, so the field parts' ``B``-inner products are those of ``B_uu``).
        rtol: field parts whose Gram eigenvalue is below ``rtol`` times the largest are
            dropped (eigenvectors that live on the coefficients alone).

    Returns:
        New vectors ``W`` with ``W^T B W = I`` spanning the field parts.
    """
    if not vectors:
        return []
    parts = []
    for v in vectors:
        w = v.copy()
        zero_coefficients(w)
        parts.append(w)
    b_parts = apply_many(as_apply(apply_B), None, parts)
    g = symmetric(gram(parts, b_parts))
    s, q = np.linalg.eigh(g)
    keep = s > rtol * max(float(s.max()), 0.0) if s.size and s.max() > 0 else np.zeros(0, bool)
    basis = combine(parts, q[:, keep] / np.sqrt(s[keep])) if keep.any() else []
    for v in (*parts, *b_parts):
        v.destroy()
    return basis


def half_log_det(apply_H_batch: ApplyBatch, basis: Sequence[PETSc.Vec]) -> float:
    """``1/2 log det(I + W^T H W)`` for a ``B``-orthonormal ``W`` (one batched pass)."""
    if not basis:
        return 0.0
    hw = [w.duplicate() for w in basis]
    apply_H_batch(list(basis), hw)
    a = symmetric(gram(list(basis), hw))
    for v in hw:
        v.destroy()
    ev = np.linalg.eigvalsh(a)
    return 0.5 * float(np.sum(np.log1p(np.maximum(ev, -1.0 + 1e-12))))


def volume_correction(
    set_point: Callable[[PETSc.Vec], bool],
    apply_H_batch: ApplyBatch,
    basis: Sequence[PETSc.Vec],
    x: PETSc.Vec,
    directions: Sequence[PETSc.Vec],
    steps: np.ndarray,
    covariance: np.ndarray,
    *,
    max_halvings: int = 3,
) -> VolumeCorrection:
    """The marginal mode's shift ``-C g`` by central differences (collective).

    Args:
        set_point: ``set_point(y)`` linearises the Hessian at ``y``; returns False where the
            forward model fails. It is called at ``x`` last, so the caller's state is at
            ``x`` again afterwards.
        apply_H_batch: the misfit Hessian's batched action at the current point.
        basis: the field basis ``W`` (:func:`field_basis`).
        x: the MAP point (not modified).
        directions: ``t_j``, the conditional-mean direction of each coefficient (unit change
            of coefficient ``j``, the fields following).
        steps: the difference step of each coefficient (e.g. its posterior std); where a
            perturbed run fails the step is halved, up to ``max_halvings`` times.
        covariance: ``C``, the coefficients' marginal covariance.
        max_halvings: halvings of a step before the coefficient's slope is given up (0).

    Returns:
        The :class:`VolumeCorrection`.
    """
    steps = np.asarray(steps, dtype=float).copy()
    p = len(directions)
    gradient = np.zeros(p)
    failed: list[int] = []
    actions = forward = 0
    y = x.duplicate()
    for j, t in enumerate(directions):
        for _ in range(max_halvings + 1):
            values: list[float] = []
            for sign in (1.0, -1.0):
                x.copy(y)
                y.axpy(sign * steps[j], t)
                forward += 1
                if not set_point(y):
                    break
                values.append(half_log_det(apply_H_batch, basis))
                actions += len(basis)
            if len(values) == 2:
                gradient[j] = (values[0] - values[1]) / (2.0 * steps[j])
                break
            steps[j] *= 0.5  # the forward model fails that far out: closer in
        else:
            failed.append(j)
    y.destroy()
    forward += 1
    if not set_point(x):
        raise RuntimeError("the forward model failed at the MAP point it succeeded at before")
    centre = half_log_det(apply_H_batch, basis)
    actions += len(basis)
    shift = -np.asarray(covariance, dtype=float) @ gradient
    return VolumeCorrection(shift, gradient, centre, len(basis), actions, forward, failed, steps)
