"""Pieces of the pipeline against independent answers: NNLS, registration, OD, masks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import nnls

from femkin.stxm.masks import matched_labels, particle_labels, video_mask
from femkin.stxm.od import optical_density
from femkin.stxm.register import displacement, shift_image
from femkin.stxm.stack import Stack
from femkin.stxm.unmix import nnls2, unmix


def test_nnls2_matches_scipy():
    rng = np.random.default_rng(0)
    a = np.abs(rng.normal(size=(9, 2))) + 0.1
    b = rng.normal(size=(9, 200))  # many pixels need the constraint
    ours = nnls2(a, b)
    ref = np.array([nnls(a, b[:, p])[0] for p in range(b.shape[1])]).T
    np.testing.assert_allclose(ours, ref, atol=1e-10)
    assert np.sum(np.any(ref == 0, axis=0)) > 50


def test_unmix_exact_mixture_and_bootstrap():
    design = np.array([[1.0, 0.2], [0.8, 0.5], [0.3, 1.2], [0.2, 1.0], [0.5, 0.5]])
    c = np.linspace(0, 1, 12).reshape(3, 4)
    thick = 0.7
    od = np.einsum("ek,khw->ehw", design, np.array([thick * c, thick * (1 - c)]))
    res = unmix(od, design, n_boot=30)
    np.testing.assert_allclose(res.c, c, atol=1e-12)
    np.testing.assert_allclose(res.weights.sum(axis=0), thick, atol=1e-12)
    assert np.nanmax(res.sigma) < 1e-10  # noise-free: every resample gives the same c


def test_displacement_subpixel():
    rows, cols = np.indices((40, 40), dtype=np.float64)
    true = np.array([1.37, -2.61])

    def blob(dr, dc):
        return np.exp(-((rows - 18 - dr) ** 2 + (cols - 21 - dc) ** 2) / 18.0) + 0.5 * np.exp(
            -((rows - 27 - dr) ** 2 + (cols - 12 - dc) ** 2) / 8.0
        )

    rng = np.random.default_rng(2)
    moving = blob(*true) + rng.normal(0, 0.01, (40, 40))
    found = displacement(blob(0, 0), moving)
    assert np.abs(found - true).max() < 0.05
    back = shift_image(moving, -found)
    assert np.nanmax(np.abs(back - blob(0, 0))) < 0.06
    # undoing (+1.37, -2.61) moves content down-right: the first columns and last rows
    # come from outside the image and are unobserved
    assert np.isnan(back[:, :2]).all() and np.isnan(back[-1]).all()
    assert np.isfinite(back[2:-2, 3:-3]).all()


def test_optical_density_region_and_auto():
    i0 = np.array([1000.0, 2000.0])
    od_true = np.zeros((2, 20, 20))
    od_true[:, 5:12, 6:14] = [[[0.5]], [[1.1]]]
    counts = i0[:, None, None] * np.exp(-od_true)
    stack = Stack(
        np.array([700.0, 710.0]),
        np.arange(20.0),
        np.arange(20.0),
        counts,
        np.ones(2),
        None,
        {},
        "test",
    )
    dens = optical_density(stack, [15, 20, 0, 20])
    np.testing.assert_allclose(dens.i0, i0)
    np.testing.assert_allclose(dens.od, od_true, atol=1e-12)
    auto = optical_density(stack)
    np.testing.assert_allclose(auto.i0, i0)
    assert not auto.background[:, 5:12, 6:14].any()


def test_masks_fill_holes_drop_small_and_stable_labels():
    fe = np.zeros((30, 30))
    fe[2:12, 2:12] = 1.0
    fe[5:7, 5:7] = 0.0  # a hole
    fe[20:28, 18:28] = 1.0
    fe[25:27, 2:4] = 1.0  # 4 pixels: dropped with min_size 5
    lab = particle_labels(fe, 0.5, 5)
    assert lab.max() == 2 and lab[5, 5] == 1 and lab[26, 3] == 0
    swapped = np.where(lab == 1, 2, np.where(lab == 2, 1, 0))
    matched, next_id = matched_labels(swapped, lab, 3)
    np.testing.assert_array_equal(matched, lab)
    assert next_id == 3
    frames = np.stack([lab, lab, np.where(lab == 2, 0, lab)])  # particle 2 vanishes in frame 2
    mask = video_mask(frames, np.ones_like(frames, dtype=bool), 5)
    np.testing.assert_array_equal(mask, lab)


@pytest.mark.parametrize("threshold", [None, 0.2])
def test_new_particle_gets_new_label(threshold):
    from femkin.stxm.masks import otsu, stable_labels

    fe = np.zeros((2, 20, 20))
    fe[:, 2:8, 2:8] = 1.0
    fe[1, 12:18, 12:18] = 1.0
    th = np.array([otsu(f) if threshold is None else threshold for f in fe])
    lab = stable_labels(fe, th, 4)
    assert lab[0].max() == 1 and set(np.unique(lab[1])) == {0, 1, 2}
    assert lab[1, 15, 15] == 2 and lab[1, 4, 4] == 1
