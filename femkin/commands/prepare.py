"""``femkin prepare``: raw STXM stacks -> Li-fraction video (``c``, mask, ``t``, sigma) + PNG.

Serial work: under ``mpirun`` only rank 0 reads, computes and writes; a user error found there
is raised on every rank.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from femkin.case import SCHEMA
from femkin.errors import CaseError, InputError, run_on_root

#: The ``[prepare]`` keys of the case schema, where their defaults are declared.
PREPARE = SCHEMA["prepare"]


def _default(key: str) -> Any:
    default = PREPARE[key].default
    return list(default) if isinstance(default, list) else default


def register(subparsers) -> None:
    """Add the ``prepare`` verb."""
    parser = subparsers.add_parser(
        "prepare",
        help="turn raw STXM stacks into a Li-fraction video and masks",
        description="Read STXM stacks (ALS .hdr/.xim, NeXus NXstxm .h5/.hdf5/.nxs, aXis2000 "
        ".stk), one per frame in time order; compute optical densities, register energies and "
        "frames by sub-pixel phase correlation, unmix against LiFePO4/FePO4 reference spectra "
        "(non-negative, bootstrap sigma), segment particles (Otsu) and write the video contract "
        "plus a PNG summary next to it. With --case, the [prepare] section gives the defaults "
        "(paths relative to the case directory); command-line values override it.",
    )
    parser.add_argument("stacks", nargs="*", type=Path, help="raw stacks, one per frame")
    parser.add_argument(
        "--references", type=Path, default=None, help="CSV with columns energy, LiFePO4, FePO4"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"video to write (.npz, .h5 or .tif folder); default {_default('out')}",
    )
    parser.add_argument(
        "--i0-region",
        type=int,
        nargs=4,
        default=None,
        metavar=("ROW0", "ROW1", "COL0", "COL1"),
        help="particle-free region for I0 (raw pixels, half-open); automatic by default",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="Fe optical density threshold for the masks (default: Otsu)",
    )
    parser.add_argument(
        "--min-size",
        type=int,
        default=None,
        help=f"smallest particle kept, in pixels (default {_default('min_size')})",
    )
    parser.add_argument(
        "--times",
        type=float,
        nargs="+",
        default=None,
        help="frame times in seconds (default: from the file headers)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=None,
        help=f"bootstrap resamples of the energies for sigma (default {_default('bootstrap')}; "
        "0: no sigma, then the case needs [data] sigma)",
    )
    parser.add_argument(
        "--case",
        type=Path,
        default=None,
        help="case directory or case.toml whose [prepare] section to use",
    )
    parser.set_defaults(func=run)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Merge the case file's ``[prepare]`` section with the command line (which wins).

    Defaults are the schema's (:data:`femkin.case.SCHEMA`), as for a case file.
    """
    out: dict[str, Any] = {key: _default(key) for key in PREPARE}
    out["out"] = Path(out["out"])
    source = "command line"
    if args.case is not None:
        from femkin.case import load_case

        case = load_case(args.case)
        sec = case.prepare
        source = str(case.file)
        out.update({k: sec[k] for k in out if k in sec})
        out["stacks"] = [case.resolve(s) for s in sec.get("stacks") or []]
        if sec.get("references"):
            out["references"] = case.resolve(sec["references"])
        out["out"] = case.resolve(sec.get("out") or _default("out"))
    if args.stacks:
        out["stacks"] = list(args.stacks)
    for key in ("references", "out", "i0_region", "threshold", "min_size", "times", "bootstrap"):
        value = getattr(args, key)
        if value is not None:
            out[key] = value
    error = CaseError if args.case is not None and not args.stacks else InputError
    if not out["stacks"]:
        raise error(source, "stacks", "at least one raw STXM stack", "none")
    if out["references"] is None:
        raise error(source, "references", "a CSV of reference spectra (--references)", "none")
    return out


#: The settings that change what prepare makes from the same files (see femkin.stxm.provenance).
RECORDED = ("i0_region", "threshold", "min_size", "times", "bootstrap")


def case_arguments(case) -> argparse.Namespace:
    """``femkin prepare CASE``'s arguments without overrides: all from the case's [prepare]."""
    return argparse.Namespace(
        case=Path(case),
        stacks=[],
        references=None,
        out=None,
        i0_region=None,
        threshold=None,
        min_size=None,
        times=None,
        bootstrap=None,
    )


def prepare_video(args: argparse.Namespace, *, if_stale: bool = False) -> tuple[str, bool]:
    """Prepare (rank 0); with ``if_stale``, only when the video is not current.

    Returns the report and whether a video was written.
    """
    from femkin.io.video import Video, validate_video, write_video
    from femkin.stxm import prepare, read_references, read_stack, write_summary
    from femkin.stxm.provenance import input_files, record_path, stale_reason, write_record

    cfg = settings(args)
    out = Path(cfg["out"])
    recorded = {k: cfg[k] for k in RECORDED}
    files = input_files(cfg["stacks"], cfg["references"])
    if if_stale:
        reason = stale_reason(out, recorded, files)
        if reason is None:
            return (
                f"prepare: {out} is current ({len(files)} input files and the [prepare] "
                f"settings unchanged since {record_path(out).name}); skipped",
                False,
            )
    else:
        reason = "requested"
    stacks = [read_stack(p) for p in cfg["stacks"]]
    refs = read_references(cfg["references"])
    result = prepare(
        stacks,
        refs,
        i0_region=cfg["i0_region"],
        threshold=cfg["threshold"],
        min_size=int(cfg["min_size"]),
        times=cfg["times"],
        n_boot=int(cfg["bootstrap"]),
    )
    video = Video(
        c=result.c,
        mask=result.mask,
        t=result.t,
        pixel_size=result.pixel_size,
        sigma=result.sigma,
        source="; ".join(str(p) for p in cfg["stacks"]),
    )
    validate_video(video, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record_path(out).unlink(missing_ok=True)  # a video without its record is never current
    write_video(out, video)
    png = out.parent / f"{out.stem}_summary.png"
    write_summary(png, result)
    write_record(out, recorded, files)
    drift = max(float(abs(s).max()) for s in result.shifts)
    lines = [
        f"prepare ({reason}): {len(stacks)} frame(s), {result.mask.max()} particle(s), "
        f"{int((result.mask > 0).sum())} pixels, pixel {result.pixel_size:g} um",
        f"largest drift corrected: {drift:.2f} px; Fe OD thresholds "
        + ", ".join(f"{v:.3g}" for v in result.thresholds),
    ]
    for k in range(result.c.shape[0]):
        noise = (
            "" if result.sigma is None else f", median sigma {np.nanmedian(result.sigma[k]):.3f}"
        )
        lines.append(f"t = {result.t[k]:g} s: mean c {np.nanmean(result.c[k]):.3f}{noise}")
    if result.sigma is None:
        lines.append("no sigma written (--bootstrap 0): set [data] sigma in the case file")
    lines.append(f"wrote {out} and {png}")
    return "\n".join(lines), True


def prepare_case(case: Path, comm, *, quiet: bool = False) -> bool:
    """Make the case's ``[prepare]`` video unless it is current (for ``femkin run``).

    Returns:
        Whether the video was (re)made, on every rank.
    """
    result = run_on_root(comm, prepare_video, case_arguments(case), if_stale=True)
    if comm.rank == 0 and not quiet:
        print(result[0], flush=True)
    return bool(comm.bcast(result[1] if comm.rank == 0 else None, root=0))


def run(args: argparse.Namespace) -> int:
    """Run ``prepare`` on rank 0; re-raise a user error on every rank."""
    from femkin._fem import MPI

    comm = MPI.COMM_WORLD
    report = run_on_root(comm, prepare_video, args)
    if comm.rank == 0:
        print(report[0], flush=True)
    return 0
