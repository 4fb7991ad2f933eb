"""Cost of the blurred pixel observation against point sampling, on the demo particle.

Problem: the demo particle (label 1 of ``cases/demo/data/video.npz``, or the synthetic
stand-in of :mod:`_common`) meshed at ``--size`` pixels (default 1.5, the demo's fitting
mesh), its mixed (c, mu) P1 space. For point sampling and for PSF FWHMs of 0.6, 1 and 2
pixels: the assembly time of B (and of B with dB/dfwhm and d^2B/dfwhm^2, what a learned PSF
width assembles whenever the width changes), the non-zeros per pixel row, the quadrature
subdivisions used, and the time of 200 products ``B u`` and ``B^T w`` as a ratio to point
sampling, all measured in this one run (the machine is shared: compare ratios, not seconds).

Prints one JSON object. Run: ``python benchmarks/bench_observation.py [--size 1.5]`` (well
under a minute on one busy core).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from _common import demo_mask

from femkin._fem import MPI
from femkin.meshing import mesh_particle
from femkin.observation import (
    FWHM_PER_SIGMA,
    RESOLUTION,
    blurred_observation,
    build_observation,
)


def _best(func, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        func()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=1.5, help="element size, pixels")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    mask, label, a, source = demo_mask()
    mesh = mesh_particle(mask, label, a, comm, size=args.size).mesh
    from femkin._fem import dolfinx

    W = dolfinx.fem.functionspace(mesh, ("Lagrange", 1, (2,)))
    W0 = W.sub(0)
    n_local = len(dolfinx.fem.Function(W).x.array)
    u = np.cos(np.arange(n_local) * 0.37)
    cells = comm.allreduce(mesh.topology.index_map(2).size_local)
    h_max = comm.allreduce(
        float(mesh.h(2, np.arange(mesh.topology.index_map(2).size_local, dtype=np.int32)).max()),
        op=MPI.MAX,
    )

    def products(obs) -> float:
        w = np.ones(obs.pixels.size)
        out = np.zeros(n_local)

        def run():
            for _ in range(200):
                obs.apply(u)
                obs.apply_transpose(w, out)

        return _best(run)

    point_build = _best(lambda: build_observation(W0, mask, label, a))
    point = build_observation(W0, mask, label, a)
    point_products = products(point)
    rows = []
    for pixels in (0.6, 1.0, 2.0):
        fwhm = pixels * a
        build = _best(lambda fwhm=fwhm: blurred_observation(W0, mask, label, a, fwhm))
        build2 = _best(
            lambda fwhm=fwhm: blurred_observation(W0, mask, label, a, fwhm, derivatives=2), 1
        )
        obs = blurred_observation(W0, mask, label, a, fwhm)
        nnz = comm.allreduce(obs.matrix.nnz)
        rows.append(
            {
                "psf_fwhm_pixels": pixels,
                "psf_fwhm_um": fwhm,
                "subdivisions": max(1, int(np.ceil(RESOLUTION * h_max * FWHM_PER_SIGMA / fwhm))),
                "assembly_s": build,
                "assembly_with_derivatives_s": build2,
                "assembly_ratio_to_point": build / point_build,
                "nnz_per_pixel": nnz / obs.n_pixels,
                "products_ratio_to_point": products(obs) / point_products,
            }
        )
    if comm.rank == 0:
        print(
            json.dumps(
                {
                    "benchmark": "observation",
                    "size": {
                        "source": source,
                        "element_size_pixels": args.size,
                        "cells": cells,
                        "pixels": int(np.sum(mask == label)),
                        "ranks": comm.size,
                        "products": 200,
                    },
                    "point": {
                        "assembly_s": point_build,
                        "nnz_per_pixel": comm.allreduce(point.matrix.nnz) / point.n_pixels,
                        "products_s": point_products,
                    },
                    "blurred": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
