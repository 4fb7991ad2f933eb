"""Masks -> polygons -> gmsh -> DOLFINx meshes, serial and parallel."""

from __future__ import annotations

import numpy as np
import pytest

import femkin.meshing
from femkin._fem import MPI
from femkin.errors import InputError
from femkin.meshing import mesh_particle, particle_polygons, plot_mesh, rings_intersect

PS = 0.05


def _disk(shape=(30, 30), centre=(15, 14), radius=10.0, label=1, mask=None):
    mask = np.zeros(shape, dtype=np.int64) if mask is None else mask
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius**2] = label
    return mask


def _area(ring):
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)


def _cells(mesh):
    return mesh.topology.index_map(mesh.topology.dim).size_global


def test_rectangle_polygon_is_exact():
    mask = np.zeros((12, 16), dtype=np.int64)
    mask[2:10, 3:13] = 1
    (ring,) = particle_polygons(mask, 1, PS, smoothing=0.0, simplify=0.0)
    # the 0.5 level lies half a pixel outside the outer pixel centres
    np.testing.assert_allclose(ring.min(axis=0), [3 * PS, 2 * PS])
    np.testing.assert_allclose(ring.max(axis=0), [13 * PS, 10 * PS])
    # 80 pixels, less the four cut corners (1/8 pixel each)
    np.testing.assert_allclose(_area(ring), (80 - 0.5) * PS**2)


def test_polygon_orientation_and_hole():
    mask = _disk()
    mask[13:19, 11:17] = 0  # a 6x6 hole
    outer, hole = particle_polygons(mask, 1, PS)
    assert _area(outer) > 0 > _area(hole)
    assert abs(_area(hole) / PS**2 + 36) < 4
    assert not rings_intersect([outer / PS, hole / PS])
    # a 2x2 hole is filled when smaller than min_hole_area, kept otherwise
    mask[7:9, 13:15] = 0
    assert len(particle_polygons(mask, 1, PS, min_hole_area=5.0)) == 2
    rings = particle_polygons(mask, 1, PS, min_hole_area=4.0)
    assert len(rings) == 3 and abs(_area(rings[2]) / PS**2 + 3.5) < 0.01


def test_intersection_check():
    square = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    bowtie = np.array([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert not rings_intersect([square])
    assert rings_intersect([bowtie])
    assert rings_intersect([square, square * 0.5 + 0.75])  # a "hole" crossing the outer ring


def test_pieces_keep_largest():
    mask = _disk()
    mask[0:2, 0:2] = 1
    with pytest.warns(UserWarning, match="2 separate pieces"):
        (ring,) = particle_polygons(mask, 1, PS)
    assert ring.min() > 3 * PS


@pytest.mark.mpi
def test_area_matches_pixels(comm):
    mask = _disk()
    pm = mesh_particle(mask, 1, PS, comm)
    pixels = (mask == 1).sum() * PS**2
    assert abs(pm.area / pixels - 1) < 0.01, (pm.area, pixels)
    assert pm.mesh.geometry.dim == 2 and pm.msh_file is None
    assert (
        comm.allreduce(
            np.ptp(pm.mesh.geometry.x[:, 2]) if pm.mesh.geometry.x.size else 0.0, op=MPI.MAX
        )
        == 0.0
    )


@pytest.mark.mpi
def test_hole_preserved(comm):
    full = _disk()
    holed = full.copy()
    holed[12:20, 10:18] = 0  # 64 pixels
    a_full = mesh_particle(full, 1, PS, comm).area
    a_holed = mesh_particle(holed, 1, PS, comm).area
    assert abs((a_full - a_holed) / PS**2 - 64) < 1.5, (a_full - a_holed) / PS**2
    assert abs(a_holed / ((holed == 1).sum() * PS**2) - 1) < 0.01


@pytest.mark.mpi
def test_several_particles(comm):
    mask = _disk(shape=(30, 50), centre=(15, 12), radius=9)
    mask = _disk(shape=(30, 50), centre=(14, 36), radius=7, label=2, mask=mask)
    meshes = [mesh_particle(mask, label, PS, comm) for label in (1, 2)]
    for label, pm in zip((1, 2), meshes, strict=True):
        assert pm.label == label
        assert abs(pm.area / ((mask == label).sum() * PS**2) - 1) < 0.01
    xmax1 = comm.allreduce(meshes[0].mesh.geometry.x[:, 0].max(initial=-np.inf), op=MPI.MAX)
    xmin2 = comm.allreduce(meshes[1].mesh.geometry.x[:, 0].min(initial=np.inf), op=MPI.MIN)
    assert xmax1 < 22 * PS < xmin2


@pytest.mark.mpi
def test_refinement_quadruples_cells(comm):
    mask = _disk(radius=8)
    coarse = _cells(mesh_particle(mask, 1, PS, comm, size=2.0).mesh)
    fine = _cells(mesh_particle(mask, 1, PS, comm, size=1.0).mesh)
    assert 3.2 < fine / coarse < 4.8, (coarse, fine)


@pytest.mark.mpi
def test_parallel_equals_serial(comm):
    mask = _disk(radius=8)
    mask[13:16, 12:16] = 0
    serial = mesh_particle(mask, 1, PS, MPI.COMM_SELF)
    parallel = mesh_particle(mask, 1, PS, comm)
    assert _cells(parallel.mesh) == _cells(serial.mesh)
    assert abs(parallel.area - serial.area) < 1e-12
    assert parallel.mesh.comm.size == comm.size


@pytest.mark.mpi
def test_cache_reused(comm, mpi_tmp_path, monkeypatch):
    mask = _disk(radius=7)
    first = mesh_particle(mask, 1, PS, comm, cache_dir=mpi_tmp_path)
    assert first.msh_file.parent == mpi_tmp_path and first.msh_file.name.startswith("particle_1_")
    mtime = first.msh_file.stat().st_mtime_ns

    def no_gmsh(*args, **kwargs):
        raise AssertionError("gmsh called although the mesh is cached")

    monkeypatch.setattr(femkin.meshing, "_gmsh_write", no_gmsh)
    again = mesh_particle(mask, 1, PS, comm, cache_dir=mpi_tmp_path)
    assert again.msh_file == first.msh_file and again.msh_file.stat().st_mtime_ns == mtime
    assert _cells(again.mesh) == _cells(first.mesh) and again.area == first.area
    # any changed input is another cache entry (here gmsh is needed and refused)
    with pytest.raises(InputError, match="gmsh called"):
        mesh_particle(mask, 1, PS, comm, size=0.9, cache_dir=mpi_tmp_path)
    comm.barrier()
    assert len(list(mpi_tmp_path.glob("*.msh"))) == 1


@pytest.mark.mpi
def test_empty_label(comm):
    with pytest.raises(InputError, match="pixels with label 3"):
        mesh_particle(_disk(), 3, PS, comm)
    with pytest.raises(InputError, match="mesh.size"):
        mesh_particle(_disk(), 1, PS, comm, size=0.0)


@pytest.mark.mpi
def test_plot_mesh(comm, mpi_tmp_path):
    mask = _disk(radius=6)
    pm = mesh_particle(mask, 1, PS, comm, size=2.0)
    plot_mesh(pm, mask, mpi_tmp_path / "p.png")
    comm.barrier()
    data = (mpi_tmp_path / "p.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
