"""Rebuild the reference meshes in this folder: ``python meshes/build.py``.

``demo_particle_1.msh`` is particle 1 of ``cases/demo/data/video.npz`` meshed with the schema's
default ``[mesh]`` settings (1 pixel per element): the reference resolution the tests check
against :func:`femkin.meshing.mesh_particle` with its defaults. The demo case itself fits on a
coarser mesh (its ``[mesh] size``, 1.5 pixels) and meshes that into ``cases/demo/meshes/``.
Tests read these files with ``femkin.meshing.read_msh(path, comm)``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from femkin._fem import MPI
from femkin.case import SCHEMA, load_case
from femkin.io import read_video
from femkin.meshing import mesh_particle

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "cases" / "demo"


def main() -> None:
    """Mesh every particle of the demo video with the schema's [mesh] defaults into meshes/."""
    options = {key: spec.default for key, spec in SCHEMA["mesh"].items()}
    video_path = DEMO / "data" / "video.npz"
    if (DEMO / "case.toml").is_file():
        case = load_case(DEMO)
        video_path = case.resolve(case.data["video"])
    video = read_video(video_path)
    with tempfile.TemporaryDirectory() as cache:
        for label in video.labels:
            pm = mesh_particle(
                video.mask, int(label), video.pixel_size, MPI.COMM_SELF, **options, cache_dir=cache
            )
            out = HERE / f"demo_particle_{label}.msh"
            shutil.copyfile(pm.msh_file, out)
            cells = pm.mesh.topology.index_map(2).size_global
            print(f"{out.name}: {cells} cells, area {pm.area:.5f} um^2, options {options}")


if __name__ == "__main__":
    main()
