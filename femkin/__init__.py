"""femkin: learn heterogeneous reaction kinetics of battery particles from STXM videos.

Layers, imports pointing downwards only:

- ``femkin.io``, ``femkin.meshing``, ``femkin.stxm``: data contract, masks -> meshes, raw STXM.
- ``femkin.physics``: the Allen-Cahn reaction (ACR) model as pure UFL forms.
- ``femkin.forward``, ``femkin.observation``, ``femkin.adjoint``: time stepping, pixel
  observation, discrete adjoint/tangent/Hessian actions.
- ``femkin.inversion``, ``femkin.uq``: PETSc TAO fits and Laplace posteriors.
- ``femkin.cli``, ``femkin.commands``, ``femkin.report``: the command line on top.

Glossary (used identically in code, docs and case files): ``c`` Li fraction, ``mu`` chemical
potential (kT), ``mu_h`` homogeneous chemical potential, ``mu_e`` reservoir chemical potential
(kT), ``eta = mu - mu_e`` overpotential, ``j0`` exchange current factor, ``k = k0 exp(m)`` rate
prefactor (1/s), ``m`` log-rate field.
"""

from femkin.errors import ConvergenceError, FemkinError, InputError

__version__ = "0.1.0"
__all__ = ["ConvergenceError", "FemkinError", "InputError", "__version__"]
