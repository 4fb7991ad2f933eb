"""Particles meshed from label masks.

Each labelled particle becomes a polygon with holes in micrometre coordinates (pixel (i, j) has
its centre at ``x = (j + 0.5) * pixel_size``, ``y = (i + 0.5) * pixel_size``):

1. the sub-pixel boundary is the 0.5 level set of the particle's indicator image
   (:func:`skimage.measure.find_contours` on the zero-padded indicator), so a straight edge lies
   half a pixel outside the outermost pixel centres and the enclosed area matches the pixel count;
2. each ring is resampled at uniform arc length and smoothed with a periodic Gaussian of width
   ``smoothing`` pixels (removes the pixel staircase), then simplified by Douglas-Peucker with
   tolerance ``simplify`` pixels, halving the tolerance until no ring intersects itself or another;
3. gmsh meshes the polygon with triangles of target size ``size`` pixels on rank 0 only; the
   ``.msh`` file, or the error, is shared and every rank raises together; DOLFINx distributes the
   mesh over the communicator.

Meshes are cached as ``cache_dir/particle_<label>_<hash>.msh``, the hash covering every input.

Before gmsh runs, the number of triangles is estimated from the particle's area and the element
size (:func:`estimated_cells`: ``2.31 area / size^2 + 4 boundary edges / size``, in pixels);
above ``max_cells`` (``[mesh] max_cells``, default :data:`MAX_CELLS`) the mesh is refused
with the smallest element size that fits, instead of meshing for minutes. gmsh writes nothing
outside the cache folder: its scratch files go to ``cache_dir/.femkin/`` and the FLTK preference
file it writes on start-up goes to a scratch ``HOME`` there (FLTK also writes
``/etc/fltk/fltk.org/fltk.prefs`` when the process may write ``/etc``, i.e. as root; that path is
compiled into the gmsh wheel).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from femkin.errors import FemkinError, InputError, raise_on_every_rank
from femkin.io.atomic import atomic_write
from femkin.mesh_import import particle_mesh_file, read_particle_mesh
from femkin.outputs import PRIVATE, scratch_dir
from femkin.sysdeps import diagnose

#: Default limit of the estimated triangles per particle (``[mesh] max_cells``).
MAX_CELLS = 1_000_000
#: Triangles per (element size)^2 of area: Frontal-Delaunay gives near-equilateral triangles.
CELLS_PER_AREA = 4.0 / np.sqrt(3.0)
#: Extra triangles along the boundary, per pixel edge and element size (measured with gmsh).
CELLS_PER_EDGE = 4.0
#: Bump when the polygon or gmsh recipe changes: invalidates every cached mesh.
MESH_VERSION = 1
_RESAMPLE = 0.25  # arc-length spacing (pixels) of the smoothed contour


class ParticleMesh(NamedTuple):
    """One particle's mesh.

    Attributes:
        mesh: The DOLFINx mesh (gdim 2, triangles, micrometres) on the communicator.
        label: The particle's label in the mask.
        pixel_size: Pixel size in micrometres.
        area: Mesh area in um^2 (reduced over ranks).
        msh_file: The cached gmsh file, or None when no cache directory was given.
    """

    mesh: Any
    label: int
    pixel_size: float
    area: float
    msh_file: Path | None


# ------------------------------------------------------------------------------------------------
# Polygons


def particle_polygons(
    mask: np.ndarray,
    label: int,
    pixel_size: float,
    *,
    smoothing: float = 0.5,
    simplify: float = 0.25,
    min_hole_area: float = 4.0,
    source: str = "mask",
) -> list[np.ndarray]:
    """Return the boundary rings of one particle in micrometres.

    Args:
        mask: (H, W) integer label image.
        label: The particle's label.
        pixel_size: Pixel size in micrometres.
        smoothing: Gaussian smoothing length along the contour, pixels (0: none).
        simplify: Douglas-Peucker tolerance, pixels (0: none).
        min_hole_area: Holes with fewer pixels than this are filled.
        source: Named in error messages.

    Returns:
        (n, 2) arrays of (x, y) vertices, not repeating the first vertex: the outer boundary
        (counter-clockwise) first, then the holes (clockwise). If the label has several
        4-connected pieces only the largest is kept (with a warning).

    Raises:
        InputError: the label has no pixels.
    """
    from scipy import ndimage
    from skimage.measure import find_contours

    indicator = _indicator(mask, label, source)
    pieces, n_pieces = ndimage.label(indicator)  # 4-connected, as find_contours sees the inside
    if n_pieces > 1:
        sizes = np.bincount(pieces.ravel())[1:]
        keep = int(np.argmax(sizes)) + 1
        warnings.warn(
            f"{source}: particle {label} has {n_pieces} separate pieces; meshing the largest "
            f"({sizes[keep - 1]} pixels), dropping {int(sizes.sum() - sizes[keep - 1])} pixels",
            stacklevel=2,
        )
        indicator = pieces == keep
    padded = np.pad(indicator, 1)
    # Holes: background pieces (8-connected) that do not reach the padded frame.
    outside, _ = ndimage.label(~padded, structure=np.ones((3, 3)))
    hole_sizes = np.bincount(outside.ravel())
    small = np.flatnonzero((hole_sizes < min_hole_area) & (np.arange(hole_sizes.size) > 0))
    small = small[small != outside[0, 0]]
    padded = padded | np.isin(outside, small)

    rings = []
    for contour in find_contours(padded.astype(np.float64), 0.5):
        xy = np.column_stack([contour[:, 1] - 0.5, contour[:, 0] - 0.5])  # pixel units
        if np.allclose(xy[0], xy[-1]):
            xy = xy[:-1]
        if len(xy) >= 3:
            rings.append(xy)
    rings.sort(key=lambda r: -abs(_signed_area(r)))
    rings = [_oriented(r, ccw=(k == 0)) for k, r in enumerate(rings)]
    smoothed = [_smoothed(r, smoothing) for r in rings]
    kept = [0] + [k for k in range(1, len(rings)) if abs(_signed_area(smoothed[k])) > 0.25]
    out = _simplified([smoothed[k] for k in kept], simplify)
    # Smoothing and chords of convex stretches shrink a ring; an offset along the vertex normals
    # restores the area enclosed by the level set (which matches the pixel count).
    corrected = [_area_restored(r, _signed_area(rings[k])) for r, k in zip(out, kept, strict=True)]
    if not rings_intersect(corrected):
        out = corrected
    return [r * pixel_size for r in out]


def _indicator(mask: np.ndarray, label: int, source: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(source, "mask", "a 2-D label image", f"shape {mask.shape}")
    indicator = mask == label
    if not indicator.any():
        raise InputError(source, "mask", f"pixels with label {label}", "none")
    return indicator


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _oriented(ring: np.ndarray, *, ccw: bool) -> np.ndarray:
    return ring if (_signed_area(ring) > 0) == ccw else ring[::-1].copy()


def _smoothed(ring: np.ndarray, smoothing: float) -> np.ndarray:
    """Resample at uniform arc length and apply a periodic Gaussian of width ``smoothing``."""
    if smoothing <= 0:
        return ring
    from scipy.ndimage import gaussian_filter1d

    closed = np.vstack([ring, ring[:1]])
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(closed, axis=0), axis=1))])
    n = max(int(np.ceil(s[-1] / _RESAMPLE)), 8)
    si = np.linspace(0.0, s[-1], n, endpoint=False)
    xy = np.column_stack([np.interp(si, s, closed[:, 0]), np.interp(si, s, closed[:, 1])])
    return gaussian_filter1d(xy, smoothing / (s[-1] / n), axis=0, mode="wrap")


def _area_restored(ring: np.ndarray, target: float) -> np.ndarray:
    """Offset the vertices along their normals so the signed area becomes ``target``."""
    for _ in range(3):
        edges = np.roll(ring, -1, axis=0) - ring
        length = np.linalg.norm(edges, axis=1)
        perimeter = float(length.sum())
        # right-hand normals point outwards of a counter-clockwise ring (inwards of a hole's,
        # whose signed area is negative, so the same formula moves it the right way)
        normals = np.column_stack([edges[:, 1], -edges[:, 0]]) / length[:, None]
        vertex_normals = normals + np.roll(normals, 1, axis=0)
        vertex_normals /= np.linalg.norm(vertex_normals, axis=1)[:, None]
        offset = (target - _signed_area(ring)) / perimeter
        ring = ring + offset * vertex_normals
    return ring


def _simplified(rings: list[np.ndarray], tolerance: float) -> list[np.ndarray]:
    """Douglas-Peucker each ring; halve the tolerance until the rings form a valid polygon."""
    from skimage.measure import approximate_polygon

    while True:
        out = []
        for ring in rings:
            if tolerance > 0:
                r = approximate_polygon(np.vstack([ring, ring[:1]]), tolerance)[:-1]
            else:
                r = ring
            out.append(r)
        if all(len(r) >= 3 for r in out) and not rings_intersect(out):
            return out
        if tolerance < 1e-3:
            return rings
        tolerance /= 2


def rings_intersect(rings: list[np.ndarray]) -> bool:
    """True if any two non-adjacent edges of the rings cross or touch."""
    starts = np.vstack(rings)
    ends = np.vstack([np.roll(r, -1, axis=0) for r in rings])
    ring_id = np.concatenate([np.full(len(r), k) for k, r in enumerate(rings)])
    index = np.concatenate([np.arange(len(r)) for r in rings])
    length = np.concatenate([np.full(len(r), len(r)) for r in rings])

    def orient(a, b, c):
        return (b[..., 0] - a[..., 0]) * (c[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (
            c[..., 0] - a[..., 0]
        )

    p, q = starts[:, None, :], ends[:, None, :]
    r, s = starts[None, :, :], ends[None, :, :]
    o1, o2 = orient(p, q, r), orient(p, q, s)
    o3, o4 = orient(r, s, p), orient(r, s, q)
    cross = (o1 * o2 <= 0) & (o3 * o4 <= 0)
    same = ring_id[:, None] == ring_id[None, :]
    gap = np.abs(index[:, None] - index[None, :])
    adjacent = same & ((gap <= 1) | (gap == length[:, None] - 1))
    return bool(np.any(cross & ~adjacent))


# ------------------------------------------------------------------------------------------------
# Meshes


def mesh_hash(
    mask: np.ndarray,
    label: int,
    pixel_size: float,
    size: float,
    smoothing: float,
    simplify: float,
    min_hole_area: float,
) -> str:
    """Return the cache key of one particle mesh (16 hex digits)."""
    digest = hashlib.sha256()
    pixels = np.flatnonzero(np.asarray(mask) == label).astype(np.int64)
    digest.update(np.asarray(np.shape(mask), dtype=np.int64).tobytes())
    digest.update(pixels.tobytes())
    params = (MESH_VERSION, int(label), pixel_size, size, smoothing, simplify, min_hole_area)
    digest.update(repr(tuple(float(p) for p in params)).encode())
    return digest.hexdigest()[:16]


def estimated_cells(mask: np.ndarray, label: int, size: float) -> int:
    """The number of triangles gmsh makes for a particle at element size ``size`` (pixels).

    ``CELLS_PER_AREA area / size^2`` for the interior plus :data:`CELLS_PER_EDGE` per pixel edge
    of the boundary per element size (gmsh refines along the polygon); within 20% of gmsh's
    count from 3 to 0.25 pixels (tests/robustness/test_outputs.py).
    """
    indicator = np.pad(np.asarray(mask) == label, 1)
    area = float(np.count_nonzero(indicator))
    edges = float(
        np.count_nonzero(indicator[1:] != indicator[:-1])
        + np.count_nonzero(indicator[:, 1:] != indicator[:, :-1])
    )
    return int(np.ceil(CELLS_PER_AREA * area / size**2 + CELLS_PER_EDGE * edges / size))


def check_cell_count(
    mask: np.ndarray,
    label: int,
    size: float,
    max_cells: int = MAX_CELLS,
    source: str = "mask",
    field: str = "mesh.size",
) -> int:
    """The estimated triangles of a particle; refuses more than ``max_cells``.

    Raises:
        InputError: naming ``field`` of ``source``, the estimate and the smallest size that fits.
    """
    cells = estimated_cells(mask, label, size)
    if cells > max_cells:
        smallest = size * np.sqrt(cells / max_cells)
        raise InputError(
            source,
            field,
            f"an element size giving at most max_cells = {max_cells} triangles for particle "
            f"{label} (size >= {smallest:.3g} pixels, or raise [mesh] max_cells)",
            f"size {size:g} pixels: about {cells} triangles",
        )
    return cells


def mesh_particle(
    mask: np.ndarray,
    label: int,
    pixel_size: float,
    comm,
    *,
    size: float = 1.0,
    smoothing: float = 0.5,
    simplify: float = 0.25,
    min_hole_area: float = 4.0,
    cache_dir: str | os.PathLike | None = None,
    source: str = "mask",
    files: dict[int, str] | str | None = None,
    file_unit: str = "um",
    footprint_tolerance: float = 0.1,
    max_cells: int = MAX_CELLS,
) -> ParticleMesh:
    """Mesh one particle of a label mask with triangles on ``comm``.

    Args:
        mask: (H, W) integer label image (the same on every rank).
        label: The particle's label.
        pixel_size: Pixel size in micrometres.
        comm: MPI communicator of the mesh.
        size: Target element size, pixels.
        smoothing: Boundary smoothing, see :func:`particle_polygons`.
        simplify: Boundary simplification tolerance, see :func:`particle_polygons`.
        min_hole_area: Smallest hole kept, see :func:`particle_polygons`.
        cache_dir: Folder of cached ``.msh`` files (reused when present), or None.
        source: Named in error messages.
        files: The particles' own meshes (``[mesh] files``: label -> path, or a path pattern
            with ``{label}``); when given, the particle's file is read and checked against its
            pixels instead of meshing the mask (:mod:`femkin.mesh_import`).
        file_unit: Unit of those files' coordinates, ``"um"`` or ``"pixel"``.
        footprint_tolerance: Relative area and containment mismatch allowed for those files.
        max_cells: Refuse a mesh of more (estimated) triangles than this.

    Raises:
        InputError: an empty label, a non-positive size, a mesh above ``max_cells``, an
            unwritable cache folder, or a particle gmsh cannot mesh (raised on every rank).
    """
    _indicator(mask, label, source)  # every rank validates before any collective call
    if files is not None:
        path = particle_mesh_file(files, label, source)
        mesh = read_particle_mesh(
            path, mask, label, pixel_size, comm, unit=file_unit, tolerance=footprint_tolerance
        )
        return ParticleMesh(
            mesh, int(label), float(pixel_size), comm.allreduce(_local_area(mesh)), path
        )
    if not (np.isfinite(size) and size > 0):
        raise InputError(source, "mesh.size", "a positive element size in pixels", size)
    if not (np.isfinite(pixel_size) and pixel_size > 0):
        raise InputError(source, "pixel_size", "a positive size in micrometres", pixel_size)
    check_cell_count(mask, label, size, max_cells, source)
    options = dict(smoothing=smoothing, simplify=simplify, min_hole_area=min_hole_area)
    key = mesh_hash(mask, label, pixel_size, size, **options)
    cache = Path(cache_dir) if cache_dir is not None else None
    target = cache / f"particle_{int(label)}_{key}.msh" if cache is not None else None

    error: FemkinError | None = None
    msh, scratch, home = None, None, None
    if comm.rank == 0:
        try:
            writable = cache is not None and (
                os.access(cache, os.W_OK) if cache.exists() else _creatable(cache)
            )
            if target is not None and target.is_file():
                msh = target
                home = cache / PRIVATE / f"home-{os.getpid()}" if writable and cache else None
            else:
                _remove_stale(cache)
                scratch = scratch_dir(cache)  # cache None: the system temporary directory
                home = scratch.__enter__()
                rings = particle_polygons(mask, label, pixel_size, **options, source=source)
                msh = home / "particle.msh"
                try:
                    _gmsh_write(rings, int(label), size * pixel_size, msh, home=home)
                except Exception as err:  # gmsh raises plain Exceptions
                    # a missing system library is neither the data's nor the folder's fault
                    if (problem := diagnose(err, "gmsh")) is not None:
                        raise problem from None
                    if isinstance(err, OSError):
                        raise
                    raise InputError(
                        source, "mask", f"a particle {label} that gmsh can mesh", f"gmsh: {err}"
                    ) from None
                if target is not None:
                    msh = _store(msh, target)
        except FemkinError as err:
            error = err
        except OSError as err:
            where = err.filename or cache
            error = InputError(str(where), None, "a writable mesh folder", f"{err.strerror or err}")
    try:
        raise_on_every_rank(comm, error)
        mesh = read_msh(msh, comm, home=home)
    finally:
        if scratch is not None:
            scratch.__exit__(None, None, None)
    area = comm.allreduce(_local_area(mesh))
    return ParticleMesh(mesh, int(label), float(pixel_size), area, target)


def _store(msh: Path, target: Path) -> Path:
    """Copy a new mesh into the cache atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: shutil.copyfile(msh, tmp))
    return target


#: Scratch folders of killed runs older than this (seconds) are removed.
_STALE = 600.0


def _creatable(folder: Path) -> bool:
    parent = folder.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return os.access(parent, os.W_OK)


def _remove_stale(cache: Path | None) -> None:
    """Remove scratch folders that killed runs left in ``cache/.femkin``."""
    if cache is None:
        return
    for old in list((cache / PRIVATE).glob("scratch-*")) + list((cache / PRIVATE).glob("home-*")):
        try:
            if time.time() - old.stat().st_mtime > _STALE:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def read_msh(path: str | os.PathLike | None, comm, *, home: Path | None = None) -> Any:
    """Read a 2-D gmsh ``.msh`` file (needed on rank 0 only) into a DOLFINx mesh on ``comm``.

    ``home``: where gmsh's FLTK may write its preference file meanwhile (see :func:`_gmsh_start`).

    Raises:
        InputError: on every rank, when rank 0 cannot read the file.
    """
    # isort: off
    import femkin._fem  # noqa: F401  (dolfinx_solver before dolfinx)
    from dolfinx.io import gmsh as dolfinx_gmsh

    # isort: on

    error: FemkinError | None = None
    if comm.rank == 0:
        try:
            import gmsh

            if path is None or not Path(path).is_file():
                raise FileNotFoundError("no such file")
            _gmsh_start(home=home)
            gmsh.model.add("femkin_read")
            gmsh.merge(str(path))
            if not gmsh.model.getPhysicalGroups(2):
                raise ValueError("no physical surface group")
        except Exception as err:
            error = diagnose(err, "gmsh")
            if error is None:
                _gmsh_stop()
                error = InputError(
                    path, None, "a readable 2-D gmsh mesh", f"{type(err).__name__}: {err}"
                )
    raise_on_every_rank(comm, error)
    if comm.rank == 0:
        import gmsh

        try:
            data = dolfinx_gmsh.model_to_mesh(gmsh.model, comm, 0, gdim=2)
        finally:
            gmsh.model.remove()
            _gmsh_stop()
    else:
        data = dolfinx_gmsh.model_to_mesh(None, comm, 0, gdim=2)
    return data.mesh


_GMSH_OWNED = False


def _gmsh_start(home: Path | None = None) -> None:
    """Initialise gmsh (no config files, no popups) with ``HOME`` at ``home`` meanwhile.

    gmsh's FLTK writes ``$HOME/.fltk/fltk.org/fltk.prefs`` on start-up; pointing ``HOME`` at
    a scratch folder of the case keeps the user's home untouched.
    """
    global _GMSH_OWNED
    import gmsh

    if not gmsh.isInitialized():
        saved = os.environ.get("HOME")
        created = home is not None and not Path(home).exists()
        if home is not None:
            Path(home).mkdir(parents=True, exist_ok=True)
            os.environ["HOME"] = str(home)
        handlers = _signal_handlers()
        try:
            gmsh.initialize(["-nopopup"], readConfigFiles=False, interruptible=False)
        finally:
            _restore_signal_handlers(handlers)  # gmsh resets SIGTERM to its default
            if home is not None:
                if saved is None:
                    os.environ.pop("HOME", None)
                else:
                    os.environ["HOME"] = saved
                shutil.rmtree(Path(home) if created else Path(home) / ".fltk", ignore_errors=True)
        _GMSH_OWNED = True
    gmsh.option.setNumber("General.Terminal", 0)


def _signal_handlers() -> dict:
    import signal

    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}


def _restore_signal_handlers(handlers: dict) -> None:
    import signal

    for signum, handler in handlers.items():
        if handler is not None:
            try:
                signal.signal(signum, handler)
            except ValueError:  # not the main thread
                pass


def _gmsh_stop() -> None:
    global _GMSH_OWNED
    import gmsh

    if _GMSH_OWNED and gmsh.isInitialized():
        gmsh.finalize()
        _GMSH_OWNED = False


def _gmsh_write(
    rings: list[np.ndarray], label: int, h: float, path: Path, *, home: Path | None = None
) -> None:
    """Mesh the polygon (outer ring + holes, um) with gmsh; write a .msh file."""
    import gmsh

    _gmsh_start(home=home)
    try:
        gmsh.model.add(f"femkin_particle_{label}")
        geo = gmsh.model.geo
        loops, lines = [], []
        for ring in rings:
            points = [geo.addPoint(float(x), float(y), 0.0, h) for x, y in ring]
            edges = [
                geo.addLine(points[k], points[(k + 1) % len(points)]) for k in range(len(points))
            ]
            lines += edges
            loops.append(geo.addCurveLoop(edges))
        surface = geo.addPlaneSurface(loops)
        geo.synchronize()
        gmsh.model.addPhysicalGroup(2, [surface], tag=label, name="particle")
        gmsh.model.addPhysicalGroup(1, lines, tag=1, name="boundary")
        gmsh.option.setNumber("Mesh.Algorithm", 6)  # Frontal-Delaunay: well-shaped triangles
        gmsh.option.setNumber("Mesh.MeshSizeMax", h)
        gmsh.option.setNumber("Mesh.MeshSizeFromCurvature", 0)
        gmsh.option.setNumber("Mesh.MshFileVersion", 4.1)
        gmsh.model.mesh.generate(2)
        gmsh.write(str(path))
    finally:
        if gmsh.isInitialized() and gmsh.model.getCurrent() == f"femkin_particle_{label}":
            gmsh.model.remove()
        _gmsh_stop()


def mesh_area(mesh) -> float:
    """The area of a mesh (um^2 for femkin's meshes), collective on ``mesh.comm``."""
    return float(mesh.comm.allreduce(_local_area(mesh)))


def _local_area(mesh) -> float:
    import dolfinx.fem
    import ufl

    one = dolfinx.fem.Constant(mesh, np.float64(1.0))
    return float(dolfinx.fem.assemble_scalar(dolfinx.fem.form(one * ufl.dx(domain=mesh))))


def _owned_triangles(mesh) -> np.ndarray:
    n = mesh.topology.index_map(mesh.topology.dim).size_local
    return mesh.geometry.x[mesh.geometry.dofmaps[0][:n], :2]


def plot_mesh(particle_mesh: ParticleMesh, mask: np.ndarray, path: str | os.PathLike) -> None:
    """Write a PNG of the mesh over its mask (collective; rank 0 draws)."""
    comm = particle_mesh.mesh.comm
    triangles = comm.gather(_owned_triangles(particle_mesh.mesh), root=0)
    if comm.rank != 0:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    tri = np.concatenate(triangles)
    ps = particle_mesh.pixel_size
    rows, cols = np.shape(mask)
    fig, ax = plt.subplots(figsize=(6, 6))
    shown = np.where(np.asarray(mask) == particle_mesh.label, 2, np.sign(mask)).astype(float)
    ax.imshow(
        shown,
        cmap="Greys",
        vmin=0,
        vmax=3,
        extent=(0, cols * ps, rows * ps, 0),
        interpolation="nearest",
    )
    ax.add_collection(
        PolyCollection(list(tri), facecolors="none", edgecolors="tab:blue", linewidths=0.4)
    )
    lo, hi = tri.reshape(-1, 2).min(axis=0), tri.reshape(-1, 2).max(axis=0)
    pad = 2 * ps
    ax.set_xlim(lo[0] - pad, hi[0] + pad)
    ax.set_ylim(hi[1] + pad, lo[1] - pad)  # rows grow downwards, as in the image
    ax.set_aspect("equal")
    ax.set_xlabel("x (um)")
    ax.set_ylabel("y (um)")
    ax.set_title(
        f"particle {particle_mesh.label}: {len(tri)} triangles, area {particle_mesh.area:.4g} um^2"
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
