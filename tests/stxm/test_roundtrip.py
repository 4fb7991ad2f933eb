"""Round trip: synthetic stacks (known Li map, references, drift, Poisson noise) written in each
format by femkin's writers, read back and prepared; c, drift and mask checked against the truth.

Measured on the default scene (48x48 px, 12 energies, I0 = 4000 counts, 2 frames, seeds 3 and
4): drift error <= 0.06 px; RMS error of c inside the mask 0.024-0.027 against an RMS bootstrap
sigma of 0.022, with 87-91 % of the pixels within two sigma; the mask differs from the truth
only on pixels adjacent to the true boundary.
"""

from __future__ import annotations

import datetime

import numpy as np
import pytest
from scipy import ndimage

from femkin.stxm import prepare, read_references, read_stack
from femkin.stxm.als import write_hdr_stack
from femkin.stxm.nexus import LAYOUTS, write_nexus
from femkin.stxm.stk import write_stk
from femkin.stxm.synthetic import (
    make_synthetic,
    reference_spectra,
    scene,
    true_mask,
    write_references_csv,
)

RMS_C = 0.04  # observed 0.024-0.027; the noise (RMS bootstrap sigma) is about 0.022
DRIFT_TOL = 0.2  # pixels, the requirement


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(n_times=2, seed=3)


@pytest.fixture
def refs(tmp_path):
    e = np.linspace(700.0, 720.0, 81)
    path = tmp_path / "refs.csv"
    write_references_csv(path, e, reference_spectra(e))
    return read_references(path)


def _write(fmt, path_base, stack, k):
    if fmt == "hdr":
        path = path_base / f"stack{k}.hdr"
        write_hdr_stack(path, stack)
    elif fmt == "stk":
        path = path_base / f"stack{k}.stk"
        write_stk(path, stack)
    else:
        path = path_base / f"stack{k}.h5"
        write_nexus(path, stack, layout=fmt)
    return path


@pytest.mark.parametrize("fmt", ["hdr", "stk", *LAYOUTS])
def test_writer_reader_identity(tmp_path, synthetic, fmt):
    stack = synthetic.stacks[1]
    back = read_stack(_write(fmt, tmp_path, stack, 0))
    assert back.counts.shape == stack.counts.shape
    np.testing.assert_array_equal(back.counts, stack.counts)  # Poisson counts: integers
    np.testing.assert_allclose(back.energies, stack.energies, atol=1e-4)
    np.testing.assert_allclose(back.x, stack.x, atol=1e-4)
    np.testing.assert_allclose(back.y, stack.y, atol=1e-4)
    np.testing.assert_allclose(back.dwell, stack.dwell, rtol=1e-6)
    if fmt == "stk":
        assert back.timestamp is None
    else:
        assert back.timestamp == stack.timestamp
    if fmt in LAYOUTS:
        assert back.metadata["layout"] == fmt


@pytest.mark.parametrize("fmt", ["hdr", "nxstxm-1.3", "stk"])
def test_prepare_recovers_truth(tmp_path, synthetic, refs, fmt):
    stacks = [read_stack(_write(fmt, tmp_path, s, k)) for k, s in enumerate(synthetic.stacks)]
    times = [0.0, 60.0] if fmt == "stk" else None  # .stk has no time stamp
    r = prepare(stacks, refs, times=times, n_boot=40)
    np.testing.assert_allclose(r.t, synthetic.times)
    # drift: displacement of every raw image relative to the output frame
    ref = synthetic.drift[r.reference[0], r.reference[1]]
    for k, shifts in enumerate(r.shifts):
        err = np.abs(shifts - (synthetic.drift[k] - ref)).max()
        assert err < DRIFT_TOL, f"frame {k}: drift error {err:.3f} px"
    # c: the truth in the output frame is the scene displaced by the reference drift
    rows, cols = np.indices(r.mask.shape, dtype=np.float64)
    inside = r.mask > 0
    for k in range(len(stacks)):
        _, c_true = scene(rows - ref[0], cols - ref[1], float(k))
        ok = inside & np.isfinite(r.c[k])
        assert ok.sum() > 0.95 * inside.sum()
        err = r.c[k][ok] - c_true[ok]
        rms = np.sqrt(np.mean(err**2))
        noise = np.sqrt(np.mean(r.sigma[k][ok] ** 2))
        assert rms < RMS_C and rms < 1.5 * noise, f"frame {k}: rms {rms:.3f}, sigma {noise:.3f}"
        assert np.mean(np.abs(err) < 2 * r.sigma[k][ok]) > 0.8
    # mask: two particles, every wrong pixel within one pixel of the true boundary
    truth = true_mask(r.mask.shape, ref)
    assert r.mask.max() == 2
    wrong = (truth > 0) != inside
    dist = np.maximum(
        ndimage.distance_transform_edt(truth > 0), ndimage.distance_transform_edt(truth == 0)
    )
    assert wrong.sum() < 0.15 * (truth > 0).sum()
    assert dist[wrong].max(initial=0) <= 1.0
    # labels stable over time and consistent with the truth's particles
    for lab in (1, 2):
        assert np.all(r.labels[:, r.mask == lab][r.labels[:, r.mask == lab] > 0] == lab)
    overlap = {lab: np.bincount(truth[r.mask == lab]).argmax() for lab in (1, 2)}
    assert sorted(overlap.values()) == [1, 2]


def test_three_frames_large_drift(refs):
    syn = make_synthetic(n_times=3, seed=11, max_drift=2.0, time_drift=4.0)
    r = prepare(syn.stacks, refs, n_boot=20)
    ref = syn.drift[0, r.reference[1]]
    errs = [np.abs(s - (syn.drift[k] - ref)).max() for k, s in enumerate(r.shifts)]
    assert max(errs) < DRIFT_TOL, errs
    assert np.abs(syn.drift).max() > 3.0  # the drift corrected really is large
    np.testing.assert_array_equal(np.unique(r.labels[2]), [0, 1, 2])


def test_header_times_feed_t(tmp_path, synthetic, refs):
    stacks = [
        s._replace(
            timestamp=datetime.datetime(2024, 1, 1, 0, 0, 0) + datetime.timedelta(seconds=17.5 * k)
        )
        for k, s in enumerate(synthetic.stacks)
    ]
    r = prepare(stacks, refs, n_boot=0)
    np.testing.assert_allclose(r.t, [0.0, 17.5])
