"""Glue between a case directory and the solver: video, meshes, particles, problem.

This is the one place (with the CLI verbs) where meshing meets solving, and where the case
file's sections become library objects: :func:`model_parameters`, :func:`solver_options`,
:func:`driving_from`, :func:`resolve_sigma`, and the checkpoint of a case
(:func:`checkpoint_path`, :func:`checkpoint_settings`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from femkin._fem import MPI
from femkin.case import Case, load_case
from femkin.driving import Driving
from femkin.errors import FemkinError, InputError
from femkin.forward import ModelParameters, SolverOptions
from femkin.io.video import Video, read_video
from femkin.meshing import mesh_particle
from femkin.parallel import distribute
from femkin.problem import InverseProblem
from femkin.progress import Progress


class Study(NamedTuple):
    """A loaded case and the video it fits."""

    case: Case
    video: Video
    video_path: Path
    truth_path: Path | None
    twin: bool


def model_parameters(model: dict) -> ModelParameters:
    """The :class:`~femkin.forward.ModelParameters` of a case file's ``[model]`` section."""
    return ModelParameters(
        mu_h=tuple(model["mu_h"]),
        j0=tuple(model["j0"]),
        j0_prefactor=tuple(model["j0_prefactor"]),
        k0=float(model["k0"]),
        kappa=float(model["kappa"]),
        coherency=float(model["coherency"]),
        alpha=float(model["alpha"]),
    )


def solver_options(solver: dict) -> SolverOptions:
    """The :class:`~femkin.forward.SolverOptions` of a case file's ``[solver]`` section."""
    names = [f.name for f in dataclasses.fields(SolverOptions)]
    return SolverOptions(**{name: solver[name] for name in names if name in solver})


def driving_from(video: Video, case_driving: dict, labels: Sequence[int]) -> dict[int, Driving]:
    """Initial mu_e(t) per particle: the case's ``[driving]`` knots if given, else the video's.

    Knots are moved to the frame times when mu_e is fitted (``mode = "fitted"``).

    Raises:
        InputError: neither the video nor the case gives mu_e.
    """
    if case_driving.get("t") is not None:
        base = Driving(case_driving["t"], case_driving["mu_e"])
    elif video.mu_e is not None:
        base = Driving(video.t, video.mu_e)
    else:
        raise InputError(
            video.source,
            "mu_e",
            "a mu_e (or voltage) series in the video, or "
            "[driving] t and mu_e knots in the case file",
            "neither",
        )
    if case_driving.get("mode", "data") == "fitted":
        return {lb: Driving(video.t, [base(t) for t in video.t]) for lb in labels}
    return {lb: Driving(base.t, base.values) for lb in labels}


def resolve_sigma(video: Video, case_data: dict, source: str):
    """Noise std: the case's ``[data] sigma``, else the video's ``sigma``.

    Raises:
        InputError: neither gives one.
    """
    if case_data.get("sigma") is not None:
        return float(case_data["sigma"])
    if video.sigma is not None:
        return video.sigma
    raise InputError(
        source,
        "sigma",
        "a noise std in the video ('sigma') or [data] sigma in the case file",
        "neither",
    )


def checkpoint_path(case: Case) -> Path:
    """Where the fit of a case keeps its checkpoint (and its MAP point)."""
    return case.dir / "checkpoints" / "state.npz"


def checkpoint_settings(study: Study, problem: InverseProblem) -> tuple[dict, str]:
    """The settings a checkpoint belongs to, and their hash."""
    inv = study.case.inversion
    settings = {
        "learn": list(problem.learn),
        "tao_type": inv["tao_type"],
        "hessian": inv["hessian"],
        "video": str(study.video_path.name),
        "prior": inv["prior"],
        "model": study.case.model,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return settings, digest


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
    params = model_parameters(case.model)
    solver = solver_options(case.solver)
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
