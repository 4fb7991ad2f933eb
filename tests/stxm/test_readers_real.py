"""Readers on every real sample file in shared/data/stxm-samples (skipped when absent):
shapes, energies, axis orders and first values, checked against the files' own text/HDF5."""

from __future__ import annotations

import datetime

import h5py
import numpy as np
import pytest

from femkin.errors import InputError
from femkin.stxm import read_stack
from femkin.stxm.als import parse_header


def test_max_iv_hdr_stack(stxm_samples):
    path = stxm_samples / "orange-spectroscopy" / "max_iv.hdr"
    with pytest.warns(UserWarning, match="Image001_0 says Energy = 718"):
        s = read_stack(path)
    assert s.counts.shape == (2, 10, 10)
    np.testing.assert_array_equal(s.energies, [698.0, 700.0])
    assert s.x[0] == pytest.approx(-188.2969) and s.x[-1] == pytest.approx(-187.8469)
    assert s.y[0] == pytest.approx(6061.1806) and s.y[-1] == pytest.approx(6061.6306)
    assert s.pixel_size == pytest.approx(0.05)
    # first line of max_iv_a000.xim is row 0 (y[0]); its columns run along x
    np.testing.assert_array_equal(s.counts[0, 0, :4], [1251, 1281, 1275, 1303])
    np.testing.assert_array_equal(s.counts[0, 1, :3], [1262, 1277, 1271])
    assert s.counts[0].min() == 1247 and s.counts[0].max() == 1304
    assert s.counts[1].min() == 1228 and s.counts[1].max() == 1303
    np.testing.assert_allclose(s.dwell, [1e-3, 1e-3])
    assert s.timestamp == datetime.datetime(2020, 10, 15, 11, 59, 33)
    assert s.metadata["channel"] == "PMT"
    assert s.metadata["image_times"][1] == datetime.datetime(2020, 10, 15, 13, 2, 42)


def test_igbemx_single_image(stxm_samples):
    s = read_stack(stxm_samples / "igbemx-stxm_parser" / "30529000.hdr")
    assert s.counts.shape == (1, 200, 200)
    np.testing.assert_array_equal(s.energies, [708.4])
    assert s.x[0] == pytest.approx(5400.83) and s.x[-1] == pytest.approx(5450.58)
    assert s.y[0] == pytest.approx(-2.43) and s.y[-1] == pytest.approx(47.32)
    np.testing.assert_array_equal(s.counts[0, 0, :3], [749, 709, 741])
    assert (s.counts.min(), s.counts.max()) == (225, 870)
    assert s.dwell[0] == pytest.approx(0.5e-3)
    assert s.timestamp == datetime.datetime(2003, 5, 29, 4, 45, 38)


def test_point_scan_header_parses_but_is_rejected(stxm_samples):
    path = stxm_samples / "igbemx-stxm_parser" / "30523005.hdr"
    hdr = parse_header(path)
    energies = hdr["ScanDefinition"]["Regions"][0]["PAxis"]["Points"]  # spectra: PAxis = energy
    assert len(energies) == 121 and energies[0] == 280 and energies[-1] == 310
    with pytest.raises(InputError, match="NEXAFS Point Scan"):
        read_stack(path)


def test_diamond_axis_attribute_layout(stxm_samples):
    path = stxm_samples / "orange-spectroscopy" / "small_diamond_nxs.nxs"
    s = read_stack(path)
    assert s.metadata["layout"] == "nxstxm-axis"
    assert s.counts.shape == (8, 7, 6)  # (photon_energy, sample_y, sample_x)
    np.testing.assert_allclose(s.energies[[0, -1]], [278.0, 282.2])
    assert s.y.size == 7 and s.x.size == 6
    with h5py.File(path) as f:
        np.testing.assert_array_equal(s.counts, f["entry1/Counter1/data"][()])
        np.testing.assert_array_equal(s.x, f["entry1/Counter1/sample_x"][()])
    np.testing.assert_allclose(s.dwell, 0.01)
    assert s.timestamp is None


def test_pollux_stack_and_image(stxm_samples):
    folder = stxm_samples / "nexusformat-exampledata-SLS"
    s = read_stack(folder / "Sample_Stack_2021-03-16_128.hdf5")
    assert s.metadata["layout"] == "nxstxm-1.3"
    assert s.counts.shape == (4, 50, 50)
    np.testing.assert_array_equal(s.energies, [280.0, 284.5, 285.0, 320.0])
    assert s.pixel_size == pytest.approx(0.5)
    assert s.x[0] == pytest.approx(-4982.26883836) and s.y[0] == pytest.approx(5189.38790224)
    assert (s.counts.min(), s.counts.max()) == (342, 1821)
    assert s.timestamp.isoformat() == "2021-03-16T16:50:18+01:00"
    img = read_stack(folder / "Sample_Image_2021-03-16_095.hdf5")
    assert img.counts.shape == (1, 50, 50)
    np.testing.assert_array_equal(img.energies, [350.0])
    assert img.pixel_size == pytest.approx(1.0)
    np.testing.assert_array_equal(img.counts[0, 0, :3], [35, 32, 40])
    assert (img.counts.min(), img.counts.max()) == (22, 4724)


@pytest.mark.parametrize(
    "name, axes",
    [
        ("Sample_Line_2021-03-16_096.hdf5", "line_position"),
        ("Focus_2021-03-16_051.hdf5", "zone_plate"),
    ],
)
def test_pollux_line_and_focus_rejected(stxm_samples, name, axes):
    with pytest.raises(InputError, match=axes):
        read_stack(stxm_samples / "nexusformat-exampledata-SLS" / name)
