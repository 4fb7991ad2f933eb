"""``femkin simulate CASE``: synthetic data from the ACR model (twin experiments).

Reads the mask, ``t``, ``pixel_size``, ``mu_e`` and the first frame from the case's video,
simulates every particle (on the ``[simulate] mesh_size`` mesh, finer than the fitting mesh
for an honest twin experiment) with k(x) from ``k_map`` or a random smooth field, observes it
on the pixels (blurred by the PSF of ``[simulate] psf_fwhm``, else ``[data] psf_fwhm``, when
one is given; point values otherwise), and writes
``CASE/simulated/video.npz`` (noisy ``c``, NaN outside particles, ``sigma`` = noise),
``CASE/simulated/truth.npz`` (noise-free ``c``, ``k`` and ``m`` on pixels, the parameters), an
XDMF (or VTX) time series of c and mu per particle for ParaView, and PNG frames
(``[simulate] outputs``). The numerics live in :mod:`femkin.twin`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="simulate a case's particles (synthetic data for twin experiments)",
        description="Simulate every particle of the case's video with the [model] parameters "
        "and write CASE/simulated/{video.npz,truth.npz}, XDMF and PNG frames.",
    )
    parser.add_argument("case", type=Path, help="case directory (or its case.toml)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run)


def simulate(case_path, comm=None, *, quiet: bool = False) -> Path:
    """Run the simulation of a case; returns the path of the simulated video."""
    import numpy as np

    from femkin._fem import MPI
    from femkin.forward import ParticleModel
    from femkin.io.video import Video, write_video
    from femkin.progress import Progress
    from femkin.report import plot_frames, write_trajectory
    from femkin.study import (
        build_meshes,
        collective,
        driving_from,
        model_parameters,
        open_study,
        require_writable,
        solver_options,
    )
    from femkin.twin import TrueField, read_k_map, simulate_particle, with_noise

    comm = comm or MPI.COMM_WORLD
    study = open_study(case_path, comm, simulated=False)
    require_writable(comm, study, "meshes", "simulated")
    case, video = study.case, study.video
    sim = case.simulate or {}
    labels = [int(lb) for lb in video.labels]
    truth = {k: v for k, v in (sim.get("model") or {}).items() if v is not None}
    params = model_parameters({**case.model, **truth})

    def checks():
        k_map = read_k_map(case.resolve(sim["k_map"]), video.mask) if sim.get("k_map") else None
        return k_map, driving_from(video, case.driving, labels)

    k_map, driving = collective(comm, checks)
    true_field = TrueField(
        k_map,
        sim.get("m_std"),
        sim.get("m_length") or 0.2,
        sim.get("m_field", "fourier"),
        sim.get("seed", 0),
    )
    dist, meshes = build_meshes(comm, study, labels, size=sim.get("mesh_size"), quiet=quiet)
    psf_fwhm = sim.get("psf_fwhm") or case.data["psf_fwhm"]
    solver = solver_options(case.solver)
    outputs = sim.get("outputs", ["npz", "xdmf", "png"])
    T, H, W = video.c.shape
    out_dir = case.dir / "simulated"
    if comm.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    comm.barrier()
    local = []
    # Rank 0 shows its own group's particles (the distribution balances pixels over groups).
    bar = Progress(
        f"simulate: frames of {len(dist.mine)} particle(s)",
        (T - 1) * len(dist.mine),
        comm=comm,
        quiet=quiet,
    )
    for i in dist.mine:
        label = labels[i]
        model = ParticleModel(meshes[label], params, solver=solver)
        twin = simulate_particle(
            model,
            video,
            label,
            driving[label],
            true_field,
            smoothing=case.model["initial_smoothing"],
            on_frame=lambda _: bar.update(),
            psf_fwhm=psf_fwhm,
        )
        local.append((twin.pixels, twin.clean, twin.m_pixels, twin.m))
        for fmt, suffix in (("xdmf", "xdmf"), ("vtx", "bp")):
            if fmt in outputs:
                write_trajectory(
                    model, twin.trajectory, out_dir / f"particle_{label}.{suffix}", fmt
                )
        if not quiet and model.comm.rank == 0:
            bar.clear()
            print(
                f"particle {label}: {twin.trajectory.n_steps} steps, "
                f"{int(np.sum(twin.trajectory.newton_iterations))} Newton iterations",
                flush=True,
            )
    bar.close()
    gathered = comm.gather(local, root=0)
    video_out = out_dir / "video.npz"
    if comm.rank == 0:
        c = np.full((T, H * W), np.nan)
        m_pix = np.full(H * W, np.nan)
        for part in gathered:
            for pix, clean, pix_v, m_vals in part:
                c[:, pix] = clean
                m_pix[pix_v] = m_vals
        c = c.reshape(T, H, W)
        noise = float(sim.get("noise", 0.0))
        noisy = with_noise(c, noise, int(sim.get("seed", 0)))
        mu_e = np.array([driving[labels[0]](t) for t in video.t])
        write_video(
            video_out,
            Video(
                noisy,
                video.mask,
                video.t,
                video.pixel_size,
                mu_e=mu_e,
                sigma=noise if noise > 0 else None,
            ),
        )
        m_pix = m_pix.reshape(H, W)
        law: dict[str, Any] = {"lambda": params.lambda_}  # a keyword in Python
        np.savez(
            out_dir / "truth.npz",
            c=c,
            m=m_pix,
            k=params.k0 * np.exp(m_pix),
            mu_h=np.array(params.mu_h),
            j0=np.array(params.j0),
            j0_prefactor=np.array(params.j0_prefactor),
            k0=params.k0,
            kappa=params.kappa,
            coherency=params.coherency,
            alpha=params.alpha,
            kinetics=params.kinetics,
            noise=noise,
            **law,
            psf_fwhm=np.nan if psf_fwhm is None else psf_fwhm,  # NaN: point sampling
        )
        if "png" in outputs:
            plot_frames(noisy, c, video.t, out_dir / "frames.png")
        if not quiet:
            print(f"wrote {video_out}", flush=True)
    comm.barrier()
    return video_out


def run(args: argparse.Namespace) -> int:
    simulate(args.case, quiet=args.quiet)
    return 0
