"""Particle masks: Otsu threshold of the Fe optical density, holes filled, small particles
dropped, and labels kept stable over the frames of a video (matched by overlap).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu


def otsu(image: np.ndarray) -> float:
    """Otsu threshold of the finite pixels of ``image``."""
    values = image[np.isfinite(image)]
    if values.size < 2 or np.ptp(values) == 0:
        return float(np.nanmax(image)) if values.size else 0.0
    return float(threshold_otsu(values))


def particle_labels(fe: np.ndarray, threshold: float, min_size: int) -> np.ndarray:
    """Label the particles of one frame: ``fe > threshold``, holes filled, small ones dropped.

    Returns:
        ``(H, W)`` int labels 1..N ordered by first pixel (row-major), 0 background.
    """
    binary = ndimage.binary_fill_holes(np.nan_to_num(fe, nan=-np.inf) > threshold)
    labels, n = ndimage.label(binary)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    labels = np.where(keep[labels], labels, 0)
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape).astype(np.int64)


def matched_labels(
    labels: np.ndarray, reference: np.ndarray, next_id: int
) -> tuple[np.ndarray, int]:
    """Relabel ``labels`` so each particle takes the ``reference`` label it overlaps most.

    Particles that overlap nothing (or a reference label already taken by a larger overlap)
    get fresh ids starting at ``next_id``. Returns ``(relabelled, next_id)``.
    """
    out = np.zeros_like(labels)
    pairs = []
    for lab in range(1, labels.max() + 1):
        sel = labels == lab
        ref = reference[sel]
        ref = ref[ref > 0]
        if ref.size:
            counts = np.bincount(ref)
            pairs.append((int(counts.max()), lab, int(np.argmax(counts))))
        else:
            pairs.append((0, lab, 0))
    taken: set[int] = set()
    for overlap, lab, ref_lab in sorted(pairs, reverse=True):
        if overlap > 0 and ref_lab not in taken:
            out[labels == lab] = ref_lab
            taken.add(ref_lab)
        else:
            out[labels == lab] = next_id
            next_id += 1
    return out, next_id


def stable_labels(fe: np.ndarray, thresholds: np.ndarray, min_size: int) -> np.ndarray:
    """Per-frame particle labels ``(T, H, W)``, each frame matched to the previous one."""
    frames = [particle_labels(fe[0], thresholds[0], min_size)]
    next_id = int(frames[0].max()) + 1
    for t in range(1, fe.shape[0]):
        lab, next_id = matched_labels(
            particle_labels(fe[t], thresholds[t], min_size), frames[-1], next_id
        )
        frames.append(lab)
    return np.stack(frames)


def video_mask(labels: np.ndarray, observed: np.ndarray, min_size: int) -> np.ndarray:
    """One mask for the whole video: pixels inside a particle in most frames that observe
    them, labelled with the stable label they carry most often, renumbered 1..N.
    """
    inside = np.sum((labels > 0) & observed, axis=0)
    seen = np.maximum(np.sum(observed, axis=0), 1)
    binary = ndimage.binary_fill_holes(inside * 2 > seen)
    comp, n = ndimage.label(binary)
    mask = np.zeros(comp.shape, dtype=np.int64)
    stable = labels.reshape(labels.shape[0], -1)
    ids = []
    for k in range(1, n + 1):
        sel = (comp == k).ravel()
        if sel.sum() < min_size:
            continue
        votes = stable[:, sel]
        votes = votes[votes > 0]
        ids.append((int(np.bincount(votes).argmax()) if votes.size else 10**9 + k, k))
    for new, (_, k) in enumerate(sorted(ids), start=1):
        mask[comp == k] = new
    return mask
