"""Tests of the parameter vector layout, Riesz map, hashed random vectors and global dicts."""

from __future__ import annotations

import numpy as np
import pytest

from femkin._fem import MPI, dolfinx
from femkin.errors import InputError
from femkin.parallel import distribute
from femkin.parameters import (
    FieldBlock,
    ParameterSpace,
    ParticleScalarBlock,
    ScalarBlock,
    hashed_normal,
)

# Particle label -> cells per side of its unit-square mesh.
PARTICLES = {3: 6, 7: 4}


def make_space(comm, particles=PARTICLES):
    """Two particles spread over sub-communicators, global and per-particle blocks."""
    labels = list(particles)
    dist = distribute(comm, [particles[k] ** 2 for k in labels])
    fields, pscalars = [], []
    for i, label in enumerate(labels):
        V = None
        if i in dist.mine:
            n = particles[label]
            mesh = dolfinx.mesh.create_rectangle(dist.subcomm, [[i, 0.0], [i + 1.0, 1.0]], [n, n])
            V = dolfinx.fem.functionspace(mesh, ("Lagrange", 1))
        fields.append(FieldBlock("m", label, V))
        pscalars.append(ParticleScalarBlock("mu_e", label, 3, dist.group_root[dist.owner[i]]))
    space = ParameterSpace(comm, [ScalarBlock("mu_h", 4), ScalarBlock("k0", 1)], fields, pscalars)
    return space, dist


@pytest.mark.mpi
def test_layout_sizes(comm):
    space, dist = make_space(comm)
    n_field = sum((n + 1) ** 2 for n in PARTICLES.values())
    assert space.global_size == 5 + n_field + 2 * 3
    x = space.create_vector()
    assert x.getSize() == space.global_size
    expected_local = 5 if comm.rank == 0 else 0
    for i, (label, _n) in enumerate(PARTICLES.items()):
        if i in dist.mine:
            expected_local += space.field_space("m", label).dofmap.index_map.size_local
        if comm.rank == dist.group_root[dist.owner[i]]:
            expected_local += 3
    assert x.getLocalSize() == expected_local
    if comm.size == 2:
        assert space.local_size < space.global_size


@pytest.mark.mpi
def test_public_keys_slices_and_masks(comm):
    """The blocks' local slices tile this rank's array once; slices, masks and values agree."""
    space, dist = make_space(comm)
    assert space.scalar_keys == (("mu_h", None), ("k0", None), ("mu_e", 3), ("mu_e", 7))
    assert space.field_keys == (("m", 3), ("m", 7))
    count = sum(space.block_mask(name).astype(int) for name in ("mu_h", "k0", "m", "mu_e"))
    assert np.array_equal(count, np.ones(space.local_size, dtype=int))
    x = space.random_normal(5)
    for key in space.scalar_keys:
        values = space.get_scalars(x, *key)
        assert values.size == space.block_size(*key)
        sl = space.local_slice(*key)
        if sl is not None:
            np.testing.assert_array_equal(x.getArray(readonly=True)[sl], values)
    for key in space.field_keys:
        assert (space.local_slice(*key) is not None) == space.holds(*key)
        if space.holds(*key):
            view = space.field_view(x, *key)
            np.testing.assert_array_equal(x.getArray(readonly=True)[space.local_slice(*key)], view)


@pytest.mark.mpi
def test_scalars_roundtrip(comm):
    space, _ = make_space(comm)
    x = space.create_vector()
    space.set_scalars(x, "mu_h", [1.0, 2.0, 3.0, 4.0])
    space.set_scalars(x, "mu_e", [5.0, 6.0, 7.0], label=7)
    assert np.array_equal(space.get_scalars(x, "mu_h"), [1.0, 2.0, 3.0, 4.0])
    assert np.array_equal(space.get_scalars(x, "mu_e", 7), [5.0, 6.0, 7.0])
    assert np.array_equal(space.get_scalars(x, "mu_e", 3), [0.0, 0.0, 0.0])
    assert x.norm() == pytest.approx(np.sqrt(1 + 4 + 9 + 16 + 25 + 36 + 49))


@pytest.mark.mpi
def test_riesz_roundtrip_and_inner(comm):
    space, _ = make_space(comm)
    x = space.random_normal(seed=1)
    y, z = x.duplicate(), x.duplicate()
    space.riesz().mult(x, y)
    space.riesz_inverse().mult(y, z)
    z.axpy(-1.0, x)
    assert z.norm() < 1e-10 * x.norm()
    # Constant fields: x^T M x = area (1 per particle) for the field part, plus scalars.
    one = space.create_vector()
    one.set(1.0)
    assert space.inner(one, one) == pytest.approx(5 + 2 + 6, rel=1e-12)


@pytest.mark.mpi
def test_to_function(comm):
    space, dist = make_space(comm)
    x = space.random_normal(seed=5)
    for i, label in enumerate(PARTICLES):
        if i not in dist.mine:
            continue
        V = space.field_space("m", label)
        f = dolfinx.fem.Function(V)
        space.to_function(x, "m", label, f)
        # Ghost values are the same hash of their coordinates.
        coords = V.tabulate_dof_coordinates()
        from femkin.parameters import rounded_coordinates

        expected = hashed_normal(5, "m", label, rounded_coordinates(coords))
        assert np.allclose(f.x.array, expected)
        y = space.create_vector()
        space.from_function(y, "m", label, f)
        space.add_from_function(y, "m", label, f)
        assert np.allclose(space.field_view(y, "m", label), 2 * space.field_view(x, "m", label))


@pytest.mark.mpi
@pytest.mark.parametrize("particles", [PARTICLES, {5: 8}], ids=["two", "one-spanning"])
def test_random_normal_partition_independent(comm, particles):
    space, _ = make_space(comm, particles)
    x = space.random_normal(seed=11)
    d = space.to_global_dict(x)
    # Serial reference on one rank.
    ref = None
    if comm.rank == 0:
        sspace, _ = make_space(MPI.COMM_SELF, particles)
        ref = sspace.to_global_dict(sspace.random_normal(seed=11))
    failures = None
    if comm.rank == 0:
        failures = [] if set(d) == set(ref) else [f"keys {set(d) ^ set(ref)}"]
        for key in set(d) & set(ref):
            same = (
                np.allclose(d[key], ref[key], rtol=0, atol=1e-12)
                if key.endswith("coordinates")
                else np.array_equal(d[key], ref[key])
            )
            if not same:
                failures.append(key)
        values = np.concatenate([d[k] for k in d if not k.endswith("coordinates")])
        if not (abs(values.mean()) < 0.3 and 0.7 < values.std() < 1.3):
            failures.append(f"statistics {values.mean()=} {values.std()=}")
    assert comm.bcast(failures, root=0) == []
    other = space.random_normal(seed=12)
    other.axpy(-1.0, x)
    assert other.norm() > 1.0


def test_hashed_normal_statistics():
    z = hashed_normal(0, "m", 1, np.arange(200000)[:, None])
    assert abs(z.mean()) < 0.01
    assert abs(z.std() - 1.0) < 0.01
    assert abs(np.mean(z**4) - 3.0) < 0.05


@pytest.mark.mpi
def test_global_dict_roundtrip_across_ranks(comm):
    space, _ = make_space(comm)
    x = space.random_normal(seed=3)
    d = space.to_global_dict(x)
    y = space.create_vector()
    space.from_global_dict(d, y)
    y.axpy(-1.0, x)
    assert y.norm() == 0.0
    # Load what rank 0 wrote serially into the distributed layout (and back).
    dserial = None
    if comm.rank == 0:
        sspace, _ = make_space(MPI.COMM_SELF)
        dserial = sspace.to_global_dict(sspace.random_normal(seed=3))
    z = space.create_vector()
    space.from_global_dict(dserial, z)
    z.axpy(-1.0, x)
    assert z.norm() == 0.0


@pytest.mark.mpi
def test_from_global_dict_errors(comm):
    space, _ = make_space(comm)
    x = space.create_vector()
    d = space.to_global_dict(x)
    if comm.rank == 0:
        d["mu_h"] = np.zeros(3)
    with pytest.raises(InputError, match="mu_h"):
        space.from_global_dict(d, x, source="ckpt.npz")
    d = space.to_global_dict(x)
    if comm.rank == 0:
        d["m/3/coordinates"] = d["m/3/coordinates"] + 0.5
    with pytest.raises(InputError, match="coordinates"):
        space.from_global_dict(d, x)


def test_duplicate_blocks():
    with pytest.raises(InputError, match="duplicates"):
        ParameterSpace(MPI.COMM_WORLD, [ScalarBlock("a", 1), ScalarBlock("a", 2)])
