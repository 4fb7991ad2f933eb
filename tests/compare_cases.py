"""Model-variant twins for ``femkin compare``: one simulated case and fits of its data.

:func:`write_twin` writes a twin case (the tiny disc particle of ``workflow_case``, frames over
``t_end`` seconds) whose truth uses the fixed j0 law ``c^p (1 - c)^q`` (no Legendre part, m = 0);
:func:`write_variant` a case that fits the twin's simulated video with another model (its own
``j0_prefactor``, Legendre coefficients and learned blocks), reading the data through
``[data] video = "../<twin>/simulated/video.npz"``.

Both take the kinetic law (``kinetics``: ``[model] kinetics``, and for a twin also its truth's;
``lam``: CIET's lambda, the truth's for a twin, the start and prior mean for a variant) and the
observation (``psf_fwhm``: the PSF FWHM in um of a twin's simulated data, or a variant's
``[data] psf_fwhm``). Left at ``None`` they write exactly the text of before (BV, point
sampling).
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
k0 = {k0}{law}
[solver]
{solver}
[driving]
t = {knots}
mu_e = {mu_e}
[inversion]
learn = {learn}
max_iterations = {max_iterations}
[uq]
samples = 0
"""


def _law(kinetics: str | None, lam: float | None) -> str:
    """The ``[model]`` (or ``[simulate.model]``) lines of a kinetic law; none for the default."""
    text = "" if kinetics is None else f'\nkinetics = "{kinetics}"'
    return text + ("" if lam is None else f"\nlambda = {lam}")


def _common(
    pq,
    j0,
    learn,
    *,
    knots,
    mu_e,
    dc_max,
    max_iterations,
    k0: float | None = None,
    kinetics: str | None = None,
    lam: float | None = None,
    time_tol: float | None = None,
) -> str:
    # backward Euler with dc_max; with time_tol, the variable-step BDF2 scheme at that tolerance
    solver = (
        f'scheme = "euler"\ndc_max = {dc_max}'
        if time_tol is None
        else f'scheme = "bdf2"\ntime_tol = {time_tol}'
    )
    return COMMON.format(
        k0="1.0e-3" if k0 is None else repr(k0),
        law=_law(kinetics, lam),
        solver=solver,
        j0=json.dumps(list(j0)),
        pq=json.dumps(list(pq)),
        learn=json.dumps(list(learn)),
        knots=json.dumps(list(knots)),
        mu_e=json.dumps(list(mu_e)),
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
    kinetics: str | None = None,
    lam: float | None = None,
    k0: float | None = None,
    true_k0: float | None = None,
    psf_fwhm: float | None = None,
    time_tol: float | None = None,
) -> pathlib.Path:
    """A twin whose truth is ``kinetics`` (default BV with ``j0 = c^p (1 - c)^q``) with CIET's
    ``lam``, rate constant ``true_k0`` (default 2e-3 1/s) and the PSF ``psf_fwhm``; it fits
    the same law from ``k0`` (default 1e-3 1/s; and ``[model] lambda`` at its default, 8.3 kT) with point sampling."""
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
            k0=k0,
            kinetics=kinetics,
            time_tol=time_tol,
        )
        + f"""
[simulate]
noise = {noise}
seed = 3
m_std = 0.0
mesh_size = 1.0
outputs = ["npz"]{"" if psf_fwhm is None else f"{chr(10)}psf_fwhm = {psf_fwhm}"}
[simulate.model]
mu_h = [3.0, 0.3]
k0 = {"2.0e-3" if true_k0 is None else repr(true_k0)}{_law(kinetics, lam)}
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
    kinetics: str | None = None,
    lam: float | None = None,
    k0: float | None = None,
    psf_fwhm: float | None = None,
    time_tol: float | None = None,
) -> pathlib.Path:
    """A case fitting the simulated video of the sibling case ``twin`` with another model
    (``kinetics``, CIET's starting ``lam``, the starting ``k0``, ``[data] psf_fwhm``)."""
    root.mkdir(parents=True, exist_ok=True)
    psf = "" if psf_fwhm is None else f"psf_fwhm = {psf_fwhm}\n"
    (root / "case.toml").write_text(
        f'[data]\nvideo = "../{twin}/simulated/video.npz"\n'
        f'truth = "../{twin}/simulated/truth.npz"\n'
        + psf
        + _common(
            pq,
            j0,
            learn,
            knots=knots,
            mu_e=mu_e,
            dc_max=dc_max,
            max_iterations=max_iterations,
            k0=k0,
            kinetics=kinetics,
            lam=lam,
            time_tol=time_tol,
        )
    )
    return root
