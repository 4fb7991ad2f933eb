"""Gaussian priors on the parameter vector (hIPPYlib style).

- :class:`BiLaplacianPrior`: a Gaussian field on a P1 space with covariance
  ``Gamma = A^{-1} M A^{-1}``, ``A = delta M + gamma K (+ Robin boundary mass)``. In 2-D this is
  the discretised Matern field with nu = 1: with the inverse length ``s^2 = delta / gamma``
  (not the glossary's kappa) the continuous marginal variance is ``1 / (4 pi gamma delta)``
  and the correlation length (where the correlation ``(s r) K_1(s r)`` is about 0.14) is
  ``sqrt(8 gamma / delta)``.
- :class:`GaussianScalarPrior`: independent normals on a coefficient vector.
- :class:`Prior`: the composite over a :class:`~femkin.parameters.ParameterSpace`.

Vectors of coefficients are primal; ``precision_mult`` and ``gradient`` return dual vectors
(``Gamma^{-1} v``), ``covariance_mult`` maps dual to primal.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np

from femkin._fem import PETSc, dolfinx, ufl
from femkin.errors import InputError
from femkin.parameters import ParameterSpace, block_key_str, hashed_normal, rounded_coordinates
from femkin.petsc_tools import mass_matrix, mass_solver, solved

#: hIPPYlib's Robin coefficient divisor (Roininen et al. 2014), reduces boundary inflation.
ROBIN_BETA = 1.42


def bilaplacian_coefficients(std: float, length: float) -> tuple[float, float]:
    """``(gamma, delta)`` of ``A = delta M + gamma K`` for a 2-D Matern nu = 1 field.

    From ``length = sqrt(8 gamma / delta)`` and ``std^2 = 1 / (4 pi gamma delta)``.
    """
    gamma = length / (std * np.sqrt(32.0 * np.pi))
    delta = 8.0 * gamma / length**2
    return float(gamma), float(delta)


#: The interval holding the spectrum of ``M_L^{-1/2} M M_L^{-1/2}`` for P1 simplices (in 1-3 D
#: the element matrices' eigenvalues are 1 and 1/(d+2), Wathen 1987), slightly widened.
SQRT_MASS_INTERVAL = (0.19, 1.01)
#: Degree of the Chebyshev approximation of sqrt there (error ~ 2.6^-degree).
SQRT_MASS_DEGREE = 32


@functools.cache
def _sqrt_chebyshev() -> np.ndarray:
    """Chebyshev coefficients of ``sqrt`` on :data:`SQRT_MASS_INTERVAL`."""
    a, b = SQRT_MASS_INTERVAL
    return np.polynomial.chebyshev.chebinterpolate(
        lambda t: np.sqrt(0.5 * (b - a) * t + 0.5 * (a + b)), SQRT_MASS_DEGREE
    )


class BiLaplacianPrior:
    """Gaussian prior on a P1 space ``V`` with covariance ``A^{-1} M A^{-1}``.

    Args:
        V: P1 function space (collective on its mesh's communicator).
        std: marginal standard deviation.
        length: correlation length (same unit as the mesh).
        mean: mean coefficient vector (owned dofs), default 0.
        robin: add hIPPYlib's Robin term ``gamma sqrt(delta/gamma)/1.42 * u v ds``.
        options_prefix: PETSc options prefix of the solves with ``A`` (MUMPS LU by default).

    ``precision_mult`` applies ``A M^{-1} A`` with a CG solve (rtol 1e-14) for ``M^{-1}``, so
    it is the exact inverse of ``covariance_mult``. ``sample`` draws ``mean + A^{-1} R w``
    with ``R R^T = M``: ``R = M_L^{1/2} S^{1/2}``, ``S = M_L^{-1/2} M M_L^{-1/2}`` (``M_L`` the
    lumped mass), ``S^{1/2}`` a Chebyshev polynomial of degree :data:`SQRT_MASS_DEGREE` in
    ``S`` (the spectrum of ``S`` lies in [1/5, 1] for P1 simplices, Wathen 1987; relative
    error below 1e-12), so the samples' covariance is ``Gamma`` itself. (The lumped
    ``A^{-1} M_L^{1/2} w`` alone has covariance ``A^{-1} M_L A^{-1}``: on meshes with few
    elements per correlation length its pointwise variance is ~1.5x ``Gamma``'s and
    ``E[z^T Gamma^{-1} z]`` ~2.3x the dimension, which biases every sampler built on it.)

    Raises:
        InputError: non-positive std or length.
    """

    def __init__(
        self,
        V,
        std: float,
        length: float,
        mean: np.ndarray | None = None,
        robin: bool = True,
        options_prefix: str = "femkin_prior_",
    ):
        if not (np.isfinite(std) and std > 0):
            raise InputError("<case>", "prior std", "a positive number", std)
        if not (np.isfinite(length) and length > 0):
            raise InputError("<case>", "prior length", "a positive number", length)
        self.V = V
        self.comm = V.mesh.comm
        self.std, self.length = float(std), float(length)
        self.gamma, self.delta = bilaplacian_coefficients(std, length)
        u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
        a = (self.delta * u * v + self.gamma * ufl.inner(ufl.grad(u), ufl.grad(v))) * ufl.dx
        if robin:
            a += self.gamma * np.sqrt(self.delta / self.gamma) / ROBIN_BETA * u * v * ufl.ds
        self.A = dolfinx.fem.petsc.assemble_matrix(dolfinx.fem.form(a))
        self.A.assemble()
        self.M = mass_matrix(V)
        self.n_local = V.dofmap.index_map.size_local
        self.n_global = V.dofmap.index_map.size_global
        self.Asolver = PETSc.KSP().create(self.comm)
        self.Asolver.setOptionsPrefix(options_prefix)
        self.Asolver.setOperators(self.A)
        self.Asolver.setType("preonly")
        self.Asolver.getPC().setType("lu")
        self.Asolver.getPC().setFactorSolverType("mumps")
        self.Asolver.setFromOptions()
        self.Msolver = mass_solver(self.M)
        ones, self.sqrt_ML = self.M.createVecs()
        ones.set(1.0)
        self.M.mult(ones, self.sqrt_ML)
        self.sqrt_ML.sqrtabs()
        ones.destroy()
        self.mean = self.M.createVecs()[0]
        self.mean.set(0.0)
        if mean is not None:
            self.mean.getArray()[:] = mean
        self._w1, self._w2 = self.M.createVecs()

    def _solve(self, ksp: PETSc.KSP, b: PETSc.Vec, x: PETSc.Vec) -> None:
        if not solved(ksp, b, x):
            raise RuntimeError(f"prior solve failed: reason {ksp.getConvergedReason()}")

    def create_vector(self) -> PETSc.Vec:
        """A zero vector on ``V`` (owned dofs)."""
        v = self.M.createVecs()[0]
        v.set(0.0)
        return v

    def covariance_mult(self, r: PETSc.Vec, out: PETSc.Vec) -> None:
        """``out = A^{-1} M A^{-1} r`` (dual -> primal)."""
        self._solve(self.Asolver, r, self._w1)
        self.M.mult(self._w1, self._w2)
        self._solve(self.Asolver, self._w2, out)

    def precision_mult(self, v: PETSc.Vec, out: PETSc.Vec) -> None:
        """``out = A M^{-1} A v`` (primal -> dual)."""
        self.A.mult(v, self._w1)
        self._solve(self.Msolver, self._w1, self._w2)
        self.A.mult(self._w2, out)

    def cost(self, m: PETSc.Vec) -> float:
        """``0.5 (m - mean)^T Gamma^{-1} (m - mean)``."""
        d = m.copy()
        d.axpy(-1.0, self.mean)
        g = d.duplicate()
        self.precision_mult(d, g)
        value = 0.5 * d.dot(g)
        d.destroy()
        g.destroy()
        return value

    def gradient(self, m: PETSc.Vec, out: PETSc.Vec) -> None:
        """``out = Gamma^{-1} (m - mean)`` (dual)."""
        d = m.copy()
        d.axpy(-1.0, self.mean)
        self.precision_mult(d, out)
        d.destroy()

    def sqrt_mass_mult(self, w: PETSc.Vec, out: PETSc.Vec) -> None:
        """``out = R w`` with ``R R^T = M`` (``R = M_L^{1/2} S^{1/2}``, see the class notes).

        Clenshaw's recurrence on the Chebyshev series of ``sqrt`` over [a, b] =
        :data:`SQRT_MASS_INTERVAL`, in ``T = (2 S - (a + b)) / (b - a)``.
        """
        a, b = SQRT_MASS_INTERVAL
        c = _sqrt_chebyshev()
        inv = self.sqrt_ML.copy()
        inv.reciprocal()
        b1, b2, t, tmp = (w.duplicate() for _ in range(4))
        b1.set(0.0)
        b2.set(0.0)

        def apply_T(v, res):  # res = T v
            tmp.pointwiseMult(inv, v)
            self.M.mult(tmp, res)
            res.pointwiseMult(inv, res)
            res.scale(2.0 / (b - a))
            res.axpy(-(a + b) / (b - a), v)

        for k in range(len(c) - 1, 0, -1):
            apply_T(b1, t)  # b_k = c_k w + 2 T b_{k+1} - b_{k+2}
            t.scale(2.0)
            t.axpy(-1.0, b2)
            t.axpy(float(c[k]), w)
            b2, b1, t = b1, t, b2
        apply_T(b1, t)  # S^{1/2} w = c_0 w + T b_1 - b_2
        t.axpy(-1.0, b2)
        t.axpy(float(c[0]), w)
        out.pointwiseMult(self.sqrt_ML, t)
        for v in (inv, b1, b2, t, tmp):
            v.destroy()

    def sample(self, white: PETSc.Vec, out: PETSc.Vec) -> None:
        """``out = mean + A^{-1} R white`` (``R R^T = M``) for i.i.d. N(0, 1) ``white``."""
        self.sqrt_mass_mult(white, self._w1)
        self._solve(self.Asolver, self._w1, out)
        out.axpy(1.0, self.mean)

    def pointwise_variance(
        self, method: str = "exact", n_samples: int = 200, seed: int = 0
    ) -> np.ndarray:
        """The diagonal of ``Gamma`` on the owned dofs.

        Args:
            method: ``"exact"``: probing with every unit vector (one solve with ``A`` per
                global dof; for small spaces); ``"randomized"``: the mean of squared samples
                ``A^{-1} R w`` (:meth:`sample`; relative error about ``sqrt(2 / n_samples)``).
            n_samples: samples of the randomized estimate.
            seed: seed of the white noise (hashed from dof coordinates).
        """
        var = np.zeros(self.n_local)
        e, y, My = self.create_vector(), self.create_vector(), self.create_vector()
        lo, hi = e.getOwnershipRange()
        if method == "exact":
            for i in range(self.n_global):
                e.set(0.0)
                if lo <= i < hi:
                    e.setValue(i, 1.0)
                e.assemble()
                self._solve(self.Asolver, e, y)
                self.M.mult(y, My)
                self._solve(self.Asolver, My, y)
                if lo <= i < hi:
                    var[i - lo] = y.getValue(i)
        elif method == "randomized":
            keys = rounded_coordinates(self.V.tabulate_dof_coordinates()[: self.n_local])
            for k in range(n_samples):
                e.getArray()[:] = hashed_normal(seed + k, "prior_probe", None, keys)
                self.sqrt_mass_mult(e, self._w1)
                self._solve(self.Asolver, self._w1, y)
                var += y.getArray(readonly=True) ** 2
            var /= n_samples
        else:
            raise ValueError(f"{method=} is not 'exact' or 'randomized'")
        for obj in (e, y, My):
            obj.destroy()
        return var

    def destroy(self) -> None:
        """Free the PETSc objects."""
        for obj in (
            self.A,
            self.M,
            self.Asolver,
            self.Msolver,
            self.sqrt_ML,
            self.mean,
            self._w1,
            self._w2,
        ):
            obj.destroy()


class GaussianScalarPrior:
    """Independent normals ``N(mean_i, std_i^2)`` on a coefficient vector.

    Raises:
        InputError: non-positive std or mismatched sizes.
    """

    def __init__(self, mean, std):
        self.mean = np.atleast_1d(np.asarray(mean, dtype=float))
        self.std = np.broadcast_to(np.asarray(std, dtype=float), self.mean.shape).copy()
        if not np.all(np.isfinite(self.std) & (self.std > 0)):
            raise InputError("<case>", "coefficient_std", "positive numbers", self.std.tolist())

    @property
    def size(self) -> int:
        """The number of coefficients."""
        return self.mean.size

    def cost(self, x: np.ndarray) -> float:
        """``0.5 * sum(((x - mean) / std)^2)``."""
        return 0.5 * float(np.sum(((x - self.mean) / self.std) ** 2))

    def gradient(self, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / std^2``."""
        return (x - self.mean) / self.std**2

    def precision_mult(self, v: np.ndarray) -> np.ndarray:
        """``v / std^2``."""
        return v / self.std**2

    def covariance_mult(self, r: np.ndarray) -> np.ndarray:
        """``r * std^2``."""
        return r * self.std**2

    def sample(self, white: np.ndarray) -> np.ndarray:
        """A prior sample from standard-normal ``white``: ``mean + std * white``."""
        return self.mean + self.std * white


class Prior:
    """The composite Gaussian prior over a parameter space (blocks independent).

    Args:
        space: the parameter space.
        priors: one entry per block key ``(name, label)`` (``label`` is ``None`` for global
            coefficient blocks): a :class:`GaussianScalarPrior` for scalar blocks, a
            :class:`BiLaplacianPrior` for field blocks (``None`` on ranks that do not hold the
            particle). The same keys on every rank.

    Raises:
        InputError: a block without a prior, a prior for an unknown block or a size mismatch
            (on every rank, before any collective call).
    """

    def __init__(self, space: ParameterSpace, priors: Mapping[tuple, object]):
        self.space = space
        keys = set(space.keys)
        given = set(priors)
        if keys != given:
            raise InputError(
                "<prior>",
                "blocks",
                f"priors for {sorted(map(str, keys))}",
                f"priors for {sorted(map(str, given))}",
            )
        for key in space.scalar_keys:
            p = priors[key]
            size = space.block_size(*key)
            if not isinstance(p, GaussianScalarPrior) or p.size != size:
                raise InputError(
                    "<prior>", block_key_str(*key), f"a GaussianScalarPrior of size {size}", p
                )
        for key in space.field_keys:
            p = priors[key]
            if space.holds(*key) and not isinstance(p, BiLaplacianPrior):
                raise InputError("<prior>", block_key_str(*key), "a BiLaplacianPrior", p)
        self.priors = dict(priors)
        self._mean = space.create_vector()
        a = self._mean.getArray()
        for key in space.scalar_keys:
            sl = space.local_slice(*key)
            if sl is not None:
                a[sl] = self.priors[key].mean
        for key in space.field_keys:
            sl = space.local_slice(*key)
            if sl is not None:
                a[sl] = self.priors[key].mean.getArray(readonly=True)

    def mean(self) -> PETSc.Vec:
        """A copy of the prior mean."""
        return self._mean.copy()

    def _apply(self, v: PETSc.Vec, out: PETSc.Vec, scalar_op: str, field_op: str) -> None:
        space = self.space
        va, oa = v.getArray(readonly=True), out.getArray()
        for key in space.scalar_keys:
            sl = space.local_slice(*key)
            if sl is not None:
                oa[sl] = getattr(self.priors[key], scalar_op)(va[sl])
        for key in space.field_keys:
            if not space.holds(*key):
                continue
            vin = space.field_vec(v, *key, readonly=True)
            vout = space.field_vec(out, *key)
            getattr(self.priors[key], field_op)(vin, vout)
            vin.destroy()
            vout.destroy()

    def precision_mult(self, v: PETSc.Vec, out: PETSc.Vec) -> None:
        """``out = Gamma^{-1} v`` (primal -> dual)."""
        self._apply(v, out, "precision_mult", "precision_mult")

    def covariance_mult(self, r: PETSc.Vec, out: PETSc.Vec) -> None:
        """``out = Gamma r`` (dual -> primal)."""
        self._apply(r, out, "covariance_mult", "covariance_mult")

    def gradient(self, x: PETSc.Vec, g: PETSc.Vec) -> None:
        """``g = Gamma^{-1} (x - mean)`` (dual)."""
        d = x.copy()
        d.axpy(-1.0, self._mean)
        self.precision_mult(d, g)
        d.destroy()

    def cost(self, x: PETSc.Vec) -> float:
        """``0.5 (x - mean)^T Gamma^{-1} (x - mean)`` (collective)."""
        g = x.duplicate()
        value = self.cost_gradient(x, g)
        g.destroy()
        return value

    def cost_gradient(self, x: PETSc.Vec, g: PETSc.Vec) -> float:
        """The cost, with its dual gradient written into ``g``."""
        self.gradient(x, g)
        d = x.copy()
        d.axpy(-1.0, self._mean)
        value = 0.5 * d.dot(g)
        d.destroy()
        return value

    def sample(self, seed: int) -> PETSc.Vec:
        """A prior sample from ``space.random_normal(seed)`` (the same on any number of ranks)."""
        w = self.space.random_normal(seed)
        out = self.space.create_vector()
        wa, oa = w.getArray(readonly=True), out.getArray()
        for key in self.space.scalar_keys:
            sl = self.space.local_slice(*key)
            if sl is not None:
                oa[sl] = self.priors[key].sample(wa[sl])
        for key in self.space.field_keys:
            if not self.space.holds(*key):
                continue
            win = self.space.field_vec(w, *key)
            vout = self.space.field_vec(out, *key)
            self.priors[key].sample(win, vout)
            win.destroy()
            vout.destroy()
        w.destroy()
        return out


__all__ = ["BiLaplacianPrior", "GaussianScalarPrior", "Prior", "bilaplacian_coefficients"]
