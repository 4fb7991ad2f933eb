"""Rebuild the reference meshes in this folder: ``python meshes/build.py``.

``demo_particle_1.msh`` is particle 1 of ``cases/demo/data/video.npz`` meshed with the demo
case's ``[mesh]`` settings (the schema defaults when ``cases/demo/case.toml`` is absent). Tests
and the demo read these files with ``dolfinx.io.gmsh.read_from_msh(path, comm, gdim=2)``.
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
    if (DEMO / "case.toml").is_file():
        case = load_case(DEMO)
        options, video_path = case.mesh, case.resolve(case.data["video"])
    else:
        options = {key: spec.default for key, spec in SCHEMA["mesh"].items()}
        video_path = DEMO / "data" / "video.npz"
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
