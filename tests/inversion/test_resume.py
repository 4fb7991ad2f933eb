"""``femkin invert --resume``: a fit killed at any iteration and resumed gives the uninterrupted
run's answer (coefficients and m to 1e-8 relative, the same iteration count and history), on
one rank (real SIGKILL, or the hard-exit test hook after the k-th checkpoint) and on two
(in-process, the hook raising instead). Resuming a finished fit, resuming without a
checkpoint and resuming a checkpoint of other inputs are one-line outcomes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from workflow_case import write_case

from femkin._fem import MPI
from femkin.inversion import checkpoint as checkpoint_module

CLI = "from femkin.cli import main; import sys; sys.exit(main(sys.argv[1:]))"
SERIAL = pytest.mark.skipif(MPI.COMM_WORLD.size > 1, reason="drives serial subprocesses")
_BASE: dict = {}


def _femkin(*args, env=None):
    return subprocess.run(
        [sys.executable, "-c", CLI, *map(str, args)],
        capture_output=True,
        text=True,
        env=None if env is None else {**os.environ, **env},
        timeout=600,
    )


def _base_case(root):
    """A simulated 60-pixel, 4-frame twin (mu_h, j0, k0 and m learned), made once per session."""
    if "case" not in _BASE:
        case = write_case(root, max_iterations=30, n_frames=4)
        r = _femkin("simulate", case, "--quiet")
        assert r.returncode == 0, r.stderr
        _BASE["case"] = case
    return _BASE["case"]


def _copy(base, dest):
    shutil.copytree(base, dest, ignore=shutil.ignore_patterns("results", "checkpoints"))
    return dest


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted fit (serial), its final parameters and summary."""
    if MPI.COMM_WORLD.size > 1:
        pytest.skip("serial reference")
    base = _base_case(tmp_path_factory.mktemp("base") / "case")
    case = _copy(base, tmp_path_factory.mktemp("ref") / "case")
    r = _femkin("invert", case, "--quiet")
    assert r.returncode == 0, r.stderr
    return case, *_final(case)


def _final(case):
    """(parameter blocks of the final checkpoint, its state, summary.json)."""
    with np.load(case / "checkpoints" / "state.npz") as z:
        state = json.loads(str(z["__state__"]))
        blocks = {k: z[k] for k in z.files if k != "__state__" and not k.endswith("coordinates")}
    summary = json.loads((case / "results" / "summary.json").read_text())
    return blocks, state, summary


def _relative(a, b) -> float:
    num = sum(float(np.sum((a[k] - b[k]) ** 2)) for k in b)
    return float(np.sqrt(num / sum(float(np.sum(b[k] ** 2)) for k in b)))


def _assert_same_fit(case, reference):
    _, ref_blocks, ref_state, ref_summary = reference
    blocks, state, summary = _final(case)
    assert sorted(blocks) == sorted(ref_blocks)
    assert _relative(blocks, ref_blocks) < 1e-8, _relative(blocks, ref_blocks)
    assert summary["iterations"] == ref_summary["iterations"]
    assert summary["tao_reason"] == ref_summary["tao_reason"]
    assert summary["converged"] is True
    np.testing.assert_allclose(
        [h["objective"] for h in state["history"]],
        [h["objective"] for h in ref_state["history"]],
        rtol=1e-10,
    )


def test_reference_converges(reference):
    _, _, state, summary = reference
    assert summary["converged"] is True and summary["tao_reason"] == "CONVERGED_DECREMENT"
    c = summary["convergence"]
    assert c["decrement"] < c["decrement_tol"] == 1e-3
    assert c["iterations"] == summary["iterations"] == len(state["history"]) - 1 >= 5
    assert c["hessian_actions"] == sum(
        h.get("cg_iterations", 0) + h.get("discarded_cg_iterations", 0) for h in state["history"]
    )
    assert "converged" in summary["stop_reason"] and "NOT" not in summary["stop_reason"]


@SERIAL
@pytest.mark.parametrize("kill_at", [0, 4])
def test_hard_exit_after_checkpoint_then_resume(reference, tmp_path, kill_at):
    case = _copy(reference[0], tmp_path / "case")
    r = _femkin(
        "invert", case, "--quiet", env={checkpoint_module.EXIT_AFTER_CHECKPOINT: str(kill_at)}
    )
    assert r.returncode == 137, r.stderr
    assert not (case / "results" / "summary.json").exists()
    with np.load(case / "checkpoints" / "state.npz") as z:
        assert json.loads(str(z["__state__"]))["iteration"] == kill_at
    r = _femkin("invert", case, "--resume", "--quiet")
    assert r.returncode == 0, r.stderr
    _assert_same_fit(case, reference)


@SERIAL
def test_sigkill_then_resume(reference, tmp_path):
    """A real SIGKILL at whatever moment the third checkpoint is seen (maybe mid-write)."""
    case = _copy(reference[0], tmp_path / "case")
    ckpt = case / "checkpoints" / "state.npz"
    proc = subprocess.Popen([sys.executable, "-c", CLI, "invert", str(case), "--quiet"])
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        try:
            with np.load(ckpt) as z:
                if json.loads(str(z["__state__"]))["iteration"] >= 3:
                    break
        except (OSError, ValueError, KeyError, EOFError):  # absent or replaced while read
            pass
        time.sleep(0.02)
    assert proc.poll() is None, "the fit finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (case / "results" / "summary.json").exists()
    r = _femkin("invert", case, "--resume", "--quiet")
    assert r.returncode == 0, r.stderr
    _assert_same_fit(case, reference)


@SERIAL
def test_resume_of_a_finished_fit_leaves_results(reference, tmp_path):
    case = _copy(reference[0], tmp_path / "case")
    shutil.copytree(reference[0] / "results", case / "results")
    shutil.copytree(reference[0] / "checkpoints", case / "checkpoints")
    before = {p.name: p.read_bytes() for p in (case / "results").iterdir()}
    stamp = (case / "results" / "summary.json").stat().st_mtime_ns
    r = _femkin("invert", case, "--resume")
    assert r.returncode == 0, r.stderr
    assert "already finished" in r.stdout and r.stderr == ""
    assert {p.name: p.read_bytes() for p in (case / "results").iterdir()} == before
    assert (case / "results" / "summary.json").stat().st_mtime_ns == stamp


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("femkin: error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@SERIAL
def test_resume_needs_a_checkpoint(reference, tmp_path):
    case = _copy(reference[0], tmp_path / "case")
    _one_line_error(_femkin("invert", case, "--resume"), "state.npz", "--resume-or-start")
    assert not (case / "results").exists()
    text = (case / "case.toml").read_text().replace("max_iterations = 30", "max_iterations = 1")
    (case / "case.toml").write_text(text)
    r = _femkin("invert", case, "--resume-or-start", "--quiet")
    assert r.returncode == 0, r.stderr
    summary = json.loads((case / "results" / "summary.json").read_text())
    assert summary["iterations"] == 1 and summary["converged"] is False
    assert summary["tao_reason"] == "DIVERGED_MAXITS" and "NOT converged" in summary["stop_reason"]
    assert "not converged" in r.stdout.lower()  # the warning line


@SERIAL
@pytest.mark.parametrize(
    "change, named",
    [
        (("kappa = 0.004", "kappa = 0.005"), "[model]"),
        (('learn = ["mu_h", "j0", "k0", "m"]', 'learn = ["mu_h", "j0", "k0"]'), "learn"),
        (("m_std = 0.5", "m_std = 0.6"), "[inversion.prior]"),
        (("size = 1.5", "size = 1.4"), "[mesh]"),
        (None, "video"),
    ],
)
def test_resume_refuses_other_inputs(reference, tmp_path, change, named):
    case = _copy(reference[0], tmp_path / "case")
    shutil.copytree(reference[0] / "checkpoints", case / "checkpoints")
    if change is None:
        video = case / "simulated" / "video.npz"
        with np.load(video) as z:
            data = {k: z[k] for k in z.files}
        data["c"] = data["c"] + 1e-6 * np.isfinite(data["c"])
        np.savez(video, **data)
    else:
        text = (case / "case.toml").read_text()
        assert change[0] in text
        (case / "case.toml").write_text(text.replace(change[0], change[1], 1))
    _one_line_error(_femkin("invert", case, "--resume"), "other inputs", named)
    # budgets and tolerances are not inputs: raising the cap resumes
    if named != "[model]":
        return
    (case / "case.toml").write_text((reference[0] / "case.toml").read_text() + "\n")
    text = (case / "case.toml").read_text().replace("max_iterations = 30", "max_iterations = 40")
    (case / "case.toml").write_text(text)
    r = _femkin("invert", case, "--resume", "--quiet")
    assert r.returncode == 0, r.stderr


@SERIAL
@pytest.mark.parametrize(
    "edit, field",
    [
        ("max_iterations = 0", "inversion.max_iterations"),
        ('method = "tao"\ntao_type = "bnsl"', "inversion.tao_type"),
        ('method = "newtn"', "inversion.method"),
    ],
)
def test_bad_optimiser_settings_are_case_errors(reference, tmp_path, edit, field):
    case = _copy(reference[0], tmp_path / "case")
    text = (case / "case.toml").read_text().replace("max_iterations = 30", edit)
    (case / "case.toml").write_text(text)
    _one_line_error(_femkin("invert", case), field)


@pytest.mark.mpi
def test_resume_on_the_ranks_of_the_run(mpi_tmp_path, monkeypatch):
    """Under mpirun -n 2: stop after checkpoint 3 (the hook raises), resume, compare.

    Two uninterrupted 2-rank runs are not bitwise reproducible (measured: objectives differ by
    1e-16 at iteration 0, from the parallel direct solves, and 4e-6 relative in the final
    parameters; up to 6e-4 when rounding flips one CG count), so on 2 ranks the resumed run
    must reach the same minimum within the stopping tolerance (objective within
    2 decrement_tol nats, parameters within 1e-2 relative, iteration counts within one); the
    1e-8 equality is asserted on one rank above. Before issue #10 the resumed j0 was 67% off.
    """
    from femkin.commands.invert import invert

    comm = MPI.COMM_WORLD

    class Killed(BaseException):
        pass

    def hook(iteration, comm_):
        if iteration == 3:
            comm_.barrier()
            raise Killed

    case = None
    if comm.rank == 0:
        case = write_case(mpi_tmp_path / "base", max_iterations=30, n_frames=4)
    case = comm.bcast(case, root=0)
    from femkin.cli import main

    assert main(["simulate", str(case), "--quiet"]) == 0
    ref = mpi_tmp_path / "ref"
    if comm.rank == 0:
        _copy(case, ref)
    comm.barrier()
    invert(ref, quiet=True)
    killed = mpi_tmp_path / "killed"
    if comm.rank == 0:
        _copy(case, killed)
    comm.barrier()
    monkeypatch.setattr(checkpoint_module, "exit_after_checkpoint_hook", hook)
    with pytest.raises(Killed):
        invert(killed, quiet=True)
    monkeypatch.undo()
    invert(killed, resume=True, quiet=True)
    comm.barrier()
    ok, detail = True, None
    if comm.rank == 0:
        a, sa, ra = _final(ref)
        b, sb, rb = _final(killed)
        rel = _relative(b, a)
        # The same answer (parameters, objective, converged); under mpirun the iteration count
        # near the stopping test is not reproducible run to run (measured: 14 against 16 with
        # the objectives 2.4e-5 nats apart, and within one on an earlier run of the same
        # code), so it may differ by a few.
        ok = (
            rel < 1e-2
            and abs(ra["iterations"] - rb["iterations"]) <= 3
            and abs(ra["objective"] - rb["objective"]) < 2e-3
            and rb["converged"]
            and sb["iteration"] == rb["iterations"]
        )
        detail = (rel, ra["iterations"], rb["iterations"], ra["objective"], rb["objective"])
    ok = comm.bcast(ok, root=0)
    assert ok, comm.bcast(detail, root=0)


def _uq_json(case):
    """uq.json without its timings (the only entries that may differ between runs)."""

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if "time" not in k and "wall" not in k}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return strip(json.loads((case / "results" / "uq.json").read_text()))


@SERIAL
def test_uq_killed_reruns_to_the_same_result(reference, tmp_path):
    """A SIGKILLed ``femkin uq`` rerun gives the uninterrupted uq.json (seeded probes/samples)."""
    case = _copy(reference[0], tmp_path / "case")
    shutil.copytree(reference[0] / "results", case / "results")
    shutil.copytree(reference[0] / "checkpoints", case / "checkpoints")
    text = (case / "case.toml").read_text() + "[uq]\nmax_rank = 4\noversampling = 2\nsamples = 2\n"
    (case / "case.toml").write_text(text)
    r = _femkin("uq", case, "--quiet")
    assert r.returncode == 0, r.stderr
    first = _uq_json(case)
    (case / "results" / "uq.json").unlink()
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, "uq", str(case)], stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline()
    while line and not line.startswith("uq:"):  # wait until the eigensolver has finished
        line = proc.stdout.readline()
    assert line.startswith("uq:") and proc.poll() is None, line
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert not (case / "results" / "uq.json").exists()
    r = _femkin("uq", case, "--quiet")
    assert r.returncode == 0, r.stderr
    assert _uq_json(case) == first
