"""Particle meshes from other tools (``[mesh] files``, meshio) and ``femkin mesh --export``."""

from __future__ import annotations

import shutil

import meshio
import numpy as np
import pytest
from workflow_case import write_case

from femkin._fem import MPI
from femkin.case import load_case
from femkin.cli import main
from femkin.errors import CaseError, InputError
from femkin.io import read_video
from femkin.mesh_import import (
    Triangles,
    footprint_mismatch,
    gathered_triangles,
    read_triangles,
    write_mesh,
)
from femkin.meshing import mesh_area, mesh_particle

PS = 0.05


def _disk_mask(shape=(24, 40), centres=((11.5, 11.0), (12.0, 28.5)), radius=7.0):
    ii, jj = np.mgrid[0 : shape[0], 0 : shape[1]]
    mask = np.zeros(shape, dtype=np.int64)
    for lb, (ci, cj) in enumerate(centres, start=1):
        mask[(ii - ci) ** 2 + (jj - cj) ** 2 <= radius**2] = lb
    return mask


def _area(mesh) -> float:
    return mesh_area(mesh)


def _cells(mesh) -> int:
    return mesh.topology.index_map(mesh.topology.dim).size_global


@pytest.mark.mpi
@pytest.mark.parametrize("fmt", ["vtu", "msh", "xdmf", "vtk"])
def test_exported_mesh_reads_back_identically(mpi_tmp_path, fmt):
    comm = MPI.COMM_WORLD
    mask = _disk_mask()
    pm = mesh_particle(mask, 2, PS, comm)
    path = write_mesh(pm.mesh, mpi_tmp_path / f"p2.{fmt}", label=2)
    comm.barrier()
    back = mesh_particle(mask, 2, PS, comm, files={2: str(path)})
    assert back.msh_file == path
    assert _cells(back.mesh) == _cells(pm.mesh)
    assert abs(_area(back.mesh) - pm.area) <= 1e-12 * pm.area
    # the same vertex set (partition independent), not just the same area
    a, b = gathered_triangles(pm.mesh), gathered_triangles(back.mesh)
    if comm.rank == 0:
        ka = np.unique(np.round(a.points, 10), axis=0)
        kb = np.unique(np.round(b.points, 10), axis=0)
        assert np.array_equal(ka, kb)


def test_pixel_unit_and_pattern(tmp_path):
    comm = MPI.COMM_SELF
    mask = _disk_mask()
    pm = mesh_particle(mask, 1, PS, comm)
    tri = gathered_triangles(pm.mesh)
    points = np.column_stack([tri.points / PS, np.zeros(len(tri.points))])  # in pixels
    meshio.write(tmp_path / "p1.vtk", meshio.Mesh(points, [("triangle", tri.cells)]))
    files = str(tmp_path / "p{label}.vtk")
    with pytest.raises(InputError, match="area"):  # read as micrometres: 400x too large
        mesh_particle(mask, 1, PS, comm, files=files)
    back = mesh_particle(mask, 1, PS, comm, files=files, file_unit="pixel")
    assert abs(back.area - pm.area) <= 1e-12 * pm.area


def test_footprint_checks_area_and_containment():
    mask = _disk_mask()
    pm = mesh_particle(mask, 1, PS, MPI.COMM_SELF)
    tri = gathered_triangles(pm.mesh)
    assert footprint_mismatch(tri, mask, 1, PS, 0.1) is None
    # the other particle's pixels: same kind of disc, wrong place
    assert footprint_mismatch(tri, mask, 2, PS, 0.1) is not None
    # shifted by 3 pixels: the area matches, the pixel centres do not
    shifted = Triangles(tri.points + [3 * PS, 0.0], tri.cells)
    expected, found = footprint_mismatch(shifted, mask, 1, PS, 0.1)
    n = int((mask == 1).sum())
    assert f"{n} pixels" in expected and f"of {n} pixel centres inside" in found
    inside = int(found.split(" with ")[1].split(" of ")[0])
    assert 0.5 * n < inside < 0.9 * n
    # scaled by 1.2 about its centre: containment holds, the area (x1.44) does not
    c = tri.points.mean(axis=0)
    grown = Triangles(c + 1.2 * (tri.points - c), tri.cells)
    assert footprint_mismatch(grown, mask, 1, PS, 0.1) is not None
    assert footprint_mismatch(grown, mask, 1, PS, 0.5) is None


def test_only_triangles_in_the_plane(tmp_path):
    quad = meshio.Mesh(
        np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0.0]]), [("quad", [[0, 1, 2, 3]])]
    )
    meshio.write(tmp_path / "quad.vtu", quad)
    with pytest.raises(InputError, match="linear triangles.*found quad"):
        read_triangles(tmp_path / "quad.vtu")
    tilted = meshio.Mesh(np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0.5]]), [("triangle", [[0, 1, 2]])])
    meshio.write(tmp_path / "tilted.vtu", tilted)
    with pytest.raises(InputError, match="x-y plane"):
        read_triangles(tmp_path / "tilted.vtu")
    (tmp_path / "junk.vtu").write_text("not a mesh")
    with pytest.raises(InputError, match="meshio can read"):
        read_triangles(tmp_path / "junk.vtu")


@pytest.mark.parametrize(
    "value,field,expected",
    [
        ('"meshes/p.msh"', "mesh.files", "{label}"),
        ('{x = "a.msh"}', "mesh.files.x", "particle label"),
        ("{1 = 3}", "mesh.files.1", "a path"),
        ("3", "mesh.files", "a table"),
    ],
)
def test_case_key_errors(tmp_path, value, field, expected):
    (tmp_path / "case.toml").write_text(f'[data]\nvideo = "v.npz"\n[mesh]\nfiles = {value}\n')
    with pytest.raises(CaseError, match=expected) as err:
        load_case(tmp_path)
    assert err.value.field == field


def test_case_paths_resolve_against_the_case(tmp_path):
    (tmp_path / "case.toml").write_text(
        '[data]\nvideo = "v.npz"\n[mesh]\nfiles = {1 = "m/p1.msh", 2 = "/abs/p2.vtu"}\n'
    )
    case = load_case(tmp_path)
    assert case.mesh["files"] == {1: str(tmp_path.resolve() / "m" / "p1.msh"), 2: "/abs/p2.vtu"}
    (tmp_path / "case.toml").write_text(
        '[data]\nvideo = "v.npz"\n[mesh]\nfiles = "m/p{label}.vtu"\n'
    )
    assert load_case(tmp_path).mesh["files"] == str(tmp_path.resolve() / "m" / "p{label}.vtu")


@pytest.mark.mpi
def test_mesh_command_exports_and_imports(mpi_tmp_path, capsys):
    """``femkin mesh --export``, then a case that brings those meshes, then a wrong one."""
    comm = MPI.COMM_WORLD
    case = mpi_tmp_path / "case"
    if comm.rank == 0:
        write_case(case, labels=2)
    comm.barrier()
    assert main(["mesh", str(case), "--export", "vtu", "xdmf"]) == 0
    out = capsys.readouterr().out
    video = read_video(case / "data" / "video.npz")
    for label in (1, 2):
        exported = case / "meshes" / f"particle_{label}.vtu"
        assert exported.is_file() and (case / "meshes" / f"particle_{label}.xdmf").is_file()
        if comm.rank == 0:
            assert f"particle_{label}.vtu" in out
            m = meshio.read(exported)
            tri = Triangles(m.points[:, :2], m.cells_dict["triangle"])
            assert np.all(m.cell_data_dict["particle"]["triangle"] == label)
            pixels = int((video.mask == label).sum()) * video.pixel_size**2
            assert abs(tri.areas().sum() / pixels - 1) < 0.02

    own = mpi_tmp_path / "own"
    if comm.rank == 0:
        shutil.copytree(case / "data", own / "data")
        shutil.copytree(case / "meshes", own / "theirs")
        text = (case / "case.toml").read_text()
        (own / "case.toml").write_text(
            text.replace("[mesh]\n", '[mesh]\nfiles = "theirs/particle_{label}.vtu"\n')
        )
    comm.barrier()
    capsys.readouterr()
    assert main(["mesh", str(own)]) == 0
    out = capsys.readouterr().out
    if comm.rank == 0:
        assert "particle_1.vtu" in out and "particle_2.vtu" in out

    # the two particles' meshes swapped: one line naming the file, no traceback
    if comm.rank == 0:
        text = (
            (own / "case.toml")
            .read_text()
            .replace(
                'files = "theirs/particle_{label}.vtu"',
                'files = {1 = "theirs/particle_2.vtu", 2 = "theirs/particle_1.vtu"}',
            )
        )
        (own / "case.toml").write_text(text)
    comm.barrier()
    capsys.readouterr()
    assert main(["mesh", str(own)]) == 2
    err = capsys.readouterr().err.strip()
    if comm.rank == 0:
        assert len(err.splitlines()) == 1, err
        assert "particle_2.vtu" in err and "mesh.files" in err
        assert "particle 1's footprint" in err and "pixel centres inside" in err
