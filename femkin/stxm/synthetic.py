"""Synthetic STXM stacks of LiFePO4 particles with a known Li map, known reference spectra,
known drift and Poisson noise: the truth behind the round-trip tests and demos.

The scene is analytic and is evaluated at the drifted pixel positions, so the drift is exact
(no interpolation). Particles are ellipses with soft edges (``tanh``, 0.6 px) and a dome
thickness; the Li fraction is a tanh phase boundary moving across them over time.
"""

from __future__ import annotations

import datetime
from typing import NamedTuple

import numpy as np

from femkin.stxm.stack import Stack

# (centre row, centre col, semi-axis rows, semi-axis cols) in pixels
PARTICLES = ((16.0, 15.0, 9.0, 7.5), (30.0, 33.0, 7.0, 9.5))


def reference_spectra(energies: np.ndarray) -> np.ndarray:
    """Fe L3-like spectra ``(E, 2)`` of LiFePO4 (Fe2+, 708 eV) and FePO4 (Fe3+, 710 eV).

    Both have a 0.2 pre-edge, an edge step of 0.5 and a white line; they are normalised to the
    same post-edge level.
    """
    e = np.asarray(energies, dtype=np.float64)
    step = 0.5 * (0.5 + np.arctan((e - 709.0) / 0.6) / np.pi)
    lfp = (
        0.2
        + step
        + 1.4 * np.exp(-0.5 * ((e - 708.0) / 0.7) ** 2)
        + 0.3 * np.exp(-0.5 * ((e - 710.5) / 0.8) ** 2)
    )
    fp = (
        0.2
        + step
        + 0.35 * np.exp(-0.5 * ((e - 708.0) / 0.7) ** 2)
        + 1.3 * np.exp(-0.5 * ((e - 710.2) / 0.7) ** 2)
    )
    return np.stack([lfp, fp], axis=1)


def scene(rows: np.ndarray, cols: np.ndarray, time: float) -> tuple[np.ndarray, np.ndarray]:
    """Thickness (OD per unit spectrum) and Li fraction at pixel coordinates, at ``time`` in
    [0, 1]. Returns ``(thickness, c)`` broadcast over ``rows``, ``cols``.
    """
    thick = np.zeros(np.broadcast(rows, cols).shape)
    for r0, c0, a, b in PARTICLES:
        rho = np.sqrt(((rows - r0) / a) ** 2 + ((cols - c0) / b) ** 2)
        edge = 0.5 * (1 - np.tanh((rho - 1.0) * min(a, b) / 0.6))
        thick += edge * (0.35 + 0.4 * np.sqrt(np.clip(1 - rho**2, 0, None)))
    front = 8.0 + 30.0 * time  # a phase boundary moving along rows + cols
    c = 0.15 + 0.7 * 0.5 * (1 - np.tanh((rows + 0.6 * cols - front) / 3.0))
    return thick, c


def true_mask(shape: tuple[int, int], shift: np.ndarray | None = None) -> np.ndarray:
    """Particle support (``rho < 1``) displaced by ``shift`` (none by default), labelled 1..N."""
    shift = np.zeros(2) if shift is None else np.asarray(shift, dtype=np.float64)
    rows, cols = np.indices(shape, dtype=np.float64)
    out = np.zeros(shape, dtype=np.int64)
    for k, (r0, c0, a, b) in enumerate(PARTICLES, start=1):
        rho = np.sqrt(((rows - shift[0] - r0) / a) ** 2 + ((cols - shift[1] - c0) / b) ** 2)
        out[rho < 1] = k
    return out


class Synthetic(NamedTuple):
    """Stacks and the truth: ``drift (T, E, 2)`` displacements in pixels, ``c (T, H, W)`` and
    ``thickness (T, H, W)`` in the undrifted frame, the references and the frame times.
    """

    stacks: list[Stack]
    drift: np.ndarray
    c: np.ndarray
    thickness: np.ndarray
    energies: np.ndarray
    references: np.ndarray
    times: np.ndarray


def make_synthetic(
    *,
    shape: tuple[int, int] = (48, 48),
    n_times: int = 3,
    energies: np.ndarray | None = None,
    i0: float = 4000.0,
    pixel_size: float = 0.05,
    max_drift: float = 1.5,
    time_drift: float = 3.0,
    seed: int = 0,
) -> Synthetic:
    """Make ``n_times`` stacks of the synthetic scene.

    Args:
        shape: image rows, columns.
        n_times: number of stacks (frames of the video), 60 s apart.
        energies: photon energies (eV); 12 energies over 704-716 eV by default.
        i0: incident counts per pixel (Poisson noise from it).
        pixel_size: micrometres.
        max_drift: largest drift between the energies of one stack (pixels).
        time_drift: largest extra drift of a whole stack (pixels).
        seed: random seed for drifts and noise.
    """
    rng = np.random.default_rng(seed)
    energies = np.linspace(704.0, 716.0, 12) if energies is None else np.asarray(energies)
    refs = reference_spectra(energies)
    rows, cols = np.indices(shape, dtype=np.float64)
    stack_drift = rng.uniform(-time_drift, time_drift, (n_times, 1, 2))
    stack_drift[0] = 0.0
    drift = stack_drift + rng.uniform(-max_drift, max_drift, (n_times, energies.size, 2))
    i0_e = i0 * (1.0 + 0.1 * np.sin(energies - energies[0]))  # beam flux varies with energy
    start = datetime.datetime(2023, 5, 4, 10, 0, 0)
    stacks, c_true, t_true = [], [], []
    times = np.arange(n_times) * 60.0
    for t in range(n_times):
        frac = t / max(n_times - 1, 1)
        th0, c0 = scene(rows, cols, frac)
        c_true.append(c0)
        t_true.append(th0)
        counts = np.empty((energies.size, *shape))
        for k in range(energies.size):
            th, c = scene(rows - drift[t, k, 0], cols - drift[t, k, 1], frac)
            od = th * (c * refs[k, 0] + (1 - c) * refs[k, 1])
            counts[k] = rng.poisson(i0_e[k] * np.exp(-od))
        stacks.append(
            Stack(
                energies=energies.copy(),
                x=np.arange(shape[1]) * pixel_size + 100.0,
                y=np.arange(shape[0]) * pixel_size - 20.0,
                counts=counts,
                dwell=np.full(energies.size, 1e-3),
                timestamp=start + datetime.timedelta(seconds=float(times[t])),
                metadata={"format": "synthetic"},
                source=f"synthetic-{t}",
            )
        )
    return Synthetic(stacks, drift, np.array(c_true), np.array(t_true), energies, refs, times)


def write_references_csv(path, energies: np.ndarray, spectra: np.ndarray) -> None:
    """Write ``energy, LiFePO4, FePO4`` as CSV."""
    with open(path, "w") as f:
        f.write("energy,LiFePO4,FePO4\n")
        for e, (a, b) in zip(energies, spectra, strict=True):
            f.write(f"{e:.4f},{a:.8f},{b:.8f}\n")
