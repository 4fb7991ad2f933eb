"""The twin-experiment cases shared by the tests and the benchmarks (one ``case.toml`` text).

:func:`write_case` writes the tiny disc-particle case of the workflow tests (``tests`` import it
through ``workflow_case``), :func:`write_synthetic_case` the many-particle cases of the
inversion benchmarks; both write the same ``case.toml`` (:func:`case_toml`), with the data
simulated next by ``femkin simulate``. Importable from the tests (pytest's ``pythonpath``) and
from the benchmark scripts (their own folder is on ``sys.path``).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np

from femkin.io.video import Video, write_video

#: Pixel size of the twin videos, um.
PIXEL_SIZE = 0.05

CASE_TOML = """
[data]
video = "data/video.npz"
[mesh]
size = {mesh_size}
[model]
kappa = 0.004
mu_h = [2.5, 0.0]
j0 = [0.0]
k0 = 1.0e-3
[solver]
scheme = "euler"
dc_max = 0.08
[driving]
t = [0.0, 400.0]
mu_e = [1.0, 2.5]
[simulate]
noise = 0.05
seed = 3
m_std = 0.4
m_length = 0.2
mesh_size = {sim_mesh_size}
outputs = {outputs}
[simulate.model]
mu_h = [3.0, 0.3]
j0 = [-0.4]
k0 = 2.0e-3
[inversion]
learn = {learn}
max_iterations = {max_iterations}
{checkpoint}[inversion.prior]
m_std = 0.5
m_length = 0.15
[verify]
steps = {steps}
"""


def case_toml(
    *,
    mesh_size: float = 1.5,
    sim_mesh_size: float = 1.0,
    max_iterations: int = 4,
    learn: Sequence[str] = ("mu_h", "j0", "k0", "m"),
    outputs: Sequence[str] = ("npz", "png"),
    checkpoint_every: int | None = None,
    steps: Sequence[float] = (0.04, 0.02, 0.01, 0.005),
) -> str:
    """The ``case.toml`` text of a twin case (true model in ``[simulate]``, fit in ``[inversion]``).

    Args:
        mesh_size: fitting mesh element size (pixels).
        sim_mesh_size: simulation mesh element size (pixels).
        max_iterations: TAO iterations of the fit.
        learn: the ``[inversion] learn`` blocks.
        outputs: the ``[simulate] outputs``.
        checkpoint_every: ``[inversion] checkpoint_every`` (left at its default if None).
        steps: the ``[verify] steps``.
    """
    return CASE_TOML.format(
        mesh_size=mesh_size,
        sim_mesh_size=sim_mesh_size,
        max_iterations=max_iterations,
        learn=json.dumps(list(learn)),
        outputs=json.dumps(list(outputs)),
        checkpoint="" if checkpoint_every is None else f"checkpoint_every = {checkpoint_every}\n",
        steps=json.dumps(list(steps)),
    )


def write_case(
    root: pathlib.Path, *, labels: int = 1, max_iterations: int = 4, n_frames: int = 5
) -> pathlib.Path:
    """A case with ``labels`` disc-like particles of ~60 pixels each, 0.05 um pixels."""
    root = pathlib.Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    H, W = 12, 12 * labels
    mask = np.zeros((H, W), dtype=np.int64)
    ii, jj = np.mgrid[0:H, 0:W]
    for lb in range(labels):
        cx, cy = 5.5 + 12 * lb, 5.5
        mask[((jj - cx) / 4.6) ** 2 + ((ii - cy) / 4.0) ** 2 <= 1.0] = lb + 1
    t = np.linspace(0.0, 400.0, n_frames)
    c = np.full((n_frames, H, W), np.nan)
    c[0][mask > 0] = 0.1 + 0.02 * np.cos(ii[mask > 0] / 3.0)
    video = Video(c, mask, t, PIXEL_SIZE, mu_e=np.full(n_frames, 1.0))
    write_video(root / "data" / "video.npz", video)
    (root / "case.toml").write_text(case_toml(max_iterations=max_iterations))
    return root


def synthetic_mask(n_particles: int, pixels: float, seed: int = 11) -> tuple[np.ndarray, list]:
    """Label image of ``n_particles`` ellipses of about ``pixels`` pixels each.

    Returns (mask, per-particle (cy, cx, c_init)). Every particle's shape and initial Li
    fraction come from ``default_rng([seed, index])``, independent of the other particles.
    """
    shapes = []
    for i in range(n_particles):
        rng = np.random.default_rng([seed, i])
        area = pixels * rng.uniform(0.85, 1.15)
        aspect = rng.uniform(1.1, 1.8)
        b = np.sqrt(area / (np.pi * aspect))
        shapes.append((aspect * b, b, rng.uniform(0, np.pi), rng.uniform(0.06, 0.2)))
    cell = int(np.ceil(2 * max(s[0] for s in shapes))) + 4
    n_cols = int(np.ceil(np.sqrt(n_particles)))
    n_rows = int(np.ceil(n_particles / n_cols))
    mask = np.zeros((n_rows * cell, n_cols * cell), dtype=np.int64)
    ii, jj = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    placed = []
    for i, (a, b, theta, c_init) in enumerate(shapes):
        cy, cx = (i // n_cols + 0.5) * cell - 0.5, (i % n_cols + 0.5) * cell - 0.5
        u = (jj - cx) * np.cos(theta) + (ii - cy) * np.sin(theta)
        v = -(jj - cx) * np.sin(theta) + (ii - cy) * np.cos(theta)
        mask[(u / a) ** 2 + (v / b) ** 2 <= 1.0] = i + 1
        placed.append((cy, cx, c_init))
    return mask, placed


def write_synthetic_case(
    root,
    n_particles: int,
    *,
    pixels: float = 60.0,
    n_frames: int = 5,
    max_iterations: int = 4,
    learn=("mu_h", "j0", "k0", "m"),
    mesh_size: float = 1.5,
    sim_mesh_size: float = 1.0,
    seed: int = 11,
) -> pathlib.Path:
    """Write a twin case of ``n_particles`` particles into ``root`` (run ``simulate`` next).

    Args:
        root: the case directory (created).
        n_particles: number of particles (labels 1..n).
        pixels: mean pixel count per particle.
        n_frames: frames over 0..400 s (frame 0 is the given initial state).
        max_iterations: TAO iterations of the fit.
        learn: the ``[inversion] learn`` blocks.
        mesh_size: fitting mesh element size (pixels).
        sim_mesh_size: simulation mesh element size (pixels).
        seed: seed of the particle shapes.

    Returns:
        The case directory.
    """
    root = pathlib.Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    mask, placed = synthetic_mask(n_particles, pixels, seed)
    ii, jj = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    t = np.linspace(0.0, 400.0, n_frames)
    c = np.full((n_frames,) + mask.shape, np.nan)
    for i, (cy, cx, c_init) in enumerate(placed):
        inside = mask == i + 1
        c[0][inside] = c_init + 0.02 * np.cos((ii[inside] - cy) / 3.0) * np.sin(
            (jj[inside] - cx) / 4.0
        )
    write_video(
        root / "data" / "video.npz", Video(c, mask, t, PIXEL_SIZE, mu_e=np.full(n_frames, 1.0))
    )
    (root / "case.toml").write_text(
        case_toml(
            mesh_size=mesh_size,
            sim_mesh_size=sim_mesh_size,
            max_iterations=max_iterations,
            learn=learn,
            outputs=("npz",),
            checkpoint_every=1000000,
        )
    )
    return root
