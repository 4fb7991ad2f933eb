"""The posterior std map of ln k is smaller where the data say more (issue #5).

A twin case of ``tests/workflow_case.py`` is simulated, and then the left part of its particle
(pixel columns ``j < BLIND_EDGE``) is hidden: NaN in every frame after the first, so those
pixels carry no misfit term (frame 0 stays complete: it only sets the initial condition). After
a short inversion and ``femkin uq``, the Laplace posterior must know that the hidden region is
unconstrained:

- the ratio ``k_std / k_prior_std`` (posterior over prior std of ``ln k``) is larger at every
  hidden pixel far from the region's edge than at every observed pixel far from it, and its mean
  over the observed ones is less than half of its mean over the hidden ones;
- split ``Var(ln k) = Var(ln k0) + [Var(m_i) + 2 Cov(ln k0, m_i)]``: the bracket (what the
  field ``m`` adds to the global ``ln k0``) keeps most of its prior value ``Var_prior(m_i)`` in
  the hidden region and almost vanishes in the observed one, where the video pins ``ln k``
  itself down (the cross covariance cancels ``Var(m_i)``).

The prior's correlation length ``m_length = 0.15 um`` is 3 pixels; "far" means at least
2.5 pixels (0.125 um) from the edge, on either side. Measured (serial): mean std ratio 0.093 on
the observed pixels, 0.247 on the hidden ones (ratio 0.38); the bracket over its prior value:
-0.03 observed, 0.84 hidden. Finally the map is compared with the dense Laplace posterior of the
same linearisation (68 parameters): the low-rank pointwise std is within 0.7% of it. Tried: with
the ``ln k0``-``m`` cross term dropped from ``_ln_k_maps``, or with the prior diagonal of ``m``
in place of the posterior's, all three tests fail.

Not marked ``mpi``: under ``mpirun -n 2`` (fit on rank 0, uq on both ranks) the two map tests
pass with the serial numbers to 1e-10 but took 205 s on the loaded 2-core machine (29 s
serially for all three tests); the parallel std map is covered by ``test_uq_command.py``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from uq_problems import simulated_twin

from femkin._fem import MPI
from femkin.cli import main
from femkin.io.video import read_video, write_video

UQ_SECTION = """
[uq]
max_rank = 30
oversampling = 5
samples = 0
seed = 7
"""
#: Pixel columns ``j < BLIND_EDGE`` of the particle (columns 1..10) are hidden after frame 0.
BLIND_EDGE = 6
#: Columns at least 2.5 pixels from the edge at x = 6 px: hidden ``j <= 3``, observed ``j >= 8``.
FAR_HIDDEN, FAR_OBSERVED = 3, 8


@pytest.fixture(scope="module")
def blind_case():
    """The twin case with its left part hidden, inverted (4 iterations, rank 0) and analysed."""
    comm = MPI.COMM_WORLD
    root, case = simulated_twin("femkin-stdmap-", 4, UQ_SECTION)
    if comm.rank == 0:
        path = case / "simulated" / "video.npz"
        video = read_video(path)
        cols = np.arange(video.mask.shape[1])[None, :]
        hidden = (video.mask == 1) & (cols < BLIND_EDGE)
        c = video.c.copy()
        c[1:, hidden] = np.nan
        write_video(path, video._replace(c=c))
        from femkin.commands.invert import invert

        # The fit runs on rank 0 alone (test_workflow covers parallel fits); uq on all ranks.
        invert(case, quiet=True, comm=MPI.COMM_SELF)
    comm.barrier()
    assert main(["uq", str(case), "--quiet"]) == 0
    out = case / "results"
    maps = {
        "std": np.load(out / "k_std_1.npy"),
        "prior": np.load(out / "k_prior_std_1.npy"),
        "mask": read_video(case / "simulated" / "video.npz").mask,
        "uq": json.loads((out / "uq.json").read_text()),
        "case": case,
    }
    comm.barrier()
    yield maps
    comm.barrier()
    if comm.rank == 0:
        shutil.rmtree(root, ignore_errors=True)


def _regions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cols = np.broadcast_to(np.arange(mask.shape[1])[None, :], mask.shape)
    inside = mask == 1
    return inside & (cols <= FAR_HIDDEN), inside & (cols >= FAR_OBSERVED)


def test_std_ratio_larger_where_no_data(blind_case):
    std, prior = blind_case["std"], blind_case["prior"]
    hidden, observed = _regions(blind_case["mask"])
    assert hidden.sum() >= 10 and observed.sum() >= 10
    inside = blind_case["mask"] == 1
    ratio = std / prior
    assert np.all(np.isfinite(ratio[inside])) and np.all(np.isnan(ratio[~inside]))
    assert np.all(ratio[inside] > 0) and np.all(ratio[inside] < 1)
    r_hidden, r_observed = ratio[hidden], ratio[observed]
    detail = (float(r_hidden.mean()), float(r_observed.mean()))
    # measured 0.247 (hidden) and 0.093 (observed): ratio of the means 0.38
    assert r_observed.mean() < 0.5 * r_hidden.mean(), detail
    assert r_observed.max() < r_hidden.min(), (r_observed.max(), r_hidden.min())


def test_field_part_of_the_variance_stays_at_the_prior_without_data(blind_case):
    std, prior, uq = blind_case["std"], blind_case["prior"], blind_case["uq"]
    hidden, observed = _regions(blind_case["mask"])
    k0_var = uq["coefficients"]["k0"]["std"][0] ** 2
    k0_prior_var = uq["coefficients"]["k0"]["prior_std"][0] ** 2
    # Var(m_i) + 2 Cov(ln k0, m_i) over the prior Var(m_i) (the prior has no cross term)
    field_part = (std**2 - k0_var) / (prior**2 - k0_prior_var)
    f_hidden, f_observed = float(field_part[hidden].mean()), float(field_part[observed].mean())
    # measured 0.84 and -0.03: without data m keeps most of its prior variance; with data
    # ln k = ln k0 + m is pinned down and Cov(ln k0, m_i) ~ -Var(m_i) cancels it
    assert 0.6 < f_hidden < 1.1, f_hidden
    assert -0.2 < f_observed < 0.1, f_observed


def test_std_map_matches_the_dense_posterior(blind_case):
    """The map against ``(H + Gamma_prior^{-1})^{-1}`` formed densely, column by column, from
    the Gauss-Newton Hessian and prior precision actions at the MAP point (serial: 68 columns).

    ``Var(ln k) = C[m_i, m_i] + C[k0, k0] + 2 C[k0, m_i]`` at every P1 dof, its square root
    interpolated to the pixels as ``femkin uq`` does. The low-rank posterior drops eigenvalues
    below the threshold 0.1 (and stops at ``max_rank``); measured: std within 0.7% at every
    pixel, 0.2% on average.
    """
    from femkin.inversion.checkpoint import read_checkpoint
    from femkin.inversion.fit import build_prior
    from femkin.study import build_problem, checkpoint_path, checkpoint_settings, open_study

    comm = MPI.COMM_SELF
    study = open_study(blind_case["case"], comm)
    problem = build_problem(study, comm)
    space = problem.space
    x = problem.initial_vector()
    prior = build_prior(problem, study.case.inversion["prior"], x)
    _, case_hash = checkpoint_settings(study, problem)
    state = read_checkpoint(checkpoint_path(study.case), space, x, case_hash=case_hash)
    problem.set_schedules(state.get("schedules", {}))
    g = space.create_vector()
    problem.gradient(x, g)  # the linearisation point of the Hessian actions
    n = space.global_size
    H, R = np.zeros((n, n)), np.zeros((n, n))
    e, y = space.create_vector(), space.create_vector()
    for i in range(n):
        e.set(0.0)
        e.getArray()[i] = 1.0
        problem.hessian_mult(e, y, gauss_newton=True)
        H[:, i] = y.getArray(readonly=True)
        prior.precision_mult(e, y)
        R[:, i] = y.getArray(readonly=True)
    C = np.linalg.inv(0.5 * (H + H.T) + 0.5 * (R + R.T))
    m = space.local_slice("m", 1)
    k0 = space.local_slice("k0").start
    var = np.diag(C)[m] + C[k0, k0] + 2.0 * C[k0, m]
    assert np.all(var > 0)
    dense = problem.field_on_pixels("m", arrays={1: np.sqrt(var)})
    std = blind_case["std"]
    inside = blind_case["mask"] == 1
    rel = np.abs(std[inside] / dense[inside] - 1.0)
    assert rel.max() < 0.03 and rel.mean() < 0.01, (rel.max(), rel.mean())
