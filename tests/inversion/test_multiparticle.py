"""Joint fits of several particles: rank-count independence and the gain of shared data.

* Parallel (``mpi``): a two-particle and a one-particle twin case fitted under the current
  communicator give the same coefficients as a serial fit (``MPI.COMM_SELF``) of a copy of the
  same case on every rank. On two ranks the two particles live on different sub-communicators,
  the single particle's mesh spans both ranks.
* Serial: two particles sharing the true mu_h, j0 and k0 (but lithiating from different initial
  Li fractions, so they see different parts of mu_h(c)) recover mu_h(c) better when fitted
  jointly than either particle alone, all three fits on the same simulated data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from workflow_case import write_case

from femkin._fem import MPI
from femkin.cli import main
from femkin.commands.invert import invert
from femkin.io.video import Video, read_video, write_video
from femkin.physics.acr import legendre_sum


def _coefficients(case: Path) -> np.ndarray:
    """mu_h, j0 and ln k0 of a fitted case, as one vector."""
    c = json.loads((case / "results" / "summary.json").read_text())["coefficients"]
    return np.array(list(c["mu_h"]) + list(c["j0"]) + [np.log(c["k0"])])


def _simulated_case_and_copies(root: Path, labels: int, comm) -> tuple[Path, Path]:
    """Write and simulate a tiny case under ``comm``; give every rank its own copy of it.

    Returns (the shared case, this rank's private copy) with the simulated data and no meshes
    or results (the copy re-meshes serially).
    """
    case = root / "case"
    if comm.rank == 0:
        write_case(case, labels=labels, max_iterations=3)
    comm.barrier()
    assert main(["simulate", str(case), "--quiet"]) == 0
    copy = root / f"serial_rank{comm.rank}"
    shutil.copytree(case, copy, ignore=shutil.ignore_patterns("meshes", "results", "checkpoints"))
    comm.barrier()
    return case, copy


@pytest.mark.mpi
@pytest.mark.parametrize("labels", [2, 1])
def test_answer_does_not_depend_on_ranks(mpi_tmp_path, labels):
    comm = MPI.COMM_WORLD
    case, copy = _simulated_case_and_copies(mpi_tmp_path, labels, comm)
    problem, result, _, _ = invert(case, quiet=True)
    dist = problem.distribution
    if comm.size >= 2:
        # two particles: one per sub-communicator; one particle: its mesh spans every rank
        assert dist.n_groups == min(labels, comm.size)
        assert dist.subcomm.size == comm.size // dist.n_groups
        assert len(dist.mine) == 1
    single_rank_particles = comm.allreduce(dist.subcomm.size, op=MPI.MAX) == 1
    comm.barrier()
    parallel = comm.bcast(_coefficients(case) if comm.rank == 0 else None)
    first = np.array([result.history[0]["objective"], result.history[0]["gradient_norm"]])
    del problem, result

    _, ref_result, _, _ = invert(copy, quiet=True, comm=MPI.COMM_SELF)
    serial = _coefficients(copy)
    ref_first = np.array(
        [ref_result.history[0]["objective"], ref_result.history[0]["gradient_norm"]]
    )
    # The objective and the prior-weighted gradient norm at the initial point: the evaluation
    # itself is partition independent to roundoff (measured <= 6e-16 on 2 ranks).
    first_rel = comm.allreduce(
        float(np.max(np.abs(first - ref_first) / np.abs(ref_first))), op=MPI.MAX
    )
    assert first_rel < 1e-12, (first, ref_first)
    # The fit moved away from the initial guesses, so agreement is not trivial.
    initial = np.array([2.5, 0.0, 0.0, np.log(1.0e-3)])
    moved = comm.allreduce(float(np.max(np.abs(serial - initial))), op=MPI.MIN)
    assert moved > 0.05, (serial, initial)
    # After three truncated Newton-CG iterations, measured on 2 ranks:
    # - two particles, one per rank (each particle's solves are serial, as in the reference):
    #   2.6e-13 relative;
    # - one particle split over two ranks: 7e-9 to 5e-8 relative. Partitioned assembly, dot
    #   products and parallel MUMPS (not even bitwise reproducible from run to run on 2 ranks)
    #   differ from the serial run by 1e-16..1e-14; the last CG directions of each Newton step
    #   amplify that about 1e6-fold (ill-conditioned GN Hessian; the Hessian actions at equal
    #   inputs agree to 1e-14). Two serial runs with different LU packages differ as much.
    tolerance = 1e-9 if single_rank_particles else 1e-6
    rel = np.abs(parallel - serial) / np.maximum(np.abs(serial), 1e-2)
    worst = comm.allreduce(float(rel.max()), op=MPI.MAX)
    assert worst < tolerance, (worst, parallel, serial)


# ------------------------------------------------------------------------------------------
# Joint vs single-particle recovery of mu_h.

TRUE_MU_H = (3.0, 0.3)
MU_H_GRID = np.linspace(0.1, 0.9, 81)


def _mu_h_error(case: Path) -> float:
    """Max |mu_h(c) - mu_h_true(c)| (kT) on c in [0.1, 0.9] of a fitted case."""
    a = json.loads((case / "results" / "summary.json").read_text())["coefficients"]["mu_h"]
    x = 1 - 2 * MU_H_GRID
    return float(np.max(np.abs(legendre_sum(a, x) - legendre_sum(TRUE_MU_H, x))))


def _data_case(root: Path, source: Path, video: Video, keep: int | None) -> Path:
    """A non-twin case fitting ``video`` (all particles, or label ``keep`` as label 1)."""
    (root / "data").mkdir(parents=True)
    mask, c = video.mask.copy(), video.c.copy()
    if keep is not None:
        c[:, mask != keep] = np.nan
        mask = np.where(mask == keep, 1, 0)
    write_video(
        root / "data" / "video.npz",
        Video(c, mask, video.t, video.pixel_size, mu_e=video.mu_e, sigma=video.sigma),
    )
    shutil.copy(source / "simulated" / "truth.npz", root / "data" / "truth.npz")
    lines, skip = [], False
    for line in (source / "case.toml").read_text().splitlines():
        if line.startswith("["):
            skip = line.startswith("[simulate")
        if not skip:
            lines.append(line)
    text = "\n".join(lines).replace(
        'video = "data/video.npz"', 'video = "data/video.npz"\ntruth = "data/truth.npz"'
    )
    (root / "case.toml").write_text(text + "\n")
    return root


@pytest.mark.skipif(MPI.COMM_WORLD.size > 1, reason="serial study of three fits")
def test_two_particles_recover_mu_h_better_than_either_alone(tmp_path):
    source = write_case(tmp_path / "twin", labels=2, max_iterations=12, n_frames=6)
    # Same shape, same true coefficients, no k(x) heterogeneity; particle 2 starts half
    # lithiated, so the two particles sample different parts of mu_h(c).
    video = read_video(source / "data" / "video.npz")
    c0 = video.c[0].copy()
    c0[video.mask == 2] += 0.35
    c = video.c.copy()
    c[0] = c0
    write_video(
        source / "data" / "video.npz",
        Video(c, video.mask, video.t, video.pixel_size, mu_e=video.mu_e),
    )
    text = (source / "case.toml").read_text()
    text = text.replace("m_std = 0.4\n", "m_std = 0.0\n").replace(
        'learn = ["mu_h", "j0", "k0", "m"]', 'learn = ["mu_h", "j0", "k0"]'
    )
    assert f"[simulate.model]\nmu_h = {list(TRUE_MU_H)}" in text
    (source / "case.toml").write_text(text)
    assert main(["simulate", str(source), "--quiet"]) == 0
    sim = read_video(source / "simulated" / "video.npz")

    errors = {}
    for name, keep in (("joint", None), ("label1", 1), ("label2", 2)):
        case = _data_case(tmp_path / name, source, sim, keep)
        invert(case, quiet=True)
        errors[name] = _mu_h_error(case)
    # measured: joint 0.023 kT, label 1 alone 0.24 kT, label 2 alone 0.52 kT (12 iterations)
    assert errors["joint"] < 0.5 * min(errors["label1"], errors["label2"]), errors
