"""``femkin mesh CASE``: mesh every particle of a case's video into ``CASE/meshes/``.

With ``[mesh] files`` the particles' own meshes are read and checked against the mask instead
(:mod:`femkin.mesh_import`); ``--export FORMAT`` also writes each mesh as
``CASE/meshes/particle_<label>.<FORMAT>`` for other tools (ParaView, gmsh, ...).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from femkin.mesh_import import EXPORT_FORMATS


def register(subparsers) -> None:
    """Add the ``mesh`` verb."""
    parser = subparsers.add_parser(
        "mesh",
        help="mesh every particle of a case's video",
        description="Read the video named in [data], mesh each labelled particle with the "
        "[mesh] settings into CASE/meshes/ (cached by a hash of the inputs, reused when "
        "present) and draw CASE/meshes/particle_<label>.png.",
    )
    parser.add_argument("case", type=Path, help="case directory (or its case.toml)")
    parser.add_argument(
        "--export",
        nargs="+",
        metavar="FORMAT",
        choices=EXPORT_FORMATS,
        default=[],
        help="also write each mesh as meshes/particle_<label>.<FORMAT> (meshio formats: "
        + ", ".join(EXPORT_FORMATS)
        + ")",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Mesh the particles of ``args.case``; print one line per particle."""
    from femkin._fem import MPI
    from femkin.case import load_case
    from femkin.io import read_video
    from femkin.mesh_import import write_mesh
    from femkin.meshing import mesh_particle, plot_mesh

    comm = MPI.COMM_WORLD
    case = load_case(args.case)
    video_path = case.resolve(case.data["video"])
    video = read_video(video_path)
    out = case.dir / "meshes"
    for label in video.labels:
        pm = mesh_particle(
            video.mask,
            int(label),
            video.pixel_size,
            comm,
            **case.mesh,
            cache_dir=out,
            source=str(video_path),
        )
        plot_mesh(pm, video.mask, out / f"particle_{label}.png")
        exported = [
            write_mesh(pm.mesh, out / f"particle_{label}.{fmt}", label=int(label)).name
            for fmt in args.export
        ]
        topology = pm.mesh.topology
        topology.create_entities(0)
        vertices = topology.index_map(0).size_global
        cells = topology.index_map(topology.dim).size_global
        if comm.rank == 0:
            pixels = int((video.mask == label).sum())
            print(
                f"particle {label}: {pixels} pixels, {vertices} vertices, {cells} cells, "
                f"area {pm.area:.4f} um^2 (pixels {pixels * video.pixel_size**2:.4f}), "
                f"{pm.msh_file.name if pm.msh_file else ''}"
                + "".join(f", {name}" for name in exported),
                flush=True,
            )
    return 0
