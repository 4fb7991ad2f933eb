"""From raw stacks to a posterior with ``femkin run``: prepare runs when its video is stale and
is skipped while it is current; ``femkin init`` writes a case file that loads and meshes."""

from __future__ import annotations

import json
import os
import shutil
import tomllib

import numpy as np
import pytest
from conftest import REPO

from femkin._fem import MPI
from femkin.case import SCHEMA, load_case
from femkin.cli import main
from femkin.commands.prepare import prepare_case
from femkin.io.video import Video, read_video, write_video
from femkin.stxm.nexus import write_nexus
from femkin.stxm.provenance import input_files, record_path, stale_reason, write_record
from femkin.stxm.synthetic import make_synthetic, reference_spectra, write_references_csv

STACKS_CASE = REPO / "cases" / "stacks"


def _raw_case(root, *, n_times=2):
    """A case whose [prepare] names two small NeXus stacks (rank 0 writes it)."""
    syn = make_synthetic(shape=(40, 40), n_times=n_times, seed=4, max_drift=0.5, time_drift=1.0)
    raw = root / "raw"
    raw.mkdir(parents=True)
    for k, s in enumerate(syn.stacks):
        write_nexus(raw / f"s{k}.h5", s)
    e = np.linspace(700.0, 720.0, 41)
    write_references_csv(raw / "refs.csv", e, reference_spectra(e))
    stacks = ", ".join(f'"raw/s{k}.h5"' for k in range(n_times))
    (root / "case.toml").write_text(
        '[data]\nvideo = "data/video.npz"\n'
        f'[prepare]\nstacks = [{stacks}]\nreferences = "raw/refs.csv"\n'
        "min_size = 10\nbootstrap = 5\n"
    )
    return syn


@pytest.mark.mpi
def test_prepare_skipped_while_current(mpi_tmp_path, capsys):
    comm = MPI.COMM_WORLD
    case = mpi_tmp_path / "case"
    if comm.rank == 0:
        _raw_case(case)
    comm.barrier()
    video = case / "data" / "video.npz"
    assert prepare_case(case, comm, quiet=True) is True
    made = video.stat().st_mtime_ns
    assert prepare_case(case, comm, quiet=True) is False  # current: not made again
    assert video.stat().st_mtime_ns == made

    if comm.rank == 0:  # touched but unchanged: still current (hash compared)
        os.utime(case / "raw" / "s0.h5", ns=(made + 10**9, made + 10**9))
    comm.barrier()
    assert prepare_case(case, comm) is False
    out = capsys.readouterr().out
    if comm.rank == 0:
        assert "is current" in out and "skipped" in out

    if comm.rank == 0:  # a changed setting makes it stale
        text = (case / "case.toml").read_text().replace("min_size = 10", "min_size = 12")
        (case / "case.toml").write_text(text)
    comm.barrier()
    assert prepare_case(case, comm, quiet=True) is True
    assert video.stat().st_mtime_ns != made


def test_stale_reasons(tmp_path):
    """Every way a prepared video goes stale, on stand-in files (no prepare run)."""
    stacks = [tmp_path / "a.hdr", tmp_path / "b.h5"]
    stacks[0].write_text("header")
    (tmp_path / "a_a000.xim").write_text("1 2\n3 4\n")  # an ALS header's image
    stacks[1].write_bytes(b"stack b")
    refs = tmp_path / "refs.csv"
    refs.write_text("energy,LiFePO4,FePO4\n")
    out = tmp_path / "video.npz"
    files = input_files(stacks, refs)
    assert [f.name for f in files] == ["a.hdr", "a_a000.xim", "b.h5", "refs.csv"]
    settings = {"min_size": 20, "threshold": None, "times": [0.0, 60.0]}
    assert "does not exist" in stale_reason(out, settings, files)
    out.write_bytes(b"video")
    assert "record" in stale_reason(out, settings, files)
    write_record(out, settings, files)
    assert stale_reason(out, settings, files) is None
    assert "min_size" in stale_reason(out, {**settings, "min_size": 21}, files)
    assert "times" in stale_reason(out, {**settings, "times": [0.0, 30.0]}, files)
    st = stacks[1].stat()
    os.utime(stacks[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes
    assert stale_reason(out, settings, files) is None
    (tmp_path / "a_a000.xim").write_text("1 2\n3 5\n")  # same size, new content
    assert stale_reason(out, settings, files).endswith("a_a000.xim changed")
    write_record(out, settings, files)
    assert "list of input files" in stale_reason(out, settings, files[1:])
    refs.unlink()
    assert stale_reason(out, settings, files).endswith("refs.csv is missing")
    record_path(out).write_text("{not json")
    assert "unreadable" in stale_reason(out, settings, files)


def test_run_rejects_prepare_out_other_than_data_video(tmp_path, capsys):
    _raw_case(tmp_path / "case")
    text = (tmp_path / "case" / "case.toml").read_text() + 'out = "data/other.npz"\n'
    (tmp_path / "case" / "case.toml").write_text(text)
    assert main(["run", str(tmp_path / "case"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "prepare.out" in err and "data/video.npz" in err
    assert not (tmp_path / "case" / "data").exists()


def _small_stacks_case(root):
    """cases/stacks with a smaller posterior budget (the same prepare, model and fit budget)."""
    shutil.copytree(STACKS_CASE, root, ignore=shutil.ignore_patterns("data", "results", "meshes"))
    text = (root / "case.toml").read_text()
    text = text.replace("max_rank = 6", "max_rank = 3").replace("samples = 3", "samples = 1")
    (root / "case.toml").write_text(text)


@pytest.mark.mpi
def test_run_stacks_case_end_to_end(mpi_tmp_path, capsys):
    comm = MPI.COMM_WORLD
    case = mpi_tmp_path / "stacks"
    if comm.rank == 0:
        _small_stacks_case(case)
    comm.barrier()
    assert main(["run", str(case)]) == 0
    out = capsys.readouterr().out
    video = read_video(case / "data" / "video.npz")
    # prepare recovers the analytic scene's Li fraction (make_data.py prints the truth)
    inside = video.mask > 0
    mean_c = [float(np.nanmean(f[inside])) for f in video.c]
    np.testing.assert_allclose(mean_c, [0.150, 0.198, 0.389, 0.506], atol=0.02)
    assert video.mask.max() == 2
    summary = json.loads((case / "results" / "summary.json").read_text())
    assert summary["iterations"] == 4  # the case's budget (Newton-CG, not converged there)
    assert summary["converged"] is False and "iteration cap" in summary["stop_reason"]
    assert summary["misfit_rms"] < 0.2  # from about 0.32 at the initial guess (RMS/sigma 15)
    for name in ("report.md", "k_1.npy", "k_2.npy"):
        assert (case / "results" / name).exists(), name
    if comm.rank == 0:
        assert "prepare (" in out and "does not exist" in out

    # the second run skips prepare: the video keeps its time stamp
    made = (case / "data" / "video.npz").stat().st_mtime_ns
    assert main(["run", str(case), "--quiet"]) == 0
    assert (case / "data" / "video.npz").stat().st_mtime_ns == made


def test_init_from_video_writes_case_that_meshes(tmp_path, capsys):
    data = tmp_path / "case" / "data"
    data.mkdir(parents=True)
    mask = np.zeros((14, 30), dtype=np.int64)
    mask[3:11, 2:12] = 1
    mask[4:10, 17:27] = 2
    t = np.array([0.0, 30.0, 60.0])
    c = np.where(mask > 0, 0.0, np.nan)[None] + np.array([0.8, 0.6, 0.4])[:, None, None]
    write_video(data / "movie.npz", Video(c, mask, t, 0.04, sigma=0.03))
    assert main(["init", str(tmp_path / "case"), "--video", str(data / "movie.npz")]) == 0
    out = capsys.readouterr().out
    text = (tmp_path / "case" / "case.toml").read_text()
    raw = tomllib.loads(text)
    assert raw["data"]["video"] == "data/movie.npz"  # inside the case: relative
    # the data's facts, in the header comments and the report
    for fact in (
        "2 particle(s): 1 (80 px), 2 (60 px)",
        "pixel size 0.04 um",
        "3 frame(s) over 0..60 s",
        "noise sigma: present",
        "neither mu_e nor voltage",
    ):
        assert fact in text and fact in out, fact
    # no drive in the video: mu_e is fitted, starting below mu_h (the data delithiate)
    assert raw["driving"] == {"mode": "fitted", "t": [0.0, 60.0], "mu_e": [-2.0, -2.0]}
    # every schema section is written, with defaults that load as they are
    for section in SCHEMA:
        assert f"[{section}]" in text
    case = load_case(tmp_path / "case")
    assert case.mesh["size"] == SCHEMA["mesh"]["size"].default
    assert case.inversion["prior"]["m_std"] == SCHEMA["inversion"]["prior"]["m_std"].default
    assert case.simulate is None  # commented out: not a twin experiment
    assert main(["mesh", str(tmp_path / "case")]) == 0
    assert len(list((tmp_path / "case" / "meshes").glob("particle_*_*.msh"))) == 2
    # an existing case is not overwritten without --force
    assert main(["init", str(tmp_path / "case"), "--video", str(data / "movie.npz")]) == 2
    assert "--force" in capsys.readouterr().err


def test_init_from_stacks_prepares_and_records(tmp_path, capsys):
    syn = _raw_case(tmp_path / "src")
    stacks = [str(tmp_path / "src" / "raw" / f"s{k}.h5") for k in range(2)]
    refs = str(tmp_path / "src" / "raw" / "refs.csv")
    case = tmp_path / "new"
    assert main(["init", str(case), "--stacks", *stacks, "--references", refs]) == 0
    raw = tomllib.loads((case / "case.toml").read_text())
    assert raw["prepare"]["stacks"] == stacks and raw["prepare"]["references"] == refs
    video = read_video(case / "data" / "video.npz")
    assert video.mask.max() == 2 and video.c.shape == (2, 40, 40)
    np.testing.assert_allclose(video.t, syn.times)
    text = (case / "case.toml").read_text()
    assert "2 particle(s)" in text and "pixel size 0.05 um" in text and "2 frame(s)" in text
    # femkin run would not prepare again
    capsys.readouterr()
    assert prepare_case(case, MPI.COMM_WORLD) is False
    assert main(["init", str(tmp_path / "other"), "--stacks", *stacks]) == 2
    assert "--references" in capsys.readouterr().err
