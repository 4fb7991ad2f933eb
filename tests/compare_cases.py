"""Model-variant twins for ``femkin compare``: one simulated case and fits of its data.

:func:`write_twin` writes a twin case (the tiny disc particle of ``workflow_case``, frames over
``t_end`` seconds) whose truth uses the fixed j0 law ``c^p (1 - c)^q`` (no Legendre part, m = 0);
:func:`write_variant` a case that fits the twin's simulated video with another model (its own
``j0_prefactor``, Legendre coefficients and learned blocks), reading the data through
``[data] video = "../<twin>/simulated/video.npz"``.

Both take the kinetic law (``kinetics``: ``[model] kinetics``, and for a twin also its truth's;
``lam``: CIET's lambda, the truth's for a twin, the start and prior mean for a variant), the
observation (``psf_fwhm``: the PSF FWHM in um of a twin's simulated data, or a variant's
``[data] psf_fwhm``), the time scheme (``time_tol``: variable-step BDF2 at that tolerance instead
of backward Euler with ``dc_max``) and a rough rate field (``rough_k = (std, length)``: the
twin's true m drawn from the BiLaplacian prior of that std and length, um, which is also every
fit's ``[inversion.prior]`` of m). Left at ``None`` they write exactly the text of before (BV,
point sampling, backward Euler, uniform k).
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
{prior}"""


def _law(kinetics: str | None, lam: float | None) -> str:
    """The ``[model]`` (or ``[simulate.model]``) lines of a kinetic law; none for the default."""
    text = "" if kinetics is None else f'\nkinetics = "{kinetics}"'
    return text + ("" if lam is None else f"\nlambda = {lam}")


def _common(
    pq,
    j0,
    learn,
    *,
    knots=(0.0, 400.0),
    mu_e=(1.0, 2.5),
    dc_max: float = 0.08,
    max_iterations: int = 60,
    k0: float | None = None,
    kinetics: str | None = None,
    lam: float | None = None,
    time_tol: float | None = None,
    rough_k: tuple[float, float] | None = None,
) -> str:
    """The fit's part of a case.toml (model, driving, solver, inversion); ``write_twin`` and
    ``write_variant`` pass their fit settings through unchanged."""
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
        prior=""
        if rough_k is None
        else f"[inversion.prior]\nm_std = {rough_k[0]}\nm_length = {rough_k[1]}\n",
        j0=json.dumps(list(j0)),
        pq=json.dumps(list(pq)),
        learn=json.dumps(list(learn)),
        knots=json.dumps(list(knots)),
        mu_e=json.dumps(list(mu_e)),
        max_iterations=max_iterations,
    )


def _rough_truth(rough_k: tuple[float, float]) -> str:
    return f'm_std = {rough_k[0]}\nm_length = {rough_k[1]}\nm_field = "prior"'


def write_twin(
    root: pathlib.Path,
    pq=(0.5, 1.5),
    *,
    n_frames: int = 5,
    t_end: float = 400.0,
    noise: float = 0.07,
    learn=("mu_h", "k0"),
    kinetics: str | None = None,
    lam: float | None = None,
    true_k0: float | None = None,
    psf_fwhm: float | None = None,
    rough_k: tuple[float, float] | None = None,
    **fit,
) -> pathlib.Path:
    """A twin whose truth is ``kinetics`` (default BV with ``j0 = c^p (1 - c)^q``) with CIET's
    ``lam``, rate constant ``true_k0`` (default 2e-3 1/s), the PSF ``psf_fwhm`` and (with
    ``rough_k``) a random m; it fits the same law and observation from ``k0`` (default 1e-3
    1/s) and ``[model] lambda`` at its default, 8.3 kT; ``fit``: the fit's settings (``knots``,
    ``mu_e``, ``dc_max``, ``max_iterations``, ``k0``, ``time_tol``) of :func:`_common`."""
    case = write_case(root, n_frames=n_frames)
    v = read_video(case / "data" / "video.npz")
    t = np.linspace(0.0, t_end, n_frames)
    write_video(case / "data" / "video.npz", Video(v.c, v.mask, t, v.pixel_size, mu_e=v.mu_e))
    psf = "" if psf_fwhm is None else f"psf_fwhm = {psf_fwhm}\n"
    m_lines = "m_std = 0.0" if rough_k is None else _rough_truth(rough_k)
    (case / "case.toml").write_text(
        '[data]\nvideo = "data/video.npz"\n'
        + psf
        + _common(pq, [], learn, kinetics=kinetics, rough_k=rough_k, **fit)
        + f"""
[simulate]
noise = {noise}
seed = 3
{m_lines}
mesh_size = 1.0
outputs = ["npz"]
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
    psf_fwhm: float | None = None,
    **fit,
) -> pathlib.Path:
    """A case fitting the simulated video of the sibling case ``twin`` with another model
    (``[data] psf_fwhm``; ``fit``: ``kinetics``, CIET's starting ``lam``, the starting ``k0`` and
    the other settings of :func:`_common`)."""
    root.mkdir(parents=True, exist_ok=True)
    psf = "" if psf_fwhm is None else f"psf_fwhm = {psf_fwhm}\n"
    (root / "case.toml").write_text(
        f'[data]\nvideo = "../{twin}/simulated/video.npz"\n'
        f'truth = "../{twin}/simulated/truth.npz"\n' + psf + _common(pq, j0, learn, **fit)
    )
    return root


# -- the attribution twins of tests/test_compare.py and benchmarks/bench_attribution.py ----
# 13 frames over a 1200 s lithiation-delithiation cycle, noise 0.07, variable-step BDF2 at the
# default time_tol (backward Euler's step schedule, frozen during a fit, left discretisation
# errors of tens of nats in the misfit of these fast cycles).

#: The strong cycle of the kinetic-law twins: overpotentials up to ~8 kT on delithiation, where
#: CIET's Marcus-Hush-Chidsey rate saturates (lambda = 6 kT) and Butler-Volmer's does not.
STRONG = {
    "n_frames": 13,
    "t_end": 1200.0,
    "knots": (0.0, 600.0, 1200.0),
    "mu_e": (1.0, 5.5, -6.0),
    "dc_max": 0.03,
    "time_tol": 5e-4,
}
#: The milder cycle of ``test_occam_and_attribution`` (the PSF twins).
MILD = {**STRONG, "mu_e": (1.0, 4.0, -3.0)}
#: Lim et al.'s j0 = c^(1/2) (1 - c)^(3/2) as the ``j0_prefactor`` (p, q).
LIM = (0.5, 1.5)
#: The kinetic-law variants by case name: CIET with lambda learned (prior median 8.3 kT, the
#: literature value; std 0.5 in ln lambda) and fixed at 8.3 kT, the two fixed Butler-Volmer
#: laws, and Lim's j0 times a learned exp(b_1 P_1 + b_2 P_2) of 1 - 2c (the flexible family).
LAWS = {
    "ciet": {"kinetics": "ciet", "k0": 0.03, "learn": ["mu_h", "k0", "lambda"]},
    "ciet-8.3": {"kinetics": "ciet", "k0": 0.03, "learn": ["mu_h", "k0"]},
    "bv-lim": {"kinetics": "bv-lim", "learn": ["mu_h", "k0"]},
    "bv-constant": {"kinetics": "bv-constant", "learn": ["mu_h", "k0"]},
    "bv-flex": {"j0": [0.0, 0.0], "learn": ["mu_h", "j0", "k0"]},
}
#: The CIET twin's truth: lambda (kT) and k0 (1/s); the bv-lim twin's k0 is 2e-3 1/s.
TRUE_LAMBDA, CIET_K0 = 6.0, 0.06
#: The PSF twin's FWHM (um: 1.5 pixels of 0.05 um) and the learned width's prior median.
TRUE_PSF, PSF_PRIOR = 0.075, 0.05
#: std and correlation length (um) of the PSF twins' random ln k field (truth and prior).
ROUGH_K = (0.7, 0.1)


def _cycle(cycle) -> dict:
    return {k: cycle[k] for k in ("knots", "mu_e", "dc_max", "time_tol")}


def write_law_twin(root: pathlib.Path, truth: str) -> list[pathlib.Path]:
    """The twin made with ``truth`` ("ciet" or "bv-lim") and its variants; the twin first."""
    law = LAWS[truth]
    extra = {"lam": TRUE_LAMBDA, "true_k0": CIET_K0} if truth == "ciet" else {}
    write_twin(
        root / truth,
        LIM,
        kinetics=law["kinetics"],
        k0=law.get("k0"),
        learn=law["learn"],
        **extra,
        **STRONG,
    )
    cases = [root / truth]
    for name, kw in LAWS.items():
        if name == truth:
            continue
        kw = dict(kw)
        write_variant(
            root / name, truth, LIM, kw.pop("j0", []), kw.pop("learn"), **kw, **_cycle(STRONG)
        )
        cases.append(root / name)
    return cases


def write_psf_twin(
    root: pathlib.Path, blurred: bool, *, fwhm: float = TRUE_PSF, n_frames: int = 25
) -> list[pathlib.Path]:
    """The Lim twin with (``psf``: FWHM ``fwhm``) or without (``point``) the PSF, and its
    observation variants (point sampling, the PSF fixed at ``fwhm``, the width learned); the
    twin first."""
    twin = "psf" if blurred else "point"
    learn = ["mu_h", "k0", "m"]
    cycle = {**MILD, "n_frames": n_frames}
    write_twin(
        root / twin, LIM, psf_fwhm=fwhm if blurred else None, learn=learn, rough_k=ROUGH_K, **cycle
    )
    cases = [root / twin]
    variants = {"point": None, "psf": fwhm, "psf-learned": PSF_PRIOR}
    for name, width in variants.items():
        if name == twin:
            continue
        var_learn = learn + ["psf_fwhm"] if name == "psf-learned" else learn
        write_variant(
            root / name,
            twin,
            LIM,
            [],
            var_learn,
            psf_fwhm=width,
            rough_k=ROUGH_K,
            **_cycle(MILD),
        )
        cases.append(root / name)
    return cases
