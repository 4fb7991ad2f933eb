"""The names of the parameter blocks an inversion can learn, declared once.

Used by the case schema (``[inversion] learn``, ``[verify] blocks``), the inverse problem, the
parameter vector, checkpoints, ``summary.json`` and ``uq.json``. Each name is a glossary symbol:

- ``mu_h``: Legendre coefficients a_1..a_N of mu_h(c) (kT);
- ``j0``: Legendre coefficients b_1..b_M of ln j0(c);
- ``k0``: the rate prefactor. **Its coordinate is ln k0**: the parameter vector, the gradient,
  the prior (``[inversion.prior] k0_std``), Taylor directions and the posterior in ``uq.json``
  all use ln k0, so that k0 stays positive and a step is a relative change of k0;
  ``summary.json`` and the ``[model]`` section give k0 itself (1/s);
- ``kappa``: gradient-energy coefficient (kT um^2);
- ``coherency``: coherency coefficient B (kT);
- ``lambda``: the reorganisation energy of ``[model] kinetics = "ciet"``. **Its coordinate is
  ln lambda** (like k0: positive, relative steps, prior ``[inversion.prior] lambda_std`` on
  ln lambda); ``summary.json`` and ``[model] lambda`` give lambda itself (kT);
- ``m``: the log-rate field ln(k / k0) of each particle (P1);
- ``initial``: the initial c of each particle (P1);
- ``mu_e``: the knots of mu_e(t) of each particle (kT), when ``[driving] mode = "fitted"``;
- ``psf_fwhm``: the FWHM of the instrument's Gaussian point-spread function (um), shared by
  all particles of the video. **Its coordinate is ln psf_fwhm** (like k0); it enters only the
  observation (:func:`femkin.observation.blurred_observation`), not the model.

The order of :data:`BLOCKS` is the order of the blocks in the parameter vector.

Some blocks only enter some kinetic laws (:data:`LAW_BLOCKS`): ``j0`` (ln j0 Legendre
coefficients) only the learned-j0 Butler-Volmer law ``"bv"``, ``lambda`` only ``"ciet"``;
learning one under another law is refused (:func:`blocks_unused_by`).
"""

from __future__ import annotations

#: Coefficients shared by all particles (one vector each, stored on rank 0).
GLOBAL_BLOCKS = ("mu_h", "j0", "k0", "kappa", "coherency", "lambda")
#: P1 fields of each particle.
PARTICLE_FIELD_BLOCKS = ("m", "initial")
#: Scalar vectors of each particle.
PARTICLE_SCALAR_BLOCKS = ("mu_e",)
#: Scalars of the observation shared by all particles (stored on rank 0).
OBSERVATION_BLOCKS = ("psf_fwhm",)
#: Every block, in parameter-vector order.
BLOCKS = GLOBAL_BLOCKS + OBSERVATION_BLOCKS + PARTICLE_FIELD_BLOCKS + PARTICLE_SCALAR_BLOCKS

#: The kinetic laws (``[model] kinetics``, :mod:`femkin.physics.acr`); the first is the default.
KINETICS = ("bv", "bv-constant", "bv-lim", "ciet")
#: Blocks that only some kinetic laws contain: block -> those laws.
LAW_BLOCKS = {"j0": ("bv",), "lambda": ("ciet",)}


def blocks_unused_by(kinetics: str, blocks) -> list[str]:
    """The blocks among ``blocks`` that the kinetic law ``kinetics`` does not contain."""
    return [b for b in blocks if b in LAW_BLOCKS and kinetics not in LAW_BLOCKS[b]]
