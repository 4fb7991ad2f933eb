"""Sub-pixel image registration: phase correlation, refined by least squares.

The coarse shift comes from phase correlation (scikit-image's upsampled-DFT cross-correlation,
to 1/10 pixel); it is refined by Gauss-Newton (Lucas-Kanade) on
``moving ~ a * shifted(reference) + b``, which is the maximum-likelihood shift for Gaussian
noise and free of the peak-fitting bias of correlation.

Shifts are *displacements*: ``shift = (dy, dx)`` in pixels means the content of the moving
image sits ``dy`` rows and ``dx`` columns further than in the reference. Undoing it is
``shift_image(moving, -shift)``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.registration import phase_cross_correlation

UPSAMPLE = 10
NEWTON_STEPS = 6


def _prepared(image: np.ndarray) -> np.ndarray:
    img = np.where(np.isfinite(image), image, np.nan)
    fill = np.nanmedian(img) if np.isfinite(img).any() else 0.0
    img = np.where(np.isfinite(img), img, fill)
    return img - fill


def displacement(
    reference: np.ndarray, moving: np.ndarray, *, upsample: int = UPSAMPLE
) -> np.ndarray:
    """Return the sub-pixel displacement ``(dy, dx)`` of ``moving`` relative to ``reference``.

    NaN pixels (unobserved) are replaced by the image median before correlating.
    """
    shift, _, _ = phase_cross_correlation(
        _prepared(reference), _prepared(moving), upsample_factor=upsample, normalization=None
    )
    return refined_displacement(reference, moving, -np.asarray(shift, dtype=np.float64))


def refined_displacement(
    reference: np.ndarray, moving: np.ndarray, start: np.ndarray, *, steps: int = NEWTON_STEPS
) -> np.ndarray:
    """Least-squares displacement near ``start``: Gauss-Newton on
    ``moving(x) ~ a * reference(x - s) + b`` over the pixels finite in both images.
    """
    s = np.asarray(start, dtype=np.float64).copy()
    for _ in range(steps):
        r0 = shift_image(reference, s)
        gy, gx = np.gradient(r0)
        ok = np.isfinite(r0) & np.isfinite(moving) & np.isfinite(gy) & np.isfinite(gx)
        if ok.sum() < 8:
            break
        cols = np.stack([r0[ok], np.ones(ok.sum()), gy[ok], gx[ok]], axis=1)
        coef, *_ = np.linalg.lstsq(cols, moving[ok], rcond=None)
        if abs(coef[0]) < 1e-12:
            break
        step = -coef[2:] / coef[0]
        step = np.clip(step, -1.0, 1.0)
        s += step
        if np.max(np.abs(step)) < 1e-4:
            break
    return s


def shift_image(image: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Translate ``image`` by ``shift = (dy, dx)`` pixels (cubic spline); NaN where unobserved."""
    shift = np.asarray(shift, dtype=np.float64)
    finite = np.isfinite(image)
    filled = np.where(finite, image, np.nanmedian(image) if finite.any() else 0.0)
    out = ndimage.shift(filled, shift, order=3, mode="nearest")
    seen = ndimage.shift(finite.astype(np.float64), shift, order=1, mode="constant", cval=0.0)
    out[seen < 0.999] = np.nan
    return out


def register_stack(images: np.ndarray, reference: int | None = None) -> tuple[np.ndarray, int]:
    """Displacements of every image of ``images (N, H, W)`` relative to one reference image.

    Args:
        images: the images (e.g. optical density per energy).
        reference: index of the reference; by default the image with the largest spatial
            standard deviation (highest contrast).

    Returns:
        ``(shifts (N, 2), reference)``; ``shifts[reference] == 0``.
    """
    if reference is None:
        reference = int(np.argmax([np.nanstd(im) for im in images]))
    ref = images[reference]
    shifts = np.array(
        [displacement(ref, im) if k != reference else np.zeros(2) for k, im in enumerate(images)]
    )
    return shifts, reference
