"""``femkin prepare``: raw STXM stacks -> Li-fraction video (``c``, mask, ``t``, sigma) + PNG.

Serial work: under ``mpirun`` only rank 0 reads, computes and writes; a user error found there
is raised on every rank.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from femkin.case import SCHEMA
from femkin.errors import CaseError, InputError

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
        default=100,
        help="bootstrap resamples of the energies for sigma (default 100)",
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
    for key in ("references", "out", "i0_region", "threshold", "min_size", "times"):
        value = getattr(args, key)
        if value is not None:
            out[key] = value
    error = CaseError if args.case is not None and not args.stacks else InputError
    if not out["stacks"]:
        raise error(source, "stacks", "at least one raw STXM stack", "none")
    if out["references"] is None:
        raise error(source, "references", "a CSV of reference spectra (--references)", "none")
    return out


def _work(args: argparse.Namespace) -> str:
    from femkin.io.video import Video, validate_video, write_video
    from femkin.stxm import prepare, read_references, read_stack, write_summary

    cfg = settings(args)
    stacks = [read_stack(p) for p in cfg["stacks"]]
    refs = read_references(cfg["references"])
    result = prepare(
        stacks,
        refs,
        i0_region=cfg["i0_region"],
        threshold=cfg["threshold"],
        min_size=int(cfg["min_size"]),
        times=cfg["times"],
        n_boot=args.bootstrap,
    )
    out = Path(cfg["out"])
    video = Video(
        c=result.c,
        mask=result.mask,
        t=result.t,
        pixel_size=result.pixel_size,
        sigma=result.sigma,
        source="; ".join(str(p) for p in cfg["stacks"]),
    )
    validate_video(video, out)
    write_video(out, video)
    png = out.parent / f"{out.stem}_summary.png"
    write_summary(png, result)
    drift = max(float(abs(s).max()) for s in result.shifts)
    lines = [
        f"{len(stacks)} frame(s), {result.mask.max()} particle(s), "
        f"{int((result.mask > 0).sum())} pixels, pixel {result.pixel_size:g} um",
        f"largest drift corrected: {drift:.2f} px; Fe OD thresholds "
        + ", ".join(f"{v:.3g}" for v in result.thresholds),
    ]
    for k in range(result.c.shape[0]):
        import numpy as np

        lines.append(
            f"t = {result.t[k]:g} s: mean c {np.nanmean(result.c[k]):.3f}, "
            f"median sigma {np.nanmedian(result.sigma[k]):.3f}"
        )
    lines.append(f"wrote {out} and {png}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``prepare`` on rank 0; re-raise a user error on every rank."""
    from femkin._fem import MPI
    from femkin.errors import run_on_root

    comm = MPI.COMM_WORLD
    report = run_on_root(comm, _work, args)
    if comm.rank == 0:
        print(report, flush=True)
    return 0
