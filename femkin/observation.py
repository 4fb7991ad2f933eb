"""Pixel observation of a P1 field: values at the centres of a particle's pixels.

The operator is a sparse matrix assembled once. Each pixel is evaluated by exactly one rank
(the lowest rank whose owned cells contain its centre; a centre that falls outside the smoothed
mesh boundary is evaluated at the closest point of the closest cell), so that sums over pixels
need one ``allreduce`` and the transpose needs one reverse ghost update.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from femkin._fem import dolfinx


class Observation(NamedTuple):
    """Observation operator of one particle on this rank.

    Attributes:
        pixels: flat indices (into the H*W image) of the pixels this rank evaluates.
        matrix: (len(pixels), n_local_with_ghosts) CSR matrix acting on a P1 function's
            local array (owned + ghost values) of the space it was built for.
        n_pixels: total number of the particle's pixels over all ranks.
    """

    pixels: np.ndarray
    matrix: sp.csr_matrix
    n_pixels: int

    def apply(self, local_array: np.ndarray) -> np.ndarray:
        """Values at this rank's pixels."""
        return self.matrix @ local_array

    def apply_transpose(self, values: np.ndarray, out: np.ndarray) -> None:
        """Add B^T values into ``out`` (a local array with ghosts; reverse-scatter afterwards)."""
        out += self.matrix.T @ values


def _barycentric(points: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Barycentric coordinates of 2-D points in triangles, one triangle per point."""
    v0, v1, v2 = vertices[:, 0, :2], vertices[:, 1, :2], vertices[:, 2, :2]
    d1, d2, dp = v1 - v0, v2 - v0, points[:, :2] - v0
    det = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    l1 = (dp[:, 0] * d2[:, 1] - dp[:, 1] * d2[:, 0]) / det
    l2 = (d1[:, 0] * dp[:, 1] - d1[:, 1] * dp[:, 0]) / det
    return np.stack([1.0 - l1 - l2, l1, l2], axis=1)


def build_observation(V, mask: np.ndarray, label: int, pixel_size: float) -> Observation:
    """Assemble the pixel observation operator of particle ``label`` for the P1 space ``V``.

    Args:
        V: a scalar P1 space, or the P1 subspace ``W.sub(i)`` of a mixed space (its dofmap
            then numbers the parent's dofs, and the matrix acts on the parent's local array).
        mask: (H, W) label image.
        label: the particle's label.
        pixel_size: um.

    Returns:
        The observation operator of this rank.
    """
    mesh = V.mesh
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
    xdofs = mesh.geometry.dofmaps[0] if hasattr(mesh.geometry, "dofmaps") else mesh.geometry.dofmap
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

    cell_dofs = V.dofmap.list
    local_dofs = cell_dofs[closest[mine]] if mine.size else np.zeros((0, 3), dtype=np.int32)
    im = V.dofmap.index_map
    n_cols = (im.size_local + im.num_ghosts) * V.dofmap.index_map_bs
    # P1 dofs follow the reference vertex order, like the geometry dofmap.
    data = lam[mine].ravel()
    r = np.repeat(np.arange(mine.size), 3)
    matrix = sp.csr_matrix((data, (r, local_dofs.ravel())), shape=(mine.size, n_cols))
    matrix.sum_duplicates()
    return Observation(flat[mine], matrix, int(flat.size))


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
