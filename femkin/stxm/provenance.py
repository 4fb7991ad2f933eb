"""Is a prepared video current? A record of the inputs and settings it was made from.

``femkin prepare`` writes ``<video>.inputs.json`` next to the video it makes: the settings
(everything in ``[prepare]`` that changes the result) and, for every input file (the stacks,
the ``.xim`` images of an ALS header, the reference spectra), its size, modification time and
SHA-256. ``femkin run`` prepares again only when the video or its record is missing, a setting
changed, or an input file's content changed (a file touched or copied without change counts as
unchanged: its hash is compared when its size or modification time differ).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

RECORD_SUFFIX = ".inputs.json"
_VERSION = 1  # bump when prepare's algorithm changes what it makes from the same inputs


def record_path(out: str | os.PathLike) -> Path:
    """The record that belongs to the video ``out`` (a file, or a TIFF folder)."""
    out = Path(out)
    return out.with_name(out.name + RECORD_SUFFIX)


def input_files(stacks: Iterable[str | os.PathLike], references: str | os.PathLike) -> list[Path]:
    """Every file that prepare reads: stacks, an ALS header's ``.xim`` images, references."""
    files: list[Path] = []
    for stack in map(Path, stacks):
        files.append(stack)
        if stack.suffix.lower() == ".hdr":
            files.extend(sorted(stack.parent.glob(f"{stack.stem}_*.xim")))
    files.append(Path(references))
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stat(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _jsonable(settings: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(settings), default=str, sort_keys=True))


def write_record(
    out: str | os.PathLike, settings: Mapping[str, Any], files: Iterable[str | os.PathLike]
) -> Path:
    """Write the record of the video ``out`` (atomically); returns its path."""
    record = {
        "version": _VERSION,
        "settings": _jsonable(settings),
        "inputs": {
            str(Path(p).resolve()): {**_stat(Path(p)), "sha256": _sha256(Path(p))} for p in files
        },
    }
    path = record_path(out)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def stale_reason(
    out: str | os.PathLike, settings: Mapping[str, Any], files: Iterable[str | os.PathLike]
) -> str | None:
    """Why the video ``out`` must be made again, or None when it is current.

    Missing input files are not reported here: prepare itself names them.
    """
    out, path = Path(out), record_path(out)
    if not out.exists():
        return f"{out} does not exist"
    try:
        record = json.loads(path.read_text())
        recorded = dict(record["inputs"])
        version, old_settings = record["version"], record["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path} (the record of its inputs) is missing or unreadable"
    if version != _VERSION:
        return "it was made by another version of prepare"
    new_settings = _jsonable(settings)
    if old_settings != new_settings:
        changed = sorted(
            k
            for k in set(old_settings) | set(new_settings)
            if old_settings.get(k) != new_settings.get(k)
        )
        return "its settings changed: " + ", ".join(changed)
    paths = [Path(p) for p in files]
    names = [str(p.resolve()) for p in paths]
    if sorted(names) != sorted(recorded):
        return "its list of input files changed"
    for p, name in zip(paths, names, strict=True):
        if not p.is_file():
            return f"{p} is missing"
        old = recorded[name]
        if _stat(p) == {"size": old["size"], "mtime_ns": old["mtime_ns"]}:
            continue
        if p.stat().st_size != old["size"] or _sha256(p) != old["sha256"]:
            return f"{p} changed"
    return None
