"""Raw STXM data to Li-fraction videos (issue 6, ``femkin prepare``).

Readers return one :class:`Stack` for every format: ALS/STXM_Control ``.hdr`` + ``.xim``
(:mod:`femkin.stxm.als`), NeXus NXstxm HDF5 in three layouts (:mod:`femkin.stxm.nexus`) and
aXis2000 ``.stk`` (:mod:`femkin.stxm.stk`); each module also writes its format. The pipeline
(:mod:`femkin.stxm.pipeline`) computes optical densities (:mod:`~femkin.stxm.od`), registers
energies and frames (:mod:`~femkin.stxm.register`), unmixes Li fractions
(:mod:`~femkin.stxm.unmix`) and segments particles (:mod:`~femkin.stxm.masks`).
"""

from femkin.stxm.pipeline import Prepared, prepare, write_summary
from femkin.stxm.readers import read_stack
from femkin.stxm.stack import Stack
from femkin.stxm.unmix import References, read_references

__all__ = [
    "Prepared",
    "References",
    "Stack",
    "prepare",
    "read_references",
    "read_stack",
    "write_summary",
]
