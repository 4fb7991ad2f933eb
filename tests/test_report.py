"""Field output for ParaView: ``[simulate] outputs`` writes exactly the formats it names."""

from __future__ import annotations

import h5py
import numpy as np
from workflow_case import write_case

from femkin._fem import MPI


def test_simulate_writes_the_requested_field_formats(tmp_path):
    """xdmf and vtx give c and mu at every frame time; png is not written when not asked for."""
    from femkin.commands.simulate import simulate

    case = write_case(tmp_path / "case", n_frames=4)
    toml = (case / "case.toml").read_text()
    (case / "case.toml").write_text(
        toml.replace('outputs = ["npz", "png"]', 'outputs = ["npz", "xdmf", "vtx"]')
    )
    simulate(case, MPI.COMM_SELF, quiet=True)
    sim = case / "simulated"
    truth = np.load(sim / "truth.npz")
    with h5py.File(sim / "particle_1.h5") as f:
        # DOLFINx names each time step by its time with "_" for the decimal point
        times = sorted(f["Function/c"], key=lambda key: float(key.replace("_", ".")))
        found = [float(key.replace("_", ".")) for key in times]
        np.testing.assert_allclose(found, np.linspace(0, 400, 4), rtol=1e-12)
        assert len(f["Function/mu"]) == 4
        c_last = f[f"Function/c/{times[-1]}"][...].ravel()
    # the nodal c of the last frame and its pixel observation have nearly the same mean
    observed = truth["c"][-1][np.isfinite(truth["c"][-1])]
    assert abs(c_last.mean() - observed.mean()) < 0.02
    bp = sim / "particle_1.bp"
    assert bp.is_dir() and sum(p.stat().st_size for p in bp.iterdir()) > 1000
    assert not (sim / "frames.png").exists()
