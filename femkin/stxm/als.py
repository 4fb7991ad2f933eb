"""ALS / STXM_Control ``.hdr`` + ``.xim`` files (ALS 5.3.2, 11.0.2, MAX IV SoftiMAX, CLS ...).

The header is a text file of ``Name = value;`` assignments with ``{ ... }`` structures and
``(n, v1, ..., vn)`` lists whose first element is their length; CRLF or LF line endings, tabs and
a blank first line occur. The scan axes are ``ScanDefinition.Regions[0].PAxis`` (x, columns) and
``QAxis`` (y, rows), the energies ``ScanDefinition.StackAxis``. Images are tab-separated text:
``<base>_a.xim`` for a single image, ``<base>_a000.xim``, ``_a001`` ... for a stack (``b``, ``c``
for further channels). Each line of an ``.xim`` is one row (one y position), each column one x.

A stack whose last images are missing and not announced in the header (no ``ImageNNN_0``
entry) was aborted: the energies are truncated with a warning. A missing image in the middle, or
a missing image that the header says was recorded, is an error.
"""

from __future__ import annotations

import datetime
import pathlib
import re
import warnings
from typing import Any

import numpy as np

from femkin.errors import InputError
from femkin.stxm.stack import Stack, checked_stack

_TOKEN = re.compile(r'\s*(?:("(?:[^"]*)")|([{}();=,])|([^\s{}();=,"]+))')
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")


class _Parser:
    """Recursive-descent parser of the STXM_Control header grammar."""

    def __init__(self, text: str, path: pathlib.Path):
        self.path = path
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        text = text.rstrip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None or m.end() == pos:
                raise InputError(
                    path,
                    None,
                    "STXM_Control header syntax",
                    f"unexpected text at character {pos}: {text[pos : pos + 20]!r}",
                )
            pos = m.end()
            if m.group(1) is not None:
                self.tokens.append(("str", m.group(1)[1:-1]))
            elif m.group(2) is not None:
                self.tokens.append(("punct", m.group(2)))
            elif m.group(3) is not None:
                self.tokens.append(("word", m.group(3)))
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, punct: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise InputError(self.path, None, f"'{punct or 'a value'}'", "end of file (truncated?)")
        if punct is not None and tok != ("punct", punct):
            raise InputError(
                self.path, None, f"'{punct}' in header", f"{tok[1]!r} (token {self.i})"
            )
        self.i += 1
        return tok

    def assignments(self, closing: str | None, where: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while True:
            tok = self.peek()
            if tok is None:
                if closing is not None:
                    raise InputError(
                        self.path,
                        where or None,
                        f"closing '{closing}'",
                        "end of file (truncated header)",
                    )
                return out
            if tok == ("punct", closing):
                self.i += 1
                return out
            if tok == ("punct", ";"):
                self.i += 1
                continue
            kind, name = self.take()
            if kind != "word":
                raise InputError(self.path, where or None, "a field name", repr(name))
            self.take("=")
            key = f"{where}.{name}" if where else name
            out[name] = self.value(key)

    def value(self, where: str) -> Any:
        kind, tok = self.take()
        if kind == "str":
            return tok
        if kind == "word":
            low = tok.lower()
            if low in ("true", "false"):
                return low == "true"
            try:
                return float(tok) if any(ch in tok for ch in ".eE") else int(tok)
            except ValueError:
                return tok
        if tok == "{":
            return self.assignments("}", where)
        if tok == "(":
            items = [self.value(where)]
            while self.peek() == ("punct", ","):
                self.i += 1
                items.append(self.value(where))
            self.take(")")
            count, rest = items[0], items[1:]
            if not isinstance(count, int) or count != len(rest):
                raise InputError(
                    self.path,
                    where,
                    f"a list starting with its length ({len(rest)})",
                    f"length {count!r}",
                )
            return rest
        raise InputError(self.path, where, "a value", repr(tok))


def parse_header(path: str | pathlib.Path) -> dict[str, Any]:
    """Parse a STXM_Control ``.hdr`` file into nested dicts and lists.

    Raises:
        InputError: syntax error, truncated file, or a list whose count does not match.
    """
    path = pathlib.Path(path)
    try:
        text = path.read_bytes().decode("latin-1")
    except OSError as err:
        raise InputError(path, None, "a readable header", str(err)) from None
    return _Parser(text, path).assignments(None, "")


def parse_time(text: str) -> datetime.datetime | None:
    """Parse STXM_Control dates: ``2020 October 15 11:59:33``, ``2003 May29 04:45:38``."""
    m = re.match(r"\s*(\d{4})\s*([A-Za-z]+)\s*(\d{1,2})\s+(\d{1,2}):(\d{2}):(\d{2})", text)
    if not m or m.group(2)[:3].lower() not in _MONTHS:
        return None
    month = _MONTHS.index(m.group(2)[:3].lower()) + 1
    return datetime.datetime(
        int(m.group(1)), month, int(m.group(3)), int(m.group(4)), int(m.group(5)), int(m.group(6))
    )


def _get(d: dict, path: pathlib.Path, *keys: str | int) -> Any:
    cur: Any = d
    done = []
    for k in keys:
        done.append(str(k))
        try:
            cur = cur[k]
        except (KeyError, IndexError, TypeError):
            raise InputError(path, ".".join(done), "present in the header", "missing") from None
    return cur


def _xim_name(base: pathlib.Path, channel: int, index: int | None) -> pathlib.Path:
    letter = chr(ord("a") + channel)
    suffix = f"_{letter}.xim" if index is None else f"_{letter}{index:03d}.xim"
    return base.with_name(base.name + suffix)


def _read_xim(path: pathlib.Path, shape: tuple[int, int]) -> np.ndarray:
    try:
        rows = [line.split() for line in path.read_text("latin-1").splitlines() if line.strip()]
        data = np.array([[float(v) for v in row] for row in rows], dtype=np.float64)
    except ValueError as err:
        raise InputError(path, None, "tab-separated numbers", str(err)) from None
    if data.ndim != 2 or data.shape != shape:
        found = data.shape if data.ndim == 2 else "ragged rows"
        raise InputError(path, None, f"{shape[0]} rows (y) x {shape[1]} columns (x)", found)
    return data


def read_hdr_stack(path: str | pathlib.Path, *, channel: int | str = 0) -> Stack:
    """Read an ALS/STXM_Control image or image stack.

    Args:
        path: the ``.hdr`` file.
        channel: channel index (0 = ``a``) or channel name (e.g. ``"PMT"``).

    Returns:
        The stack; an aborted stack is truncated to the images present (with a warning).

    Raises:
        InputError: unsupported scan type (point or line spectra), bad header, missing or
            inconsistent images, image of the wrong size.
    """
    path = pathlib.Path(path)
    hdr = parse_header(path)
    sd = _get(hdr, path, "ScanDefinition")
    scan_type = str(sd.get("Type", ""))
    if "image" not in scan_type.lower():
        raise InputError(
            path,
            "ScanDefinition.Type",
            "an image scan ('Image Scan', 'NEXAFS Image Scan')",
            repr(scan_type),
        )
    regions = _get(hdr, path, "ScanDefinition", "Regions")
    if len(regions) != 1:
        raise InputError(path, "ScanDefinition.Regions", "1 spatial region", len(regions))
    x = np.asarray(_get(regions[0], path, "PAxis", "Points"), dtype=np.float64)
    y = np.asarray(_get(regions[0], path, "QAxis", "Points"), dtype=np.float64)
    energies = np.asarray(_get(sd, path, "StackAxis", "Points"), dtype=np.float64)
    for field, _name in (("PAxis", "Sample X"), ("QAxis", "Sample Y")):
        unit = str(regions[0][field].get("Unit", "um")).lower()
        if unit not in ("um", "µm", "micron", "microns"):
            raise InputError(path, f"ScanDefinition.Regions.{field}.Unit", "'um'", repr(unit))
    channels = [c.get("Name", "") for c in sd.get("Channels", [])] or ["counter0"]
    if isinstance(channel, str):
        if channel not in channels:
            raise InputError(path, "ScanDefinition.Channels", f"one of {channels}", repr(channel))
        channel = channels.index(channel)
    if not 0 <= channel < len(channels):
        raise InputError(path, "channel", f"0..{len(channels) - 1}", channel)

    base = path.with_suffix("")
    shape = (y.size, x.size)
    single = _xim_name(base, channel, None)
    announced = sorted(int(m.group(1)) for k in hdr if (m := re.fullmatch(r"Image(\d+)_0", k)))
    image_times = {
        i: parse_time(str(hdr[f"Image{i:03d}_0"].get("Time", "")))
        for i in announced
        if isinstance(hdr.get(f"Image{i:03d}_0"), dict)
    }
    image_energies = {i: hdr[f"Image{i:03d}_0"].get("Energy") for i in image_times}
    if energies.size == 1 and single.is_file():
        images = [_read_xim(single, shape)]
        files = [single]
    else:
        files = [_xim_name(base, channel, k) for k in range(energies.size)]
        present = [f.is_file() for f in files]
        n = present.index(False) if False in present else len(files)
        if n == 0:
            raise InputError(path, "images", f"{files[0].name} (or {single.name})", "no .xim file")
        if any(present[n:]):
            gap = files[n].name
            raise InputError(
                path, "images", "contiguous .xim files", f"{gap} missing in the middle"
            )
        extra = _xim_name(base, channel, energies.size)
        if extra.is_file():
            raise InputError(
                path,
                "ScanDefinition.StackAxis.Points",
                f"{energies.size} energies (the number of images)",
                f"an extra image {extra.name}",
            )
        if n < energies.size:
            claimed = [i for i in announced if i >= n]
            if claimed:
                raise InputError(
                    path,
                    f"Image{claimed[0]:03d}_0",
                    f"its image {files[claimed[0]].name}",
                    "the file is missing",
                )
            warnings.warn(
                f"{path}: aborted stack, {n} of {energies.size} images present; "
                f"energies truncated to {energies[:n].min():g}-{energies[:n].max():g} eV",
                stacklevel=2,
            )
            energies = energies[:n]
            files = files[:n]
        images = [_read_xim(f, shape) for f in files]
    for i, e_img in image_energies.items():
        if i < energies.size and isinstance(e_img, (int, float)) and abs(e_img - energies[i]) > 0.5:
            warnings.warn(
                f"{path}: Image{i:03d}_0 says Energy = {e_img}, the StackAxis says "
                f"{energies[i]}; using the StackAxis",
                stacklevel=2,
            )
    dwell_ms = float(sd.get("Dwell", np.nan))
    stamp = parse_time(str(hdr.get("Time", "")))
    metadata = {
        "format": "als-hdr",
        "scan_type": scan_type,
        "flags": sd.get("Flags"),
        "channel": channels[channel],
        "files": [str(f) for f in files],
        "image_times": [image_times.get(i) for i in range(energies.size)],
        "label": sd.get("Label"),
    }
    return checked_stack(
        Stack(
            energies=energies,
            x=x,
            y=y,
            counts=np.stack(images).astype(np.float64),
            dwell=np.full(energies.size, dwell_ms * 1e-3),
            timestamp=stamp,
            metadata=metadata,
            source=str(path),
        )
    )


def _fmt_list(values: np.ndarray, fmt: str = "{:.4f}") -> str:
    return "(" + ", ".join([str(len(values))] + [fmt.format(v) for v in values]) + ")"


def write_hdr_stack(
    path: str | pathlib.Path, stack: Stack, *, n_images: int | None = None, announce: bool = True
) -> list[pathlib.Path]:
    """Write a stack as an STXM_Control ``.hdr`` with one ``.xim`` per energy (CRLF endings).

    Args:
        path: the ``.hdr`` path; the images go next to it.
        stack: the stack to write (counts rounded to integers).
        n_images: write only the first ``n_images`` images (to make an aborted stack).
        announce: write an ``ImageNNN_0`` entry for every image written.

    Returns:
        The files written, header first.
    """
    path = pathlib.Path(path)
    e = stack.energies.size
    n_images = e if n_images is None else n_images
    stamp = stack.timestamp or datetime.datetime(2000, 1, 1)
    dwell_ms = float(np.nanmean(stack.dwell) * 1e3) if np.isfinite(stack.dwell).any() else 1.0
    flags = "Image Stack" if e > 1 else "Image"
    lines = [
        "",
        f'ScanDefinition = {{ Label = "{path.name}"; Type = "NEXAFS Image Scan"; '
        f'Flags = "{flags}"; Dwell = {dwell_ms:g};',
        "\tRegions = (1,",
        "{",
        f'\t\t\tPAxis = {{ Name = "Sample X"; Unit = "um"; Min = {stack.x.min():.4f}; '
        f"Max = {stack.x.max():.4f}; Dir = 1;",
        f"\t\t\t\tPoints = {_fmt_list(stack.x)};",
        "};",
        "",
        f'\t\t\tQAxis = {{ Name = "Sample Y"; Unit = "um"; Min = {stack.y.min():.4f}; '
        f"Max = {stack.y.max():.4f}; Dir = 1;",
        f"\t\t\t\tPoints = {_fmt_list(stack.y)};",
        "};",
        "});",
        "",
        f'\tStackAxis = {{ Name = "Energy"; Unit = "eV"; Min = {stack.energies.min():g}; '
        f"Max = {stack.energies.max():g}; Dir = 1;",
        f"\t\tPoints = {_fmt_list(stack.energies)};",
        "};",
        "",
        "\tChannels = (1,",
        '{ Name = "counter0"; Unit = "Hz";});',
        "};",
        f' Time = "{stamp.year} {stamp.strftime("%B")} {stamp.day} {stamp:%H:%M:%S}"; '
        "BeamFeedback = false; ShutterAutomatic = true;",
    ]
    if announce:
        for k in range(n_images):
            lines.append(
                f"Image{k:03d}_0 = {{StorageRingCurrent = 500.00; "
                f"Energy = {stack.energies[k]:.2f}; "
                f'Time = "{stamp.year} {stamp:%b} {stamp.day} {stamp:%H:%M:%S}";}};'
            )
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("latin-1"))
    written = [path]
    base = path.with_suffix("")
    for k in range(n_images):
        name = _xim_name(base, 0, None if e == 1 else k)
        rows = ["\t".join(str(int(round(v))) for v in row) for row in stack.counts[k]]
        name.write_bytes(("\r\n".join(rows) + "\r\n").encode("latin-1"))
        written.append(name)
    return written
