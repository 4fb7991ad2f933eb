"""NeXus NXstxm HDF5 files in the three layouts met in practice.

- ``nxstxm-1.3`` (PolLux/SLS, NeXus definition version 1.3): ``entry1/counter0`` is an NXdata
  group with ``axes`` (``["energy", "sample_y", "sample_x"]``), ``signal`` and ``<axis>_indices``
  attributes; a single image has ``axes = ["sample_y", "sample_x"]`` and a 1-element ``energy``.
- ``als-pystxmcontrol`` (ALS pystxmcontrol): ``entry0/counter0`` (or ``binned_values`` /
  ``default`` in later versions) with ``data`` (E, Y, X), ``energy``, ``sample_x``,
  ``sample_y``, ``count_time`` and no axis attributes; ``entry0/start_time`` is a 1-element
  string array; further regions are ``entry1``, ``entry2`` ... (only the first is read).
- ``nxstxm-axis`` (older writers, e.g. Diamond I08): ``photon_energy``, ``sample_y``,
  ``sample_x`` carry a 1-based ``axis`` attribute naming the data dimension they index.

Line spectra and focus scans (axes such as ``line_position`` or ``zone_plate``) are rejected.
Positions are converted to micrometres from their ``units`` attribute (assumed um when absent).
"""

from __future__ import annotations

import datetime
import pathlib
from typing import Any

import h5py
import numpy as np

from femkin.errors import InputError
from femkin.stxm.stack import Stack, checked_stack

LAYOUTS = ("nxstxm-1.3", "als-pystxmcontrol", "nxstxm-axis")
_ENERGY = ("energy", "photon_energy")
_UNITS = {
    "um": 1.0,
    "µm": 1.0,
    "\u03bcm": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "mm": 1e3,
    "nm": 1e-3,
    "m": 1e6,
}


def _text(value: Any) -> str:
    arr = np.asarray(value)
    if arr.size == 0:
        return ""
    item = arr.reshape(-1)[0]
    return item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)


def _names(value: Any) -> list[str]:
    arr = np.atleast_1d(np.asarray(value))
    out: list[str] = []
    for v in arr.reshape(-1):
        s = v.decode() if isinstance(v, bytes) else str(v)
        out.extend(p for p in s.split(":") if p)  # NeXus also allows "a:b:c"
    return out


def _entries(f: h5py.File) -> list[str]:
    names = [
        k
        for k, g in f.items()
        if isinstance(g, h5py.Group)
        and (_text(g.attrs.get("NX_class", b"")) == "NXentry" or k.startswith("entry"))
    ]
    return sorted(names)


def _data_group(path: pathlib.Path, entry: h5py.Group) -> h5py.Group:
    candidates = []
    for name in ("binned_values", "default", "counter0"):
        if name in entry and isinstance(entry[name], h5py.Group) and "data" in entry[name]:
            candidates.append(entry[name])
    for _name, g in sorted(entry.items()):
        if (
            isinstance(g, h5py.Group)
            and _text(g.attrs.get("NX_class", b"")) == "NXdata"
            and "data" in g
        ):
            candidates.append(g)
    if not candidates:
        raise InputError(path, entry.name, "an NXdata group with a 'data' field", "none")
    return candidates[0]


def _position_um(path: pathlib.Path, ds: h5py.Dataset, meta: dict) -> np.ndarray:
    values = np.asarray(ds[()], dtype=np.float64).reshape(-1)
    unit = _text(ds.attrs.get("units", b"")).strip()
    if not unit:
        meta.setdefault("assumed_units", []).append(ds.name)
        return values
    if unit not in _UNITS:
        raise InputError(path, ds.name + "@units", f"one of {sorted(_UNITS)}", repr(unit))
    return values * _UNITS[unit]


def _time(entry: h5py.Group) -> datetime.datetime | None:
    if "start_time" not in entry:
        return None
    try:
        return datetime.datetime.fromisoformat(_text(entry["start_time"][()]).strip())
    except ValueError:
        return None


def read_nexus(path: str | pathlib.Path, *, entry: str | None = None) -> Stack:
    """Read an image or image stack from a NeXus NXstxm file (any of :data:`LAYOUTS`).

    Args:
        path: the HDF5 file.
        entry: the NXentry to read; the first one (sorted by name) by default.

    Returns:
        The stack; ``metadata["layout"]`` names the layout recognised.

    Raises:
        InputError: not HDF5, no NXentry/NXdata, unsupported scan (line, focus, point),
            axis lengths that do not match the data.
    """
    path = pathlib.Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise InputError(path, None, "a readable HDF5 file", str(err).split("(")[0]) from None
    with f:
        names = _entries(f)
        if not names:
            raise InputError(path, "/", "an NXentry group", f"top-level keys {list(f.keys())}")
        name = entry or names[0]
        if name not in f:
            raise InputError(path, "entry", f"one of {names}", repr(name))
        ent = f[name]
        group = _data_group(path, ent)
        meta: dict[str, Any] = {
            "format": "nexus",
            "entry": name,
            "group": group.name,
            "entries": names,
        }
        data_ds = group["data"]
        try:
            data = np.asarray(data_ds[()], dtype=np.float64)
        except OSError as err:
            raise InputError(path, data_ds.name, "readable data", str(err)) from None
        for key in ("stxm_scan_type", "scan_type"):
            if key in group:
                meta["scan_type"] = _text(group[key][()])
        # dims: name of the axis on each dimension of data
        dims: list[str | None] = [None] * data.ndim
        if "axes" in group.attrs:
            meta["layout"] = "nxstxm-1.3"
            axes = _names(group.attrs["axes"])
            for k, ax in enumerate(axes):
                idx = group.attrs.get(f"{ax}_indices", k)
                idx = int(np.atleast_1d(idx)[0])
                if not 0 <= idx < data.ndim:
                    raise InputError(path, f"{group.name}@{ax}_indices", f"0..{data.ndim - 1}", idx)
                dims[idx] = ax
        elif any("axis" in ds.attrs for ds in group.values() if isinstance(ds, h5py.Dataset)):
            meta["layout"] = "nxstxm-axis"
            for key, ds in group.items():
                if isinstance(ds, h5py.Dataset) and "axis" in ds.attrs:
                    k = int(np.atleast_1d(ds.attrs["axis"])[0]) - 1
                    if not 0 <= k < data.ndim:
                        raise InputError(path, f"{ds.name}@axis", f"1..{data.ndim}", k + 1)
                    dims[k] = key
        else:
            meta["layout"] = "als-pystxmcontrol"
            default = ["energy", "sample_y", "sample_x"]
            dims = list(default[-data.ndim :]) if data.ndim in (2, 3) else dims
        unsupported = [d for d in dims if d not in (*_ENERGY, "sample_x", "sample_y")]
        if unsupported or "sample_x" not in dims or "sample_y" not in dims:
            raise InputError(
                path,
                f"{group.name}/data axes",
                "an image or image stack (axes energy, sample_y, sample_x)",
                f"axes {dims} (scan type {meta.get('scan_type', '?')!r})",
            )
        x = _position_um(path, group["sample_x"], meta)
        y = _position_um(path, group["sample_y"], meta)
        ename = next((e for e in _ENERGY if e in group), None)
        if ename is not None:
            energies = np.asarray(group[ename][()], dtype=np.float64).reshape(-1)
        elif "instrument/monochromator/energy" in ent:
            energies = np.asarray(
                ent["instrument/monochromator/energy"][()], dtype=np.float64
            ).reshape(-1)
        else:
            raise InputError(path, f"{group.name}/energy", "photon energies", "missing")
        edim = next((k for k, d in enumerate(dims) if d in _ENERGY), None)
        if edim is None:
            data = data[np.newaxis]
            dims = ["energy", *dims]
        order = [
            next(k for k, d in enumerate(dims) if d in _ENERGY),
            dims.index("sample_y"),
            dims.index("sample_x"),
        ]
        counts = np.transpose(data, order)
        for field, axis, n in (
            ("energy", energies, counts.shape[0]),
            ("sample_y", y, counts.shape[1]),
            ("sample_x", x, counts.shape[2]),
        ):
            if axis.size != n:
                raise InputError(
                    path,
                    f"{group.name}/{field}",
                    f"{n} values (data dimension of {field})",
                    axis.size,
                )
        if "count_time" in group:
            dwell = np.asarray(group["count_time"][()], dtype=np.float64).reshape(-1)
            if dwell.size == 1:
                dwell = np.full(energies.size, dwell[0])
            elif dwell.size != energies.size:
                raise InputError(
                    path, f"{group.name}/count_time", f"1 or {energies.size} values", dwell.size
                )
        else:
            dwell = np.full(energies.size, np.nan)
        meta["definition"] = _text(ent["definition"][()]) if "definition" in ent else None
        stamp = _time(ent)
    return checked_stack(
        Stack(
            energies=energies,
            x=x,
            y=y,
            counts=np.ascontiguousarray(counts),
            dwell=dwell,
            timestamp=stamp,
            metadata=meta,
            source=str(path),
        )
    )


def _str(s: str) -> np.bytes_:
    return np.bytes_(s.encode())


def write_nexus(path: str | pathlib.Path, stack: Stack, *, layout: str = "nxstxm-1.3") -> None:
    """Write a stack as NXstxm HDF5 in one of :data:`LAYOUTS` (used by the round-trip tests).

    Args:
        path: the output file.
        stack: counts ``(E, Y, X)``.
        layout: ``"nxstxm-1.3"``, ``"als-pystxmcontrol"`` or ``"nxstxm-axis"``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"{layout=} is not one of {LAYOUTS}")
    stamp = (stack.timestamp or datetime.datetime(2000, 1, 1)).isoformat()
    e = stack.energies.size
    with h5py.File(path, "w") as f:
        if layout == "nxstxm-1.3":
            f.attrs["NX_class"] = _str("NXroot")
            ent = f.create_group("entry1")
            ent.attrs["NX_class"] = _str("NXentry")
            d = ent.create_dataset("definition", data=np.array([b"NXstxm"]))
            d.attrs["version"] = _str("1.3")
            ent.create_dataset("start_time", data=np.array([stamp.encode()]))
            g = ent.create_group("counter0")
            g.attrs["NX_class"] = _str("NXdata")
            g.attrs["signal"] = _str("data")
            g.attrs["axes"] = np.array([b"energy", b"sample_y", b"sample_x"])
            for k, name in enumerate(("energy", "sample_y", "sample_x")):
                g.attrs[f"{name}_indices"] = np.array([k], dtype=np.uint32)
            g.create_dataset("data", data=stack.counts)
            g.create_dataset("energy", data=stack.energies).attrs["units"] = _str("eV")
            g.create_dataset("sample_y", data=stack.y).attrs["units"] = np.bytes_("µm".encode())
            g.create_dataset("sample_x", data=stack.x).attrs["units"] = np.bytes_("µm".encode())
            g.create_dataset("count_time", data=stack.dwell).attrs["units"] = _str("s")
            scan = "sample image stack" if e > 1 else "sample image"
            g.create_dataset("stxm_scan_type", data=np.array([scan.encode()]))
        elif layout == "als-pystxmcontrol":
            ent = f.create_group("entry0")
            ent.attrs["NX_class"] = _str("NXentry")
            ent.create_dataset("definition", data=_str("NXstxm"))
            ent.create_dataset("version", data=_str("1.0"))
            ent.create_dataset("start_time", data=np.array([stamp.encode()]))
            ent.create_dataset("end_time", data=np.array([stamp.encode()]))
            ent.create_group("motors")
            g = ent.create_group("counter0")
            g.attrs["NX_class"] = _str("NXdata")
            g.create_dataset("data", data=stack.counts)
            g.create_dataset("energy", data=stack.energies)
            g.create_dataset("sample_x", data=stack.x)
            g.create_dataset("sample_y", data=stack.y)
            g.create_dataset("count_time", data=stack.dwell)
            g.create_dataset("stxm_scan_type", data=_str("Image" if e == 1 else "Image Stack"))
        else:
            ent = f.create_group("entry1")
            ent.attrs["NX_class"] = _str("NXentry")
            ent.create_dataset("definition", data=np.array([b"NXstxm"]))
            ent.create_dataset("start_time", data=np.array([stamp.encode()]))
            g = ent.create_group("Counter1")
            g.attrs["NX_class"] = _str("NXdata")
            g.create_dataset("data", data=stack.counts)
            g.create_dataset("photon_energy", data=stack.energies).attrs["axis"] = 1
            g.create_dataset("sample_y", data=stack.y).attrs["axis"] = 2
            g.create_dataset("sample_x", data=stack.x).attrs["axis"] = 3
            g.create_dataset("count_time", data=stack.dwell)
            g.create_dataset("scan_type", data=np.array([b"Sample"]))
