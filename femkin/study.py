"""Glue between a case directory and the solver: video, meshes, particles, problem.

This is the one place (with the CLI verbs) where meshing meets solving.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from femkin._fem import MPI
from femkin.case import Case, load_case
from femkin.errors import FemkinError, InputError
from femkin.forward import ModelParameters, SolverOptions
from femkin.io.video import Video, read_video
from femkin.meshing import mesh_particle
from femkin.parallel import distribute
from femkin.problem import InverseProblem, driving_from, resolve_sigma
from femkin.progress import Progress


class Study(NamedTuple):
    """A loaded case and the video it fits."""

    case: Case
    video: Video
    video_path: Path
    truth_path: Path | None
    twin: bool


def collective(comm, func, *args, **kwargs):
    """Run ``func`` on every rank; if any rank raises a user error, all ranks raise it."""
    err = None
    result = None
    try:
        result = func(*args, **kwargs)
    except FemkinError as e:
        err = e
    errors = comm.allgather(None if err is None else (type(err), str(err)))
    for found in errors:
        if found is not None:
            if err is not None:
                raise err
            cls, msg = found
            raise FemkinError(msg)
    return result


def open_study(path, comm=MPI.COMM_WORLD, *, simulated: bool | None = None) -> Study:
    """Load a case; a case with [simulate] is a twin experiment that fits its simulated video."""

    def load():
        case = load_case(path)
        twin = case.simulate is not None if simulated is None else simulated
        if twin:
            video_path = case.dir / "simulated" / "video.npz"
            truth: Path | None = case.dir / "simulated" / "truth.npz"
            if not video_path.exists():
                raise InputError(
                    video_path,
                    None,
                    "the simulated video of this twin "
                    "experiment (run 'femkin simulate CASE' first)",
                    "no such file",
                )
        else:
            video_path = case.resolve(case.data["video"])
            truth = case.resolve(case.data["truth"]) if case.data.get("truth") else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            video = read_video(video_path)
        for w in caught:
            if comm.rank == 0:
                print(f"femkin: warning: {w.message}", flush=True)
        return Study(case, video, video_path, truth, twin)

    return collective(comm, load)


def build_meshes(comm, study: Study, labels, *, size: float | None = None, quiet: bool = True):
    """Distribute the particles and mesh those of this rank's group (cached in CASE/meshes).

    With ``quiet=False`` rank 0 shows a progress bar over its group's particles.
    """
    video = study.video
    weights = [int((video.mask == lb).sum()) for lb in labels]
    dist = distribute(comm, weights)
    opts = dict(study.case.mesh)
    if size is not None:
        opts["size"] = size
    meshes = {}
    bar = Progress(f"mesh: {len(dist.mine)} particle(s)", len(dist.mine), comm=comm, quiet=quiet)

    def mesh_group():  # a group's error (bad mask, mesh file) reaches every rank of comm
        for i in dist.mine:
            label = int(labels[i])
            pm = mesh_particle(
                video.mask,
                label,
                video.pixel_size,
                dist.subcomm,
                **opts,
                cache_dir=study.case.dir / "meshes",
                source=str(study.video_path),
            )
            meshes[label] = pm.mesh
            bar.update()

    try:
        collective(comm, mesh_group)
    finally:
        bar.close()
    return dist, meshes


def build_problem(
    study: Study, comm=MPI.COMM_WORLD, *, learn=None, quiet: bool = True
) -> InverseProblem:
    """The inverse problem of a case (meshes cached, particles distributed; ``quiet=False``
    shows a progress bar while meshing).
    """
    case, video = study.case, study.video
    labels = [int(lb) for lb in video.labels]

    def checks():
        sigma = resolve_sigma(video, case.data, str(study.video_path))
        driving = driving_from(video, case.driving, labels)
        return sigma, driving

    sigma, driving = collective(comm, checks)
    dist, meshes = build_meshes(comm, study, labels, quiet=quiet)
    params = ModelParameters.from_case(case.model)
    solver = SolverOptions.from_case(case.solver)
    learn = case.inversion["learn"] if learn is None else learn
    if "mu_e" in learn and case.driving["mode"] != "fitted":
        learn = [b for b in learn if b != "mu_e"]
    if case.driving["mode"] == "fitted" and "mu_e" not in learn:
        learn = list(learn) + ["mu_e"]
    problem = InverseProblem(
        comm,
        video,
        meshes,
        dist,
        params,
        learn,
        solver,
        sigma,
        driving,
        initial_smoothing=case.model["initial_smoothing"],
    )
    _warn_resolution(problem, comm)
    return problem


def _warn_resolution(problem: InverseProblem, comm) -> None:
    msgs = []
    for label, p in problem.particles.items():
        width = p.model.interface_width()
        h = p.model.h_max()
        if np.isfinite(width) and h > width and p.model.comm.rank == 0:
            msgs.append(
                f"particle {label}: the mesh (h = {h:.3g} um) does not resolve the "
                f"interface width sqrt(kappa/a_1) = {width:.3g} um"
            )
    for m in sum(comm.allgather(msgs), []):
        if comm.rank == 0:
            print(f"femkin: warning: {m}", flush=True)
