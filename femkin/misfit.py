"""The pixel misfit of one particle (hIPPYlib's ``Misfit``: cost, adjoint source, GN source).

    J = 1/2 sum_f sum_p w_{f,p} ((B c(t_f))_p - d_{f,p})^2,    w = 1/sigma^2 (0: not observed)

over the frames ``f`` (frame 0 only when the initial state is learned: otherwise it is the
data the run starts from) and this rank's pixels ``p`` of the particle (``B`` the observation
operator, :mod:`femkin.observation`). Sums over ranks are the caller's (one ``allreduce``).
The sources are the callbacks that :class:`femkin.adjoint.ParticleDerivatives` adds to the
right-hand side of the adjoint at every step ``n`` of a trajectory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
        """dJ/du_n: adds ``B^T w (B u_n - d_f)`` at the frame steps."""
        frames = self.frames(traj)

        def source(n: int, out: np.ndarray) -> None:
            f = frames.get(n)
            if f is not None:
                r = self.obs.apply(traj.state(n)) - self.data[f]
                self.obs.apply_transpose(self.weight[f] * r, out)

        return source

    def gauss_newton_source(self, traj, tangents: Sequence[np.ndarray]) -> Source:
        """The Gauss-Newton source of a tangent trajectory: adds ``B^T w B du_n``."""
        frames = self.frames(traj)

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
