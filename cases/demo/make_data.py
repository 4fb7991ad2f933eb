"""Generate the demo case's input data (deterministic): ``data/video.npz`` and ``data/k_map.npy``.

One synthetic LiFePO4 platelet of irregular, rounded shape (~1200 pixels at 50 nm) in a 56x56
image. The video holds the mask, 13 frame times over 1500 s, the drive ``mu_e(t)`` (kT) and only
the first frame of ``c`` (0.1 plus a +-0.02 smooth variation); later frames are NaN until
``femkin simulate`` fills them. ``k_map.npy`` is the "true" heterogeneous rate
``k = K0 * exp(m)`` (1/s) on pixels, NaN outside the particle.

Edit the constants below and run ``python cases/demo/make_data.py`` to regenerate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from femkin.io import Video, pixel_centres, write_video

HERE = Path(__file__).resolve().parent
SEED = 2023
SHAPE = (56, 56)  # image rows, columns
PIXEL_SIZE = 0.05  # um
TARGET_PIXELS = 1200
T = np.linspace(0.0, 1500.0, 13)  # s: 13 frames keep the demo fit to a few CPU minutes
C0 = 0.1  # mean initial Li fraction
C0_VARIATION = 0.02  # amplitude of its smooth spatial variation
K0 = 1.5e-3  # 1/s, median of the true k map
M_STD = 0.4  # std of m = ln(k / K0) over the particle


MU_E_START, MU_E_END = 1.0, 2.5  # kT: a lithiating ramp above the spinodal peak of mu_h


def mu_e(t: np.ndarray) -> np.ndarray:
    """The reservoir chemical potential (kT) at times t (s): a linear lithiating ramp.

    It stays above the largest value of the true mu_h on (0.1, 0.9) (0.42 kT), so every pixel
    lithiates from c ~ 0.1 to c ~ 0.9 within the video, and rises with time so that the same c
    is reached under different overpotentials (this separates mu_h from j0 in the fit).
    """
    return MU_E_START + (MU_E_END - MU_E_START) * (t - t[0]) / (t[-1] - t[0])


def particle_mask(rng: np.random.Generator) -> np.ndarray:
    """An irregular rounded platelet: an elongated radial Fourier shape, scaled to ~TARGET."""
    rows, cols = SHAPE
    yy, xx = np.mgrid[:rows, :cols]
    cy, cx = (rows - 1) / 2 + 0.7, (cols - 1) / 2 - 0.4
    theta = np.arctan2(yy - cy, xx - cx)
    r = np.hypot(yy - cy, xx - cx)
    shape = 1.0 + 0.22 * np.cos(2 * (theta - 0.6))  # elongation of a platelet
    for n in (3, 4, 5):  # irregular, rounded bumps and dents
        a, phase = rng.uniform(0.02, 0.06), rng.uniform(0, 2 * np.pi)
        shape += a * np.cos(n * theta + phase)
    lo, hi = 5.0, 30.0  # bisect the radius scale for the target pixel count
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.sum(r < mid * shape) < TARGET_PIXELS else (lo, mid)
    mask = (r < hi * shape).astype(np.int64)
    border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
    if border.any():
        raise RuntimeError("the demo particle touches the image border")
    return mask


def smooth_field(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """A smooth field: a gradient plus ``n`` Gaussian bumps of either sign (zero mean, unit std)."""
    angle = rng.uniform(0, 2 * np.pi)
    f = np.cos(angle) * x + np.sin(angle) * y
    for _ in range(n):
        x0, y0 = rng.uniform(0.8, 2.0, 2)
        width = rng.uniform(0.25, 0.45)  # um
        f = f + rng.choice([-1.0, 1.0]) * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * width**2))
    return f


def main() -> None:
    rng = np.random.default_rng(SEED)
    mask = particle_mask(rng)
    inside = mask == 1
    x, y = pixel_centres(SHAPE, PIXEL_SIZE)

    variation = smooth_field(x, y, rng, n=2)
    variation -= variation[inside].mean()
    variation *= C0_VARIATION / np.abs(variation[inside]).max()
    c = np.full((T.size, *SHAPE), np.nan)
    c[0][inside] = C0 + variation[inside]

    m = smooth_field(x, y, rng, n=3)
    m -= m[inside].mean()
    m *= M_STD / m[inside].std()
    k_map = np.where(inside, K0 * np.exp(m), np.nan)

    data = HERE / "data"
    data.mkdir(exist_ok=True)
    write_video(data / "video.npz", Video(c=c, mask=mask, t=T, pixel_size=PIXEL_SIZE, mu_e=mu_e(T)))
    np.save(data / "k_map.npy", k_map)
    print(
        f"{int(inside.sum())} pixels; c0 in [{np.nanmin(c[0]):.4f}, {np.nanmax(c[0]):.4f}]; "
        f"k in [{np.nanmin(k_map):.3g}, {np.nanmax(k_map):.3g}] 1/s, std(ln k) = "
        f"{np.nanstd(np.log(k_map)):.3f}"
    )


if __name__ == "__main__":
    main()
