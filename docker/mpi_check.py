"""Check MPI point-to-point transfers in a container: ``mpirun -n 2 python docker/mpi_check.py``.

Large messages between ranks on one node use MPICH's single-copy transport when it is enabled:
cross-memory attach (``process_vm_readv``), which needs ptrace rights that a container without
``--cap-add SYS_PTRACE`` lacks. The image disables it (``MPIR_CVAR_CH4_CMA_ENABLE=0``); run with
``-e MPIR_CVAR_CH4_CMA_ENABLE=1`` to see the failure that this avoids.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
n = 1 << 20  # 8 MB of float64: far above every eager/single-copy threshold
data = np.arange(n, dtype=np.float64) * (comm.rank + 1)
if comm.rank == 0:
    comm.Send(data, dest=1, tag=7)
    back = np.empty(n)
    comm.Recv(back, source=1, tag=8)
    assert np.array_equal(back, np.arange(n) * 2.0)
elif comm.rank == 1:
    got = np.empty(n)
    comm.Recv(got, source=0, tag=7)
    assert np.array_equal(got, np.arange(n) * 1.0)
    comm.Send(data, dest=0, tag=8)
total = comm.allreduce(float(data[-1]))
if comm.rank == 0:
    print(f"mpi_check: {comm.size} ranks, 8 MB exchanged, allreduce {total:g}: ok", flush=True)
