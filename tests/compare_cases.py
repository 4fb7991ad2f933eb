"""Model-variant twins for ``femkin compare``: one simulated case and fits of its data.

:func:`write_twin` writes a twin case (the tiny disc particle of ``workflow_case``, frames over
``t_end`` seconds) whose truth uses the fixed j0 law ``c^p (1 - c)^q`` (no Legendre part, m = 0);
:func:`write_variant` a case that fits the twin's simulated video with another model (its own
``j0_prefactor``, Legendre coefficients and learned blocks), reading the data through
``[data] video = "../<twin>/simulated/video.npz"``.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from workflow_case import write_case

from femkin.io.video import Video, read_video, write_video

COMMON = """
[mesh]
size = 1.5
[model]
kappa = 0.004
mu_h = [2.5, 0.0]
j0 = {j0}
j0_prefactor = {pq}
k0 = 1.0e-3
[solver]
scheme = "euler"
dc_max = {dc_max}
[driving]
t = {knots}
mu_e = {mu_e}
[inversion]
learn = {learn}
max_iterations = {max_iterations}
[uq]
samples = 0
"""


def _common(pq, j0, learn, *, knots, mu_e, dc_max, max_iterations) -> str:
    return COMMON.format(
        j0=json.dumps(list(j0)),
        pq=json.dumps(list(pq)),
        learn=json.dumps(list(learn)),
        knots=json.dumps(list(knots)),
        mu_e=json.dumps(list(mu_e)),
        dc_max=dc_max,
        max_iterations=max_iterations,
    )


def write_twin(
    root: pathlib.Path,
    pq=(0.5, 1.5),
    *,
    n_frames: int = 5,
    t_end: float = 400.0,
    knots=(0.0, 400.0),
    mu_e=(1.0, 2.5),
    noise: float = 0.07,
    dc_max: float = 0.08,
    max_iterations: int = 60,
    learn=("mu_h", "k0"),
) -> pathlib.Path:
    """A twin whose truth is BV with ``j0 = c^p (1 - c)^q``; it fits the same law."""
    case = write_case(root, n_frames=n_frames)
    v = read_video(case / "data" / "video.npz")
    t = np.linspace(0.0, t_end, n_frames)
    write_video(case / "data" / "video.npz", Video(v.c, v.mask, t, v.pixel_size, mu_e=v.mu_e))
    (case / "case.toml").write_text(
        '[data]\nvideo = "data/video.npz"\n'
        + _common(
            pq,
            [],
            learn,
            knots=knots,
            mu_e=mu_e,
            dc_max=dc_max,
            max_iterations=max_iterations,
        )
        + f"""
[simulate]
noise = {noise}
seed = 3
m_std = 0.0
mesh_size = 1.0
outputs = ["npz"]
[simulate.model]
mu_h = [3.0, 0.3]
k0 = 2.0e-3
"""
    )
    return case


def write_variant(
    root: pathlib.Path,
    twin: str,
    pq,
    j0,
    learn,
    *,
    knots=(0.0, 400.0),
    mu_e=(1.0, 2.5),
    dc_max: float = 0.08,
    max_iterations: int = 60,
) -> pathlib.Path:
    """A case fitting the simulated video of the sibling case ``twin`` with another model."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "case.toml").write_text(
        f'[data]\nvideo = "../{twin}/simulated/video.npz"\n'
        f'truth = "../{twin}/simulated/truth.npz"\n'
        + _common(
            pq, j0, learn, knots=knots, mu_e=mu_e, dc_max=dc_max, max_iterations=max_iterations
        )
    )
    return root
