"""Generate the stacks case's raw beamline files (deterministic): stacks and references.

``raw/frame_<k>.h5`` and ``raw/references.csv``.

Four NeXus NXstxm stacks (one per frame, 60 s apart, 10 energies over 704-716 eV at the Fe L3
edge, 48 x 48 pixels of 50 nm, 4000 incident counts per pixel with Poisson noise, up to 1 pixel
of drift between energies and 2 pixels between stacks) of the analytic two-particle scene of
:mod:`femkin.stxm.synthetic`: two LiFePO4 ellipses (about 210 and 200 pixels) crossed by a
lithiation front. ``references.csv`` holds the LiFePO4 and FePO4 reference spectra on a finer
energy grid (700-720 eV, 0.25 eV), as a beamline's reference measurement would.

``femkin run cases/stacks`` turns them into ``data/video.npz`` (``femkin prepare``), then
meshes, fits and samples. Edit the constants below and run ``python cases/stacks/make_data.py``
to regenerate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from femkin.stxm.nexus import write_nexus
from femkin.stxm.synthetic import make_synthetic, reference_spectra, write_references_csv

HERE = Path(__file__).resolve().parent
SEED = 13
SHAPE = (48, 48)  # image rows, columns
FRAMES = 4  # stacks, 60 s apart
ENERGIES = np.linspace(704.0, 716.0, 10)  # eV
I0 = 4000.0  # incident counts per pixel
PIXEL_SIZE = 0.05  # um


def main() -> None:
    syn = make_synthetic(
        shape=SHAPE,
        n_times=FRAMES,
        energies=ENERGIES,
        i0=I0,
        pixel_size=PIXEL_SIZE,
        max_drift=1.0,
        time_drift=2.0,
        seed=SEED,
    )
    raw = HERE / "raw"
    raw.mkdir(exist_ok=True)
    for k, stack in enumerate(syn.stacks):
        # a detector's integer counts (< 2**16), as beamlines store them
        write_nexus(raw / f"frame_{k}.h5", stack._replace(counts=stack.counts.astype(np.uint16)))
    e = np.arange(700.0, 720.0 + 1e-9, 0.25)
    write_references_csv(raw / "references.csv", e, reference_spectra(e))
    c = syn.c[:, syn.thickness[0] > 0.1]
    print(
        f"{FRAMES} stacks of {ENERGIES.size} energies x {SHAPE[0]} x {SHAPE[1]} pixels; "
        f"true mean c per frame: " + ", ".join(f"{v:.3f}" for v in c.mean(axis=1))
    )


if __name__ == "__main__":
    main()
