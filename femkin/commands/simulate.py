"""``femkin simulate CASE``: synthetic data from the ACR model (twin experiments).

Reads the mask, ``t``, ``pixel_size``, ``mu_e`` and the first frame from the case's video,
simulates every particle (on the ``[simulate] mesh_size`` mesh, finer than the fitting mesh
for an honest twin experiment) with k(x) from ``k_map`` or a random smooth field, and writes
``CASE/simulated/video.npz`` (noisy ``c``, NaN outside particles, ``sigma`` = noise),
``CASE/simulated/truth.npz`` (noise-free ``c``, ``k`` and ``m`` on pixels, the parameters), an
XDMF time series of c and mu per particle for ParaView, and PNG frames.
"""

from __future__ import annotations

import argparse
from pathlib import Path


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


def random_m(coords, std: float, length: float, seed: int, n_features: int = 64):
    """A smooth random field of coordinates (random Fourier features), partition independent."""
    import numpy as np

    rng = np.random.default_rng([seed, 7919])
    omega = rng.standard_normal((n_features, 2)) / length
    phase = rng.uniform(0, 2 * np.pi, n_features)
    field = np.sqrt(2.0 / n_features) * np.cos(coords[:, :2] @ omega.T + phase).sum(axis=1)
    return std * field


def prior_m(V, std: float, length: float, seed: int, label: int):
    """A sample of the BiLaplacian prior (std, length) on ``V`` (owned + ghost values).

    The white noise is hashed from the seed, the label and the rounded dof coordinates, so the
    sample does not depend on the partition.
    """
    from femkin._fem import dolfinx
    from femkin.parameters import hashed_normal, rounded_coordinates
    from femkin.prior import BiLaplacianPrior

    prior = BiLaplacianPrior(V, std, length, options_prefix="femkin_truth_prior_")
    n_own = V.dofmap.index_map.size_local
    white = prior.create_vector()
    white.getArray()[:] = hashed_normal(
        seed, "m_truth", label, rounded_coordinates(V.tabulate_dof_coordinates()[:n_own])
    )
    out = prior.create_vector()
    prior.sample(white, out)
    f = dolfinx.fem.Function(V)
    f.x.array[:n_own] = out.getArray(readonly=True)
    f.x.scatter_forward()
    for v in (white, out):
        v.destroy()
    prior.destroy()
    return f.x.array.copy()


def simulate(case_path, comm=None, *, quiet: bool = False) -> Path:
    """Run the simulation of a case; returns the path of the simulated video."""
    import numpy as np

    from femkin._fem import MPI
    from femkin.errors import InputError
    from femkin.forward import ModelParameters, ParticleModel, SolverOptions
    from femkin.io.video import Video, write_video
    from femkin.observation import build_observation
    from femkin.problem import C_CLIP, driving_from, image_at, smoothed
    from femkin.progress import Progress
    from femkin.study import build_meshes, collective, open_study

    comm = comm or MPI.COMM_WORLD
    study = open_study(case_path, comm, simulated=False)
    case, video = study.case, study.video
    sim = case.simulate or {}
    labels = [int(lb) for lb in video.labels]
    truth = {k: v for k, v in (sim.get("model") or {}).items() if v is not None}
    params = ModelParameters.from_case({**case.model, **truth})

    def checks():
        k_map = None
        if sim.get("k_map"):
            path = case.resolve(sim["k_map"])
            try:
                k_map = np.load(path)
            except Exception as err:
                raise InputError(path, "k_map", "a readable .npy array", repr(err)) from None
            if k_map.shape != video.mask.shape:
                raise InputError(
                    path, "k_map", f"shape {video.mask.shape} (the mask's)", k_map.shape
                )
            inside = video.mask > 0
            if not np.all(np.isfinite(k_map[inside]) & (k_map[inside] > 0)):
                raise InputError(
                    path,
                    "k_map",
                    "finite k > 0 on every particle pixel",
                    "non-positive or NaN values",
                )
        return k_map, driving_from(video, case.driving, labels)

    k_map, driving = collective(comm, checks)
    dist, meshes = build_meshes(comm, study, labels, size=sim.get("mesh_size"), quiet=quiet)
    solver = SolverOptions.from_case(case.solver)
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
        coords = model.V.tabulate_dof_coordinates()
        inside = video.mask == label
        if k_map is not None:
            m = image_at(np.log(k_map / params.k0), inside, coords, video.pixel_size)
        elif sim.get("m_std") and sim.get("m_field", "fourier") == "prior":
            m = prior_m(model.V, sim["m_std"], sim.get("m_length") or 0.2, sim["seed"], label)
        elif sim.get("m_std"):
            m = random_m(coords, sim["m_std"], sim.get("m_length") or 0.2, sim["seed"])
        else:
            m = np.zeros(len(coords))
        model.set_m(m)
        c0 = smoothed(
            model.V,
            image_at(video.c[0], inside, coords, video.pixel_size),
            case.model["initial_smoothing"],
        )
        c0 = np.clip(c0, C_CLIP, 1 - C_CLIP)
        traj = model.solve(video.t, driving[label], c0, on_frame=lambda _: bar.update())
        obs = build_observation(model.W.sub(0), video.mask, label, video.pixel_size)
        obs_V = build_observation(model.V, video.mask, label, video.pixel_size)
        clean = np.stack([obs.apply(traj.state(n)) for n in traj.frame_steps])
        local.append((obs.pixels, clean, obs_V.pixels, obs_V.apply(model.m.x.array)))
        if "xdmf" in sim.get("outputs", ["xdmf"]):
            _write_xdmf(model, traj, out_dir / f"particle_{label}.xdmf")
        if not quiet and model.comm.rank == 0:
            bar.clear()
            print(
                f"particle {label}: {traj.n_steps} steps, "
                f"{int(np.sum(traj.newton_iterations))} Newton iterations",
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
        noisy = c.copy()
        noise = float(sim.get("noise", 0.0))
        if noise > 0:
            for f in range(1, T):  # frame 0 stays the given initial frame's projection
                rng = np.random.default_rng([int(sim.get("seed", 0)), f])
                noisy[f] += noise * rng.standard_normal((H, W))
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
            noise=noise,
        )
        if "png" in sim.get("outputs", ["png"]):
            _plot_frames(noisy, c, video.t, out_dir / "frames.png")
        if not quiet:
            print(f"wrote {video_out}", flush=True)
    comm.barrier()
    return video_out


def _write_xdmf(model, traj, path) -> None:
    from femkin._fem import dolfinx

    Vmu, _ = model.W.sub(1).collapse()
    c = dolfinx.fem.Function(model.V, name="c")
    mu = dolfinx.fem.Function(Vmu, name="mu")
    with dolfinx.io.XDMFFile(model.comm, str(path), "w") as xdmf:
        xdmf.write_mesh(model.mesh)
        for n in traj.frame_steps:
            state = traj.state(n)
            c.x.array[:] = state[model.c_dofs]
            mu.x.array[:] = state[model.mu_dofs]
            xdmf.write_function(c, traj.times[n])
            xdmf.write_function(mu, traj.times[n])


def _plot_frames(noisy, clean, t, path, n_show: int = 5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    idx = np.unique(np.linspace(0, len(t) - 1, n_show).astype(int))
    fig, axes = plt.subplots(2, len(idx), figsize=(2.4 * len(idx), 5), squeeze=False)
    for j, f in enumerate(idx):
        for i, (img, name) in enumerate(((clean, "model"), (noisy, "noisy"))):
            ax = axes[i, j]
            im = ax.imshow(img[f], vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"{name}, t = {t[f]:.0f} s", fontsize=8)
            ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.6, label="c")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    simulate(args.case, quiet=args.quiet)
    return 0
