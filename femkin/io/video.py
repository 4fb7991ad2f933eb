"""The STXM video data contract: one reader, one writer, one validator.

A video holds the Li fraction ``c`` of every pixel in every frame, a label mask of the particles,
the frame times, the pixel size and, optionally, the reservoir chemical potential ``mu_e`` and the
noise level ``sigma``. Three containers hold the same fields:

- ``.npz``: arrays named ``c``, ``mask``, ``t``, ``pixel_size`` (+ optional ``mu_e`` or
  ``voltage``/``v_ref``/``temperature``, ``sigma``);
- ``.h5``/``.hdf5``: datasets of the same names;
- a TIFF folder: ``c.tif`` (T, H, W), ``mask.tif`` (H, W), optional ``sigma.tif`` and a JSON
  sidecar ``video.json`` with ``t``, ``pixel_size``, ``mu_e`` (or ``voltage``, ``v_ref``,
  ``temperature``) and a scalar ``sigma``. The folder, its ``c.tif`` or its ``video.json`` may be
  named.

Pixel (row ``i``, column ``j``) has its centre at ``x = (j + 0.5) * pixel_size``,
``y = (i + 0.5) * pixel_size`` (micrometres). ``c`` is NaN where nothing was observed.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import scipy.constants

from femkin.errors import InputError

#: Values of ``c`` outside ``[C_MIN, C_MAX]`` are rejected (a bad normalisation, not noise).
C_MIN, C_MAX = -0.5, 1.5
TIFF_SIDECAR = "video.json"
_REQUIRED = ("c", "mask", "t", "pixel_size")
_OPTIONAL = ("mu_e", "voltage", "v_ref", "temperature", "sigma")


class Video(NamedTuple):
    """One STXM video in the femkin contract.

    Attributes:
        c: (T, H, W) float64 Li fraction; NaN where not observed.
        mask: (H, W) int64 labels: 0 background, 1..N particles.
        t: (T,) float64 frame times in seconds, strictly increasing.
        pixel_size: Pixel edge length in micrometres.
        mu_e: (T,) reservoir chemical potential in kT, or None.
        sigma: Noise standard deviation of ``c``: a scalar, a (T, H, W) array, or None.
        source: The path the video came from (for error messages).
    """

    c: np.ndarray
    mask: np.ndarray
    t: np.ndarray
    pixel_size: float
    mu_e: np.ndarray | None = None
    sigma: np.ndarray | float | None = None
    source: str = ""

    @property
    def labels(self) -> np.ndarray:
        """The particle labels 1..N present in the mask."""
        return np.arange(1, int(self.mask.max(initial=0)) + 1)


def voltage_to_mu_e(voltage, v_ref: float, temperature: float) -> np.ndarray:
    """Convert a cell voltage (V) to the reservoir chemical potential in kT.

    ``mu_e = -(voltage - v_ref) e / (k_B T)``: a voltage below the reference lithiates.

    Args:
        voltage: Voltage(s) in volts.
        v_ref: Reference (equilibrium) voltage in volts.
        temperature: Temperature in kelvin.
    """
    return -(np.asarray(voltage, dtype=np.float64) - v_ref) * (
        scipy.constants.e / (scipy.constants.k * temperature)
    )


def pixel_centres(shape: tuple[int, int], pixel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """Return (H, W) arrays ``x = (j + 0.5) * pixel_size``, ``y = (i + 0.5) * pixel_size``."""
    rows, cols = shape
    y, x = np.meshgrid(
        (np.arange(rows) + 0.5) * pixel_size, (np.arange(cols) + 0.5) * pixel_size, indexing="ij"
    )
    return x, y


# ------------------------------------------------------------------------------------------------
# Reading


def read_video(path: str | os.PathLike) -> Video:
    """Read and validate a video (``.npz``, ``.h5``/``.hdf5``, or a TIFF folder).

    Raises:
        InputError: unreadable file, unsupported suffix, missing or invalid fields.
    """
    path = Path(path)
    kind, where = _container(path)
    if not where.exists():
        raise InputError(path, None, "an existing video file", "no such file or directory")
    loader = {"npz": _load_npz, "h5": _load_h5, "tif": _load_tif}[kind]
    fields = loader(where)
    video = _video_from_fields(fields, str(path))
    validate_video(video, str(path))
    return video


def _container(path: Path) -> tuple[str, Path]:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return "npz", path
    if suffix in (".h5", ".hdf5"):
        return "h5", path
    if suffix in (".tif", ".tiff", ".json"):
        return "tif", path.parent
    if path.is_dir() or suffix == "":
        return "tif", path
    raise InputError(
        path,
        None,
        "a video file with suffix .npz, .h5, .hdf5, .tif or .json, or a TIFF folder",
        f"suffix '{path.suffix}'",
    )


def _load_npz(path: Path) -> dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: np.asarray(data[name]) for name in data.files}
    except Exception as err:  # zipfile, pickle and format errors alike
        raise InputError(
            path, None, "a readable .npz file", f"{type(err).__name__}: {err}"
        ) from err


def _load_h5(path: Path) -> dict[str, Any]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return {
                name: np.asarray(f[name][()]) for name in f if isinstance(f[name], h5py.Dataset)
            }
    except Exception as err:
        raise InputError(
            path, None, "a readable HDF5 file", f"{type(err).__name__}: {err}"
        ) from err


def _load_tif(folder: Path) -> dict[str, Any]:
    import tifffile

    fields: dict[str, Any] = {}
    sidecar = folder / TIFF_SIDECAR
    if not sidecar.is_file():
        raise InputError(sidecar, None, "a JSON sidecar next to c.tif", "no such file")
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as err:
        raise InputError(
            sidecar, None, "a readable JSON object", f"{type(err).__name__}: {err}"
        ) from err
    if not isinstance(meta, dict):
        raise InputError(sidecar, None, "a JSON object", type(meta).__name__)
    for name, value in meta.items():
        fields[name] = np.asarray(np.nan if value is None else value)
    for name in ("c", "mask", "sigma"):
        tif = folder / f"{name}.tif"
        if name == "sigma" and (not tif.is_file() or "sigma" in meta):
            continue
        if not tif.is_file():
            continue  # reported as a missing field
        try:
            fields[name] = np.asarray(tifffile.imread(tif))
        except Exception as err:
            raise InputError(tif, name, "a readable TIFF", f"{type(err).__name__}: {err}") from err
    return fields


def _video_from_fields(fields: dict[str, Any], source: str) -> Video:
    for name in _REQUIRED:
        if name not in fields:
            raise InputError(source, name, "a field named " + repr(name), "no such field")
    unknown = sorted(set(fields) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        warnings.warn(f"{source}: ignoring unknown fields {unknown}", stacklevel=3)
    c = _float_array(fields["c"], source, "c")
    t = _float_array(fields["t"], source, "t")
    mask = np.asarray(fields["mask"])
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise InputError(source, "mask", "an integer array", f"dtype {mask.dtype}")
    mask = mask.astype(np.int64)
    pixel_size = _scalar(fields["pixel_size"], source, "pixel_size")
    mu_e = None
    if "mu_e" in fields:
        mu_e = _float_array(fields["mu_e"], source, "mu_e")
    elif "voltage" in fields:
        for name in ("v_ref", "temperature"):
            if name not in fields:
                raise InputError(source, name, f"'{name}' given with 'voltage'", "no such field")
        temperature = _scalar(fields["temperature"], source, "temperature")
        if not temperature > 0:
            raise InputError(source, "temperature", "a positive temperature in K", temperature)
        voltage = _float_array(fields["voltage"], source, "voltage")
        mu_e = voltage_to_mu_e(voltage, _scalar(fields["v_ref"], source, "v_ref"), temperature)
    sigma: np.ndarray | float | None = None
    if "sigma" in fields:
        s = _float_array(fields["sigma"], source, "sigma")
        sigma = float(s) if s.ndim == 0 else s
    return Video(c=c, mask=mask, t=t, pixel_size=pixel_size, mu_e=mu_e, sigma=sigma, source=source)


def _float_array(value: Any, source: str, name: str) -> np.ndarray:
    arr = np.asarray(value)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputError(source, name, "a numeric array", f"dtype {arr.dtype}")
    return arr.astype(np.float64)


def _scalar(value: Any, source: str, name: str) -> float:
    arr = _float_array(value, source, name)
    if arr.size != 1:
        raise InputError(source, name, "a scalar", f"shape {arr.shape}")
    return float(arr.reshape(()))


# ------------------------------------------------------------------------------------------------
# Validation


def validate_video(video: Video, source: str | os.PathLike | None = None) -> list[str]:
    """Check a video against the contract.

    Args:
        video: The video.
        source: The path named in messages (default ``video.source``).

    Returns:
        Warnings (also issued with :func:`warnings.warn`): particles touching the image border.

    Raises:
        InputError: the first violation found, naming the file, field, expected and found.
    """
    src = str(source) if source is not None else (video.source or "<video>")
    c, mask, t = video.c, video.mask, video.t
    if c.ndim != 3:
        raise InputError(src, "c", "a (T, H, W) array", f"shape {c.shape}")
    nt, rows, cols = c.shape
    if mask.ndim != 2 or mask.shape != (rows, cols):
        raise InputError(
            src, "mask", f"shape (H, W) = {(rows, cols)} matching c", f"shape {mask.shape}"
        )
    if t.ndim != 1 or t.shape != (nt,):
        raise InputError(src, "t", f"shape (T,) = ({nt},) matching c", f"shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise InputError(src, "t", "finite times", f"{int(np.sum(~np.isfinite(t)))} non-finite")
    if nt > 1 and not np.all(np.diff(t) > 0):
        k = int(np.argmin(np.diff(t) > 0))
        raise InputError(
            src, "t", "strictly increasing times", f"t[{k}]={t[k]} >= t[{k + 1}]={t[k + 1]}"
        )
    if not (np.isfinite(video.pixel_size) and video.pixel_size > 0):
        raise InputError(src, "pixel_size", "a positive size in micrometres", video.pixel_size)
    if video.mu_e is not None:
        mu_e = np.asarray(video.mu_e)
        if mu_e.shape != (nt,):
            raise InputError(src, "mu_e", f"shape (T,) = ({nt},) matching t", f"shape {mu_e.shape}")
        if not np.all(np.isfinite(mu_e)):
            raise InputError(
                src, "mu_e", "finite values", f"{int(np.sum(~np.isfinite(mu_e)))} NaN/inf"
            )
    if video.sigma is not None:
        sigma = np.asarray(video.sigma, dtype=np.float64)
        if sigma.ndim != 0 and sigma.shape != c.shape:
            raise InputError(
                src, "sigma", f"a scalar or shape {c.shape} matching c", f"shape {sigma.shape}"
            )
        finite = sigma[np.isfinite(sigma)] if sigma.ndim else sigma.reshape(1)
        if sigma.ndim == 0 and not np.isfinite(sigma):
            raise InputError(src, "sigma", "a positive finite noise level", float(sigma))
        if np.any(finite <= 0):
            raise InputError(src, "sigma", "positive values", f"minimum {finite.min()}")
        if sigma.ndim:
            unweighted = np.isfinite(c) & ~np.isfinite(sigma)
            if unweighted.any():
                raise InputError(
                    src,
                    "sigma",
                    "a finite sigma wherever c is observed",
                    f"{int(unweighted.sum())} observed pixel(s) with NaN/inf sigma "
                    f"(of {int(np.isfinite(c).sum())} observed)",
                )
    observed = c[np.isfinite(c)]
    if np.any(np.isinf(c)):
        raise InputError(
            src, "c", "finite values or NaN", f"{int(np.sum(np.isinf(c)))} infinite values"
        )
    if observed.size and (observed.min() < C_MIN or observed.max() > C_MAX):
        raise InputError(
            src,
            "c",
            f"values within [{C_MIN}, {C_MAX}] (Li fraction)",
            f"range [{observed.min():.4g}, {observed.max():.4g}]",
        )
    if mask.min(initial=0) < 0:
        raise InputError(src, "mask", "labels >= 0", f"label {int(mask.min())}")
    n_labels = int(mask.max(initial=0))
    if n_labels == 0:
        raise InputError(src, "mask", "at least one particle (label 1..N)", "no labelled pixel")
    counts = np.bincount(mask.ravel(), minlength=n_labels + 1)
    empty = [lab for lab in range(1, n_labels + 1) if counts[lab] == 0]
    if empty:
        raise InputError(
            src, "mask", f"pixels for every label 1..{n_labels}", f"label(s) {empty} with no pixels"
        )
    seen = np.any(np.isfinite(c), axis=0)
    seen_counts = np.bincount(mask[seen], minlength=n_labels + 1)
    blind = [lab for lab in range(1, n_labels + 1) if seen_counts[lab] == 0]
    if blind:
        raise InputError(
            src,
            "c",
            "an observed (non-NaN) pixel of every particle in some frame",
            f"particle(s) {blind} never observed",
        )
    border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
    messages = [
        f"{src}: particle {lab} touches the image border; it may be cut off"
        for lab in sorted(set(border[border > 0].tolist()))
    ]
    for message in messages:
        warnings.warn(message, stacklevel=2)
    return messages


# ------------------------------------------------------------------------------------------------
# Writing


def write_video(path: str | os.PathLike, video: Video) -> None:
    """Write a video; the container follows the suffix (as :func:`read_video`).

    ``mu_e`` is written in kT (a voltage given on reading has been converted). Reading the file
    back gives identical arrays.
    """
    path = Path(path)
    kind, where = _container(path)
    fields: dict[str, Any] = {
        "c": np.asarray(video.c, dtype=np.float64),
        "mask": np.asarray(video.mask, dtype=np.int64),
        "t": np.asarray(video.t, dtype=np.float64),
        "pixel_size": np.float64(video.pixel_size),
    }
    if video.mu_e is not None:
        fields["mu_e"] = np.asarray(video.mu_e, dtype=np.float64)
    if video.sigma is not None:
        fields["sigma"] = np.asarray(video.sigma, dtype=np.float64)
    if kind != "tif":
        where.parent.mkdir(parents=True, exist_ok=True)
    if kind == "npz":
        np.savez_compressed(where, **fields)
    elif kind == "h5":
        import h5py

        with h5py.File(where, "w") as f:
            for name, value in fields.items():
                opts = {"compression": "gzip"} if np.ndim(value) >= 2 else {}
                f.create_dataset(name, data=value, **opts)
    else:
        _write_tif(where, fields)


def _write_tif(folder: Path, fields: dict[str, Any]) -> None:
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / "c.tif", fields["c"], photometric="minisblack")
    tifffile.imwrite(folder / "mask.tif", fields["mask"], photometric="minisblack")
    meta: dict[str, Any] = {"t": fields["t"].tolist(), "pixel_size": float(fields["pixel_size"])}
    if "mu_e" in fields:
        meta["mu_e"] = fields["mu_e"].tolist()
    sigma_tif = folder / "sigma.tif"
    if "sigma" in fields and fields["sigma"].ndim == 0:
        meta["sigma"] = float(fields["sigma"])
    elif "sigma" in fields:
        tifffile.imwrite(sigma_tif, fields["sigma"], photometric="minisblack")
    if "sigma" not in fields or fields["sigma"].ndim == 0:
        sigma_tif.unlink(missing_ok=True)
    (folder / TIFF_SIDECAR).write_text(json.dumps(meta, indent=1) + "\n")
