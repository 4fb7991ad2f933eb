"""Particle meshes from other tools and femkin's meshes for other tools, through meshio.

People who segment and mesh particles elsewhere (gmsh scripts, Avizo, other pipelines) give one
mesh per particle label in the case file, in any format meshio reads::

    [mesh]
    files = {1 = "meshes/p1.msh", 2 = "meshes/p2.vtu"}   # or a pattern: "meshes/p{label}.vtk"
    file_unit = "um"                                      # or "pixel"

Coordinates are in the image frame of the mask: x along the columns, y along the rows (down),
the centre of pixel ``(row i, column j)`` at ``((j + 0.5) p, (i + 0.5) p)`` for pixel size
``p``, as for femkin's own meshes. A mesh is checked against the labelled pixels of its
particle before anything is built from it (:func:`footprint_mismatch`): its area must match
the pixel area and it must contain the pixel centres, both within ``footprint_tolerance``;
otherwise every rank raises one :class:`~femkin.errors.InputError` line naming the file.

:func:`write_mesh` writes a DOLFINx mesh in any format meshio writes (``femkin mesh CASE
--export vtu``), for ParaView, VisIt, gmsh and the like.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from femkin.errors import InputError, raise_on_every_rank, run_on_root

#: Formats ``femkin mesh --export`` offers (file extensions meshio writes triangles to).
EXPORT_FORMATS = ("vtu", "vtk", "xdmf", "msh", "med", "obj", "ply", "stl")

#: Units a mesh file's coordinates may be in (``[mesh] file_unit``).
FILE_UNITS = ("um", "pixel")


class Triangles(NamedTuple):
    """A planar linear triangle mesh.

    Attributes:
        points: ``(n, 2)`` vertex coordinates, micrometres.
        cells: ``(m, 3)`` vertex indices of the triangles.
    """

    points: np.ndarray
    cells: np.ndarray

    def areas(self) -> np.ndarray:
        """The triangles' (unsigned) areas, um^2."""
        a, b, c = (self.points[self.cells[:, k]] for k in range(3))
        cross = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (
            c[:, 0] - a[:, 0]
        )
        return 0.5 * np.abs(cross)


def particle_mesh_file(files: dict[int, str] | str, label: int, source: str = "<case>") -> Path:
    """The mesh file of particle ``label``: ``files[label]`` or the pattern with ``{label}``.

    Raises:
        InputError: the table has no entry for ``label``.
    """
    if isinstance(files, str):
        return Path(files.format(label=int(label)))
    if int(label) not in files:
        raise InputError(
            source,
            "mesh.files",
            f"a mesh for particle {int(label)}",
            f"meshes for particles {sorted(files)} only",
        )
    return Path(files[int(label)])


def read_triangles(path: str | os.PathLike, *, scale: float = 1.0) -> Triangles:
    """Read the triangles of a planar mesh file with meshio (lines, points, tags are dropped).

    Args:
        path: any mesh file meshio reads (``.msh``, ``.vtu``, ``.vtk``, ``.xdmf``, ``.med``, ...).
        scale: factor from the file's unit to micrometres.

    Raises:
        InputError: unreadable file, no linear triangles, or vertices off the x-y plane.
    """
    import meshio

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "mesh.files", "an existing mesh file", "no such file")
    said = io.StringIO()
    try:
        # meshio prints its complaints and may call sys.exit: keep both to the one-line error
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            mesh = meshio.read(path)
    except (Exception, SystemExit) as err:  # ReadError, KeyError, ValueError, ... by format
        detail = " ".join(said.getvalue().split()) or f"{type(err).__name__}: {err}"
        raise InputError(path, "mesh.files", "a mesh file meshio can read", detail) from None
    blocks = [np.asarray(c.data) for c in mesh.cells if c.type == "triangle"]
    if not blocks or not sum(b.shape[0] for b in blocks):
        types = sorted({c.type for c in mesh.cells}) or ["no cells"]
        raise InputError(path, "mesh.files", "a mesh of linear triangles", ", ".join(types))
    cells = np.concatenate(blocks).astype(np.int64)
    points = np.asarray(mesh.points, dtype=np.float64)
    if points.shape[1] == 3:
        extent = float(np.ptp(points[:, :2], axis=0).max()) or 1.0
        off = float(np.abs(points[np.unique(cells), 2]).max())
        if off > 1e-9 * extent:
            raise InputError(
                path, "mesh.files", "a planar mesh in the x-y plane", f"|z| up to {off:.3g}"
            )
    used, cells = np.unique(cells, return_inverse=True)
    return Triangles(scale * points[used, :2], cells.reshape(-1, 3))


def footprint_mismatch(
    tri: Triangles, mask: np.ndarray, label: int, pixel_size: float, tolerance: float
) -> tuple[str, str] | None:
    """Compare a mesh with the labelled pixels of particle ``label``.

    The mesh area must lie within ``tolerance`` (relative) of the pixel area, and at least a
    fraction ``1 - tolerance`` of the labelled pixel centres must lie inside the mesh.

    Returns:
        None when they match, else ``(expected, found)`` for the error message.
    """
    from matplotlib.tri import Triangulation

    rows, cols = np.nonzero(mask == label)
    n_pixels = rows.size
    pixel_area = n_pixels * pixel_size**2
    area = float(tri.areas().sum())
    try:
        finder = Triangulation(tri.points[:, 0], tri.points[:, 1], tri.cells).get_trifinder()
        found = np.asarray(finder((cols + 0.5) * pixel_size, (rows + 0.5) * pixel_size))
        inside = int(np.count_nonzero(found >= 0))
    except (ValueError, RuntimeError) as err:  # overlapping or degenerate triangles
        return ("a valid triangle mesh", f"{type(err).__name__}: {err}")
    area_ok = abs(area - pixel_area) <= tolerance * pixel_area
    inside_ok = inside >= (1.0 - tolerance) * n_pixels
    if area_ok and inside_ok:
        return None
    expected = (
        f"a mesh of particle {label}'s footprint ({n_pixels} pixels, area {pixel_area:.4g} um^2, "
        f"within {tolerance:.0%})"
    )
    centre = tri.points.mean(axis=0)
    what = (
        f"area {area:.4g} um^2 with {inside} of {n_pixels} pixel centres inside "
        f"(mesh centre ({centre[0]:.3g}, {centre[1]:.3g}) um, pixels' "
        f"({(cols.mean() + 0.5) * pixel_size:.3g}, {(rows.mean() + 0.5) * pixel_size:.3g}) um)"
    )
    return (expected, what)


def read_particle_mesh(
    path: str | os.PathLike,
    mask: np.ndarray,
    label: int,
    pixel_size: float,
    comm,
    *,
    unit: str = "um",
    tolerance: float = 0.1,
) -> Any:
    """Read a user's particle mesh on rank 0, check its footprint, and distribute it on ``comm``.

    Args:
        path: the mesh file (any format meshio reads).
        mask: ``(H, W)`` label image (the same on every rank).
        label: the particle's label.
        pixel_size: pixel size, micrometres.
        comm: the communicator of the mesh.
        unit: the file's unit, ``"um"`` or ``"pixel"``.
        tolerance: relative tolerance of the footprint check (:func:`footprint_mismatch`).

    Returns:
        The DOLFINx mesh (gdim 2, linear triangles, micrometres).

    Raises:
        InputError: on every rank of ``comm`` together: unreadable file, no triangles, or a
            mesh that does not match the particle's pixels.
    """
    # isort: off
    import femkin._fem  # noqa: F401  (dolfinx_solver before dolfinx)
    import basix.ufl
    import dolfinx.mesh
    import ufl

    # isort: on

    if unit not in FILE_UNITS:
        raise InputError("<case>", "mesh.file_unit", f"one of {FILE_UNITS}", repr(unit))

    def checked() -> Triangles:
        tri = read_triangles(path, scale=pixel_size if unit == "pixel" else 1.0)
        mismatch = footprint_mismatch(tri, mask, label, pixel_size, tolerance)
        if mismatch is not None:
            raise InputError(path, "mesh.files", *mismatch)
        return tri

    tri = run_on_root(comm, checked)
    if tri is not None:
        cells, points = tri.cells, tri.points
    else:
        cells, points = np.empty((0, 3), dtype=np.int64), np.empty((0, 2), dtype=np.float64)
    element = ufl.Mesh(basix.ufl.element("Lagrange", "triangle", 1, shape=(2,)))
    return dolfinx.mesh.create_mesh(comm, cells, element, points)


def gathered_triangles(mesh) -> Triangles | None:
    """All triangles of a DOLFINx mesh on rank 0 (``None`` elsewhere); collective.

    Vertices shared between ranks are merged by their coordinates, so the result does not
    depend on the partition (up to the order of points and cells).
    """
    n_owned = mesh.topology.index_map(mesh.topology.dim).size_local
    x = mesh.geometry.x[:, :2]
    local = x[mesh.geometry.dofmaps[0][:n_owned]]  # (cells, 3, 2)
    parts = mesh.comm.gather(local, root=0)
    if parts is None:
        return None
    corners = np.concatenate(parts).reshape(-1, 2)
    scale = max(float(np.abs(corners).max()), 1e-300)
    key = np.round(corners / scale, 12)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    return Triangles(corners[first], inverse.reshape(-1, 3).astype(np.int64))


def write_mesh(mesh, path: str | os.PathLike, *, label: int | None = None) -> Path:
    """Write a DOLFINx mesh with meshio (format from the suffix); collective, rank 0 writes.

    Args:
        mesh: a 2-D triangle mesh (micrometres).
        path: the output file; its suffix picks the format (``.vtu``, ``.xdmf``, ``.msh``, ...).
        label: stored as cell data ``particle`` when given.

    Returns:
        ``path``.

    Raises:
        InputError: on every rank, when meshio cannot write the format.
    """
    import meshio

    path = Path(path)
    tri = gathered_triangles(mesh)
    error = None
    if tri is not None:
        points = np.column_stack([tri.points, np.zeros(len(tri.points))])
        cell_data = {} if label is None else {"particle": [np.full(len(tri.cells), int(label))]}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            meshio.write(path, meshio.Mesh(points, [("triangle", tri.cells)], cell_data=cell_data))
        except Exception as err:  # meshio raises WriteError, KeyError, ... by format
            error = InputError(
                path, None, "a mesh format meshio writes", f"{type(err).__name__}: {err}"
            )
    raise_on_every_rank(mesh.comm, error)
    return path
