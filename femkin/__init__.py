"""femkin: learn heterogeneous reaction kinetics of battery particles from STXM videos.

Layers, imports pointing downwards only:

- ``femkin.io``, ``femkin.meshing``, ``femkin.stxm``: data contract, masks -> meshes, raw STXM.
- ``femkin.blocks``: the names of the parameter blocks.
- ``femkin.physics``: the Allen-Cahn reaction (ACR) model as pure UFL forms.
- ``femkin.forward``, ``femkin.observation``, ``femkin.projection``, ``femkin.adjoint``,
  ``femkin.factor_cache``: time stepping (BDF2 or backward Euler), pixel observation, pixel
  images onto the mesh, discrete adjoint/tangent/Hessian actions, the kept step
  factorisations.
- ``femkin.misfit``, ``femkin.problem``, ``femkin.parameters``, ``femkin.prior``: the pixel
  misfit, the inverse problem over all particles, the parameter vector, the priors.
- ``femkin.inversion``, ``femkin.uq``, ``femkin.twin``: PETSc TAO fits, Laplace posteriors,
  twin-experiment data.
- ``femkin.study``, ``femkin.report``, ``femkin.cli``, ``femkin.commands``: case files,
  summaries/figures/fields, and the command line on top.

Glossary (used identically in code, docs and case files): ``c`` Li fraction, ``mu`` chemical
potential (kT), ``mu_h`` homogeneous chemical potential, ``mu_e`` reservoir chemical potential
(kT), ``eta = mu - mu_e`` overpotential, ``j0`` exchange current factor, ``k = k0 exp(m)`` rate
prefactor (1/s), ``m`` log-rate field.
"""

from femkin.errors import ConvergenceError, FemkinError, InputError

__version__ = "0.1.0"
__all__ = ["ConvergenceError", "FemkinError", "InputError", "__version__"]
