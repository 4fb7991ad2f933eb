"""``femkin prepare`` end to end: files on disk -> video contract + PNG, with and without a case
file; user errors exit with code 2 and one line."""

from __future__ import annotations

import numpy as np
import pytest

from femkin.cli import main
from femkin.io.video import read_video
from femkin.stxm.nexus import write_nexus
from femkin.stxm.stk import write_stk
from femkin.stxm.synthetic import make_synthetic, reference_spectra, write_references_csv


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw")
    syn = make_synthetic(shape=(40, 40), n_times=2, seed=5, max_drift=1.0, time_drift=2.0)
    for k, s in enumerate(syn.stacks):
        write_nexus(folder / f"s{k}.h5", s)
        write_stk(folder / f"s{k}.stk", s)
    e = np.linspace(700.0, 720.0, 81)
    write_references_csv(folder / "refs.csv", e, reference_spectra(e))
    return folder, syn


def test_prepare_cli_writes_video_and_png(raw, tmp_path, capsys):
    folder, syn = raw
    out = tmp_path / "case" / "data" / "video.npz"
    rc = main(
        [
            "prepare",
            str(folder / "s0.h5"),
            str(folder / "s1.h5"),
            "--references",
            str(folder / "refs.csv"),
            "--out",
            str(out),
            "--min-size",
            "10",
            "--bootstrap",
            "20",
        ]
    )
    assert rc == 0
    assert "2 frame(s), 2 particle(s)" in capsys.readouterr().out
    video = read_video(out)
    assert video.c.shape == (2, 40, 40) and video.mask.max() == 2
    np.testing.assert_allclose(video.t, [0.0, 60.0])
    assert video.pixel_size == pytest.approx(0.05)
    inside = video.mask > 0
    assert np.isnan(video.c[:, ~inside]).all()
    assert np.isfinite(video.c[:, inside]).mean() > 0.95
    assert np.nanmin(video.sigma) >= 1e-3 and np.nanmedian(video.sigma) < 0.2
    # frame 1 has a Li-rich region (c ~ 0.85), frame 0 is Li-poor (c ~ 0.15)
    assert np.nanmean(video.c[0]) < 0.3 < np.nanmean(video.c[1])
    png = out.parent / "video_summary.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prepare_from_case_with_overrides(raw, tmp_path, capsys):
    folder, _ = raw
    case = tmp_path / "case"
    case.mkdir()
    (case / "case.toml").write_text(
        '[data]\nvideo = "data/video.h5"\n'
        "[prepare]\n"
        f'stacks = ["{folder / "s0.stk"}", "{folder / "s1.stk"}"]\n'
        f'references = "{folder / "refs.csv"}"\n'
        'out = "data/video.h5"\ntimes = [0.0, 30.0]\nmin_size = 10\nthreshold = 0.3\n'
    )
    assert main(["prepare", "--case", str(case), "--times", "0", "45", "--bootstrap", "10"]) == 0
    video = read_video(case / "data" / "video.h5")
    np.testing.assert_allclose(video.t, [0.0, 45.0])  # the command line wins
    assert video.mask.max() == 2
    assert (case / "data" / "video_summary.png").is_file()


def test_prepare_cli_user_errors(raw, tmp_path, capsys):
    folder, _ = raw
    rc = main(
        [
            "prepare",
            str(folder / "s0.stk"),
            "--references",
            str(folder / "refs.csv"),
            "--out",
            str(tmp_path / "v.npz"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "timestamp" in err and "--times" in err and err.count("\n") == 1
    rc = main(["prepare", str(folder / "s0.h5")])
    assert rc == 2 and "references" in capsys.readouterr().err
    assert not (tmp_path / "v.npz").exists()
