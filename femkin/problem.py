"""The inverse problem over all particles of a video: parameters -> forward runs -> pixel misfit.

:class:`InverseProblem` spreads the particles over MPI sub-communicators
(:func:`femkin.parallel.distribute`), builds one :class:`~femkin.forward.ParticleModel`, its
adjoint and its observation operator per particle, and lays every learned block out in one
:class:`~femkin.parameters.ParameterSpace` vector. It evaluates the misfit

    J(theta) = 1/2 sum_f sum_p ((B c(t_f))_p - d_{f,p})^2 / sigma_{f,p}^2

(NaN pixels excluded; frame 0 only when the initial state is learned), its gradient, and
Gauss-Newton or full Hessian actions, all as dual vectors over the parameter space. The
global gradient is reduced over all ranks; the answer does not depend on the partition.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from femkin._fem import MPI, PETSc, dolfinx
from femkin.adjoint import Direction, ParticleDerivatives, Sensitivities
from femkin.blocks import (
    BLOCKS,
    GLOBAL_BLOCKS,
    OBSERVATION_BLOCKS,
    PARTICLE_FIELD_BLOCKS,
    blocks_unused_by,
)
from femkin.driving import Driving
from femkin.errors import ConvergenceError, InputError
from femkin.forward import ModelParameters, ParticleModel, SolverOptions, Trajectory
from femkin.io.video import Video
from femkin.misfit import PixelMisfit
from femkin.observation import Observation, blurred_observation, build_observation
from femkin.parallel import Distribution
from femkin.parameters import FieldBlock, ParameterSpace, ParticleScalarBlock, ScalarBlock
from femkin.projection import initial_state


class Particle:
    """Everything about one particle on its sub-communicator.

    Its model, derivatives, observation and pixel misfit (frame 0 counts when
    ``include_first``, i.e. when the initial state is learned).
    """

    def __init__(
        self,
        label: int,
        mesh,
        video: Video,
        parameters: ModelParameters,
        solver: SolverOptions,
        sigma,
        initial_smoothing: float,
        *,
        include_first: bool = False,
        psf_fwhm: float | None = None,
        learn_psf: bool = False,
    ):
        self.label = label
        self.model = ParticleModel(mesh, parameters, solver=solver)
        self.derivs = ParticleDerivatives(self.model)
        ps = video.pixel_size
        self._mask, self._pixel_size = video.mask, ps
        self.learn_psf = learn_psf
        #: dB/ds and d^2B/ds^2 in the PSF block's coordinate s = ln psf_fwhm (when learned).
        self.dobs: Observation | None = None
        self.ddobs: Observation | None = None
        self.obs: Observation = self._observation(psf_fwhm)
        # Parameter fields (m, the initial state) are shown on the pixels, not observed.
        self.obs_V: Observation = build_observation(self.model.V, video.mask, label, ps)
        self.misfit = PixelMisfit.from_video(self.obs, video.c, sigma, include_first=include_first)
        self.n_observed = self.model.comm.allreduce(int(self.misfit.observed[1:].sum()), op=MPI.SUM)
        self.c0_data = initial_state(
            self.model.V, video.c[0], video.mask == label, ps, initial_smoothing
        )
        self._trajectory: Trajectory | None = None
        self.lambdas: list | None = None
        self.schedule: list[float] | None = None

    def _observation(self, psf_fwhm: float | None) -> Observation:
        W0, mask, label, ps = self.model.W.sub(0), self._mask, self.label, self._pixel_size
        if not self.learn_psf or psf_fwhm is None:
            return build_observation(W0, mask, label, ps, psf_fwhm=psf_fwhm)
        obs, d1, d2 = blurred_observation(W0, mask, label, ps, psf_fwhm, derivatives=2)
        f = psf_fwhm  # d/ds = f d/df, d^2/ds^2 = f d/df + f^2 d^2/df^2
        self.dobs = d1._replace(matrix=(f * d1.matrix).tocsr())
        self.ddobs = d2._replace(matrix=(f * d1.matrix + f * f * d2.matrix).tocsr())
        return obs

    def psf_derivatives(self) -> tuple[Observation, Observation]:
        """dB/ds and d^2B/ds^2, s = ln psf_fwhm (the PSF width must be learned)."""
        if self.dobs is None or self.ddobs is None:
            raise RuntimeError(f"particle {self.label}: the PSF width is not learned")
        return self.dobs, self.ddobs

    def set_psf(self, psf_fwhm: float) -> None:
        """Observe with another PSF width (um; collective on the particle's communicator)."""
        self.obs = self._observation(psf_fwhm)
        self.misfit.obs = self.obs  # same pixels, same owners: the data stay as they are

    @property
    def trajectory(self) -> Trajectory:
        """The forward trajectory at the current point (set by the last forward solve)."""
        if self._trajectory is None:
            raise RuntimeError(f"particle {self.label}: no forward solve at this point yet")
        return self._trajectory

    @trajectory.setter
    def trajectory(self, traj: Trajectory | None) -> None:
        self._trajectory = traj


class InverseProblem:
    """Misfit, gradient and Hessian actions over all particles of a video.

    Args:
        comm: the communicator of the whole run.
        video: the observed video (validated).
        meshes: ``{label: mesh}`` of the particles held by this rank's group (built on
            ``distribution.subcomm``), see :func:`build_meshes`.
        distribution: where the particles live.
        parameters: initial (and, for unlearned blocks, fixed) model parameters.
        learn: the blocks to fit (:data:`BLOCKS`).
        solver: time-stepping options.
        sigma: noise std (scalar or (T, H, W)).
        driving: ``{label: Driving}`` initial mu_e(t) per particle, knots at the frame times
            when "mu_e" is learned.
        initial_smoothing: smoothing length (um) of the first-frame projection.
        psf_fwhm: FWHM (um) of the instrument's PSF: blurred pixels
            (:func:`~femkin.observation.blurred_observation`); None: point sampling.
    """

    #: Memory (MiB per particle) for the tangent states of one batch of Hessian actions.
    BATCH_MB = 512.0

    def __init__(
        self,
        comm,
        video: Video,
        meshes: dict,
        distribution: Distribution,
        parameters: ModelParameters,
        learn: Sequence[str],
        solver: SolverOptions,
        sigma,
        driving: dict[int, Driving],
        initial_smoothing: float = 0.05,
        *,
        psf_fwhm: float | None = None,
    ):
        unknown = [b for b in learn if b not in BLOCKS]
        if unknown:
            raise InputError("<inverse problem>", "learn", f"blocks among {list(BLOCKS)}", unknown)
        unused = blocks_unused_by(parameters.kinetics, learn)
        if unused:
            raise InputError(
                "<inverse problem>",
                "learn",
                f"blocks that kinetics {parameters.kinetics!r} contains",
                unused,
            )
        if "psf_fwhm" in learn and psf_fwhm is None:
            raise InputError(
                "<inverse problem>",
                "psf_fwhm",
                "a starting PSF FWHM ([data] psf_fwhm) when 'psf_fwhm' is learned",
                None,
            )
        self.comm = comm
        self.video = video
        self.labels = [int(lb) for lb in video.labels]
        self.distribution = distribution
        self.parameters = parameters
        self.learn = tuple(b for b in BLOCKS if b in learn)
        self.include_first = "initial" in self.learn
        self.driving = driving
        self.psf_fwhm = psf_fwhm  # the current PSF width (um), None: point sampling
        self.psf_fwhm_start = float(psf_fwhm) if psf_fwhm is not None else float("nan")
        self.learn_psf = "psf_fwhm" in self.learn
        self.particles: dict[int, Particle] = {}
        for i in distribution.mine:
            label = self.labels[i]
            self.particles[label] = Particle(
                label,
                meshes[label],
                video,
                parameters,
                solver,
                sigma,
                initial_smoothing,
                include_first=self.include_first,
                psf_fwhm=psf_fwhm,
                learn_psf=self.learn_psf,
            )
            # Only the learned blocks' sensitivities are assembled at every step.
            self.particles[label].derivs.active = {
                b for b in learn if b in GLOBAL_BLOCKS or b in ("mu_e", "m")
            }
        sizes = parameters.block_values()
        scalar_blocks = [ScalarBlock(b, len(sizes[b])) for b in GLOBAL_BLOCKS if b in self.learn]
        scalar_blocks += [ScalarBlock(b, 1) for b in OBSERVATION_BLOCKS if b in self.learn]
        field_blocks = []
        for name in PARTICLE_FIELD_BLOCKS:
            if name in self.learn:
                for label in self.labels:
                    p = self.particles.get(label)
                    field_blocks.append(FieldBlock(name, label, p.model.V if p else None))
        pblocks = []
        if "mu_e" in self.learn:
            for i, label in enumerate(self.labels):
                root = distribution.group_root[distribution.owner[i]]
                pblocks.append(ParticleScalarBlock("mu_e", label, len(driving[label].values), root))
        self.space = ParameterSpace(comm, scalar_blocks, field_blocks, pblocks)
        self.n_observed = comm.allreduce(
            sum(p.n_observed for p in self.particles.values() if p.model.comm.rank == 0), op=MPI.SUM
        )
        self.counters = {"forward": 0, "gradient": 0, "hessian": 0}
        self._x_last = None
        # Adaptive steps make J(x) piecewise smooth (a different step sequence per x), which
        # stalls line searches near the optimum; the first run's steps are therefore kept
        # (re-adapted only where Newton fails on them) and saved with the checkpoints.
        self.freeze = True

    # -- parameter vector <-> models --------------------------------------------------------------
    def initial_vector(self) -> PETSc.Vec:
        """The starting point: case values, m = 0, the data's mu_e, the projected first frame."""
        x = self.space.create_vector()
        values = self.parameters.block_values()
        for b in GLOBAL_BLOCKS:
            if b in self.learn:
                self.space.set_scalars(x, b, values[b])
        if self.learn_psf:
            self.space.set_scalars(x, "psf_fwhm", [np.log(self.psf_fwhm_start)])
        for label, p in self.particles.items():
            if "initial" in self.learn:
                self.space.field_view(x, "initial", label)[:] = p.c0_data[
                    : len(self.space.field_view(x, "initial", label))
                ]
            if "mu_e" in self.learn:
                self.space.set_scalars(x, "mu_e", self.driving[label].values, label)
        return x

    def parameters_at(self, x: PETSc.Vec) -> ModelParameters:
        """Global model parameters at x (collective)."""
        values = {b: self.space.get_scalars(x, b) for b in GLOBAL_BLOCKS if b in self.learn}
        return self.parameters.with_blocks(values)

    def psf_at(self, x: PETSc.Vec) -> float | None:
        """The PSF FWHM (um) at x, learned (the block holds its log) or fixed (collective)."""
        if not self.learn_psf:
            return self.psf_fwhm
        return float(np.exp(np.clip(self.space.get_scalars(x, "psf_fwhm")[0], -700.0, 700.0)))

    def _apply(self, x: PETSc.Vec) -> None:
        params = self.parameters_at(x)
        fwhm = self.psf_at(x)
        if self.learn_psf and fwhm is not None:
            if fwhm != self.psf_fwhm:
                for p in self.particles.values():
                    p.set_psf(fwhm)
                self.psf_fwhm = fwhm
        knots = {}
        if "mu_e" in self.learn:
            for label in self.labels:
                knots[label] = self.space.get_scalars(x, "mu_e", label)
        for label, p in self.particles.items():
            p.model.set_parameters(params)
            if "m" in self.learn:
                self.space.to_function(x, "m", label, p.model.m)
            if "mu_e" in self.learn:
                self.driving[label] = Driving(self.driving[label].t, knots[label])

    def _c0(self, x: PETSc.Vec, label: int) -> np.ndarray:
        p = self.particles[label]
        if "initial" not in self.learn:
            return p.c0_data
        f = dolfinx.fem.Function(p.model.V)
        self.space.to_function(x, "initial", label, f)
        return f.x.array.copy()

    # -- evaluations ------------------------------------------------------------------------------
    def misfit(self, x: PETSc.Vec, *, store_adjoint: bool = False) -> float:
        """Run every particle forward at x and return the misfit (collective)."""
        self._apply(x)
        local = 0.0
        failure = None
        for label, p in self.particles.items():
            c0 = self._c0(x, label)
            p.derivs.clear_cache()  # the kept factorisations belong to the old trajectory
            try:
                try:
                    p.trajectory = p.model.solve(
                        self.video.t, self.driving[label], c0, schedule=p.schedule
                    )
                except ConvergenceError:
                    if p.schedule is None:
                        raise
                    # The frozen steps are too long for these parameters: adapt afresh.
                    p.trajectory = p.model.solve(self.video.t, self.driving[label], c0)
                    p.schedule = list(p.trajectory.times)
            except ConvergenceError as err:
                failure = f"particle {label}: {err}"
                p.trajectory = None
                continue
            if self.freeze and p.schedule is None:
                p.schedule = list(p.trajectory.times)
            local += p.misfit.cost(p.trajectory)
        failures = self.comm.allgather(failure)
        failures = [f for f in failures if f]
        if failures:
            raise ConvergenceError(failures[0])
        self.counters["forward"] += 1
        self._x_last = x.copy()
        return self.comm.allreduce(local, op=MPI.SUM)

    def gradient(self, x: PETSc.Vec, g: PETSc.Vec) -> float:
        """Misfit and its dual gradient at x (runs the forward model)."""
        value = self.misfit(x)
        sens = {}
        for label, p in self.particles.items():
            sens[label], p.lambdas = p.derivs.adjoint(
                p.trajectory, p.misfit.source(p.trajectory), store=True
            )
        self._pack(sens, g)
        if self.learn_psf:
            local = 0.0
            for p in self.particles.values():
                local += p.misfit.observation_gradient(p.trajectory, p.psf_derivatives()[0])
            self.space.set_scalars(g, "psf_fwhm", [self.comm.allreduce(local, op=MPI.SUM)])
        self.counters["gradient"] += 1
        return value

    def _direction(self, v: PETSc.Vec) -> dict[int, Direction]:
        scalars = {b: self.space.get_scalars(v, b) for b in GLOBAL_BLOCKS if b in self.learn}
        knots = {}
        if "mu_e" in self.learn:
            for label in self.labels:
                knots[label] = self.space.get_scalars(v, "mu_e", label)
        out = {}
        for label, p in self.particles.items():
            dm = dc0 = dmu = None
            if "m" in self.learn:
                f = dolfinx.fem.Function(p.model.V)
                self.space.to_function(v, "m", label, f)
                dm = f.x.array.copy()
            if "initial" in self.learn:
                f = dolfinx.fem.Function(p.model.V)
                self.space.to_function(v, "initial", label, f)
                dc0 = f.x.array.copy()
            if "mu_e" in self.learn:
                dmu = self.driving[label].step_values(p.trajectory.times, knots[label])
            full = {
                k: scalars.get(k, np.zeros(len(vals)))
                for k, vals in self.parameters.block_values().items()
            }
            out[label] = Direction(full, m=dm, mu_e=dmu, c0=dc0)
        return out

    def hessian_mult(self, v: PETSc.Vec, out: PETSc.Vec, *, gauss_newton: bool = True) -> None:
        """Gauss-Newton (default) or full misfit Hessian action at the last gradient point."""
        self.hessian_mult_batch([v], [out], gauss_newton=gauss_newton)

    def hessian_mult_batch(
        self, vs: Sequence[PETSc.Vec], outs: Sequence[PETSc.Vec], *, gauss_newton: bool = True
    ) -> None:
        """Hessian actions on several vectors at the last gradient point (collective).

        Gauss-Newton actions of all vectors run through each particle's steps together (one
        Jacobian factorisation per step for all, in chunks whose tangent states fit in
        :attr:`BATCH_MB`); full-Hessian actions one after another.
        """
        if any(p.trajectory is None for p in self.particles.values()):
            raise RuntimeError("hessian_mult needs a gradient evaluation first")
        directions = [self._direction(v) for v in vs]
        # the PSF block: its direction, and this rank's part of its row of each action
        ds = [self.space.get_scalars(v, "psf_fwhm")[0] if self.learn_psf else 0.0 for v in vs]
        psf_rows = np.zeros(len(vs))
        sens: list[dict] = [{} for _ in vs]
        for label, p in self.particles.items():
            dirs = [d[label] for d in directions]

            def source(k, tang, *, second_order, p=p):
                if not self.learn_psf:
                    return p.misfit.gauss_newton_source(p.trajectory, tang)
                dobs, ddobs = p.psf_derivatives()
                psf_rows[k] += p.misfit.observation_hessian(
                    p.trajectory, tang, ds[k], dobs, ddobs, second_order=second_order
                )
                return p.misfit.tangent_source(
                    p.trajectory, tang, ds[k], dobs, second_order=second_order
                )

            if gauss_newton:
                # The tangent states of a batch are held in memory: at most BATCH_MB of them.
                state_bytes = 8.0 * len(p.model.u.x.array) * (p.trajectory.n_steps + 1)
                size = int(max(1, self.BATCH_MB * 2**20 // max(state_bytes, 1.0)))
                size = p.model.comm.allreduce(size, op=MPI.MIN)
                for first in range(0, len(dirs), size):
                    chunk = dirs[first : first + size]
                    tangs = p.derivs.tangent_many(p.trajectory, chunk)
                    results = p.derivs.adjoint_many(
                        p.trajectory,
                        [source(first + i, t, second_order=False) for i, t in enumerate(tangs)],
                    )
                    for k, (s_k, _) in enumerate(results, start=first):
                        sens[k][label] = s_k
            else:
                if p.lambdas is None:
                    raise RuntimeError("a full Hessian action needs the gradient at x first")
                for k, d in enumerate(dirs):
                    tang = p.derivs.tangent(p.trajectory, d)
                    sens[k][label] = p.derivs.second_order(
                        p.trajectory,
                        d,
                        p.lambdas,
                        tang,
                        source(k, tang, second_order=True),
                    )
        for k, (sens_k, out) in enumerate(zip(sens, outs, strict=True)):
            self._pack(sens_k, out)
            if self.learn_psf:
                row = self.comm.allreduce(float(psf_rows[k]), op=MPI.SUM)
                self.space.set_scalars(out, "psf_fwhm", [row])
        self.counters["hessian"] += len(vs)

    def _pack(self, sens: dict[int, Sensitivities], g: PETSc.Vec) -> None:
        """Write per-particle sensitivities into the dual vector g (collective)."""
        g.set(0.0)
        # Global blocks: each particle counted once (its sub-communicator's rank 0).
        totals = {}
        for b in GLOBAL_BLOCKS:
            if b in self.learn:
                local = np.zeros(len(self.parameters.block_values()[b]))
                for label, s in sens.items():
                    if self.particles[label].model.comm.rank == 0:
                        local += s.scalars[b]
                totals[b] = self.comm.allreduce(local, op=MPI.SUM)
                self.space.set_scalars(g, b, totals[b])
        for label, s in sens.items():
            p = self.particles[label]
            if "m" in self.learn:
                self.space.field_view(g, "m", label)[:] = s.m
            if "initial" in self.learn:
                self.space.field_view(g, "initial", label)[:] = s.c0
            if "mu_e" in self.learn:
                gk = self.driving[label].knot_gradient(p.trajectory.times, s.mu_e)
                self.space.set_scalars(g, "mu_e", gk, label)
        g.assemble()

    def schedules(self) -> dict[str, list[float]]:
        """The frozen step times of every particle, on every rank (collective)."""
        local = {
            str(lb): p.schedule
            for lb, p in self.particles.items()
            if p.schedule is not None and p.model.comm.rank == 0
        }
        merged: dict[str, list[float]] = {}
        for part in self.comm.allgather(local):
            merged.update(part)
        return merged

    def set_schedules(self, schedules: dict[str, list[float]]) -> None:
        """Restore frozen step times (e.g. from a checkpoint)."""
        for label, p in self.particles.items():
            if str(label) in schedules:
                p.schedule = list(schedules[str(label)])

    def set_newton_tolerances(self, rtol: float, atol: float) -> None:
        """Tighten the Newton tolerances of every particle's forward steps.

        For derivative checks: J is only as accurate as the Newton solves.
        """
        for p in self.particles.values():
            p.model.set_newton_tolerances(rtol, atol)

    def freeze_schedule(self) -> None:
        """Replay the current step sequence in later forward runs (for derivative checks)."""
        for p in self.particles.values():
            p.schedule = list(p.trajectory.times)

    # -- outputs ------------------------------------------------------------------------------
    def fitted_video(self) -> np.ndarray | None:
        """The model's c at every frame on the pixel grid (NaN outside), on rank 0."""
        T, H, W = self.video.c.shape
        local_pix, local_vals = [], []
        for p in self.particles.values():
            local_pix.append(p.obs.pixels)
            local_vals.append(
                np.stack(
                    [p.obs.apply(p.trajectory.state(n)) for n in p.trajectory.frame_steps], axis=1
                )
            )
        pix = np.concatenate(local_pix) if local_pix else np.zeros(0, int)
        vals = np.concatenate(local_vals) if local_vals else np.zeros((0, T))
        gathered = self.comm.gather((pix, vals), root=0)
        if self.comm.rank != 0:
            return None
        out = np.full((T, H * W), np.nan)
        for pp, vv in gathered:
            out[:, pp] = vv.T
        return out.reshape(T, H, W)

    def field_on_pixels(
        self, name: str, x: PETSc.Vec | None = None, arrays: dict[int, np.ndarray] | None = None
    ) -> np.ndarray | None:
        """A per-particle P1 field (block ``name`` of x, or given V arrays) on the pixel grid,
        NaN outside the particles; on rank 0.
        """
        H, W = self.video.mask.shape
        local = []
        for label, p in self.particles.items():
            if arrays is not None:
                vals = arrays[label]
            else:
                f = dolfinx.fem.Function(p.model.V)
                self.space.to_function(x, name, label, f)
                vals = f.x.array
            local.append((p.obs_V.pixels, p.obs_V.apply(vals)))
        gathered = self.comm.gather(local, root=0)
        if self.comm.rank != 0:
            return None
        out = np.full(H * W, np.nan)
        for part in gathered:
            for pix, vals in part:
                out[pix] = vals
        return out.reshape(H, W)
