"""The parameter vector of an inversion: all blocks of all particles in one PETSc Vec.

Blocks:

- :class:`ScalarBlock`: global coefficients shared by all particles (``mu_h`` a_n, ``j0`` b_n,
  ``k0`` as ln k0, ``kappa``, ``coherency``; names and coordinates in :mod:`femkin.blocks`);
  stored on rank 0 of the parent communicator.
- :class:`FieldBlock`: a P1 field of one particle (``m`` = ln(k/k0)); stored as the owned dofs
  of its function space, on the ranks of the particle's sub-communicator.
- :class:`ParticleScalarBlock`: a scalar vector of one particle (``mu_e`` knots); stored on the
  root rank of the particle's group.

Local layout on each rank: ``[global scalar blocks (rank 0 only)] + [owned dofs of each field
block held by this rank, in the given order] + [particle scalar blocks rooted on this rank]``.

The vector lives on the parent communicator. Every operation that involves one field block is
collective on that particle's sub-communicator only; operations on the whole vector
(:meth:`ParameterSpace.riesz`, :meth:`~ParameterSpace.to_global_dict`, ...) are collective on
the parent communicator. The Riesz map of the parameter inner product is the identity on
scalars and the P1 mass matrix on fields.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from femkin._fem import MPI, PETSc
from femkin.errors import InputError, raise_on_every_rank
from femkin.petsc_tools import mass_matrix, mass_solver, shell_mat, solved

#: Coordinates are rounded to this resolution (um) to identify dofs across partitions.
COORDINATE_RESOLUTION = 1e-9


class ScalarBlock(NamedTuple):
    """A global coefficient vector (e.g. ``mu_h`` with its a_n), stored on rank 0."""

    name: str
    size: int


class FieldBlock(NamedTuple):
    """A P1 field of one particle.

    Attributes:
        name: block name (``"m"``).
        label: particle label.
        V: the P1 function space on the particle's sub-communicator, or ``None`` on ranks that
            do not hold the particle.
    """

    name: str
    label: int
    V: Any


class ParticleScalarBlock(NamedTuple):
    """A scalar vector of one particle (e.g. ``mu_e`` knots).

    Attributes:
        name: block name.
        label: particle label.
        size: number of entries.
        root: rank in the parent communicator that stores the block (the particle's group root).
    """

    name: str
    label: int
    size: int
    root: int


BlockKey = tuple[str, "int | None"]


def block_key_str(name: str, label: int | None) -> str:
    """The key of a block in global dictionaries and checkpoints: ``name`` or ``name/label``."""
    return name if label is None else f"{name}/{label}"


def rounded_coordinates(points: np.ndarray) -> np.ndarray:
    """Integer coordinates (units of :data:`COORDINATE_RESOLUTION`), shape (n, 3), int64."""
    return np.rint(np.asarray(points, dtype=float)[:, :3] / COORDINATE_RESOLUTION).astype(np.int64)


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def hashed_normal(seed: int, name: str, label: int | None, keys: np.ndarray) -> np.ndarray:
    """I.i.d. standard normal numbers as a pure function of (seed, name, label, key row).

    Args:
        seed: user seed.
        name: block name.
        label: particle label or ``None``.
        keys: int64 array (n, k): rounded coordinates of dofs, or scalar indices (n, 1).

    Returns:
        Array (n,) of N(0, 1) samples (Box-Muller on two hashed uniforms).
    """
    keys = np.atleast_2d(np.asarray(keys, dtype=np.int64))
    base = (int(seed) & 0xFFFFFFFFFFFFFFFF) ^ (zlib.crc32(name.encode()) << 20)
    base ^= ((-1 if label is None else int(label)) & 0xFFFFFFFF) << 1
    h = _splitmix64(np.full(keys.shape[0], base & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64))
    for j in range(keys.shape[1]):
        h = _splitmix64(h ^ keys[:, j].astype(np.uint64))
    h1 = _splitmix64(h ^ np.uint64(1))
    h2 = _splitmix64(h ^ np.uint64(2))
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    u2 = (h2 >> np.uint64(11)).astype(np.float64) / 2.0**53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


class _FieldData:
    """Per-rank data of a held field block: slice, mass matrix, work vectors."""

    def __init__(self, V, start: int):
        self.V = V
        self.comm = V.mesh.comm
        index_map = V.dofmap.index_map
        self.n_local = index_map.size_local
        self.n_global = index_map.size_global
        self.slice = slice(start, start + self.n_local)
        self.coordinates = V.tabulate_dof_coordinates()[: self.n_local]
        self.mass = mass_matrix(V)
        self.mass_solver = mass_solver(self.mass)
        self.work_in, self.work_out = self.mass.createVecs()

    def wrap(self, array: np.ndarray) -> PETSc.Vec:
        """A Vec on the sub-communicator sharing memory with ``array`` (the block's slice)."""
        return PETSc.Vec().createWithArray(
            array, size=(self.n_local, self.n_global), comm=self.comm
        )

    def destroy(self):
        for obj in (self.mass, self.mass_solver, self.work_in, self.work_out):
            obj.destroy()


class ParameterSpace:
    """All parameter blocks of an inversion, laid out in one Vec on ``comm``.

    Args:
        comm: the parent communicator (all ranks).
        scalar_blocks: global coefficient blocks (stored on rank 0).
        field_blocks: field blocks of all particles, listed identically on every rank (with
            ``V=None`` where the rank does not hold the particle).
        particle_scalar_blocks: per-particle scalar blocks, listed identically on every rank.

    Raises:
        InputError: duplicate block keys or negative sizes (checked on every rank).
    """

    def __init__(
        self,
        comm: MPI.Comm,
        scalar_blocks: Sequence[ScalarBlock] = (),
        field_blocks: Sequence[FieldBlock] = (),
        particle_scalar_blocks: Sequence[ParticleScalarBlock] = (),
    ):
        self.comm = comm
        self.scalar_blocks = tuple(scalar_blocks)
        self.field_blocks = tuple(field_blocks)
        self.particle_scalar_blocks = tuple(particle_scalar_blocks)
        keys = (
            [(b.name, None) for b in self.scalar_blocks]
            + [(b.name, b.label) for b in self.field_blocks]
            + [(b.name, b.label) for b in self.particle_scalar_blocks]
        )
        if len(set(keys)) != len(keys):
            dup = sorted({block_key_str(*k) for k in keys if keys.count(k) > 1})
            raise InputError("<parameters>", "blocks", "unique block keys", f"duplicates {dup}")
        sized: list[ScalarBlock | ParticleScalarBlock] = [
            *self.scalar_blocks,
            *self.particle_scalar_blocks,
        ]
        for b in sized:
            if b.size < 0:
                raise InputError("<parameters>", b.name, "a size >= 0", b.size)
        for b in self.particle_scalar_blocks:
            if not 0 <= b.root < comm.size:
                raise InputError("<parameters>", b.name, f"a root rank in [0, {comm.size})", b.root)
        self.keys = keys
        rank = comm.rank
        offset = 0
        self._scalars: dict[BlockKey, tuple[int, slice | None]] = {}
        for b in self.scalar_blocks:
            if rank == 0:
                self._scalars[(b.name, None)] = (0, slice(offset, offset + b.size))
                offset += b.size
            else:
                self._scalars[(b.name, None)] = (0, None)
        self._fields: dict[tuple[str, int], _FieldData | None] = {}
        for fb in self.field_blocks:
            if fb.V is not None:
                data = _FieldData(fb.V, offset)
                offset += data.n_local
                self._fields[(fb.name, fb.label)] = data
            else:
                self._fields[(fb.name, fb.label)] = None
        for pb in self.particle_scalar_blocks:
            if rank == pb.root:
                self._scalars[(pb.name, pb.label)] = (pb.root, slice(offset, offset + pb.size))
                offset += pb.size
            else:
                self._scalars[(pb.name, pb.label)] = (pb.root, None)
        self.local_size = offset
        self.global_size = comm.allreduce(offset)
        self._sizes: dict[BlockKey, int] = {(b.name, None): b.size for b in self.scalar_blocks}
        self._sizes.update({(b.name, b.label): b.size for b in self.particle_scalar_blocks})

    # -- vectors ------------------------------------------------------------------------------
    def create_vector(self) -> PETSc.Vec:
        """A new zero vector with this layout."""
        x = PETSc.Vec().createMPI((self.local_size, self.global_size), comm=self.comm)
        x.set(0.0)
        return x

    # -- public iteration and masks ------------------------------------------------------------
    @property
    def scalar_keys(self) -> tuple[BlockKey, ...]:
        """Keys ``(name, label)`` of the scalar blocks in storage order (every rank).

        Global coefficient blocks have ``label=None``; per-particle blocks follow them.
        """
        return tuple(self._scalars)

    @property
    def field_keys(self) -> tuple[tuple[str, int], ...]:
        """Keys ``(name, label)`` of the field blocks in storage order (every rank)."""
        return tuple(self._fields)

    def block_size(self, name: str, label: int | None = None) -> int:
        """The number of entries of a scalar block (every rank)."""
        self._scalar(name, label)  # a clear KeyError for unknown blocks
        return self._sizes[(name, label)]

    def local_slice(self, name: str, label: int | None = None) -> slice | None:
        """Where a block's entries lie in this rank's local array; None where not stored here."""
        if label is not None and (name, label) in self._fields:
            data = self._fields[(name, label)]
            return None if data is None else data.slice
        return self._scalar(name, label)[1]

    def block_mask(self, name: str) -> np.ndarray:
        """Which of this rank's local entries belong to a block called ``name``.

        All particles of a field or per-particle block count.
        """
        mask = np.zeros(self.local_size, dtype=bool)
        for key in (*self._scalars, *self._fields):
            sl = self.local_slice(*key) if key[0] == name else None
            if sl is not None:
                mask[sl] = True
        return mask

    def holds(self, name: str, label: int) -> bool:
        """Whether this rank holds field block ``(name, label)``."""
        return self._field(name, label) is not None

    def field_space(self, name: str, label: int):
        """The function space of a field block (``None`` on ranks that do not hold it)."""
        data = self._field(name, label)
        return None if data is None else data.V

    def _held_field(self, name: str, label: int) -> _FieldData:
        data = self._field(name, label)
        if data is None:
            raise ValueError(
                f"rank {self.comm.rank} does not hold field {block_key_str(name, label)!r}"
            )
        return data

    def _field(self, name: str, label: int) -> _FieldData | None:
        try:
            return self._fields[(name, label)]
        except KeyError:
            raise KeyError(
                f"no field block {block_key_str(name, label)!r}; "
                f"blocks are {[block_key_str(*k) for k in self.keys]}"
            ) from None

    def _scalar(self, name: str, label: int | None) -> tuple[int, slice | None]:
        try:
            return self._scalars[(name, label)]
        except KeyError:
            raise KeyError(
                f"no scalar block {block_key_str(name, label)!r}; "
                f"blocks are {[block_key_str(*k) for k in self.keys]}"
            ) from None

    def get_scalars(self, x: PETSc.Vec, name: str, label: int | None = None) -> np.ndarray:
        """The values of a scalar block, on every rank (collective on ``comm``)."""
        root, sl = self._scalar(name, label)
        values = x.getArray(readonly=True)[sl].copy() if sl is not None else None
        return self.comm.bcast(values, root=root)

    def set_scalars(self, x: PETSc.Vec, name: str, values, label: int | None = None) -> None:
        """Set a scalar block from ``values`` (as given on the storing rank; not collective)."""
        root, sl = self._scalar(name, label)
        if sl is not None:
            values = np.asarray(values, dtype=float).ravel()
            if values.size != sl.stop - sl.start:
                raise InputError(
                    "<parameters>",
                    block_key_str(name, label),
                    f"{sl.stop - sl.start} values",
                    values.size,
                )
            x.getArray()[sl] = values

    def scalar_view(self, x: PETSc.Vec, name: str, label: int | None = None) -> np.ndarray | None:
        """Writable view of a scalar block on its storing rank, ``None`` elsewhere."""
        _, sl = self._scalar(name, label)
        return None if sl is None else x.getArray()[sl]

    def field_view(self, x: PETSc.Vec, name: str, label: int, readonly: bool = False) -> np.ndarray:
        """View of the owned dofs of a field block in ``x`` (holding ranks only).

        Use ``readonly=True`` for vectors that PETSc has locked (TAO's iterate in callbacks).
        """
        data = self._held_field(name, label)
        return x.getArray(readonly=readonly)[data.slice]

    def field_vec(self, x: PETSc.Vec, name: str, label: int, readonly: bool = False) -> PETSc.Vec:
        """A Vec on the particle's sub-communicator holding the block of ``x``.

        It shares memory with ``x`` (writes go through), or, with ``readonly=True``, holds a
        copy (works on locked vectors).
        """
        view = self.field_view(x, name, label, readonly=readonly)
        return self._held_field(name, label).wrap(view.copy() if readonly else view)

    def to_function(self, x: PETSc.Vec, name: str, label: int, f) -> None:
        """Copy a field block into ``f`` and update its ghosts (collective on the sub-comm)."""
        data = self._held_field(name, label)
        f.x.array[: data.n_local] = x.getArray(readonly=True)[data.slice]
        f.x.scatter_forward()

    def from_function(self, x: PETSc.Vec, name: str, label: int, f) -> None:
        """Copy the owned values of ``f`` into a field block of ``x``."""
        data = self._held_field(name, label)
        x.getArray()[data.slice] = f.x.array[: data.n_local]

    def add_from_function(self, x: PETSc.Vec, name: str, label: int, f) -> None:
        """Add the owned values of ``f`` to a field block (ghost contributions of a dual vector
        must already be accumulated, e.g. by ``scatter_reverse``).
        """
        data = self._held_field(name, label)
        x.getArray()[data.slice] += f.x.array[: data.n_local]

    # -- inner product ------------------------------------------------------------------------
    def _apply_blockwise(self, x: PETSc.Vec, y: PETSc.Vec, inverse: bool) -> None:
        y.getArray()[:] = x.getArray(readonly=True)
        for (_name, _label), data in self._fields.items():
            if data is None:
                continue
            xa = x.getArray(readonly=True)[data.slice]
            data.work_in.getArray()[:] = xa
            if inverse:
                if not solved(data.mass_solver, data.work_in, data.work_out):
                    if not np.all(np.isfinite(xa)):  # let the caller see the NaN
                        data.work_out.set(np.nan)
                        y.getArray()[data.slice] = np.nan
                        continue
                    raise RuntimeError(
                        "mass-matrix CG did not converge: reason "
                        f"{data.mass_solver.getConvergedReason()}"
                    )
            else:
                data.mass.mult(data.work_in, data.work_out)
            y.getArray()[data.slice] = data.work_out.getArray(readonly=True)

    def riesz_mult(self, x: PETSc.Vec, y: PETSc.Vec) -> None:
        """``y = R x``: identity on scalars, the mass matrix on fields (primal -> dual)."""
        self._apply_blockwise(x, y, inverse=False)

    def riesz_inverse_mult(self, x: PETSc.Vec, y: PETSc.Vec) -> None:
        """``y = R^{-1} x`` (dual -> primal); Jacobi-preconditioned CG, rtol 1e-14, on fields."""
        self._apply_blockwise(x, y, inverse=True)

    def riesz(self) -> PETSc.Mat:
        """The Riesz map as a shell Mat (symmetric positive definite)."""
        return shell_mat((self.local_size, self.global_size), self.comm, apply=self.riesz_mult)

    def riesz_inverse(self) -> PETSc.Mat:
        """The inverse Riesz map as a shell Mat."""
        sizes = (self.local_size, self.global_size)
        return shell_mat(sizes, self.comm, apply=self.riesz_inverse_mult)

    def inner(self, x: PETSc.Vec, y: PETSc.Vec) -> float:
        """The parameter inner product ``x^T R y`` (collective)."""
        work = x.duplicate()
        self.riesz_mult(y, work)
        value = x.dot(work)
        work.destroy()
        return value

    def dual_norm(self, g: PETSc.Vec) -> float:
        """The norm of a dual vector, ``sqrt(g^T R^{-1} g)`` (collective)."""
        work = g.duplicate()
        self.riesz_inverse_mult(g, work)
        value = g.dot(work)
        work.destroy()
        return float(np.sqrt(max(value, 0.0)))

    # -- partition-independent views ---------------------------------------------------------
    def random_normal(self, seed: int) -> PETSc.Vec:
        """A vector of i.i.d. N(0, 1) entries, independent of the partition.

        Each entry is a hash of (seed, block name, label, rounded dof coordinates or scalar
        index), so the same dof gets the same number on any number of ranks.
        """
        x = self.create_vector()
        a = x.getArray()
        for (name, label), (_, sl) in self._scalars.items():
            if sl is not None:
                idx = np.arange(sl.stop - sl.start, dtype=np.int64)[:, None]
                a[sl] = hashed_normal(seed, name, label, idx)
        for (name, label), data in self._fields.items():
            if data is not None:
                a[data.slice] = hashed_normal(
                    seed, name, label, rounded_coordinates(data.coordinates)
                )
        return x

    def to_global_dict(self, x: PETSc.Vec) -> dict[str, np.ndarray] | None:
        """Gather all blocks on rank 0 (collective; ``None`` on other ranks).

        Scalar blocks map ``name`` or ``name/label`` to their values; a field block maps
        ``name/label`` to its dof values sorted by rounded coordinates (x, then y, then z) and
        ``name/label/coordinates`` to those coordinates, so the result is the same on any
        number of ranks.
        """
        out: dict[str, np.ndarray] = {}
        a = x.getArray(readonly=True)
        for b in self.scalar_blocks:
            if self.comm.rank == 0:
                out[b.name] = a[self._scalars[(b.name, None)][1]].copy()
        for fb in self.field_blocks:
            data = self._fields[(fb.name, fb.label)]
            local = None if data is None else (data.coordinates.copy(), a[data.slice].copy())
            gathered = self.comm.gather(local, root=0)
            if gathered is not None:  # rank 0
                parts = [p for p in gathered if p is not None]
                coords = np.concatenate([p[0] for p in parts])
                values = np.concatenate([p[1] for p in parts])
                ic = rounded_coordinates(coords)
                order = np.lexsort((ic[:, 2], ic[:, 1], ic[:, 0]))
                key = block_key_str(fb.name, fb.label)
                out[key] = values[order]
                out[key + "/coordinates"] = coords[order]
        for pb in self.particle_scalar_blocks:
            values = self.get_scalars(x, pb.name, pb.label)
            if self.comm.rank == 0:
                out[block_key_str(pb.name, pb.label)] = values
        return out if self.comm.rank == 0 else None

    def from_global_dict(
        self, d: dict[str, np.ndarray] | None, x: PETSc.Vec, source: str = "<parameters>"
    ) -> None:
        """Load blocks gathered by :meth:`to_global_dict` (on any number of ranks) into ``x``.

        Only rank 0's ``d`` is used. Collective on ``comm``.

        Raises:
            InputError: a block is missing, has the wrong size or NaN/inf values, or a dof
                coordinate of a field is not found (on every rank together).
        """
        error = None
        if self.comm.rank == 0 and (found := self._check_global_dict(d, source)) is not None:
            error = InputError(source, *found)
        raise_on_every_rank(self.comm, error)
        given = d if d is not None else {}  # only rank 0's d is read (checked above)
        a = x.getArray()
        for b in self.scalar_blocks:
            sl = self._scalars[(b.name, None)][1]
            if sl is not None:
                a[sl] = given[b.name]
        for pb in self.particle_scalar_blocks:
            key = block_key_str(pb.name, pb.label)
            values = self.comm.bcast(given[key] if self.comm.rank == 0 else None, root=0)
            sl = self._scalars[(pb.name, pb.label)][1]
            if sl is not None:
                a[sl] = values
        missing = False
        for fb in self.field_blocks:
            key = block_key_str(fb.name, fb.label)
            payload = (given[key + "/coordinates"], given[key]) if self.comm.rank == 0 else None
            coords, values = self.comm.bcast(payload, root=0)
            data = self._fields[(fb.name, fb.label)]
            if data is None:
                continue
            ic = rounded_coordinates(coords)
            lookup = {tuple(row): i for i, row in enumerate(ic)}
            mine = rounded_coordinates(data.coordinates)
            idx = np.array([lookup.get(tuple(row), -1) for row in mine], dtype=np.int64)
            if np.any(idx < 0):
                missing = True
                continue
            a[data.slice] = np.asarray(values)[idx]
        if self.comm.allreduce(missing, op=MPI.LOR):
            raise InputError(
                source,
                "fields",
                "dof coordinates matching the mesh",
                "coordinates not found (a different mesh?)",
            )

    def _check_global_dict(self, d, source) -> tuple[str, str, object] | None:
        if d is None:
            return ("blocks", "a dictionary of blocks", None)
        sized: list[ScalarBlock | ParticleScalarBlock] = [
            *self.scalar_blocks,
            *self.particle_scalar_blocks,
        ]
        for b in sized:
            key = block_key_str(b.name, getattr(b, "label", None))
            if key not in d:
                return (key, "a stored block", "nothing")
            if np.asarray(d[key]).size != b.size:
                return (key, f"{b.size} values", np.asarray(d[key]).size)
        for fb in self.field_blocks:
            key = block_key_str(fb.name, fb.label)
            if key not in d or key + "/coordinates" not in d:
                return (key, "a stored field with coordinates", "nothing")
        for key, value in d.items():
            value = np.asarray(value)
            if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
                return (key, "finite values", f"{int(np.sum(~np.isfinite(value)))} NaN/inf")
        return None

    def destroy(self) -> None:
        """Free the PETSc objects of held field blocks."""
        for data in self._fields.values():
            if data is not None:
                data.destroy()
