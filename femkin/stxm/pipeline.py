"""From raw STXM stacks to the video contract: OD, registration, unmixing, masks.

Steps (issue 6): optical density per energy (``femkin.stxm.od``); registration of the energies
of each stack, then of the stacks over time, by sub-pixel phase correlation
(``femkin.stxm.register``); one interpolation per image to undo the total drift; non-negative
unmixing with bootstrap sigma (``femkin.stxm.unmix``); masks of the Fe optical density
``w_LFP + w_FP`` with labels stable over time (``femkin.stxm.masks``). The output frame is the
reference energy of the first stack. ``c`` and ``sigma`` are NaN outside the mask and where a
pixel drifted out of view at some energy.
"""

from __future__ import annotations

import datetime
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from femkin.errors import InputError
from femkin.stxm.masks import otsu, stable_labels, video_mask
from femkin.stxm.od import optical_density
from femkin.stxm.register import displacement, refined_displacement, register_stack, shift_image
from femkin.stxm.stack import Stack
from femkin.stxm.unmix import References, unmix

#: Smallest sigma reported: the bootstrap gives 0 where every resample clamps c to 0 or 1.
SIGMA_FLOOR = 1e-3


class Prepared(NamedTuple):
    """Everything ``prepare`` computed.

    Attributes:
        c: ``(T, H, W)`` Li fraction, NaN outside the mask or unobserved.
        sigma: ``(T, H, W)`` bootstrap standard deviation of ``c`` (at least
            :data:`SIGMA_FLOOR`), NaN where ``c`` is.
        mask: ``(H, W)`` labels 0 background, 1..N particles.
        labels: ``(T, H, W)`` per-frame particle labels, stable over time.
        t: ``(T,)`` frame times in seconds from the first.
        pixel_size: micrometres.
        od: list of ``(E_t, H, W)`` registered optical densities.
        fe: ``(T, H, W)`` Fe optical density ``w_LFP + w_FP``.
        shifts: list of ``(E_t, 2)`` total displacements (pixels, rows/cols) of each raw image
            relative to the output frame.
        stack_shifts: ``(T, 2)`` displacement of each stack's reference image.
        reference: ``(0, e)``, the image that defines the output frame.
        thresholds: ``(T,)`` Fe OD thresholds used for the masks.
        i0: list of ``(E_t,)`` incident intensities.
    """

    c: np.ndarray
    sigma: np.ndarray | None
    mask: np.ndarray
    labels: np.ndarray
    t: np.ndarray
    pixel_size: float
    od: list
    fe: np.ndarray
    shifts: list
    stack_shifts: np.ndarray
    reference: tuple[int, int]
    thresholds: np.ndarray
    i0: list


def frame_times(stacks: Sequence[Stack], times: Sequence[float] | None) -> np.ndarray:
    """Frame times: ``times`` if given, else header time stamps relative to the first stack.

    Raises:
        InputError: wrong count, not strictly increasing, or a stack without a time stamp.
    """
    n = len(stacks)
    if times is not None:
        t = np.asarray(times, dtype=np.float64).reshape(-1)
        if t.size != n:
            raise InputError("times", "times", f"{n} values (one per stack)", t.size)
        where = "times"
    else:
        stamps: list[datetime.datetime] = []
        for s in stacks:
            if s.timestamp is None:
                raise InputError(
                    s.source, "timestamp", "a scan start time in the file (or give --times)", "none"
                )
            stamps.append(s.timestamp)
        try:
            t = np.array([(s - stamps[0]).total_seconds() for s in stamps])
        except TypeError:
            raise InputError(
                stacks[0].source,
                "timestamp",
                "time stamps all with or all without a time zone (or give --times)",
                "a mixture",
            ) from None
        where = "timestamp"
    if not np.all(np.isfinite(t)) or np.any(np.diff(t) <= 0):
        raise InputError(
            "stacks" if where == "timestamp" else "times",
            where,
            "strictly increasing frame times",
            t.tolist(),
        )
    return t


def _check_grid(stacks: Sequence[Stack]) -> float:
    h, w = stacks[0].counts.shape[1:]
    px = stacks[0].pixel_size
    for s in stacks:
        if s.counts.shape[1:] != (h, w):
            raise InputError(
                s.source,
                "counts",
                f"{h}x{w} images like {stacks[0].source}",
                f"{s.counts.shape[1]}x{s.counts.shape[2]}",
            )
        if s.counts.shape[0] < 2:
            raise InputError(
                s.source, "energies", "at least 2 energies to unmix", s.counts.shape[0]
            )
        py = float(np.mean(np.abs(np.diff(s.y)))) if s.y.size > 1 else px
        if (
            not np.isfinite(s.pixel_size)
            or abs(s.pixel_size - px) > 0.01 * px
            or abs(py - px) > 0.01 * px
        ):
            raise InputError(
                s.source,
                "x, y",
                f"square pixels of {px:g} um like {stacks[0].source}",
                f"{s.pixel_size:g} x {py:g} um",
            )
    return px


def anderson(
    g, x0: np.ndarray, *, iterations: int, depth: int = 4, tol: float = 2e-3
) -> np.ndarray:
    """Anderson-accelerated fixed-point iteration ``x = g(x)`` (type II, least squares mixing).

    Stops when the update is below ``tol`` (max norm) or after ``iterations`` evaluations.
    """
    x = np.asarray(x0, dtype=np.float64)
    xs, fs = [], []
    for _ in range(iterations):
        gx = g(x)
        f = gx - x
        if np.max(np.abs(f)) < tol:
            return gx
        xs.append(gx)
        fs.append(f)
        xs, fs = xs[-(depth + 1) :], fs[-(depth + 1) :]
        if len(fs) > 1:
            df = np.array([fs[i + 1] - fs[i] for i in range(len(fs) - 1)]).T
            dg = np.array([xs[i + 1] - xs[i] for i in range(len(xs) - 1)]).T
            gamma, *_ = np.linalg.lstsq(df, f, rcond=None)
            x = gx - dg @ gamma
        else:
            x = gx
    return x


def align_energies(
    od: np.ndarray, design: np.ndarray, *, iterations: int = 12
) -> tuple[np.ndarray, int, np.ndarray]:
    """Register the energies of one stack: phase correlation, then model-based refinement.

    Images at different energies have different contrast (the Li-rich and Li-poor regions swap
    brightness between the LiFePO4 and FePO4 peaks), which biases a direct correlation. After a
    first registration to the highest-contrast image, each raw image is registered again
    against its prediction ``design[e] @ w`` (same contrast), where ``w`` is unmixed from the
    *other* energies so that an image cannot pull the model towards its own misalignment.

    Returns:
        ``(shifts (E, 2), reference, fe (H, W))``: displacements relative to the frame of the
        reference energy, its index, and the Fe optical density ``w_LFP + w_FP`` in that frame.
    """
    shifts, ref = register_stack(od)
    e = od.shape[0]

    def update(current: np.ndarray) -> np.ndarray:
        current = current.reshape(e, 2)
        aligned = np.array([shift_image(im, -sh) for im, sh in zip(od, current, strict=True)])
        new = current.copy()
        for k in range(e):
            keep = np.arange(e) != k
            if np.linalg.matrix_rank(design[keep]) < 2:
                continue
            w = unmix(aligned[keep], design[keep], n_boot=0).weights
            predicted = np.einsum("k,khw->hw", design[k], w)
            new[k] = refined_displacement(predicted, od[k], current[k], steps=2)
        return (new - new[ref]).ravel()

    shifts = anderson(update, shifts.ravel(), iterations=iterations).reshape(e, 2)
    aligned = np.array([shift_image(im, -sh) for im, sh in zip(od, shifts, strict=True)])
    w = unmix(aligned, design, n_boot=0).weights
    return shifts, ref, w[0] + w[1]


def prepare(
    stacks: Sequence[Stack],
    references: References,
    *,
    i0_region: Sequence[int] | None = None,
    threshold: float | None = None,
    min_size: int = 20,
    times: Sequence[float] | None = None,
    n_boot: int = 100,
    seed: int = 0,
) -> Prepared:
    """Turn raw stacks (one per frame, in time order) into Li fraction maps and masks.

    Args:
        stacks: the raw stacks, all on the same pixel grid.
        references: LiFePO4 and FePO4 reference spectra covering every stack's energies.
        i0_region: ``[row0, row1, col0, col1]`` particle-free region for I0; automatic if None.
        threshold: Fe optical density threshold for the masks; Otsu per frame if None.
        min_size: smallest particle kept, in pixels.
        times: frame times in seconds; from the headers if None.
        n_boot: bootstrap resamples for sigma (>= 2); 0: no sigma (``sigma`` is None; the case
            then needs ``[data] sigma``).
        seed: bootstrap seed.

    Raises:
        InputError: inconsistent stacks, uncovered energies, missing times, no particle.
    """
    if not stacks:
        raise InputError("stacks", "stacks", "at least one stack", 0)
    if min_size < 1:
        raise InputError("prepare", "min_size", "a positive number of pixels", min_size)
    if n_boot < 0 or n_boot == 1:
        raise InputError(
            "prepare",
            "bootstrap",
            "0 (no sigma) or at least 2 resamples (a standard deviation needs two)",
            n_boot,
        )
    pixel_size = _check_grid(stacks)
    t = frame_times(stacks, times)
    designs = [references.at(s.energies, source=s.source) for s in stacks]
    ods, i0s, inner, refs, fes = [], [], [], [], []
    for s, design in zip(stacks, designs, strict=True):
        dens = optical_density(s, i0_region)
        shifts, ref, fe_s = align_energies(dens.od, design)
        ods.append(dens.od)
        i0s.append(dens.i0)
        inner.append(shifts)
        refs.append(ref)
        fes.append(fe_s)
    stack_shifts = np.array([displacement(fes[0], f) for f in fes])
    stack_shifts[0] = 0.0
    total_shifts = [sh_e + d for sh_e, d in zip(inner, stack_shifts, strict=True)]
    aligned = [
        np.array([shift_image(im, -sh) for im, sh in zip(od, sh_e, strict=True)])
        for od, sh_e in zip(ods, total_shifts, strict=True)
    ]
    results = [
        unmix(od, a, n_boot=n_boot, seed=seed) for od, a in zip(aligned, designs, strict=True)
    ]
    fe = np.array([r.weights[0] + r.weights[1] for r in results])
    thresholds = np.array([otsu(f) if threshold is None else float(threshold) for f in fe])
    labels = stable_labels(fe, thresholds, min_size)
    observed = np.isfinite(fe)
    mask = video_mask(labels, observed, min_size)
    if mask.max() == 0:
        raise InputError(
            stacks[0].source,
            "mask",
            f"at least one particle of >= {min_size} pixels above Fe OD {thresholds.min():.3g}",
            "none",
        )
    inside = mask > 0
    c = np.array([np.where(inside, r.c, np.nan) for r in results])
    sigma = (
        np.array([np.where(inside, np.maximum(r.sigma, SIGMA_FLOOR), np.nan) for r in results])
        if n_boot > 0
        else None
    )
    return Prepared(
        c=c,
        sigma=sigma,
        mask=mask,
        labels=labels,
        t=t,
        pixel_size=pixel_size,
        od=aligned,
        fe=fe,
        shifts=total_shifts,
        stack_shifts=stack_shifts,
        reference=(0, refs[0]),
        thresholds=thresholds,
        i0=i0s,
    )


def write_summary(path: str | pathlib.Path, result: Prepared, *, max_frames: int = 4) -> None:
    """PNG summary: mean OD, Fe OD with mask outline, c maps, masks and the drift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = result.c.shape[0]
    frames = np.unique(np.linspace(0, n - 1, min(n, max_frames)).round().astype(int))
    ncol = max(3, len(frames))
    fig, axes = plt.subplots(3, ncol, figsize=(3.2 * ncol, 9.0), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    ax = axes[0, 0]
    im = ax.imshow(np.nanmean(result.od[0], axis=0), cmap="gray_r")
    ax.set_title("mean OD, frame 0")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax = axes[0, 1]
    im = ax.imshow(result.fe[0], cmap="viridis")
    ax.contour(result.mask > 0, levels=[0.5], colors="w", linewidths=0.8)
    ax.set_title(f"Fe OD, threshold {result.thresholds[0]:.3g}")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax = axes[0, 2]
    ax.imshow(
        np.ma.masked_equal(result.mask, 0),
        cmap="tab10",
        interpolation="nearest",
        vmin=0.5,
        vmax=10.5,
    )
    ax.set_title(f"mask ({result.mask.max()} particles)")
    for j, k in enumerate(frames):
        ax = axes[1, j]
        im = ax.imshow(result.c[k], cmap="coolwarm", vmin=0, vmax=1)
        ax.set_title(f"c, t = {result.t[k]:g} s")
        fig.colorbar(im, ax=ax, shrink=0.8)
    ax = axes[2, 0]
    ax.set_axis_on()
    for k, sh in enumerate(result.shifts):
        ax.plot(sh[:, 0], "o-", ms=3, label=f"rows, frame {k}" if k < 3 else None)
        ax.plot(sh[:, 1], "s--", ms=3, label=f"cols, frame {k}" if k < 3 else None)
    ax.set_xlabel("energy index")
    ax.set_ylabel("drift (px)")
    ax.legend(fontsize=6)
    ax = axes[2, 1]
    ax.imshow(
        np.ma.masked_equal(result.labels[-1], 0),
        cmap="tab10",
        interpolation="nearest",
        vmin=0.5,
        vmax=10.5,
    )
    ax.set_title("labels, last frame")
    ax = axes[2, 2]
    no_sigma = result.sigma is None
    shown = np.full_like(result.c[0], np.nan) if result.sigma is None else result.sigma[0]
    im = ax.imshow(shown, cmap="magma")
    ax.set_title("no sigma (--bootstrap 0)" if no_sigma else "sigma(c), frame 0")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
