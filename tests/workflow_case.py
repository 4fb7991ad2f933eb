"""A tiny twin-experiment case written into a directory (shared by the workflow tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from femkin.io.video import Video, write_video

CASE_TOML = """
[data]
video = "data/video.npz"
[mesh]
size = 1.5
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
mesh_size = 1.0
outputs = ["npz", "png"]
[simulate.model]
mu_h = [3.0, 0.3]
j0 = [-0.4]
k0 = 2.0e-3
[inversion]
learn = ["mu_h", "j0", "k0", "m"]
max_iterations = {max_iterations}
[inversion.prior]
m_std = 0.5
m_length = 0.15
[verify]
steps = [0.04, 0.02, 0.01, 0.005]
"""


def write_case(root: Path, *, labels: int = 1, max_iterations: int = 4, n_frames: int = 5) -> Path:
    """A case with ``labels`` disc-like particles of ~60 pixels each, 0.05 um pixels."""
    root = Path(root)
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
    write_video(root / "data" / "video.npz", Video(c, mask, t, 0.05, mu_e=np.full(n_frames, 1.0)))
    (root / "case.toml").write_text(CASE_TOML.format(max_iterations=max_iterations))
    return root
