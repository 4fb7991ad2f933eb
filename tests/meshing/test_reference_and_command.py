"""The committed reference mesh, the demo data, and the ``femkin mesh`` verb."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from femkin.cli import main
from femkin.errors import InputError
from femkin.io import read_video, write_video
from femkin.meshing import mesh_area, mesh_particle, read_msh

REPO = Path(__file__).resolve().parents[2]

DEMO = REPO / "cases" / "demo"


def test_demo_data_contract():
    video = read_video(DEMO / "data" / "video.npz")
    pixels = int((video.mask == 1).sum())
    # One realistic particle (a few hundred to two thousand pixels at 50 nm), a template video
    # whose first frame is the initial state and whose other frames the simulator fills.
    assert video.mask.max() == 1 and 300 < pixels <= 2000 and video.pixel_size == 0.05
    assert video.t.ndim == 1 and video.t.size >= 10 and video.t[0] == 0.0
    c0 = video.c[0][video.mask == 1]
    assert np.all((0.0 < c0) & (c0 < 1.0)) and np.ptp(c0) > 0.0
    assert np.isnan(video.c[1:]).all() and np.isnan(video.c[0][video.mask == 0]).all()
    k = np.load(DEMO / "data" / "k_map.npy")
    assert np.isfinite(k[video.mask == 1]).all() and np.isnan(k[video.mask == 0]).all()
    assert np.std(np.log(k[video.mask == 1])) > 0.2  # heterogeneous k


@pytest.mark.mpi
def test_reference_mesh_matches_demo(comm):
    video = read_video(DEMO / "data" / "video.npz")
    mesh = read_msh(REPO / "meshes" / "demo_particle_1.msh", comm)
    area = mesh_area(mesh)
    assert abs(area / ((video.mask == 1).sum() * video.pixel_size**2) - 1) < 0.005
    # the reference is what the current code builds (rebuild with meshes/build.py otherwise)
    rebuilt = mesh_particle(video.mask, 1, video.pixel_size, comm)
    cells = mesh.topology.index_map(2).size_global
    assert cells == rebuilt.mesh.topology.index_map(2).size_global
    assert abs(area - rebuilt.area) < 1e-12


@pytest.mark.mpi
def test_read_msh_missing(comm, mpi_tmp_path):
    with pytest.raises(InputError, match="readable 2-D gmsh mesh"):
        read_msh(mpi_tmp_path / "none.msh", comm)


def _case(root, video, mesh_size=2.0):
    (root / "data").mkdir(parents=True, exist_ok=True)
    write_video(root / "data" / "video.npz", video)
    (root / "case.toml").write_text(
        f'[data]\nvideo = "data/video.npz"\n[mesh]\nsize = {mesh_size}\n'
    )


@pytest.mark.mpi
def test_mesh_command(comm, mpi_tmp_path, capsys):
    video = read_video(DEMO / "data" / "video.npz")
    mask = video.mask.copy()
    mask[2:8, 2:10] = 2  # a second, small particle
    c = video.c.copy()
    c[0][mask == 2] = 0.5
    if comm.rank == 0:
        _case(mpi_tmp_path, video._replace(mask=mask, c=c))
    comm.barrier()
    assert main(["mesh", str(mpi_tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    if comm.rank == 0:
        assert len(lines) == 2, lines
        assert lines[0].startswith("particle 1: 1200 pixels, ")
        assert lines[1].startswith("particle 2: 48 pixels, ")
        cells = int(lines[1].split(" cells")[0].split()[-1])
        assert 20 < cells < 60, lines[1]  # 48 pixels at 2 pixels per element
    comm.barrier()
    meshes = mpi_tmp_path / "meshes"
    assert sorted(p.name for p in meshes.glob("*.png")) == ["particle_1.png", "particle_2.png"]
    msh = sorted(meshes.glob("*.msh"))
    assert len(msh) == 2
    mtimes = [p.stat().st_mtime_ns for p in msh]
    comm.barrier()
    assert main(["mesh", str(mpi_tmp_path)]) == 0  # cached: nothing regenerated
    assert [p.stat().st_mtime_ns for p in sorted(meshes.glob("*.msh"))] == mtimes


def test_mesh_command_user_error(tmp_path, capsys):
    (tmp_path / "case.toml").write_text('[data]\nvideo = "missing.npz"\n')
    assert main(["mesh", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("femkin: error: ") and "missing.npz" in err and "no such file" in err
