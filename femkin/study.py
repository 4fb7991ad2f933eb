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
from femkin.errors import FemkinError, InputError, os_error_message
from femkin.forward import ModelParameters, SolverOptions
from femkin.io.video import Video, read_video
from femkin.meshing import check_cell_count, mesh_particle
from femkin.outputs import check_writable
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
        kinetics=str(model.get("kinetics", "bv")),
        lambda_=float(model.get("lambda", 8.3)),
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


def checkpoint_settings(study: Study, problem: InverseProblem | None = None) -> tuple[dict, str]:
    """The input fingerprint a checkpoint belongs to, and its hash (``case_hash``).

    See :func:`femkin.inversion.checkpoint.fingerprint`: the video's arrays and the case keys
    that change the problem (``problem`` is not needed; kept for callers that pass it).
    """
    from femkin.inversion.checkpoint import fingerprint

    prints = fingerprint(study.case, study.video)
    digest = hashlib.sha256(json.dumps(prints, sort_keys=True).encode()).hexdigest()[:16]
    return prints, digest


def collective(comm, func, *args, **kwargs):
    """Run ``func`` on every rank; if any rank raises a user error, all ranks raise it."""
    err = None
    result = None
    try:
        result = func(*args, **kwargs)
    except FemkinError as e:
        err = e
    except OSError as e:  # a file that cannot be read or written: the user's to fix
        err = FemkinError(os_error_message(e))
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
            check_initial_frame(video, video_path)
        for w in caught:
            if comm.rank == 0:
                print(f"femkin: warning: {w.message}", flush=True)
        return Study(case, video, video_path, truth, twin)

    return collective(comm, load)


#: Observed values of c this many sigma outside [0, 1] are counted as beyond the noise.
OUT_OF_RANGE_SIGMAS = 3.0


def check_initial_frame(video: Video, source) -> None:
    """Every particle must be observed in the first frame: it is the initial state.

    Raises:
        InputError: naming the particle, and the first frame where it is observed.
    """
    for label in video.labels:
        inside = video.mask == label
        if np.isfinite(video.c[0][inside]).any():
            continue
        seen = [f for f in range(video.c.shape[0]) if np.isfinite(video.c[f][inside]).any()]
        later = (
            f"frame 0 all NaN; first observed in frame {seen[0]} (t = {video.t[seen[0]]:g} s): "
            f"drop the frames before it, or give the particle its own video"
            if seen
            else "never observed"
        )
        raise InputError(
            source,
            "c",
            f"particle {int(label)} observed in the first frame (its initial state)",
            later,
        )


def check_fit_data(
    video: Video, sigma, source, *, include_first: bool = False, require_data: bool = True
) -> list[str]:
    """Data checks of a fit that validation of the video alone cannot make.

    - data to fit: some observed pixel after the first frame (frame 0 is the initial state);
    - ``sigma`` finite and positive at every observed pixel;
    - counts of observed values outside [0, 1] by more than :data:`OUT_OF_RANGE_SIGMAS`
      sigma, per frame (a warning: the first frame is clipped for the initial state, later
      frames are fitted as observed).

    Returns:
        Warning messages (the caller prints them once).

    Raises:
        InputError: nothing to fit (with ``require_data``), or a sigma that is NaN, infinite or
            non-positive where c is observed.
    """
    c = video.c
    inside = video.mask > 0
    observed = np.isfinite(c) & inside[None]
    first = 0 if include_first else 1
    if require_data and (c.shape[0] <= first or not observed[first:].any()):
        raise InputError(
            source,
            "c",
            "observed pixels after the first frame (the first frame is the initial state; "
            "there is nothing to fit)",
            f"{c.shape[0]} frame(s), none observed after frame 0",
        )
    s = np.broadcast_to(np.asarray(sigma, dtype=np.float64), c.shape)
    bad = observed & ~(np.isfinite(s) & (s > 0))
    if bad.any():
        f, i, j = (int(v[0]) for v in np.nonzero(bad))
        raise InputError(
            source,
            "sigma",
            "a finite positive noise std at every observed pixel",
            f"{int(bad.sum())} observed pixel(s) with sigma NaN, inf or <= 0 "
            f"(first: frame {f}, pixel ({i}, {j}), sigma {s[f, i, j]})",
        )
    messages = []
    blind = [int(lb) for lb in video.labels if not observed[first:, video.mask == lb].any()]
    if blind:
        messages.append(
            f"{source}: particle(s) {blind} not observed after the first frame: their k(x) is "
            "fitted from the prior alone"
        )
    with np.errstate(invalid="ignore"):
        z = np.where(observed, np.maximum(-c, c - 1.0) / s, 0.0)
    far = observed & (z > OUT_OF_RANGE_SIGMAS)
    if far.any():
        per_frame = {int(f): int(n) for f, n in enumerate(far.sum(axis=(1, 2))) if n}
        frames = ", ".join(f"frame {f}: {n}" for f, n in per_frame.items())
        messages.append(
            f"{source}: {int(far.sum())} observed value(s) of c lie outside [0, 1] by more than "
            f"{OUT_OF_RANGE_SIGMAS:g} sigma ({frames}); the first frame is clipped to "
            "[0.001, 0.999] for the initial state, later frames are fitted as observed: check "
            "the normalisation of the Li fraction"
        )
    return messages


def require_writable(comm, study_or_dir, *names: str) -> None:
    """Check, before any work, that ``CASE/<name>`` can be written for each name (collective).

    Raises:
        InputError: on every rank, naming the folder and the reason (read-only, full disk).
    """
    case_dir = Path(getattr(getattr(study_or_dir, "case", None), "dir", study_or_dir))
    check_writable(comm, *(case_dir / n for n in names))


def build_meshes(
    comm,
    study: Study,
    labels,
    *,
    size: float | None = None,
    quiet: bool = True,
    size_field: str = "simulate.mesh_size",
):
    """Distribute the particles and mesh those of this rank's group (cached in CASE/meshes).

    With ``quiet=False`` rank 0 shows a progress bar over its group's particles. ``size``
    overrides ``[mesh] size`` (the case-file field ``size_field`` set it, for error messages).
    """
    video = study.video
    weights = [int((video.mask == lb).sum()) for lb in labels]
    dist = distribute(comm, weights)
    opts = dict(study.case.mesh)
    if size is not None:
        opts["size"] = size
    for lb in labels if not opts.get("files") else ():  # own meshes: no size to check
        check_cell_count(
            video.mask,
            int(lb),
            opts["size"],
            opts["max_cells"],
            str(study.case.file),
            "mesh.size" if size is None else size_field,
        )
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
    study: Study,
    comm=MPI.COMM_WORLD,
    *,
    learn=None,
    quiet: bool = True,
    require_data: bool = False,
    refined: tuple[float, float, str] | None = None,
) -> InverseProblem:
    """The inverse problem of a case (meshes cached, particles distributed).

    ``quiet=False`` shows a progress bar while meshing; ``require_data=True`` (the verbs that
    fit) refuses a video with nothing observed after the first frame (:func:`check_fit_data`).
    ``refined = (mesh_factor, time_factor, field)``: the same problem with ``[mesh] size`` and
    the step control (``[solver] time_tol`` and ``dc_max``) multiplied by those factors
    (``field`` names the case-file setting, for error messages).
    """
    case, video = study.case, study.video
    labels = [int(lb) for lb in video.labels]

    def checks():
        sigma = resolve_sigma(video, case.data, str(study.video_path))
        learned = case.inversion["learn"] if learn is None else learn
        notes = check_fit_data(
            video,
            sigma,
            study.video_path,
            include_first="initial" in learned,
            require_data=require_data,
        )
        driving = driving_from(video, case.driving, labels)
        return sigma, driving, notes

    sigma, driving, notes = collective(comm, checks)
    if comm.rank == 0:
        for note in notes:
            print(f"femkin: warning: {note}", flush=True)
    solver_section = dict(case.solver)
    size = None
    if refined is not None:
        mesh_factor, time_factor, field = refined
        size = float(case.mesh["size"]) * mesh_factor
        solver_section["time_tol"] = float(case.solver["time_tol"]) * time_factor
        solver_section["dc_max"] = float(case.solver["dc_max"]) * time_factor
    dist, meshes = build_meshes(
        comm, study, labels, quiet=quiet, size=size, size_field=refined[2] if refined else ""
    )
    params = model_parameters(case.model)
    solver = solver_options(solver_section)
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
        psf_fwhm=case.data["psf_fwhm"],
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
