"""``femkin init CASE``: a new case directory with a commented ``case.toml`` for given data.

The case file lists every section and key of :data:`femkin.case.SCHEMA` with its default, unit
and meaning (keys without a default are commented out), and fills in what the data say: the
video (or the raw stacks and reference spectra, which are prepared at once into
``CASE/data/video.npz``), the particles, the pixel size, the frames, and whether the video
carries a noise estimate and the drive mu_e (or a voltage). The result loads as it is and is
ready for ``femkin run CASE``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from femkin.errors import InputError


def register(subparsers) -> None:
    """Add the ``init`` verb."""
    parser = subparsers.add_parser(
        "init",
        help="write a new case directory with a commented case.toml for a video or raw stacks",
        description="Write CASE/case.toml with every section and its defaults (units and "
        "meaning in comments) and the data's facts filled in. With --stacks the raw STXM "
        "stacks are prepared at once into CASE/data/video.npz (femkin run skips that step "
        "while the stacks are unchanged). Data paths are written relative to CASE.",
    )
    parser.add_argument("case", type=Path, help="case directory to create")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--video", type=Path, help="a video (.npz, .h5, or TIFF folder)")
    data.add_argument("--stacks", type=Path, nargs="+", help="raw STXM stacks, one per frame")
    parser.add_argument("--references", type=Path, help="CSV of reference spectra (with --stacks)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing CASE/case.toml")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the case (rank 0); a user error is raised on every rank."""
    from femkin._fem import MPI
    from femkin.errors import run_on_root

    comm = MPI.COMM_WORLD
    report = run_on_root(comm, init_case, args)
    if comm.rank == 0:
        print(report, flush=True)
    return 0


def init_case(args: argparse.Namespace) -> str:
    """Create the case directory and its case file; returns the report."""
    from femkin.case import load_case

    case = Path(args.case)
    file = case / "case.toml"
    if file.exists() and not args.force:
        raise InputError(file, None, "a new case (or --force to overwrite)", "an existing file")
    if args.stacks is not None and args.references is None:
        raise InputError("femkin init", "--references", "reference spectra with --stacks", "none")
    if args.video is not None and args.references is not None:
        raise InputError("femkin init", "--references", "no references with --video", "given")
    case.mkdir(parents=True, exist_ok=True)
    values: dict[tuple[str, str], Any] = {}
    notes: dict[str, list[str]] = {}
    if args.stacks is not None:
        values[("prepare", "stacks")] = [_relative(p, case) for p in args.stacks]
        values[("prepare", "references")] = _relative(args.references, case)
        video_path, prepared = case / "data" / "video.npz", True
    else:
        video_path, prepared = Path(args.video), False
    values[("data", "video")] = "data/video.npz" if prepared else _relative(video_path, case)
    file.write_text(render_case(values, notes, []))  # prepare reads its [prepare] section
    lines: list[str] = []
    if prepared:
        from femkin.commands.prepare import case_arguments, prepare_video

        lines.append(prepare_video(case_arguments(case))[0])
    facts, values2, notes2 = data_facts(video_path, case)
    values.update(values2)
    notes.update(notes2)
    file.write_text(render_case(values, notes, facts))
    load_case(case)  # what we wrote must load
    lines += [*facts, f"wrote {file}; next: femkin run {case}"]
    return "\n".join(lines)


def _relative(path: Path, case: Path) -> str:
    """A path relative to the case when the file is inside it (the case moves as a whole)."""
    path, case = Path(path).resolve(), case.resolve()
    return str(path.relative_to(case)) if path.is_relative_to(case) else str(path)


def _raw_fields(path: Path) -> set[str]:
    """Names of the fields stored in a video file (to tell mu_e from voltage)."""
    import json

    try:
        if path.is_dir():
            meta = path / "video.json"
            return set(json.loads(meta.read_text())) if meta.is_file() else set()
        if path.suffix.lower() == ".npz":
            with np.load(path) as f:
                return set(f.files)
        import h5py

        with h5py.File(path, "r") as f:
            return set(f.keys())
    except (OSError, ValueError):
        return set()


def data_facts(
    video_path: Path, case: Path
) -> tuple[list[str], dict[tuple[str, str], Any], dict[str, list[str]]]:
    """Facts of the video, the case values they imply, and comments per section."""
    from femkin.io.video import read_video

    video = read_video(video_path)
    labels, counts = np.unique(video.mask[video.mask > 0], return_counts=True)
    t = np.asarray(video.t, dtype=float)
    fields = _raw_fields(video_path)
    inside = video.mask > 0
    mean_c = [float(np.nanmean(frame[inside])) for frame in video.c]
    facts = [
        f"{labels.size} particle(s): "
        + ", ".join(f"{int(lb)} ({int(n)} px)" for lb, n in zip(labels, counts, strict=True)),
        f"pixel size {video.pixel_size:g} um; image {video.mask.shape[0]} x "
        f"{video.mask.shape[1]} pixels",
        f"{t.size} frame(s) over {t[0]:g}..{t[-1]:g} s; mean c per frame "
        + ", ".join(f"{v:.3f}" for v in mean_c[:8])
        + (" ..." if len(mean_c) > 8 else ""),
    ]
    if video.sigma is None:
        facts.append("noise sigma: absent (set [data] sigma)")
    else:
        facts.append(f"noise sigma: present (median {float(np.nanmedian(video.sigma)):.3g})")
    values: dict[tuple[str, str], Any] = {}
    notes: dict[str, list[str]] = {}
    if "voltage" in fields:
        facts.append("drive: voltage present (converted to mu_e with v_ref and temperature)")
    elif video.mu_e is not None:
        facts.append("drive: mu_e present")
    else:
        # No drive: mu_e(t) is fitted at the frame times, starting from a guess whose sign
        # follows the data (lithiating: mu_e above mu_h; delithiating: below).
        guess = 2.0 if mean_c[-1] >= mean_c[0] else -2.0
        facts.append(
            "drive: neither mu_e nor voltage present; mu_e(t) is fitted at the frame times "
            f"from a constant {guess:+g} kT ({'lithiating' if guess > 0 else 'delithiating'} "
            "data)"
        )
        values[("driving", "mode")] = "fitted"
        values[("driving", "t")] = [float(t[0]), float(t[-1])]
        values[("driving", "mu_e")] = [guess, guess]
        notes["driving"] = ["The video has no mu_e or voltage: mu_e(t) is fitted."]
    if video.sigma is None:
        values[("data", "sigma")] = 0.05
        notes["data"] = ["The video has no sigma: 0.05 is a guess, set the noise std of c."]
    return facts, values, notes


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _float_toml(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {value!r}")


def _float_toml(value: float) -> str:
    text = repr(float(value))
    return text if np.isfinite(value) else ("inf" if value > 0 else "-inf")


def render_case(
    values: dict[tuple[str, str], Any], notes: dict[str, list[str]], facts: list[str]
) -> str:
    """The commented case file: every schema key, its default or the given value.

    Args:
        values: ``(section path, key) -> value`` to write instead of the default; a section
            path of a sub-table is dotted (``"inversion.prior"``).
        notes: extra comment lines per section path.
        facts: the data's facts, written at the top.
    """
    from femkin.case import OPTIONAL_SECTIONS, REQUIRED, SCHEMA

    out = [
        "# femkin case file, written by `femkin init` from the schema (femkin/case.py).",
        "# Units: lengths in um (mesh sizes in pixels), times in s, chemical potentials in kT,",
        "# rates in 1/s. Commented keys have no default; uncomment to set them.",
    ]
    if facts:
        out += ["#", "# The data:"] + [f"#   {f}" for f in facts]

    def emit(path: str, schema: dict[str, Any], commented: bool) -> None:
        prefix = "# " if commented else ""
        subtables = {k: v for k, v in schema.items() if isinstance(v, dict)}
        out.append("")
        out.append(f"{prefix}[{path}]")
        out.extend(f"# {line}" for line in notes.get(path, []))
        for key, spec in schema.items():
            if isinstance(spec, dict):
                continue
            given = (path, key) in values
            value = values[(path, key)] if given else spec.default
            doc = spec.doc or ""
            if spec.type.rstrip("?") == "float" and isinstance(value, int | float):
                text = _float_toml(float(value))
            elif spec.type.startswith("list[float]") and isinstance(value, list):
                text = "[" + ", ".join(_float_toml(float(v)) for v in value) + "]"
            elif value is REQUIRED or value is None:
                text = None
            else:
                text = _toml(value)
            line = f"# {key} = ..." if text is None else f"{prefix}{key} = {text}"
            comment = (doc + " (optional)" if text is None else doc).strip()
            if comment and len(line) + len(comment) > 96:
                out.append(f"# {comment}")
                out.append(line)
            else:
                out.append(line.ljust(39) + f" # {comment}" if comment else line)
        for name, sub in subtables.items():
            emit(f"{path}.{name}", sub, commented)

    for section, schema in SCHEMA.items():
        emit(section, schema, commented=section in OPTIONAL_SECTIONS)
    return "\n".join(out) + "\n"
