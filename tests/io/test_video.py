"""The video contract: round trips and one error per kind of bad input."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from femkin.errors import InputError
from femkin.io import Video, pixel_centres, read_video, validate_video, voltage_to_mu_e, write_video


def _video(nt: int = 4, shape=(12, 14), sigma=0.05) -> Video:
    rng = np.random.default_rng(3)
    mask = np.zeros(shape, dtype=np.int64)
    mask[2:6, 3:8] = 1
    mask[7:10, 6:12] = 2
    c = rng.uniform(0.0, 1.0, (nt, *shape))
    c[:, mask == 0] = np.nan
    c[1, 2, 3] = np.nan
    t = np.linspace(0.0, 30.0, nt)
    return Video(
        c=c, mask=mask, t=t, pixel_size=0.05, mu_e=np.linspace(-1.0, -3.0, nt), sigma=sigma
    )


def _same(a: Video, b: Video) -> None:
    np.testing.assert_array_equal(a.c, b.c)  # NaN compare equal here
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.t, b.t)
    np.testing.assert_array_equal(a.mu_e, b.mu_e)
    np.testing.assert_array_equal(np.asarray(a.sigma), np.asarray(b.sigma))
    assert a.pixel_size == b.pixel_size
    assert b.c.dtype == np.float64 and b.mask.dtype == np.int64


@pytest.mark.parametrize(
    "name", ["v.npz", "v.h5", "v.hdf5", "folder", "folder/c.tif", "f/video.json"]
)
@pytest.mark.parametrize("sigma", [0.05, "array", None])
def test_round_trip(tmp_path, name, sigma):
    video = _video()
    if sigma == "array":
        video = video._replace(
            sigma=np.full(video.c.shape, 0.07) + np.arange(video.c.shape[2]) * 1e-3
        )
    elif sigma is None:
        video = video._replace(sigma=None, mu_e=None)
    write_video(tmp_path / name, video)
    back = read_video(tmp_path / name)
    _same(video, back)
    if sigma == 0.05:
        assert isinstance(back.sigma, float)


def test_tif_any_entry_point(tmp_path):
    video = _video()
    write_video(tmp_path / "stack", video)
    for entry in ("stack", "stack/c.tif", "stack/video.json"):
        _same(video, read_video(tmp_path / entry))


def test_voltage_converted(tmp_path):
    video = _video()
    fields = dict(
        c=video.c,
        mask=video.mask,
        t=video.t,
        pixel_size=0.05,
        voltage=np.full(4, 3.40),
        v_ref=3.42,
        temperature=300.0,
    )
    np.savez(tmp_path / "v.npz", **fields)
    back = read_video(tmp_path / "v.npz")
    # 20 mV below the plateau at 300 K: 0.02 V / (k_B T / e = 0.0258520 V) = 0.773635 kT.
    np.testing.assert_allclose(back.mu_e, 0.7736345, rtol=1e-6)
    np.testing.assert_allclose(voltage_to_mu_e(3.42 + 0.02585, 3.42, 300.0), -0.99989, rtol=1e-4)


def test_pixel_centres():
    x, y = pixel_centres((2, 3), 0.5)
    np.testing.assert_array_equal(x, [[0.25, 0.75, 1.25]] * 2)
    np.testing.assert_array_equal(y, [[0.25] * 3, [0.75] * 3])


def _write_fields(tmp_path, **changes):
    video = _video()
    fields = dict(
        c=video.c,
        mask=video.mask,
        t=video.t,
        pixel_size=video.pixel_size,
        mu_e=video.mu_e,
        sigma=video.sigma,
    )
    fields.update(changes)
    fields = {k: v for k, v in fields.items() if v is not None}
    path = tmp_path / "bad.npz"
    np.savez(path, **fields)
    return path


def _raises(path, field, text):
    with pytest.raises(InputError) as info:
        read_video(path)
    assert info.value.field == field, str(info.value)
    assert str(path) in str(info.value)
    assert text in str(info.value), str(info.value)


def _bad(**changes):
    return changes


BAD = {
    "missing c": ("c", "no such field", dict(c=None)),
    "missing pixel_size": ("pixel_size", "no such field", dict(pixel_size=None)),
    "c 2-d": ("c", "(T, H, W)", dict(c=np.zeros((12, 14)))),
    "mask shape": ("mask", "shape (12, 13)", dict(mask=np.ones((12, 13), dtype=np.int64))),
    "mask float": ("mask", "integer", dict(mask=np.ones((12, 14)))),
    "t length": ("t", "shape (3,)", dict(t=np.arange(3.0))),
    "t 2-d": ("t", "shape (4, 1)", dict(t=np.arange(4.0)[:, None])),
    "t decreasing": ("t", "t[1]=2.0 >= t[2]=1.0", dict(t=np.array([0.0, 2.0, 1.0, 3.0]))),
    "t repeated": ("t", "strictly increasing", dict(t=np.array([0.0, 1.0, 1.0, 3.0]))),
    "t nan": ("t", "finite", dict(t=np.array([0.0, np.nan, 2.0, 3.0]))),
    "pixel_size zero": ("pixel_size", "positive", dict(pixel_size=0.0)),
    "pixel_size vector": ("pixel_size", "scalar", dict(pixel_size=np.ones(2))),
    "mu_e shape": ("mu_e", "shape (5,)", dict(mu_e=np.zeros(5))),
    "mu_e nan": ("mu_e", "1 NaN", dict(mu_e=np.array([0.0, np.nan, 0.0, 0.0]))),
    "sigma zero": ("sigma", "positive", dict(sigma=0.0)),
    "sigma negative array": ("sigma", "minimum -1", dict(sigma=np.full((4, 12, 14), -1.0))),
    "sigma shape": ("sigma", "shape (4, 12)", dict(sigma=np.ones((4, 12)))),
    "voltage without v_ref": (
        "v_ref",
        "no such field",
        dict(mu_e=None, voltage=np.ones(4), temperature=300.0),
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_field(tmp_path, case):
    field, text, changes = BAD[case]
    _raises(_write_fields(tmp_path, **changes), field, text)


def test_c_out_of_range(tmp_path):
    c = _video().c.copy()
    c[2, 3, 4] = 1.7
    _raises(_write_fields(tmp_path, c=c), "c", "range [")
    c[2, 3, 4] = -0.6
    _raises(_write_fields(tmp_path, c=c), "c", "[-0.6")


def test_c_infinite(tmp_path):
    c = _video().c.copy()
    c[0, 3, 4] = np.inf
    _raises(_write_fields(tmp_path, c=c), "c", "1 infinite")


def test_label_without_pixels(tmp_path):
    mask = _video().mask.copy()
    mask[mask == 2] = 3
    _raises(_write_fields(tmp_path, mask=mask), "mask", "label(s) [2] with no pixels")


def test_negative_label(tmp_path):
    mask = _video().mask.copy()
    mask[0, 0] = -1
    _raises(_write_fields(tmp_path, mask=mask), "mask", "label -1")


def test_empty_mask(tmp_path):
    _raises(_write_fields(tmp_path, mask=np.zeros((12, 14), dtype=np.int64)), "mask", "no labelled")


def test_particle_never_observed(tmp_path):
    video = _video()
    c = video.c.copy()
    c[:, video.mask == 2] = np.nan
    _raises(_write_fields(tmp_path, c=c), "c", "particle(s) [2] never observed")


def test_border_warning(tmp_path):
    video = _video()
    mask = video.mask.copy()
    mask[0:3, 3:8] = 1
    with pytest.warns(UserWarning, match="particle 1 touches the image border"):
        messages = validate_video(video._replace(mask=mask), "x.npz")
    assert len(messages) == 1 and "x.npz" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert validate_video(video, "x.npz") == []


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "video.mat"
    path.write_bytes(b"x")
    _raises(path, None, "suffix '.mat'")


def test_missing_file(tmp_path):
    _raises(tmp_path / "none.npz", None, "no such file")


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"video{suffix}"
    path.write_bytes(b"this is not a video" * 10)
    _raises(path, None, "a readable")


def test_tif_corrupt_and_missing(tmp_path):
    write_video(tmp_path / "s", _video())
    (tmp_path / "s" / "video.json").write_text("{not json")
    _raises(tmp_path / "s", None, "JSON")
    (tmp_path / "s" / "video.json").unlink()
    _raises(tmp_path / "s", None, "no such file")
    write_video(tmp_path / "s", _video())
    (tmp_path / "s" / "mask.tif").write_bytes(b"garbage")
    _raises(tmp_path / "s", "mask", "a readable TIFF")
    (tmp_path / "s" / "mask.tif").unlink()
    _raises(tmp_path / "s", "mask", "no such field")


def test_tif_sidecar_voltage(tmp_path):
    write_video(tmp_path / "s", _video())
    meta = json.loads((tmp_path / "s" / "video.json").read_text())
    del meta["mu_e"]
    meta.update(voltage=[3.5] * 4, v_ref=3.42, temperature=298.15)
    (tmp_path / "s" / "video.json").write_text(json.dumps(meta))
    video = read_video(tmp_path / "s")
    np.testing.assert_allclose(video.mu_e, -0.08 / 0.0256926, rtol=1e-4)


def test_tif_three_frames_not_rgb(tmp_path):
    video = _video(nt=3)
    write_video(tmp_path / "s", video)
    _same(video, read_video(tmp_path / "s"))
