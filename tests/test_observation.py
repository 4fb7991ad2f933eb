"""The pixel observation operators: point sampling and the PSF-blurred pixel average.

Truth made without femkin's quadrature: closed-form convolved pixel averages of linear and
cosine fields, 1-D adaptive quadrature (``scipy.integrate.quad``) of the kernel over a
rectangle for the renormalised edge pixels, and exact triangle averages of P1 functions on a
pixel-aligned mesh for the fwhm -> 0 limit.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate, stats

from femkin._fem import MPI, dolfinx
from femkin.case import load_case
from femkin.errors import CaseError
from femkin.observation import FWHM_PER_SIGMA, blurred_observation, build_observation

A = 0.05  # pixel size, um


def _square(comm, n_cells: int, side: float, diagonal="right"):
    mesh = dolfinx.mesh.create_unit_square(
        comm, n_cells, n_cells, diagonal=getattr(dolfinx.mesh.DiagonalType, diagonal)
    )
    mesh.geometry.x[:, :2] *= side
    return dolfinx.fem.functionspace(mesh, ("Lagrange", 1))


def _centres(pixels: np.ndarray, width: int, a: float = A):
    rows, cols = np.divmod(pixels, width)
    return (cols + 0.5) * a, (rows + 0.5) * a


def _gather(comm, obs, values):
    pix = np.concatenate(comm.allgather(obs.pixels))
    vals = np.concatenate(comm.allgather(values))
    order = np.argsort(pix)
    return pix[order], vals[order]


def _cosine(x, y, omega):
    return np.cos(omega * x + 0.3) * np.cos(omega * y)


def _cosine_blurred(x, y, omega, a, sigma):
    """Closed form: E cos(omega (x + U + sigma Z)), U ~ U(-a/2, a/2), Z ~ N(0, 1), per axis."""
    factor = np.sinc(omega * a / (2 * np.pi)) * np.exp(-0.5 * (omega * sigma) ** 2)
    return _cosine(x, y, omega) * factor**2


@pytest.mark.mpi
def test_linear_field_exact_and_rows_sum_to_one(comm):
    """Interior pixels of a linear field give its centre value; every row sums to 1."""
    n = 16
    V = _square(comm, 12, n * A)
    mask = np.zeros((n, n), int)
    mask[:, :] = 1  # edge pixels too: their kernels reach outside the mesh
    x = V.tabulate_dof_coordinates()
    obs = blurred_observation(V, mask, 1, A, 0.04)
    assert comm.allreduce(obs.pixels.size) == n * n == obs.n_pixels
    ones = obs.apply(np.ones(len(x)))
    assert np.allclose(ones, 1.0, rtol=0, atol=1e-13)
    lin = obs.apply(0.3 + 2.0 * x[:, 0] - 1.5 * x[:, 1])
    xc, yc = _centres(obs.pixels, n)
    sigma = 0.04 / FWHM_PER_SIGMA
    interior = (np.minimum(xc, yc) > A / 2 + 6 * sigma) & (
        np.maximum(xc, yc) < n * A - A / 2 - 6 * sigma
    )
    assert comm.allreduce(int(interior.sum())) > 0
    err = np.abs(lin - (0.3 + 2.0 * xc - 1.5 * yc))[interior]
    assert comm.allreduce(float(err.max(initial=0.0)), op=MPI.MAX) < 1e-12
    # edge pixels do not see their centre value: the kernel is cut by the particle's edge
    assert comm.allreduce(float(np.abs(lin - (0.3 + 2 * xc - 1.5 * yc)).max()), op=MPI.MAX) > 1e-3


def test_edge_pixels_renormalised_against_1d_quadrature(comm):
    """Edge and corner pixels: the kernel-weighted mean of a linear field over the rectangle.

    On Omega = [0, L]^2 the kernel is separable, so the truth is 1-D integrals of the Gaussian
    convolved box (``scipy.stats.norm.cdf``) computed by ``scipy.integrate.quad``.
    """
    n, fwhm = 8, 0.06
    side = n * A
    V = _square(comm, 8, side, "crossed")
    mask = np.ones((n, n), int)
    x = V.tabulate_dof_coordinates()
    field = 0.2 + 1.0 * x[:, 0] + 3.0 * x[:, 1]
    fine = blurred_observation(V, mask, 1, A, fwhm, subdivisions=4)
    values = blurred_observation(V, mask, 1, A, fwhm).apply(field)  # the default quadrature
    sigma = fwhm / FWHM_PER_SIGMA

    def moments(j):
        def k(s):
            upper = stats.norm.cdf(((j + 1) * A - s) / sigma)
            return (upper - stats.norm.cdf((j * A - s) / sigma)) / A

        mass = integrate.quad(k, 0.0, side, epsabs=1e-14, epsrel=1e-13, limit=200)[0]
        first = integrate.quad(
            lambda s: s * k(s), 0.0, side, epsabs=1e-14, epsrel=1e-13, limit=200
        )[0]
        return first / mass

    mean = [moments(j) for j in range(n)]
    rows, cols = np.divmod(fine.pixels, n)
    truth = 0.2 + np.array([mean[c] for c in cols]) + 3.0 * np.array([mean[r] for r in rows])
    err = float(np.abs(values - truth).max(initial=0.0))
    assert comm.allreduce(err, op=MPI.MAX) < 1e-8
    err = float(np.abs(fine.apply(field) - truth).max(initial=0.0))
    assert comm.allreduce(err, op=MPI.MAX) < 1e-11
    # the edges matter: the corner pixel's mean sits inward of its centre by a visible amount
    assert mean[0] - A / 2 > 0.1 * sigma


def test_cosine_field_converges_at_order_two(comm):
    """Blurred pixel averages of a cosine field -> the closed form as the mesh is refined."""
    n, fwhm = 12, 0.05
    omega = 2 * np.pi / 0.3
    sigma = fwhm / FWHM_PER_SIGMA
    mask = np.zeros((n, n), int)
    mask[3:9, 3:9] = 1  # kernels stay inside the mesh
    errors, sizes = [], []
    for n_cells in (6, 12, 24):
        V = _square(comm, n_cells, n * A)
        x = V.tabulate_dof_coordinates()
        obs = blurred_observation(V, mask, 1, A, fwhm)
        xc, yc = _centres(obs.pixels, n)
        err = np.abs(
            obs.apply(_cosine(x[:, 0], x[:, 1], omega)) - _cosine_blurred(xc, yc, omega, A, sigma)
        )
        errors.append(comm.allreduce(float(err.max(initial=0.0)), op=MPI.MAX))
        sizes.append(n * A / n_cells)
    rate = np.polyfit(np.log(sizes), np.log(errors), 1)[0]
    assert rate > 1.8, f"observed order {rate:.2f}, errors {errors}"
    assert errors[-1] < 0.04, errors


def test_fwhm_to_zero_gives_the_pixel_average(comm):
    """As fwhm -> 0 the blurred value -> the exact pixel average of the P1 field, as fwhm^2.

    On a mesh aligned with the pixels (2 x 2 squares of two triangles per pixel), the exact
    average of a P1 function over a pixel is the mean of its triangles' vertex means.
    """
    n = 8
    V = _square(comm, 2 * n, n * A)
    mesh = V.mesh
    mask = np.zeros((n, n), int)
    mask[2:6, 2:6] = 1
    x = V.tabulate_dof_coordinates()
    u = _cosine(x[:, 0], x[:, 1], 2 * np.pi / 0.25) + x[:, 0] ** 2
    # exact pixel averages, assembled on every rank from its owned cells
    n_cells = mesh.topology.index_map(2).size_local
    dofs = V.dofmap.list[:n_cells]
    mid = x[dofs].mean(axis=1)
    pix = (np.floor(mid[:, 1] / A) * n + np.floor(mid[:, 0] / A)).astype(int)
    box = np.bincount(pix, weights=u[dofs].mean(axis=1), minlength=n * n)
    box = comm.allreduce(box, op=MPI.SUM) / 8.0  # 8 equal triangles per pixel
    fwhms = np.array([0.04, 0.02, 0.01])
    errors = []
    for fwhm in fwhms:
        obs = blurred_observation(V, mask, 1, A, fwhm)
        err = np.abs(obs.apply(u) - box[obs.pixels])
        errors.append(comm.allreduce(float(err.max(initial=0.0)), op=MPI.MAX))
    rate = np.polyfit(np.log(fwhms), np.log(errors), 1)[0]
    assert rate > 1.8, f"observed order {rate:.2f}, errors {errors}"


def test_pixel_average_tends_to_point_value(comm):
    """Smaller pixels (fwhm = pixel size, mesh size a / 2) -> the point values, as a^2."""
    side = 0.8
    errors, sizes = [], [0.1, 0.05, 0.025]
    for a in sizes:
        n = int(round(side / a))
        V = _square(comm, 2 * n, side)
        x = V.tabulate_dof_coordinates()
        u = _cosine(x[:, 0], x[:, 1], 2 * np.pi / 3.2)
        mask = np.zeros((n, n), int)
        mask[n // 4 : 3 * n // 4, n // 4 : 3 * n // 4] = 1
        blurred = blurred_observation(V, mask, 1, a, a)
        point = build_observation(V, mask, 1, a)
        b = dict(zip(*_gather(comm, blurred, blurred.apply(u)), strict=True))
        p = dict(zip(*_gather(comm, point, point.apply(u)), strict=True))
        errors.append(max(abs(b[k] - p[k]) for k in p))
    rate = np.polyfit(np.log(sizes), np.log(errors), 1)[0]
    assert 1.85 < rate < 2.15, f"observed order {rate:.2f}, errors {errors}"


@pytest.mark.mpi
def test_transpose_is_the_adjoint(comm):
    """<w, B u> = <B^T w, u> over ranks (B^T accumulated over ghosts)."""
    n = 10
    V = _square(comm, 9, n * A, "crossed")
    mask = np.zeros((n, n), int)
    mask[1:9, 2:10] = 1
    obs = blurred_observation(V, mask, 1, A, 0.03)
    x = V.tabulate_dof_coordinates()
    u = np.sin(7 * x[:, 0]) + x[:, 1]
    w = np.cos(obs.pixels.astype(float))
    f = dolfinx.fem.Function(V)
    obs.apply_transpose(w, f.x.array)
    f.x.scatter_reverse(dolfinx.la.InsertMode.add)
    n_own = V.dofmap.index_map.size_local
    lhs = comm.allreduce(float(w @ obs.apply(u)))
    rhs = comm.allreduce(float(f.x.array[:n_own] @ u[:n_own]))
    assert abs(lhs - rhs) < 1e-12 * max(1.0, abs(lhs))


@pytest.mark.mpi
def test_fwhm_derivative_taylor(comm):
    """dB/dfwhm and d^2B/dfwhm^2 (kernel derivatives and renormalisation): Taylor O(h^2)."""
    n = 10
    V = _square(comm, 10, n * A, "crossed")
    mask = np.zeros((n, n), int)
    mask[0:8, 1:10] = 1  # edge pixels: the renormalisation's derivatives count
    x = V.tabulate_dof_coordinates()
    u = _cosine(x[:, 0], x[:, 1], 2 * np.pi / 0.3) + 2 * x[:, 0]
    fwhm = 0.04

    def ops(f):  # a fixed quadrature for every fwhm: then B is a smooth function of fwhm
        return blurred_observation(V, mask, 1, A, f, derivatives=2, subdivisions=3)

    def norm(r):
        return np.sqrt(comm.allreduce(float(np.sum(r**2))))

    base = [op.apply(u) for op in ops(fwhm)]
    steps = np.array([4e-3, 2e-3, 1e-3, 5e-4])
    rems: dict[str, list[float]] = {"B0": [], "B1": [], "dB0": [], "dB1": []}
    for h in steps:
        moved = [op.apply(u) for op in ops(fwhm + h)]
        rems["B0"].append(norm(moved[0] - base[0]))
        rems["B1"].append(norm(moved[0] - base[0] - h * base[1]))
        rems["dB0"].append(norm(moved[1] - base[1]))
        rems["dB1"].append(norm(moved[1] - base[1] - h * base[2]))
    rates = {k: np.polyfit(np.log(steps), np.log(v), 1)[0] for k, v in rems.items()}
    assert 0.9 < rates["B0"] < 1.1 and rates["B1"] > 1.9, rates
    assert 0.9 < rates["dB0"] < 1.1 and rates["dB1"] > 1.9, rates


@pytest.mark.mpi
def test_same_on_one_and_two_ranks(comm):
    """Pixel values, and B^T of pixel values tested on a field, equal the serial ones."""
    n = 12
    mask = np.zeros((n, n), int)
    mask[2:11, 1:10] = 1
    mask[5, 11] = 1
    mask[0, 3] = 2  # another particle's pixel is not observed

    def run(c):
        V = _square(c, 10, n * A, "crossed")
        obs, dobs = blurred_observation(V, mask, 1, A, 0.045, derivatives=1)
        x = V.tabulate_dof_coordinates()
        u = _cosine(x[:, 0], x[:, 1], 2 * np.pi / 0.35)
        pix, vals = _gather(c, obs, obs.apply(u))
        _, dvals = _gather(c, dobs, dobs.apply(u))
        w = np.sin(obs.pixels.astype(float))
        f = dolfinx.fem.Function(V)
        obs.apply_transpose(w, f.x.array)
        f.x.scatter_reverse(dolfinx.la.InsertMode.add)
        n_own = V.dofmap.index_map.size_local
        return pix, vals, dvals, c.allreduce(float(f.x.array[:n_own] @ u[:n_own]))

    pix, vals, dvals, adj = run(comm)
    pix1, vals1, dvals1, adj1 = run(MPI.COMM_SELF)
    assert np.array_equal(pix, pix1) and pix.size == int(np.sum(mask == 1))
    assert np.max(np.abs(vals - vals1)) < 1e-13
    assert np.max(np.abs(dvals - dvals1)) < 1e-11
    assert abs(adj - adj1) < 1e-12 * max(1.0, abs(adj1))


@pytest.mark.parametrize(
    ("value", "expected"),
    [("-0.03", "a positive number"), ("nan", "a positive number"), ('"wide"', "a float")],
)
def test_bad_psf_fwhm_is_one_case_error(tmp_path, value, expected):
    case = tmp_path / "case.toml"
    case.write_text(f'[data]\nvideo = "v.npz"\npsf_fwhm = {value}\n')
    with pytest.raises(CaseError) as info:
        load_case(tmp_path)
    message = str(info.value)
    assert info.value.field == "data.psf_fwhm" and expected in message
    assert str(case) in message and "\n" not in message


def test_psf_fwhm_default_is_point_sampling(tmp_path):
    (tmp_path / "case.toml").write_text('[data]\nvideo = "v.npz"\n')
    assert load_case(tmp_path).data["psf_fwhm"] is None
    (tmp_path / "case.toml").write_text('[data]\nvideo = "v.npz"\npsf_fwhm = 0.04\n')
    assert load_case(tmp_path).data["psf_fwhm"] == 0.04
