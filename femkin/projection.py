"""Pixel images onto a particle's P1 space: the inverse direction of :mod:`femkin.observation`.

:func:`image_at` interpolates a pixel image at mesh points (NaN-aware), :func:`smoothed` applies
a Helmholtz smoothing on the mesh, and :func:`initial_state` combines both into the initial c
of a forward run from a video's first frame (used by the inverse problem and by twin data).
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi

from femkin._fem import PETSc, dolfinx, ufl

#: The projected first frame is kept this far inside (0, 1), where ln(c / (1 - c)) is finite.
C_CLIP = 1e-3


def image_at(
    image: np.ndarray, inside: np.ndarray, points: np.ndarray, pixel_size: float
) -> np.ndarray:
    """Bilinear interpolation of a pixel image at points (um), NaN-aware.

    Pixels that are NaN or outside ``inside`` take the value of the nearest valid pixel first,
    so values near the particle boundary are not polluted by the background.
    """
    valid = inside & np.isfinite(image)
    if not valid.any():
        raise ValueError("no valid pixel to interpolate from")
    _, (ri, ci) = ndi.distance_transform_edt(~valid, return_indices=True)
    filled = image[ri, ci]
    rows = points[:, 1] / pixel_size - 0.5
    cols = points[:, 0] / pixel_size - 0.5
    return ndi.map_coordinates(filled, [rows, cols], order=1, mode="nearest")


def smoothed(V, values: np.ndarray, length: float, prefix: str = "femkin_smoothing_") -> np.ndarray:
    """Helmholtz smoothing: solve (c, v) + length^2 (grad c, grad v) = (f, v) on V.

    Args:
        V: a P1 space.
        values: f as owned + ghost values.
        length: smoothing length (um); 0 returns the values unchanged.
        prefix: PETSc options prefix of the solve.

    Returns:
        The smoothed field, owned + ghost values.
    """
    if length <= 0:
        return values.copy()
    f = dolfinx.fem.Function(V)
    f.x.array[:] = values
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    ell2 = dolfinx.fem.Constant(V.mesh, PETSc.ScalarType(length**2))
    a = u * v * ufl.dx + ell2 * ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx
    problem = dolfinx.fem.petsc.LinearProblem(
        a,
        f * v * ufl.dx,
        petsc_options_prefix=prefix,
        petsc_options={"ksp_type": "cg", "pc_type": "jacobi", "ksp_rtol": 1e-12},
    )
    out = problem.solve()
    return out.x.array.copy()


def initial_state(
    V, frame: np.ndarray, inside: np.ndarray, pixel_size: float, smoothing: float
) -> np.ndarray:
    """The initial c on ``V`` from a first frame: interpolated, smoothed, clipped to (0, 1).

    Args:
        V: the particle's P1 space.
        frame: (H, W) Li fraction, NaN where not observed.
        inside: (H, W) mask of the particle's pixels.
        pixel_size: um.
        smoothing: Helmholtz smoothing length (um), the case's ``[model] initial_smoothing``.

    Returns:
        c at the dofs of ``V`` (owned + ghost values), in ``[C_CLIP, 1 - C_CLIP]``.
    """
    raw = image_at(frame, inside, V.tabulate_dof_coordinates(), pixel_size)
    return np.clip(smoothed(V, raw, smoothing), C_CLIP, 1 - C_CLIP)
