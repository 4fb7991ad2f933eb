"""Twin experiments: synthetic data from the ACR model with a known truth.

A twin experiment simulates every particle of a video (its mask, frame times, driving and
first frame) with true parameters and a true log-rate field ``m``, observes the result on the
pixels and adds Gaussian noise; fitting those data must recover the truth. This module holds
the numerics (the true ``m``, one particle's run, the noise); ``femkin simulate`` reads the
case, distributes the particles and writes the files.

Everything random is a function of the seed and of coordinates, frame or label indices, never
of the rank: the data are the same on any number of processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from femkin.errors import InputError
from femkin.forward import Trajectory
from femkin.observation import build_observation
from femkin.projection import image_at, initial_state


def random_m(coords, std: float, length: float, seed: int, n_features: int = 64):
    """A smooth random field of coordinates (random Fourier features), partition independent."""
    rng = np.random.default_rng([seed, 7919])
    omega = rng.standard_normal((n_features, 2)) / length
    phase = rng.uniform(0, 2 * np.pi, n_features)
    field = np.sqrt(2.0 / n_features) * np.cos(coords[:, :2] @ omega.T + phase).sum(axis=1)
    return std * field


def prior_m(V, std: float, length: float, seed: int, label: int):
    """A sample of the BiLaplacian prior (std, length) on ``V`` (owned + ghost values).

    The white noise is hashed from the seed, the label and the rounded dof coordinates, so the
    sample does not depend on the partition.
    """
    from femkin._fem import dolfinx
    from femkin.parameters import hashed_normal, rounded_coordinates
    from femkin.prior import BiLaplacianPrior

    prior = BiLaplacianPrior(V, std, length, options_prefix="femkin_truth_prior_")
    n_own = V.dofmap.index_map.size_local
    white = prior.create_vector()
    white.getArray()[:] = hashed_normal(
        seed, "m_truth", label, rounded_coordinates(V.tabulate_dof_coordinates()[:n_own])
    )
    out = prior.create_vector()
    prior.sample(white, out)
    f = dolfinx.fem.Function(V)
    f.x.array[:n_own] = out.getArray(readonly=True)
    f.x.scatter_forward()
    for v in (white, out):
        v.destroy()
    prior.destroy()
    return f.x.array.copy()


class TrueField(NamedTuple):
    """How the true m of a twin experiment is made (the ``[simulate]`` settings).

    Attributes:
        k_map: (H, W) map of k (1/s), or None.
        std: std of a random m (None or 0: m = 0 unless ``k_map`` is given).
        length: its correlation length (um).
        kind: ``"fourier"`` (random Fourier features) or ``"prior"`` (a BiLaplacian sample).
        seed: the random field's seed.
    """

    k_map: np.ndarray | None = None
    std: float | None = None
    length: float = 0.2
    kind: str = "fourier"
    seed: int = 0


def read_k_map(path: Path, mask: np.ndarray) -> np.ndarray:
    """Read and check an (H, W) ``.npy`` map of k (finite, positive on every particle pixel).

    Raises:
        InputError: an unreadable file, a shape other than the mask's or invalid values.
    """
    try:
        k_map = np.load(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a user error
        raise InputError(path, "k_map", "a readable .npy array", repr(err)) from None
    if k_map.shape != mask.shape:
        raise InputError(path, "k_map", f"shape {mask.shape} (the mask's)", k_map.shape)
    inside = mask > 0
    if not np.all(np.isfinite(k_map[inside]) & (k_map[inside] > 0)):
        raise InputError(
            path, "k_map", "finite k > 0 on every particle pixel", "non-positive or NaN values"
        )
    return k_map


def true_m(V, truth: TrueField, k0: float, mask: np.ndarray, label: int, pixel_size: float):
    """The true m = ln(k / k0) of particle ``label`` on ``V`` (owned + ghost values)."""
    coords = V.tabulate_dof_coordinates()
    if truth.k_map is not None:
        return image_at(np.log(truth.k_map / k0), mask == label, coords, pixel_size)
    if truth.std and truth.kind == "prior":
        return prior_m(V, truth.std, truth.length, truth.seed, label)
    if truth.std:
        return random_m(coords, truth.std, truth.length, truth.seed)
    return np.zeros(len(coords))


class ParticleTwin(NamedTuple):
    """One simulated particle on this rank's pixels.

    Attributes:
        trajectory: the forward run (for field output).
        pixels: flat pixel indices evaluated by this rank (c).
        clean: (T, len(pixels)) noise-free c at the frames.
        m_pixels: flat pixel indices evaluated by this rank (m, on the P1 space).
        m: the true m at those pixels.
    """

    trajectory: Trajectory
    pixels: np.ndarray
    clean: np.ndarray
    m_pixels: np.ndarray
    m: np.ndarray


def simulate_particle(
    model,
    video,
    label: int,
    driving,
    truth: TrueField,
    *,
    smoothing: float,
    on_frame=None,
    psf_fwhm: float | None = None,
) -> ParticleTwin:
    """Run one particle from the video's first frame with the true m; observe it on the pixels.

    Args:
        model: the particle's :class:`~femkin.forward.ParticleModel` (true parameters set).
        video: the video whose mask, times, pixel size and first frame are used.
        label: the particle's label.
        driving: its mu_e(t).
        truth: how the true m is made.
        smoothing: the first-frame smoothing length (um), as in the inversion.
        on_frame: called after every frame (progress).
        psf_fwhm: FWHM (um) of the PSF that blurs the pixels; None: point sampling.
    """
    ps = video.pixel_size
    model.set_m(true_m(model.V, truth, model.parameters.k0, video.mask, label, ps))
    c0 = initial_state(model.V, video.c[0], video.mask == label, ps, smoothing)
    traj = model.solve(video.t, driving, c0, on_frame=on_frame)
    obs = build_observation(model.W.sub(0), video.mask, label, ps, psf_fwhm=psf_fwhm)
    obs_V = build_observation(model.V, video.mask, label, ps)
    clean = np.stack([obs.apply(traj.state(n)) for n in traj.frame_steps])
    return ParticleTwin(traj, obs.pixels, clean, obs_V.pixels, obs_V.apply(model.m.x.array))


def with_noise(c: np.ndarray, noise: float, seed: int) -> np.ndarray:
    """``c`` (T, H, W) plus N(0, noise^2) per pixel; frame ``f`` draws from seed ``(seed, f)``.

    Frame 0 stays as given: it is the projection of the observed initial frame.
    """
    noisy = c.copy()
    if noise > 0:
        T, H, W = c.shape
        for f in range(1, T):
            rng = np.random.default_rng([int(seed), f])
            noisy[f] += noise * rng.standard_normal((H, W))
    return noisy
