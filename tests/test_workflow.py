"""End-to-end: simulate -> verify -> invert on a tiny twin experiment, serially and in parallel."""

from __future__ import annotations

import json

import numpy as np
import pytest

from femkin._fem import MPI
from femkin.cli import main
from workflow_case import write_case


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
        assert rates["hessian"][block] > 2.6, rates
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
