"""Pixel observation of a P1 field: point values at pixel centres, or blurred pixels.

Point sampling (the default, :func:`build_observation`): the value at the centre of each of a
particle's pixels. The operator is a sparse matrix assembled once. Each pixel is evaluated by
exactly one rank (the lowest rank whose owned cells contain its centre; a centre that falls
outside the smoothed mesh boundary is evaluated at the closest point of the closest cell), so
that sums over pixels need one ``allreduce`` and the transpose needs one reverse ghost update.

Blurred pixels (``[data] psf_fwhm``, :func:`blurred_observation`): the field averaged over the
pixel's square convolved with a Gaussian point-spread function, renormalised over the particle.
Still one sparse matrix, linear in the field; a pixel's kernel reaches cells of several ranks,
so each rank holds its part of every row and :meth:`Observation.apply` sums the parts (one
``Allreduce`` of the particle's pixel values). Its derivatives in the PSF width are assembled
on the same quadrature (a learned width, block ``psf_fwhm``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp
from scipy import special

from femkin._fem import MPI, dolfinx


class Observation(NamedTuple):
    """Observation operator of one particle on this rank.

    Point sampling (``comm`` None): row ``i`` of ``matrix`` gives this rank's pixel
    ``pixels[i]`` from the rank's local array alone. Blurred observation (``comm`` set): a
    pixel's kernel reaches cells of several ranks, so ``matrix`` holds this rank's part of
    every pixel of the particle (rows: the particle's pixels in image order) and ``apply``
    sums the parts over ``comm`` (one ``Allreduce`` of ``n_pixels`` values, collective).

    Attributes:
        pixels: flat indices (into the H*W image) of the pixels this rank evaluates.
        matrix: CSR matrix acting on a P1 function's local array (owned + ghost values) of the
            space it was built for: (len(pixels), n_local_with_ghosts) for point sampling,
            (n_pixels, n_local_with_ghosts) partial rows for a blurred observation.
        n_pixels: total number of the particle's pixels over all ranks.
        comm: the particle's communicator when the rows are partial sums over ranks.
        owned: positions of ``pixels`` among the particle's pixels (blurred observation).
    """

    pixels: np.ndarray
    matrix: sp.csr_matrix
    n_pixels: int
    comm: Any = None
    owned: np.ndarray | None = None

    def apply(self, local_array: np.ndarray) -> np.ndarray:
        """Values at this rank's pixels (collective over ``comm`` when it is set)."""
        if self.comm is None:
            return self.matrix @ local_array
        full = np.asarray(self.matrix @ local_array, dtype=float)
        if self.comm.size > 1:
            self.comm.Allreduce(MPI.IN_PLACE, full, op=MPI.SUM)
        return full[self.owned]

    def apply_transpose(self, values: np.ndarray, out: np.ndarray) -> None:
        """Add B^T values into ``out`` (a local array with ghosts; reverse-scatter afterwards).

        Collective over ``comm`` when it is set.
        """
        if self.comm is None:
            out += self.matrix.T @ values
            return
        full = np.zeros(self.n_pixels)
        full[self.owned] = values
        if self.comm.size > 1:
            self.comm.Allreduce(MPI.IN_PLACE, full, op=MPI.SUM)
        out += self.matrix.T @ full


def _barycentric(points: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Barycentric coordinates of 2-D points in triangles, one triangle per point."""
    v0, v1, v2 = vertices[:, 0, :2], vertices[:, 1, :2], vertices[:, 2, :2]
    d1, d2, dp = v1 - v0, v2 - v0, points[:, :2] - v0
    det = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    l1 = (dp[:, 0] * d2[:, 1] - dp[:, 1] * d2[:, 0]) / det
    l2 = (d1[:, 0] * dp[:, 1] - d1[:, 1] * dp[:, 0]) / det
    return np.stack([1.0 - l1 - l2, l1, l2], axis=1)


def build_observation(
    V, mask: np.ndarray, label: int, pixel_size: float, *, psf_fwhm: float | None = None
) -> Observation:
    """Assemble the pixel observation operator of particle ``label`` for the P1 space ``V``.

    Args:
        V: a scalar P1 space, or the P1 subspace ``W.sub(i)`` of a mixed space (its dofmap
            then numbers the parent's dofs, and the matrix acts on the parent's local array).
        mask: (H, W) label image.
        label: the particle's label.
        pixel_size: um.
        psf_fwhm: None (default): the value at the pixel centre (point sampling). A positive
            FWHM (um): the blurred observation of :func:`blurred_observation`.

    Returns:
        The observation operator of this rank.
    """
    if psf_fwhm is not None:
        return blurred_observation(V, mask, label, pixel_size, psf_fwhm)
    flat, closest, lam, mine = _pixel_centres(V.mesh, mask, label, pixel_size)
    cell_dofs = V.dofmap.list
    local_dofs = cell_dofs[closest[mine]] if mine.size else np.zeros((0, 3), dtype=np.int32)
    # P1 dofs follow the reference vertex order, like the geometry dofmap.
    data = lam[mine].ravel()
    r = np.repeat(np.arange(mine.size), 3)
    matrix = sp.csr_matrix((data, (r, local_dofs.ravel())), shape=(mine.size, _n_columns(V)))
    matrix.sum_duplicates()
    return Observation(flat[mine], matrix, int(flat.size))


def _n_columns(V) -> int:
    im = V.dofmap.index_map
    return (im.size_local + im.num_ghosts) * V.dofmap.index_map_bs


def _pixel_centres(mesh, mask: np.ndarray, label: int, pixel_size: float):
    """Locate the particle's pixel centres in this rank's cells and choose each one's rank.

    Returns:
        ``(flat, closest, lam, mine)``: flat indices of all the particle's pixels (image
        order), the closest owned cell of each centre, the clamped barycentric coordinates of
        the centre (or of its closest point) in that cell, and the positions in ``flat`` of the
        pixels this rank evaluates (each pixel on exactly one rank: the lowest rank whose
        owned cells contain its centre; a centre outside the smoothed boundary goes to the
        rank of the closest cell).
    """
    comm = mesh.comm
    rows, cols = np.nonzero(mask == label)
    flat = rows * mask.shape[1] + cols
    points = np.zeros((flat.size, 3))
    points[:, 0] = (cols + 0.5) * pixel_size
    points[:, 1] = (rows + 0.5) * pixel_size

    tdim = mesh.topology.dim
    n_cells = mesh.topology.index_map(tdim).size_local
    cells_local = np.arange(n_cells, dtype=np.int32)
    tree = dolfinx.geometry.bb_tree(mesh, tdim, padding=0.0, entities=cells_local)
    # Closest owned cell for every point; distance 0 when inside.
    mid_tree = dolfinx.geometry.create_midpoint_tree(mesh, tdim, cells_local)
    closest = dolfinx.geometry.compute_closest_entity(tree, mid_tree, mesh, points)
    x = mesh.geometry.x
    xdofs = _geometry_dofmap(mesh)
    if n_cells > 0 and flat.size > 0:
        verts = x[xdofs[closest]]
        lam = _barycentric(points, verts)
        inside = np.all(lam >= -1e-10, axis=1)
        # Project outside points onto the closest point of the triangle (clamped barycentrics).
        dist = np.full(flat.size, np.inf)
        dist[inside] = 0.0
        out_idx = np.nonzero(~inside)[0]
        if out_idx.size:
            proj, d = _closest_points_in_triangles(points[out_idx, :2], verts[out_idx, :, :2])
            dist[out_idx] = d
            lam[out_idx] = _barycentric(np.c_[proj, np.zeros(len(proj))], verts[out_idx])
        lam = np.clip(lam, 0.0, 1.0)
        lam /= lam.sum(axis=1, keepdims=True)
    else:
        dist = np.full(flat.size, np.inf)
        lam = np.zeros((flat.size, 3))
    # Owner: smallest distance (to 1e-12 um), ties to the lowest rank.
    rounded = np.round(dist, 12)
    best = np.min(comm.allgather(rounded), axis=0)  # elementwise (allreduce MIN fails on arrays)
    candidate = np.where(rounded <= best, comm.rank, comm.size)
    owner = np.min(comm.allgather(candidate), axis=0)
    mine = np.nonzero(owner == comm.rank)[0]
    return flat, closest, lam, mine


def _geometry_dofmap(mesh) -> np.ndarray:
    geometry = mesh.geometry
    return geometry.dofmaps[0] if hasattr(geometry, "dofmaps") else geometry.dofmap


def _closest_points_in_triangles(p: np.ndarray, tri: np.ndarray):
    """Closest point of each triangle to each point (2-D) and the distance."""
    best = np.full(len(p), np.inf)
    best_pt = np.zeros_like(p)
    for i, j in ((0, 1), (1, 2), (2, 0)):
        a, b = tri[:, i], tri[:, j]
        ab = b - a
        t = np.einsum("ij,ij->i", p - a, ab) / np.maximum(np.einsum("ij,ij->i", ab, ab), 1e-300)
        t = np.clip(t, 0.0, 1.0)
        q = a + t[:, None] * ab
        d = np.linalg.norm(p - q, axis=1)
        better = d < best
        best[better] = d[better]
        best_pt[better] = q[better]
    return best_pt, best


# ------------------------------------------------------------------------------------------------
# The blurred observation: the pixel footprint convolved with a Gaussian point-spread function.

#: FWHM / sigma of a Gaussian.
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
#: The kernel is cut this many sigma beyond the pixel's edges (mass left out < 1e-9).
TRUNCATION = 6.0
#: Degree of the Gauss rule on each sub-triangle.
QUADRATURE_DEGREE = 8
#: Sub-triangles per cell edge: ceil(RESOLUTION * h_max / sigma), each then at most 2.5 sigma
#: across. Measured against 24 subdivisions (16 x 16 cells, random P1 field, h / sigma from 3 to
#: 17): largest error of a pixel value ~1e-9 (it is 2e-7 at 4 sigma and 8e-4 at 17 sigma).
RESOLUTION = 0.4


def pixel_kernel(x: np.ndarray, j: np.ndarray, pixel_size: float, sigma: float, order: int = 0):
    """1-D pixel kernel: the box of pixel ``j`` (normalised) convolved with a Gaussian.

    ``k(x) = (Phi(((j + 1) a - x) / sigma) - Phi((j a - x) / sigma)) / a``: the density of
    ``U + sigma Z`` with ``U`` uniform on the pixel ``[j a, (j + 1) a]`` and ``Z ~ N(0, 1)``;
    it integrates to 1 over the line. With ``u = U / sigma``,
    ``d Phi(u) / d sigma = -phi(u) u / sigma`` and
    ``d^2 Phi(u) / d sigma^2 = phi(u) u (2 - u^2) / sigma^2``.

    Args:
        x: coordinates (um).
        j: pixel indices (broadcast with ``x``).
        pixel_size: ``a`` (um).
        sigma: the Gaussian's standard deviation (um), > 0.
        order: the highest sigma-derivative returned (0, 1 or 2).

    Returns:
        ``[k, dk/dsigma, d^2k/dsigma^2][: order + 1]`` at ``x``.
    """
    u1 = ((j + 1) * pixel_size - x) / sigma
    u0 = (j * pixel_size - x) / sigma
    # Phi(u1) - Phi(u0) from the tail nearer to zero: no cancellation of two numbers near 1.
    diff = np.where(
        u0 > 0.0, special.ndtr(-u0) - special.ndtr(-u1), special.ndtr(u1) - special.ndtr(u0)
    )
    out = [diff / pixel_size]
    if order >= 1:
        pdf1 = np.exp(-0.5 * u1 * u1) / np.sqrt(2.0 * np.pi)
        pdf0 = np.exp(-0.5 * u0 * u0) / np.sqrt(2.0 * np.pi)
        out.append((pdf0 * u0 - pdf1 * u1) / (pixel_size * sigma))
        if order >= 2:
            second = pdf1 * u1 * (2.0 - u1 * u1) - pdf0 * u0 * (2.0 - u0 * u0)
            out.append(second / (pixel_size * sigma * sigma))
    return out


def _composite_rule(m: int, degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss rule of ``degree`` on each of the m^2 congruent sub-triangles of the reference
    triangle; returns points (n, 2) and weights (n,) summing to 1/2.
    """
    import basix  # after femkin._fem, which loads the bundled libraries first

    points, weights = basix.make_quadrature(basix.CellType.triangle, degree)
    out_p, out_w = [], []
    for i in range(m):
        for j in range(m - i):
            corners = [((i, j), (1, 0), (0, 1))]
            if i + j <= m - 2:
                corners.append(((i + 1, j), (-1, 1), (0, 1)))
            for origin, e1, e2 in corners:
                p = np.asarray(origin, float) + points[:, :1] * e1 + points[:, 1:2] * e2
                out_p.append(p / m)
                out_w.append(weights / m**2)
    return np.concatenate(out_p), np.concatenate(out_w)


def blurred_observation(
    V,
    mask: np.ndarray,
    label: int,
    pixel_size: float,
    psf_fwhm: float,
    *,
    derivatives: int = 0,
    subdivisions: int | None = None,
    chunk: int = 512,
):
    """The blurred pixel observation of particle ``label`` for the P1 space ``V``.

    Pixel ``i`` (the square ``P_i`` of side ``a``) sees

        B_i c = int_Omega K_i c dx / int_Omega K_i dx,    K_i = (1_{P_i} / a^2) * G_sigma,

    the pixel's footprint convolved with the Gaussian PSF ``G_sigma`` (``sigma = psf_fwhm /
    (2 sqrt(2 ln 2))``), restricted to the particle's mesh ``Omega`` and renormalised there:
    the pixel value is a composition (the fraction of Li in the material the beam crosses),
    and where the kernel reaches outside the particle there is no material, neither lithiated
    nor delithiated, so the outside adds nothing to either; rows sum to 1. (Another particle
    within the kernel's reach is not seen: particles are observed independently.)
    ``K_i = k_x k_y`` is separable with the closed form of :func:`pixel_kernel`; the integrals
    are exact for the P1 basis up to the quadrature of the smooth kernel on each cell (a Gauss
    rule of degree :data:`QUADRATURE_DEGREE` on sub-triangles ``sigma / RESOLUTION`` across,
    ~1e-9)
    and the cut :data:`TRUNCATION` sigma beyond the pixel.

    Each rank integrates over its owned cells; a pixel's rows are summed over the ranks in
    :meth:`Observation.apply`, and each pixel is reported by the rank that point sampling
    gives it. The answer does not depend on the partition (to rounding).

    Args:
        V: a scalar P1 space or the P1 subspace of a mixed space (as :func:`build_observation`).
        mask: (H, W) label image.
        label: the particle's label.
        pixel_size: ``a``, um.
        psf_fwhm: FWHM of the Gaussian PSF, um (> 0).
        derivatives: also return dB/d(psf_fwhm) (1) and d^2B/d(psf_fwhm)^2 (2) as
            :class:`Observation` objects: exact for the assembled operator (the kernel's
            sigma-derivatives on the same quadrature points, with the derivatives of the
            renormalisation).
        subdivisions: sub-triangles per cell edge (default from :data:`RESOLUTION`).
        chunk: largest number of cells per vectorised batch (memory; batches also hold at
            most 2^17 quadrature points).

    Returns:
        The observation (collective operator); with ``derivatives`` a tuple
        ``(B, dB/dfwhm[, d^2B/dfwhm^2])``.
    """
    if not (np.isfinite(psf_fwhm) and psf_fwhm > 0):
        raise ValueError(f"{psf_fwhm=} must be a positive number (um)")
    if derivatives not in (0, 1, 2):
        raise ValueError(f"{derivatives=} must be 0, 1 or 2")
    mesh = V.mesh
    comm = mesh.comm
    a = float(pixel_size)
    sigma = float(psf_fwhm) / FWHM_PER_SIGMA
    flat, _, _, mine = _pixel_centres(mesh, mask, label, a)
    n_pix = int(flat.size)
    H, W = mask.shape
    index = np.full(H * W, -1, dtype=np.int64)
    index[flat] = np.arange(n_pix)
    index = index.reshape(H, W)

    tdim = mesh.topology.dim
    n_cells = mesh.topology.index_map(tdim).size_local
    verts = mesh.geometry.x[_geometry_dofmap(mesh)[:n_cells]][:, :, :2]
    diam = np.max(np.linalg.norm(verts - np.roll(verts, 1, axis=1), axis=2), axis=1)
    h_max = comm.allreduce(float(diam.max()) if n_cells else 0.0, op=MPI.MAX)
    m = subdivisions or max(1, int(np.ceil(RESOLUTION * h_max / sigma)))
    ref_p, ref_w = _composite_rule(m, QUADRATURE_DEGREE)
    phi = np.c_[1.0 - ref_p[:, 0] - ref_p[:, 1], ref_p]  # P1 basis at the points (nq, 3)
    cell_dofs = V.dofmap.list[:n_cells]
    chunk = max(1, min(chunk, 2**17 // len(ref_w)))  # at most 2^17 points per batch
    reach = TRUNCATION * sigma

    rows_out: list[np.ndarray] = []
    cols_out: list[np.ndarray] = []
    vals_out: list[list[np.ndarray]] = [[] for _ in range(derivatives + 1)]  # R, R', R''
    for first in range(0, n_cells, chunk):
        v = verts[first : first + chunk]
        e1, e2 = v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]
        det = np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
        # quadrature points (nc, nq) and weights
        px = (
            v[:, None, 0, 0]
            + ref_p[None, :, 0] * e1[:, None, 0]
            + ref_p[None, :, 1] * e2[:, None, 0]
        )
        py = (
            v[:, None, 0, 1]
            + ref_p[None, :, 0] * e1[:, None, 1]
            + ref_p[None, :, 1] * e2[:, None, 1]
        )
        wq = det[:, None] * ref_w[None, :]
        lo, hi = v.min(axis=1), v.max(axis=1)
        j0 = np.floor((lo[:, 0] - reach) / a).astype(np.int64)
        j1 = np.floor((hi[:, 0] + reach) / a).astype(np.int64)
        i0 = np.floor((lo[:, 1] - reach) / a).astype(np.int64)
        i1 = np.floor((hi[:, 1] + reach) / a).astype(np.int64)
        kx = [
            pixel_kernel(px, (j0 + d)[:, None], a, sigma, derivatives)
            for d in range(int((j1 - j0).max()) + 1)
        ]
        ky = [
            pixel_kernel(py, (i0 + d)[:, None], a, sigma, derivatives)
            for d in range(int((i1 - i0).max()) + 1)
        ]
        dofs = cell_dofs[first : first + chunk]
        for di, kyd in enumerate(ky):
            row = i0 + di
            for dj, kxd in enumerate(kx):
                col = j0 + dj
                ok = (row <= i1) & (col <= j1) & (row >= 0) & (row < H) & (col >= 0) & (col < W)
                pix = np.where(ok, index[np.clip(row, 0, H - 1), np.clip(col, 0, W - 1)], -1)
                sel = np.nonzero(pix >= 0)[0]
                if sel.size == 0:
                    continue
                rows_out.append(np.repeat(pix[sel], 3))
                cols_out.append(dofs[sel].ravel())
                kxs, kys, ws = [k[sel] for k in kxd], [k[sel] for k in kyd], wq[sel]
                # sigma-derivatives of K = k_x k_y (Leibniz)
                kernels = [kys[0] * kxs[0]]
                if derivatives >= 1:
                    kernels.append(kys[1] * kxs[0] + kys[0] * kxs[1])
                if derivatives >= 2:
                    kernels.append(kys[2] * kxs[0] + 2.0 * kys[1] * kxs[1] + kys[0] * kxs[2])
                for out, kern in zip(vals_out, kernels, strict=True):
                    out.append(((kern * ws) @ phi).ravel())
    n_cols = _n_columns(V)
    r = np.concatenate(rows_out) if rows_out else np.zeros(0, np.int64)
    c = np.concatenate(cols_out) if cols_out else np.zeros(0, np.int64)

    def assembled(values):
        d = np.concatenate(values) if values else np.zeros(0)
        out = sp.csr_matrix((d, (r, c)), shape=(n_pix, n_cols))
        out.sum_duplicates()
        total = np.asarray(out.sum(axis=1)).ravel()
        comm.Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
        return out, total

    raws, totals = zip(*(assembled(v) for v in vals_out), strict=True)
    s0 = totals[0]
    if n_pix and s0.min() <= 0.0:
        bad = flat[int(np.argmin(s0))]
        raise ValueError(
            f"pixel {divmod(int(bad), W)} of particle {label}: its kernel does not reach the mesh"
        )

    def scaled(terms):
        out = sum(sp.diags(f) @ m for f, m in terms)
        return Observation(flat[mine], sp.csr_matrix(out), n_pix, comm, mine)

    # B = R / s with s the (global) row sums; derivatives in sigma, then d/dfwhm = d/dsigma / F.
    obs = scaled([(1.0 / s0, raws[0])])
    if not derivatives:
        return obs
    F = FWHM_PER_SIGMA
    s1 = totals[1]
    out = [obs, scaled([(1.0 / (s0 * F), raws[1]), (-s1 / (s0**2 * F), raws[0])])]
    if derivatives == 2:
        s2 = totals[2]
        out.append(
            scaled(
                [
                    (1.0 / (s0 * F**2), raws[2]),
                    (-2.0 * s1 / (s0**2 * F**2), raws[1]),
                    ((2.0 * s1**2 / s0**3 - s2 / s0**2) / F**2, raws[0]),
                ]
            )
        )
    return tuple(out)
