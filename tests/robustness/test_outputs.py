"""Result sets, run records, writability checks and the data checks of a fit (in process)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from femkin._fem import MPI
from femkin.errors import InputError
from femkin.io.video import Video
from femkin.meshing import estimated_cells, mesh_particle
from femkin.outputs import (
    PRIVATE,
    ResultSet,
    check_writable,
    fit_record,
    read_run_record,
    recover,
    results_dir,
)
from femkin.study import check_fit_data, check_initial_frame

COMM = MPI.COMM_SELF


def _write(folder, name, text):
    (folder / name).write_text(text)


def test_result_set_replaces_the_folder_as_one(tmp_path):
    (tmp_path / "results").mkdir()
    _write(tmp_path / "results", "old.txt", "old")
    with ResultSet(tmp_path, COMM, verb="invert", run_id="r1"):
        staged = results_dir(tmp_path)
        assert staged != tmp_path.resolve() / "results"
        _write(staged, "summary.json", "{}")
        # a reader meanwhile sees the old set only
        assert sorted(os.listdir(tmp_path / "results")) == ["old.txt"]
    assert sorted(os.listdir(tmp_path / "results")) == ["run.json", "summary.json"]
    assert read_run_record(tmp_path)["invert"]["run_id"] == "r1"
    assert results_dir(tmp_path) == tmp_path.resolve() / "results"
    assert os.listdir(tmp_path / PRIVATE) == []


def test_failed_verb_leaves_results_untouched(tmp_path):
    with ResultSet(tmp_path, COMM, verb="invert", run_id="r1"):
        _write(results_dir(tmp_path), "a.txt", "first")
    with pytest.raises(RuntimeError), ResultSet(tmp_path, COMM, verb="invert", run_id="r2"):
        _write(results_dir(tmp_path), "a.txt", "second")
        raise RuntimeError("killed while writing")
    assert (tmp_path / "results" / "a.txt").read_text() == "first"
    assert read_run_record(tmp_path)["invert"]["run_id"] == "r1"
    assert os.listdir(tmp_path / PRIVATE) == []


def test_keep_existing_adds_to_the_set_and_records_both_runs(tmp_path):
    with ResultSet(tmp_path, COMM, verb="invert", run_id="fit"):
        _write(results_dir(tmp_path), "summary.json", "{}")
    with ResultSet(
        tmp_path, COMM, verb="uq", run_id="uq1", keep_existing=True, record={"fit_run_id": "fit"}
    ):
        _write(results_dir(tmp_path), "uq.json", "{}")
    assert sorted(os.listdir(tmp_path / "results")) == ["run.json", "summary.json", "uq.json"]
    runs = read_run_record(tmp_path)
    assert runs["invert"]["run_id"] == "fit" and runs["uq"]["fit_run_id"] == "fit"
    # a new fit starts a fresh set: the old uq.json must not survive beside it
    with ResultSet(tmp_path, COMM, verb="invert", run_id="fit2"):
        _write(results_dir(tmp_path), "summary.json", "{}")
    assert sorted(os.listdir(tmp_path / "results")) == ["run.json", "summary.json"]


def test_recover_undoes_a_half_done_swap(tmp_path):
    private = tmp_path / PRIVATE
    old = private / "old-results-staging-results-r1"
    old.mkdir(parents=True)
    _write(old, "summary.json", "{}")
    (private / "staging-results-r2").mkdir()
    recover(tmp_path)
    assert os.listdir(tmp_path / "results") == ["summary.json"]
    assert os.listdir(private) == []


def test_check_writable_names_the_folder(tmp_path):
    check_writable(COMM, tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="file/sub.*writable folder"):
        check_writable(COMM, blocker / "sub")
    with pytest.raises(InputError, match=r"MiB free"):
        check_writable(COMM, tmp_path, min_free_mb=1e12)


def _fit_case(tmp_path, *, done: bool, fit_run="r1", ckpt_run="r1"):
    results = tmp_path / "results"
    results.mkdir()
    (results / "summary.json").write_text(json.dumps({"tao_reason": "CONVERGED_GATOL"}))
    (results / "run.json").write_text(json.dumps({"invert": {"run_id": fit_run}}))
    state = {"history": [{"iteration": 7}], "run_id": ckpt_run}
    if done:
        state["done"] = True
    return state


def test_fit_record(tmp_path):
    state = _fit_case(tmp_path, done=True)
    rec = fit_record(state, tmp_path, "ckpt")
    assert rec == {
        "run_id": "r1",
        "finished": True,
        "converged": True,
        "stop_reason": "CONVERGED_GATOL",
        "iterations": 7,
        "allow_unfinished": False,
    }


def test_fit_record_refuses_unfinished_unless_allowed(tmp_path):
    state = _fit_case(tmp_path, done=False)
    with pytest.raises(InputError, match="unfinished fit, stopped at iteration 7"):
        fit_record(state, tmp_path, "ckpt")
    rec = fit_record(state, tmp_path, "ckpt", allow_unfinished=True)
    assert rec["allow_unfinished"] and not rec["finished"] and rec["stop_reason"] == "unfinished"


def test_fit_record_refuses_results_of_another_run(tmp_path):
    state = _fit_case(tmp_path, done=True, fit_run="r0", ckpt_run="r1")
    with pytest.raises(InputError, match="results of run r0"):
        fit_record(state, tmp_path, "ckpt")


def _video(T=4):
    mask = np.zeros((6, 6), dtype=np.int64)
    mask[1:3, 1:3] = 1
    mask[3:5, 3:5] = 2
    c = np.full((T, 6, 6), np.nan)
    c[:, mask > 0] = 0.5
    return Video(c, mask, np.arange(T, dtype=float), 0.05, mu_e=np.zeros(T))


def test_initial_frame_names_the_particle():
    video = _video()
    check_initial_frame(video, "v.npz")
    video.c[0][video.mask == 2] = np.nan
    with pytest.raises(InputError, match="particle 2 observed in the first frame.*frame 1"):
        check_initial_frame(video, "v.npz")


def test_fit_data_checks():
    video = _video()
    assert check_fit_data(video, 0.05, "v.npz") == []
    sigma = np.full(video.c.shape, 0.05)
    sigma[2, 1, 1] = np.nan
    with pytest.raises(InputError, match=r"1 observed pixel\(s\) with sigma NaN.*frame 2"):
        check_fit_data(video, sigma, "v.npz")
    video.c[2][video.mask == 1] = 1.2  # 4 pixels 4 sigma above 1
    video.c[3][1, 1] = 1.1  # 2 sigma: noise
    (msg,) = check_fit_data(video, 0.05, "v.npz")
    assert "4 observed value(s)" in msg and "frame 2: 4" in msg
    video.c[1:] = np.nan
    with pytest.raises(InputError, match="nothing to fit"):
        check_fit_data(video, 0.05, "v.npz")
    assert check_fit_data(video, 0.05, "v.npz", include_first=True) == []  # frame 0 is data
    check_fit_data(video, 0.05, "v.npz", require_data=False)


def test_cell_estimate_close_to_gmsh_and_limit(tmp_path):
    ii, jj = np.mgrid[0:40, 0:40]
    mask = (((ii - 19.5) / 15) ** 2 + ((jj - 19.5) / 12) ** 2 <= 1).astype(np.int64)
    for size in (3.0, 1.0, 0.5):
        pm = mesh_particle(mask, 1, 0.05, COMM, size=size, cache_dir=tmp_path / "meshes")
        cells = pm.mesh.topology.index_map(2).size_global
        estimate = estimated_cells(mask, 1, size)
        assert 0.8 < estimate / cells < 1.2, (size, estimate, cells)
    with pytest.raises(InputError, match=r"max_cells = 100 triangles for particle 1 \(size >= "):
        mesh_particle(mask, 1, 0.05, COMM, size=0.5, max_cells=100)
    assert list((tmp_path / "meshes").glob(".femkin/*")) == []


@pytest.mark.mpi
def test_result_set_collective(mpi_tmp_path):
    """Every rank writes its part into the staged set; all parts appear together."""
    comm = MPI.COMM_WORLD
    check_writable(comm, mpi_tmp_path / "results")
    run_id = comm.bcast("r-mpi" if comm.rank == 0 else None, root=0)
    with ResultSet(mpi_tmp_path, comm, verb="invert", run_id=run_id):
        staged = results_dir(mpi_tmp_path)
        _write(staged, f"part_{comm.rank}.txt", str(comm.rank))
        comm.barrier()
        assert not (mpi_tmp_path / "results" / f"part_{comm.rank}.txt").exists()
    names = sorted(os.listdir(mpi_tmp_path / "results"))
    assert names == sorted([f"part_{r}.txt" for r in range(comm.size)] + ["run.json"])
    assert read_run_record(mpi_tmp_path)["invert"]["run_id"] == "r-mpi"
    comm.barrier()
