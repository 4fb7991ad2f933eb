"""The pixel misfit of one particle (hIPPYlib's ``Misfit``: cost, adjoint source, GN source).

    J = 1/2 sum_f sum_p w_{f,p} ((B c(t_f))_p - d_{f,p})^2,    w = 1/sigma^2 (0: not observed)

over the frames ``f`` (frame 0 only when the initial state is learned: otherwise it is the
data the run starts from) and this rank's pixels ``p`` of the particle (``B`` the observation
operator, :mod:`femkin.observation`). Sums over ranks are the caller's (one ``allreduce``).

With a model-error term (:meth:`PixelMisfit.with_model_error`, the approximation-error approach
of Kaipio and Somersalo) the noise covariance of the particle's counted pixels becomes
``W^{-1} + U U^T`` with ``U`` a few (``K``) directions over all its frames and pixels, and by
the Woodbury identity

    J = 1/2 r^T W r - 1/2 s^T M^{-1} s,    s = U^T W r,    M = I_K + U^T W U,

where ``r`` stacks the residuals ``B c(t_f) - d_f``. ``s`` is reduced over the particle's
communicator, and the correction counted once (on its rank 0).
The sources are the callbacks that :class:`femkin.adjoint.ParticleDerivatives` adds to the
right-hand side of the adjoint at every step ``n`` of a trajectory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from femkin.observation import Observation

Source = Callable[[int, np.ndarray], None]


class PixelMisfit:
    """Weighted least squares between observed pixels and a trajectory's frames.

    Args:
        obs: the particle's observation operator on the mixed space (c component).
        data: (T, n) observed c at this rank's pixels (values where ``weight`` is 0 unused).
        weight: (T, n) 1/sigma^2, 0 where not observed.
        include_first: whether frame 0 counts.
        observed: (T, n) which pixels hold data (default: ``weight > 0``).
    """

    def __init__(
        self,
        obs: Observation,
        data: np.ndarray,
        weight: np.ndarray,
        *,
        include_first: bool,
        observed: np.ndarray | None = None,
    ):
        self.obs = obs
        self.data = np.asarray(data, dtype=float)
        self.weight = np.asarray(weight, dtype=float)
        if self.data.shape != self.weight.shape or self.data.shape[1:] != obs.pixels.shape:
            raise ValueError(
                f"{self.data.shape=} and {self.weight.shape=} must both be (T, {obs.pixels.size})"
            )
        self.include_first = include_first
        self.observed = self.weight > 0 if observed is None else np.asarray(observed, dtype=bool)
        #: ``(U, M^{-1}, comm)`` of a model-error term, or None (noise only).
        self.model_error: tuple[np.ndarray, np.ndarray, Any] | None = None

    def with_model_error(self, directions: np.ndarray, comm) -> PixelMisfit:
        """A copy whose noise covariance is ``W^{-1} + U U^T`` (collective on ``comm``).

        Args:
            directions: (K, T, n) the columns of ``U`` at this rank's pixels (units of c);
                entries at pixels or frames that do not count are ignored.
            comm: the particle's communicator (``U`` spans all its ranks' pixels).

        Returns:
            The new misfit; with ``K = 0`` one without a model-error term.
        """
        out = PixelMisfit(
            self.obs,
            self.data,
            self.weight,
            include_first=self.include_first,
            observed=self.observed,
        )
        U = np.asarray(directions, dtype=float)
        if U.ndim != 3 or U.shape[1:] != self.data.shape:
            raise ValueError(f"{U.shape=} must be (K, {self.data.shape[0]}, {self.data.shape[1]})")
        if U.shape[0] == 0:
            return out
        counted = self.weight > 0
        if not self.include_first:
            counted[0] = False
        U = np.where(counted[None], U, 0.0)
        gram = comm.allreduce(np.einsum("ktn,tn,jtn->kj", U, self.weight, U))
        M = np.eye(U.shape[0]) + gram
        out.model_error = (U, np.linalg.inv(0.5 * (M + M.T)), comm)
        return out

    def _projected(self, traj, values) -> np.ndarray:
        """``M^{-1} U^T W v`` for ``v`` given per frame step by ``values(n, f)`` (collective)."""
        U, M_inv, comm = self.model_error  # type: ignore[misc]
        local = np.zeros(U.shape[0])
        for n, f in self.frames(traj).items():
            local += U[:, f] @ (self.weight[f] * values(n, f))
        return M_inv @ comm.allreduce(local)

    @classmethod
    def from_video(
        cls, obs: Observation, c: np.ndarray, sigma, *, include_first: bool
    ) -> PixelMisfit:
        """The misfit of a video at the pixels of ``obs``.

        Args:
            obs: the observation operator.
            c: (T, H, W) observed Li fraction, NaN where not observed.
            sigma: noise std, a scalar or a (T, H, W) array.
            include_first: whether frame 0 counts.
        """
        T = c.shape[0]
        d = np.stack([c[f].ravel()[obs.pixels] for f in range(T)])
        s = (
            np.broadcast_to(np.asarray(sigma, dtype=float), c.shape)
            if np.ndim(sigma)
            else np.full(c.shape, float(sigma))
        )
        s = np.stack([s[f].ravel()[obs.pixels] for f in range(T)])
        observed = np.isfinite(d)
        return cls(
            obs,
            np.where(observed, d, 0.0),
            np.where(observed, 1.0 / s**2, 0.0),
            include_first=include_first,
            observed=observed,
        )

    def frames(self, traj) -> dict[int, int]:
        """``{step: frame}`` of the frames that count."""
        return {n: f for f, n in enumerate(traj.frame_steps) if f > 0 or self.include_first}

    def cost(self, traj) -> float:
        """This rank's part of J for a trajectory."""
        total = 0.0
        for n, f in self.frames(traj).items():
            r = self.obs.apply(traj.state(n)) - self.data[f]
            total += 0.5 * float(np.sum(self.weight[f] * r * r))
        if self.model_error is not None:
            _, M_inv, comm = self.model_error
            a = self._projected(traj, lambda n, f: self.obs.apply(traj.state(n)) - self.data[f])
            if comm.rank == 0:  # s^T M^{-1} s = a^T M a, counted once per particle
                total -= 0.5 * float(a @ np.linalg.solve(M_inv, a))
        return total

    def standardised_residuals(self, traj) -> np.ndarray:
        """``(B u_n - d_f) / sigma`` at this rank's observed pixels of the frames that count.

        One flat array; the posterior predictive check compares it with N(0, 1).
        """
        out = []
        for n, f in self.frames(traj).items():
            seen = self.weight[f] > 0
            r = self.obs.apply(traj.state(n)) - self.data[f]
            out.append(r[seen] * np.sqrt(self.weight[f][seen]))
        return np.concatenate(out) if out else np.zeros(0)

    def source(self, traj) -> Source:
        """dJ/du_n: adds ``B^T w (B u_n - d_f)`` at the frame steps.

        With a model-error term ``B^T w (B u_n - d_f - U_f a)``, ``a = M^{-1} U^T W r``
        (collective on the particle's communicator when built).
        """
        frames = self.frames(traj)
        if self.model_error is not None:
            U = self.model_error[0]
            a = self._projected(traj, lambda n, f: self.obs.apply(traj.state(n)) - self.data[f])

            def corrected(n: int, out: np.ndarray) -> None:
                f = frames.get(n)
                if f is not None:
                    r = self.obs.apply(traj.state(n)) - self.data[f] - a @ U[:, f]
                    out += self.obs.matrix.T @ (self.weight[f] * r)

            return corrected

        def source(n: int, out: np.ndarray) -> None:
            f = frames.get(n)
            if f is not None:
                r = self.obs.apply(traj.state(n)) - self.data[f]
                self.obs.apply_transpose(self.weight[f] * r, out)

        return source

    def gauss_newton_source(self, traj, tangents: Sequence[np.ndarray]) -> Source:
        """The Gauss-Newton source of a tangent trajectory: adds ``B^T w B du_n``.

        With a model-error term ``B^T w (B du_n - U_f a)``, ``a = M^{-1} U^T W B du``
        (collective on the particle's communicator when built).
        """
        frames = self.frames(traj)
        if self.model_error is not None:
            U = self.model_error[0]
            a = self._projected(traj, lambda n, f: self.obs.apply(tangents[n]))

            def corrected(n: int, out: np.ndarray) -> None:
                f = frames.get(n)
                if f is not None:
                    r = self.obs.apply(tangents[n]) - a @ U[:, f]
                    out += self.obs.matrix.T @ (self.weight[f] * r)

            return corrected

        def source(n: int, out: np.ndarray) -> None:
            f = frames.get(n)
            if f is not None:
                self.obs.apply_transpose(self.weight[f] * self.obs.apply(tangents[n]), out)

        return source

    # -- a learned observation parameter s (the PSF width): B = B(s) -----------------------------
    # With dB = dB/ds and ddB = d^2B/ds^2 (:func:`femkin.observation.blurred_observation`), the
    # misfit's derivatives in s and their directional derivatives in (du, ds) follow; the state
    # does not depend on s, so no forward or adjoint solve is needed for them.

    def observation_gradient(self, traj, dobs: Observation) -> float:
        """This rank's part of dJ/ds: ``sum_f (w r_f) . (dB u_n)``."""
        total = 0.0
        for n, f in self.frames(traj).items():
            u = traj.state(n)
            r = self.obs.apply(u) - self.data[f]
            total += float(np.sum(self.weight[f] * r * dobs.apply(u)))
        return total

    def tangent_source(
        self,
        traj,
        tangents: Sequence[np.ndarray] | None,
        ds: float,
        dobs: Observation,
        *,
        second_order: bool,
    ) -> Source:
        """The derivative of the adjoint source in a direction (du, ds).

        Adds ``B^T w (B du_n + ds dB u_n)`` (Gauss-Newton), and ``ds dB^T w r_n`` with
        ``second_order`` (full Hessian). ``tangents`` None: du = 0.
        """
        frames = self.frames(traj)

        def source(n: int, out: np.ndarray) -> None:
            f = frames.get(n)
            if f is None:
                return
            u = traj.state(n)
            jv = ds * dobs.apply(u)
            if tangents is not None:
                jv = jv + self.obs.apply(tangents[n])
            self.obs.apply_transpose(self.weight[f] * jv, out)
            if second_order and ds != 0.0:
                r = self.obs.apply(u) - self.data[f]
                dobs.apply_transpose(ds * self.weight[f] * r, out)

        return source

    def observation_hessian(
        self,
        traj,
        tangents: Sequence[np.ndarray] | None,
        ds: float,
        dobs: Observation,
        ddobs: Observation | None,
        *,
        second_order: bool,
    ) -> float:
        """This rank's part of the s-row of the Hessian action in a direction (du, ds).

        ``sum_f (B du_n + ds dB u_n) . w (dB u_n)`` (Gauss-Newton), plus
        ``r_n . w (dB du_n + ds ddB u_n)`` with ``second_order``.
        """
        total = 0.0
        for n, f in self.frames(traj).items():
            u = traj.state(n)
            du_obs = dobs.apply(u)
            jv = ds * du_obs
            if tangents is not None:
                jv = jv + self.obs.apply(tangents[n])
            total += float(np.sum(jv * self.weight[f] * du_obs))
            if second_order:
                if ddobs is None:
                    raise ValueError("the full Hessian needs d^2B/ds^2 (ddobs)")
                r = self.obs.apply(u) - self.data[f]
                curv = ds * ddobs.apply(u)
                if tangents is not None:
                    curv = curv + dobs.apply(tangents[n])
                total += float(np.sum(r * self.weight[f] * curv))
        return total
