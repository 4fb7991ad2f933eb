"""End-to-end: simulate -> verify -> invert on a tiny twin experiment, serially and in parallel."""

from __future__ import annotations

import json

import numpy as np
import pytest
from workflow_case import write_case

from femkin._fem import MPI
from femkin.cli import main


@pytest.mark.mpi
def test_simulate_verify_invert(mpi_tmp_path, capsys):
    comm = MPI.COMM_WORLD
    case = mpi_tmp_path / "case"
    if comm.rank == 0:
        write_case(case, max_iterations=3)
    comm.barrier()
    assert main(["simulate", str(case), "--quiet"]) == 0
    sim = np.load(case / "simulated" / "video.npz")
    truth = np.load(case / "simulated" / "truth.npz")
    inside = sim["mask"] > 0
    noise = sim["c"][1:, inside] - truth["c"][1:, inside]
    assert 0.04 < np.std(noise) < 0.06  # the requested noise 0.05
    assert np.all(np.isnan(sim["c"][:, ~inside]))
    # the particle lithiates under the mu_e ramp
    assert truth["c"][-1, inside].mean() > truth["c"][0, inside].mean() + 0.1

    capsys.readouterr()
    assert main(["verify", str(case), "--json"]) == 0
    out = capsys.readouterr().out
    # Rank 0 prints; every rank asserts (an assertion on one rank only would desynchronise).
    rates = comm.bcast(json.loads(out.strip().splitlines()[-1]) if comm.rank == 0 else None)
    for block in ("mu_h", "j0", "k0", "m"):
        assert rates["gradient"][block] > 1.9, rates
        assert rates["hessian"][block] >= 2.9, rates
    assert rates["symmetry"] < 1e-8

    assert main(["invert", str(case), "--quiet"]) == 0
    summary = json.loads((case / "results" / "summary.json").read_text())
    assert summary["iterations"] == 3
    for name in ("fitted.npz", "mu_h.csv", "j0.csv", "k_1.npy", "report.md", "curves.png"):
        assert (case / "results" / name).exists(), name
    # three iterations already bring the fit near the noise and k correlated with the truth
    assert summary["misfit_rms"] < 0.1
    assert summary["truth_comparison"]["ln_k_pearson"] > 0.5
    k = np.load(case / "results" / "k_1.npy")
    assert np.all(np.isfinite(k[inside])) and np.all(np.isnan(k[~inside]))


def test_bad_case_key_is_one_line_error(tmp_path, capsys):
    case = write_case(tmp_path / "case")
    text = (case / "case.toml").read_text().replace("kappa = 0.004", "kapa = 0.004")
    (case / "case.toml").write_text(text)
    assert main(["simulate", str(case)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("femkin: error:") and "kapa" in err and "kappa" in err
    assert len(err.splitlines()) == 1


def test_invert_twin_without_simulation_is_a_clear_error(tmp_path, capsys):
    case = write_case(tmp_path / "case")
    assert main(["invert", str(case)]) == 2
    err = capsys.readouterr().err
    assert "femkin simulate" in err


@pytest.mark.mpi
def test_simulate_same_on_any_number_of_ranks(mpi_tmp_path):
    """femkin simulate on all ranks equals a serial run (relative 1e-8)."""
    import shutil

    from femkin.commands.simulate import simulate

    comm = MPI.COMM_WORLD
    world, single = mpi_tmp_path / "world", mpi_tmp_path / "single"
    if comm.rank == 0:
        write_case(world, labels=2)
        shutil.copytree(world, single)
    comm.barrier()
    simulate(world, comm, quiet=True)
    ok, detail = True, None
    if comm.rank == 0:
        simulate(single, MPI.COMM_SELF, quiet=True)
        a = np.load(world / "simulated" / "truth.npz")["c"]
        b = np.load(single / "simulated" / "truth.npz")["c"]
        finite = np.isfinite(a)
        ok = bool(np.array_equal(finite, np.isfinite(b))) and np.allclose(
            a[finite], b[finite], rtol=1e-8, atol=1e-10
        )
        detail = float(np.nanmax(np.abs(a - b)))
    ok = comm.bcast(ok)
    assert ok, comm.bcast(detail)


@pytest.mark.mpi
def test_verify_two_particles(mpi_tmp_path, capsys):
    """Taylor rates on a two-particle case: shared coefficients and per-particle m fields."""
    comm = MPI.COMM_WORLD
    case = mpi_tmp_path / "case"
    if comm.rank == 0:
        write_case(case, labels=2, n_frames=4)
    comm.barrier()
    assert main(["simulate", str(case), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["verify", str(case), "--json", "--blocks", "mu_h", "k0", "m"]) == 0
    out = capsys.readouterr().out
    rates = comm.bcast(json.loads(out.strip().splitlines()[-1]) if comm.rank == 0 else None)
    for block in ("mu_h", "k0", "m"):
        assert rates["gradient"][block] > 1.9, rates
        assert rates["hessian"][block] >= 2.9, rates
    assert rates["symmetry"] < 1e-8


def test_trajectory_on_disk_equals_memory():
    """storage = "disk" keeps the same states as memory (for long videos)."""
    from femkin._fem import dolfinx
    from femkin.driving import Driving
    from femkin.forward import ModelParameters, ParticleModel, SolverOptions

    mesh = dolfinx.mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    model = ParticleModel(
        mesh,
        ModelParameters(mu_h=(3.0,), j0=(), k0=2e-3),
        solver=SolverOptions(scheme="euler", dc_max=0.05),
    )
    c0 = np.full(model.V.dofmap.index_map.size_local + model.V.dofmap.index_map.num_ghosts, 0.2)
    frames, drive = [0.0, 100.0, 200.0], Driving([0.0, 200.0], [1.0, 2.0])
    mem = model.solve(frames, drive, c0, storage="memory")
    disk = model.solve(frames, drive, c0, storage="disk")
    assert mem.times == disk.times and mem.n_steps > 2
    for n in range(mem.n_steps + 1):
        assert np.array_equal(mem.state(n), disk.state(n))
