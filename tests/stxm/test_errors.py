"""Corrupt, truncated and mismatched inputs get InputError naming file, field, expected, found."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from femkin.errors import InputError
from femkin.stxm import prepare, read_references, read_stack
from femkin.stxm.als import write_hdr_stack
from femkin.stxm.nexus import write_nexus
from femkin.stxm.stk import write_stk
from femkin.stxm.synthetic import make_synthetic, reference_spectra, write_references_csv


@pytest.fixture(scope="module")
def stack():
    return make_synthetic(
        shape=(24, 24), n_times=1, energies=np.linspace(705, 713, 5), seed=1
    ).stacks[0]


def test_aborted_hdr_stack_is_truncated(tmp_path, stack):
    path = tmp_path / "s.hdr"
    write_hdr_stack(path, stack, n_images=3, announce=False)
    with pytest.warns(UserWarning, match="aborted stack, 3 of 5 images"):
        s = read_stack(path)
    assert s.counts.shape == (3, 24, 24)
    np.testing.assert_allclose(s.energies, stack.energies[:3], atol=1e-4)


def test_announced_image_missing_is_an_error(tmp_path, stack):
    path = tmp_path / "s.hdr"
    write_hdr_stack(path, stack)
    (tmp_path / "s_a004.xim").unlink()
    with pytest.raises(InputError, match="Image004_0.*s_a004.xim.*missing") as err:
        read_stack(path)
    assert err.value.file == str(path)


def test_gap_and_extra_images_are_errors(tmp_path, stack):
    path = tmp_path / "s.hdr"
    write_hdr_stack(path, stack)
    extra = tmp_path / "s_a005.xim"
    extra.write_bytes((tmp_path / "s_a000.xim").read_bytes())
    with pytest.raises(InputError, match="5 energies.*extra image s_a005.xim"):
        read_stack(path)
    extra.unlink()
    (tmp_path / "s_a002.xim").unlink()
    with pytest.raises(InputError, match="contiguous.*s_a002.xim missing in the middle"):
        read_stack(path)


def test_hdr_list_count_and_truncation(tmp_path, stack):
    path = tmp_path / "s.hdr"
    write_hdr_stack(path, stack)
    text = path.read_text()
    path.write_text(text.replace("Points = (5,", "Points = (6,"))
    with pytest.raises(InputError, match="StackAxis.*length \\(5\\).*found length 6"):
        read_stack(path)
    path.write_text(text[: len(text) // 3])
    with pytest.raises(InputError, match="truncated"):
        read_stack(path)


def test_xim_of_wrong_size(tmp_path, stack):
    path = tmp_path / "s.hdr"
    write_hdr_stack(path, stack)
    xim = tmp_path / "s_a001.xim"
    xim.write_text("\n".join(xim.read_text().splitlines()[:-2]))
    with pytest.raises(InputError, match="24 rows \\(y\\) x 24 columns \\(x\\).*\\(22, 24\\)"):
        read_stack(path)


def test_stk_truncated_and_garbage(tmp_path, stack):
    path = tmp_path / "s.stk"
    write_stk(path, stack)
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    with pytest.raises(InputError, match="size.*truncated"):
        read_stack(path)
    path.write_bytes(b"\x00\x00\x01\x00" * 3 + raw[12:])  # little-endian dims read big-endian
    with pytest.raises(InputError, match="nx"):
        read_stack(path)


def test_nexus_energy_count_mismatch(tmp_path, stack):
    path = tmp_path / "s.h5"
    write_nexus(path, stack)
    with h5py.File(path, "r+") as f:
        del f["entry1/counter0/energy"]
        f["entry1/counter0/energy"] = np.arange(4.0) + 700
    with pytest.raises(InputError, match="energy.*expected 5 values.*found 4"):
        read_stack(path)


def test_not_hdf5_and_unknown_suffix(tmp_path):
    bad = tmp_path / "s.h5"
    bad.write_text("not hdf5")
    with pytest.raises(InputError, match="HDF5"):
        read_stack(bad)
    other = tmp_path / "s.xyz"
    other.write_text("x")
    with pytest.raises(InputError, match="suffix '.xyz'"):
        read_stack(other)


def test_references_must_cover_energies(tmp_path, stack):
    e = np.linspace(706.0, 720.0, 20)
    path = tmp_path / "refs.csv"
    write_references_csv(path, e, reference_spectra(e))
    refs = read_references(path)
    with pytest.raises(InputError, match="covering 705-713 eV.*found 706-720 eV") as err:
        prepare([stack], refs, times=[0.0])
    assert err.value.file == str(path) and err.value.field == "energy"


def test_references_columns(tmp_path):
    path = tmp_path / "refs.csv"
    path.write_text("energy,LiFePO4,FePO\n700,1,2\n701,1,2\n")
    with pytest.raises(InputError, match="FePO4.*did you mean 'FePO'"):
        read_references(path)
    path.write_text("energy,LiFePO4,FePO4\n700,1,2\n700,1,3\n")
    with pytest.raises(InputError, match="repeated energies"):
        read_references(path)


def test_inconsistent_stacks_and_times(tmp_path, stack):
    e = np.linspace(700.0, 720.0, 41)
    path = tmp_path / "refs.csv"
    write_references_csv(path, e, reference_spectra(e))
    refs = read_references(path)
    small = stack._replace(
        counts=stack.counts[:, :20, :20], x=stack.x[:20], y=stack.y[:20], source="small"
    )
    with pytest.raises(InputError, match="24x24 images.*found 20x20"):
        prepare([stack, small], refs, times=[0, 1])
    with pytest.raises(InputError, match="2 values \\(one per stack\\)"):
        prepare([stack, stack], refs, times=[0.0])
    with pytest.raises(InputError, match="strictly increasing"):
        prepare([stack, stack], refs)  # same header time stamp twice
    with pytest.raises(InputError, match="i0_region"):
        prepare([stack], refs, i0_region=[0, 30, 0, 5], times=[0.0])
