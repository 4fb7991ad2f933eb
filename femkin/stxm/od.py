"""Optical density ``OD = -ln(I / I0)`` per energy, with ``I0`` from the particle-free
background, found automatically or given as a region ``[row0, row1, col0, col1]``.

Automatic ``I0``: a first OD from a high percentile of each image is registered over the
energies; its mean is thresholded (Otsu) and the particles, grown by two pixels, are removed.
What is left, moved back to each energy's own drift, is the background; ``I0`` is its mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from femkin.errors import InputError
from femkin.stxm.masks import otsu
from femkin.stxm.register import register_stack, shift_image
from femkin.stxm.stack import Stack

MIN_BACKGROUND = 8


class OpticalDensity(NamedTuple):
    """``od (E, Y, X)``, ``i0 (E,)``, ``background (E, Y, X)`` bool pixels used for ``i0``."""

    od: np.ndarray
    i0: np.ndarray
    background: np.ndarray


def _od(counts: np.ndarray, i0: np.ndarray) -> np.ndarray:
    return -np.log(np.maximum(counts, 0.5) / i0[:, None, None])


def optical_density(stack: Stack, i0_region: Sequence[int] | None = None) -> OpticalDensity:
    """Optical density of every energy of ``stack``.

    Args:
        stack: the raw stack.
        i0_region: ``[row0, row1, col0, col1]`` (half-open, raw image pixels) of a
            particle-free region; automatic when ``None``.

    Raises:
        InputError: a region outside the image or empty, or no particle-free background.
    """
    counts = stack.counts
    e, h, w = counts.shape
    if i0_region is not None:
        r0, r1, c0, c1 = (int(v) for v in i0_region)
        if not (0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w):
            raise InputError(
                stack.source,
                "i0_region",
                f"[row0, row1, col0, col1] inside the {h}x{w} image with row0 < row1, col0 < col1",
                list(i0_region),
            )
        background = np.zeros(counts.shape, dtype=bool)
        background[:, r0:r1, c0:c1] = True
    else:
        crude = _od(counts, np.percentile(counts.reshape(e, -1), 95, axis=1))
        shifts, _ = register_stack(crude)
        aligned = np.array([shift_image(im, -s) for im, s in zip(crude, shifts, strict=True)])
        mean = np.nanmean(aligned, axis=0)
        particles = np.nan_to_num(mean, nan=np.inf) > otsu(mean)
        free = ~ndimage.binary_dilation(particles, iterations=2)
        background = np.array(
            [
                ndimage.shift(free.astype(np.float64), s, order=0, mode="constant", cval=0.0) > 0.5
                for s in shifts
            ]
        )
    n_bg = background.reshape(e, -1).sum(axis=1)
    if n_bg.min() < MIN_BACKGROUND:
        raise InputError(
            stack.source,
            "i0_region",
            f"at least {MIN_BACKGROUND} particle-free pixels for I0 (give --i0-region)",
            f"{int(n_bg.min())}",
        )
    i0 = np.array([counts[k][background[k]].mean() for k in range(e)])
    if not np.all(i0 > 0):
        raise InputError(stack.source, "i0", "positive background intensity", i0)
    return OpticalDensity(_od(counts, i0), i0, background)
