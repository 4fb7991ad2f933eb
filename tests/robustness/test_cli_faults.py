"""Bad inputs and faults driven through the ``femkin`` command line, serially and on 2 ranks.

Every case runs in a copy of one tiny finished twin case (simulated, fitted for 2 iterations)
under a timeout, and asserts: the exit code (2 for user and environment errors, 130/143 for
signals, 1 for a bug), exactly one ``femkin:`` error line naming the cause, no traceback, no
hang, and that the results of the earlier run are unchanged. Faults on one rank only are
injected by ``inject.py`` (the other rank runs the real code).

The commands run as subprocesses (``python -m femkin.cli``, ``mpirun -n 2 ...``) from the serial
pytest run; these tests are not marked ``mpi`` (no ``mpirun`` inside ``mpirun``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from workflow_case import write_case

REPO = Path(__file__).resolve().parents[2]
INJECT = Path(__file__).with_name("inject.py")
#: Seconds any one command may take: a hang fails the test instead of stalling CI.
TIMEOUT = 300
MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
RANKS = [1, pytest.param(2, id="np2")]


def _env(**extra) -> dict:
    """The environment of a femkin subprocess (no MPI variables of an outer mpirun)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PMI_", "HYDRA_", "MPIR_", "OMPI_", "PMIX_"))
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def femkin_command(args, *, ranks: int = 1, inject=None) -> list[str]:
    """The command line of ``femkin ARGS`` (optionally with a fault injected)."""
    cmd = [sys.executable]
    cmd += [str(INJECT), *inject, "--"] if inject else ["-m", "femkin.cli"]
    cmd += [str(a) for a in args]
    if ranks > 1:
        if MPIRUN is None:
            pytest.skip("mpirun not found")
        cmd = [MPIRUN, "-n", str(ranks), *cmd]
    return cmd


class Outcome:
    def __init__(self, code: int, out: str, err: str, wall: float):
        self.code, self.out, self.err, self.wall = code, out, err, wall

    @property
    def text(self) -> str:
        return self.out + self.err

    def lines(self, prefix: str) -> list[str]:
        return [ln for ln in self.text.splitlines() if ln.startswith(prefix)]


def run(cmd, *, cwd=None, env=None, timeout=TIMEOUT, signal_after=None) -> Outcome:
    """Run a command in its own process group; kill the group and fail on a hang.

    ``signal_after``: ``(signum, predicate)``: send ``signum`` to the command once
    ``predicate(stdout so far)`` holds.
    """
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env or _env(), stdout=out, stderr=err, start_new_session=True
        )
        sent = False
        try:
            while proc.poll() is None:
                if time.monotonic() - t0 > timeout:
                    raise subprocess.TimeoutExpired(cmd, timeout)
                if signal_after is not None and not sent:
                    out.seek(0)
                    if signal_after[1](out.read()):
                        proc.send_signal(signal_after[0])
                        sent = True
                time.sleep(0.1)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out.seek(0)
            err.seek(0)
            pytest.fail(f"hung: {' '.join(map(str, cmd))}\n{out.read()}\n{err.read()}")
        out.seek(0)
        err.seek(0)
        res = Outcome(proc.returncode, out.read(), err.read(), time.monotonic() - t0)
    _log(cmd, res)
    return res


def _log(cmd, res: Outcome) -> None:
    """With FEMKIN_ROBUST_LOG=file, append each outcome as a JSON line (for the issue's table)."""
    path = os.environ.get("FEMKIN_ROBUST_LOG")
    if not path:
        return
    lines = [ln for ln in res.lines("femkin: ") if not ln.startswith("femkin: warning")]
    record = {
        "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
        "command": " ".join(str(c) for c in cmd[-4:]),
        "code": res.code,
        "line": lines[0] if lines else "",
        "wall_s": round(res.wall, 1),
    }
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def assert_fails(res: Outcome, code: int, *needles: str) -> str:
    """Exit ``code``, one ``femkin:`` error line containing every needle, no traceback."""
    assert "Traceback" not in res.text, res.text
    errors = [ln for ln in res.lines("femkin: ") if not ln.startswith("femkin: warning")]
    assert len(errors) == 1, res.text
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert res.code == code, res.text
    return errors[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Hash of every file under ``folder`` (to prove earlier results unchanged)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_case():
    """One tiny twin case, simulated and fitted (2 iterations), made once for the module."""
    root = Path(tempfile.mkdtemp(prefix="femkin-robust-"))
    case = write_case(root / "base", max_iterations=2)
    for verb in ("simulate", "invert"):
        res = run(femkin_command([verb, case, "--quiet"]))
        assert res.code == 0, res.text
    yield case
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def case(finished_case, tmp_path):
    """A copy of the finished case, with a snapshot of its results and checkpoint."""
    path = tmp_path / "case"
    shutil.copytree(finished_case, path, symlinks=True)
    path.chmod(0o755)
    tmp_path.chmod(0o755)
    return path


def _edit_video(case: Path, **changes) -> None:
    path = case / "simulated" / "video.npz"
    with np.load(path) as z:
        fields = {k: z[k] for k in z.files}
    for key, fn in changes.items():
        fields[key] = fn(fields)
    np.savez(path, **fields)


def _edit_toml(case: Path, old: str, new: str) -> None:
    path = case / "case.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def _nan_first_frame(f):
    c = f["c"].copy()
    c[0] = np.nan
    return c


def _nothing_after_first(f):
    c = f["c"].copy()
    c[1:] = np.nan
    return c


def _nan_sigma(f):
    s = np.full(f["c"].shape, 0.05)
    s[2, f["mask"] > 0] = np.nan
    return s


def _corrupt(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _nan_checkpoint(case: Path) -> None:
    path = case / "checkpoints" / "state.npz"
    with np.load(path) as z:
        fields = {k: z[k] for k in z.files}
    fields["mu_h"] = fields["mu_h"].copy()
    fields["mu_h"][0] = np.nan
    np.savez(path, **fields)


def _unfinished_checkpoint(case: Path) -> None:
    path = case / "checkpoints" / "state.npz"
    with np.load(path) as z:
        fields = {k: z[k] for k in z.files}
    state = json.loads(str(fields["__state__"]))
    state.pop("done", None)
    fields["__state__"] = np.array(json.dumps(state))
    np.savez(path, **fields)


# (id, mutation, argv after the case, exit code, needles in the error line)
BAD_INPUTS = [
    ("unknown-case-key", lambda c: _edit_toml(c, "[inversion]\n", "[inversion]\nbogus = 1\n"),
     ["invert"], 2, ["inversion.bogus", "unknown key"]),
    ("no-simulated-video", lambda c: (c / "simulated" / "video.npz").unlink(),
     ["invert"], 2, ["simulated/video.npz", "femkin simulate"]),
    ("corrupt-video", lambda c: _corrupt(c / "simulated" / "video.npz"),
     ["invert"], 2, ["video.npz", "readable .npz"]),
    ("nan-sigma", lambda c: _edit_video(c, sigma=_nan_sigma),
     ["invert"], 2, ["field 'sigma'", "NaN"]),
    ("first-frame-nan", lambda c: _edit_video(c, c=_nan_first_frame),
     ["invert"], 2, ["particle 1 observed in the first frame", "first observed in frame 1"]),
    ("first-frame-nan-verify", lambda c: _edit_video(c, c=_nan_first_frame),
     ["verify"], 2, ["particle 1 observed in the first frame"]),
    ("nothing-after-first-frame", lambda c: _edit_video(c, c=_nothing_after_first),
     ["invert"], 2, ["nothing to fit"]),
    ("single-frame", lambda c: _edit_video(
        c, c=lambda f: f["c"][:1], t=lambda f: f["t"][:1], mu_e=lambda f: f["mu_e"][:1],
        sigma=lambda f: np.float64(0.05)),
     ["invert"], 2, ["1 frame(s)", "nothing to fit"]),
    ("tiny-elements", lambda c: _edit_toml(c, "size = 1.5", "size = 0.002"),
     ["invert"], 2, ["case.toml", "mesh.size", "max_cells"]),
    ("nan-in-checkpoint", lambda c: (_unfinished_checkpoint(c), _nan_checkpoint(c)),
     ["invert", "--resume"], 2, ["state.npz", "'mu_h'", "finite parameter values"]),
    ("corrupt-checkpoint", lambda c: _corrupt(c / "checkpoints" / "state.npz"),
     ["invert", "--resume"], 2, ["state.npz"]),
    ("uq-after-killed-fit", _unfinished_checkpoint,
     ["uq"], 2, ["unfinished fit", "--allow-unfinished"]),
    ("uq-corrupt-checkpoint", lambda c: _corrupt(c / "checkpoints" / "state.npz"),
     ["uq"], 2, ["state.npz"]),
]  # fmt: skip


#: The cases also run on 2 ranks (the others are validated by the same collective code paths).
ON_TWO_RANKS = {
    "unknown-case-key",
    "first-frame-nan",
    "tiny-elements",
    "nan-in-checkpoint",
    "corrupt-checkpoint",
    "uq-after-killed-fit",
}


@pytest.mark.parametrize(
    "mutate, argv, code, needles, ranks",
    [(*p[1:], r) for p in BAD_INPUTS for r in (1, 2) if r == 1 or p[0] in ON_TWO_RANKS],
    ids=[
        p[0] + ("-np2" if r == 2 else "")
        for p in BAD_INPUTS
        for r in (1, 2)
        if r == 1 or p[0] in ON_TWO_RANKS
    ],
)
def test_bad_input_is_one_line(case, ranks, mutate, argv, code, needles):
    before = snapshot(case / "results")
    mutate(case)
    quiet = [] if argv[0] == "verify" else ["--quiet"]
    res = run(femkin_command([argv[0], case, *argv[1:], *quiet], ranks=ranks))
    assert_fails(res, code, *needles)
    assert snapshot(case / "results") == before


def test_first_frame_nan_simulate(case):
    path = case / "data" / "video.npz"
    with np.load(path) as z:
        fields = {k: z[k] for k in z.files}
    fields["c"] = fields["c"].copy()
    fields["c"][1] = fields["c"][0]
    fields["c"][0] = np.nan
    np.savez(path, **fields)
    res = run(femkin_command(["simulate", case, "--quiet"]))
    assert_fails(res, 2, "particle 1 observed in the first frame", "first observed in frame 1")


def test_out_of_range_fractions_warn_with_counts(case):
    def shifted(f):
        c = f["c"].copy()
        c[3, f["mask"] > 0] += 0.4  # within validation's [-0.5, 1.5], beyond the noise
        return c

    _edit_video(case, c=shifted)
    _edit_toml(case, "max_iterations = 2", "max_iterations = 1")
    with np.load(case / "simulated" / "video.npz") as z:
        n = int(np.sum(z["c"][3] > 1.0 + 3.0 * z["sigma"]))
    assert n > 0
    res = run(femkin_command(["invert", case, "--quiet"]))
    assert res.code == 0, res.text
    warnings = [ln for ln in res.lines("femkin: warning") if "outside [0, 1]" in ln]
    assert len(warnings) == 1, res.text
    assert f"frame 3: {n}" in warnings[0]


@pytest.mark.slow  # a whole UQ step; the record itself: test_outputs.py::test_fit_record*
def test_uq_allow_unfinished_is_recorded(case):
    _unfinished_checkpoint(case)
    res = run(femkin_command(["uq", case, "--quiet", "--allow-unfinished"]))
    assert res.code == 0, res.text
    assert any("did not finish" in ln for ln in res.lines("femkin: warning")), res.text
    fit = json.loads((case / "results" / "uq.json").read_text())["fit"]
    assert fit["allow_unfinished"] is True and fit["finished"] is False
    runs = json.loads((case / "results" / "run.json").read_text())
    assert runs["uq"]["fit_run_id"] == runs["invert"]["run_id"]


def test_uq_refuses_results_of_another_fit(case):
    runs = json.loads((case / "results" / "run.json").read_text())
    runs["invert"]["run_id"] = "another-run"
    (case / "results" / "run.json").write_text(json.dumps(runs))
    before = snapshot(case / "results")
    res = run(femkin_command(["uq", case, "--quiet"]))
    assert_fails(res, 2, "results of run another-run")
    assert snapshot(case / "results") == before


# -- read-only folders and full disks ---------------------------------------------------------


def _readonly(cmd, folder: Path) -> list[str]:
    """``cmd`` with ``folder`` read-only: chmod for a user, a read-only bind mount for root."""
    if os.geteuid() != 0:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        return cmd
    if shutil.which("unshare") is None:
        pytest.skip("root without unshare: cannot make a read-only folder")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("root without mount namespaces: cannot make a read-only folder")
    script = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, "sh", str(folder), *cmd]


@pytest.mark.parametrize("folder", ["", "checkpoints"], ids=["case", "checkpoints"])
def test_readonly_folder_found_before_the_fit(case, folder):
    before = snapshot(case)
    res = run(_readonly(femkin_command(["invert", case, "--quiet"]), case / folder))
    line = assert_fails(res, 2, "writable")
    assert str(case / folder).rstrip("/") in line
    assert res.wall < 60
    assert snapshot(case) == before


@pytest.mark.parametrize("ranks", RANKS)
def test_disk_full_during_the_fit_names_the_disk(case, ranks):
    # the checkpoint write inside TAO's monitor meets a full disk (ENOSPC from the write)
    before = snapshot(case / "results")
    ckpt = (case / "checkpoints" / "state.npz").read_bytes()
    inject = ["0", "femkin.inversion.checkpoint:atomic_write", "ENOSPC"]
    res = run(femkin_command(["invert", case, "--quiet"], ranks=ranks, inject=inject))
    assert_fails(res, 2, "state.npz", "No space left on device")
    assert snapshot(case / "results") == before
    assert (case / "checkpoints" / "state.npz").read_bytes() == ckpt


@pytest.mark.parametrize("ranks", [1, pytest.param(2, id="np2", marks=pytest.mark.slow)])
def test_disk_full_while_writing_results_keeps_the_old_set(case, ranks):
    _edit_toml(case, "max_iterations = 2", "max_iterations = 1")
    before = snapshot(case / "results")
    inject = ["0", "femkin.report:write_json", "ENOSPC"]
    res = run(femkin_command(["invert", case, "--quiet"], ranks=ranks, inject=inject))
    assert_fails(res, 2, "No space left on device")
    assert snapshot(case / "results") == before
    assert not list((case / ".femkin").glob("staging-*"))


def test_small_disk_found_before_the_fit(case):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and mount namespaces to mount a small file system")
    script = 'mount -t tmpfs -o size=4m tmpfs "$1/checkpoints" && shift && exec "$@"'
    cmd = ["unshare", "-m", "sh", "-c", script, "sh", str(case)]
    res = run(cmd + femkin_command(["invert", case, "--quiet"]))
    assert_fails(res, 2, "checkpoints", "MiB free")


# -- faults on one rank, signals ----------------------------------------------------------------


@pytest.mark.parametrize(
    "rank, target, code, needle",
    [
        ("1", "femkin.problem:InverseProblem.misfit", 1, "internal error: IndexError"),
        ("0", "femkin.report:figures", 1, "internal error: IndexError"),
        ("1", "femkin.parameters:ParameterSpace.from_global_dict", 1, "IndexError"),
    ],
    ids=["forward-rank1", "figures-rank0", "checkpoint-read-rank1"],
)
def test_fault_on_one_rank_ends_the_job(case, rank, target, code, needle):
    _edit_toml(case, "max_iterations = 2", "max_iterations = 1")  # mpirun on a busy machine
    before = snapshot(case / "results")
    argv = ["invert", case, "--quiet"]
    if "global_dict" in target:  # the checkpoint of a killed fit is read on resume
        _unfinished_checkpoint(case)
        argv.append("--resume")
    res = run(femkin_command(argv, ranks=2, inject=[rank, target, "IndexError"]))
    assert_fails(res, code, needle)
    assert snapshot(case / "results") == before


def test_internal_error_debug_shows_traceback(case):
    inject = ["0", "femkin.report:figures", "IndexError"]
    res = run(femkin_command(["--debug", "invert", case, "--quiet"], inject=inject))
    assert res.code == 1
    assert "Traceback" in res.err and "injected fault" in res.err


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize(
    "signum, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_signal_during_the_fit(case, ranks, signum, code, word):
    if ranks > 1 and signum == signal.SIGTERM:
        pytest.skip("mpirun forwards SIGINT; SIGTERM to the ranks is the scheduler's job")
    _edit_toml(case, "max_iterations = 2", "max_iterations = 200")
    before = snapshot(case / "results")
    res = run(
        femkin_command(["invert", case], ranks=ranks),
        signal_after=(signum, lambda out: "it   0" in out),
    )
    line = assert_fails(res, code, word)
    # all ranks together, or (a rank stuck in a collective call) the first one aborting the job
    assert line in (
        f"femkin: {word}",
        f"femkin: {word} [rank 0 of 2; ending all ranks]",
        f"femkin: {word} [rank 1 of 2; ending all ranks]",
    )
    assert snapshot(case / "results") == before
    with np.load(case / "checkpoints" / "state.npz") as z:  # intact and readable
        state = json.loads(str(z["__state__"]))
        assert np.all(np.isfinite(z["mu_h"]))
    assert state["history"] is not None


# -- nothing written outside the case ---------------------------------------------------------


def test_meshing_writes_only_inside_the_case(case, tmp_path):
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    shutil.rmtree(case / "meshes")
    real_cache = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    mpl = os.environ.get("MPLCONFIGDIR", str(Path.home() / ".config" / "matplotlib"))
    env = _env(HOME=str(home), TMPDIR=str(tmp), XDG_CACHE_HOME=real_cache, MPLCONFIGDIR=mpl)
    etc_before = os.path.exists("/etc/fltk")
    res = run(femkin_command(["mesh", case]), env=env)
    assert res.code == 0, res.text
    assert list(home.rglob("*")) == []
    assert list(tmp.rglob("*")) == []
    assert not list((case / "meshes").rglob(".femkin/*"))
    if os.geteuid() != 0:  # as root, FLTK inside the gmsh wheel writes /etc/fltk (README)
        assert os.path.exists("/etc/fltk") == etc_before


def test_killed_meshing_leaves_nothing_in_the_system_temp(case, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    shutil.rmtree(case / "meshes")
    _edit_toml(case, "size = 1.5", "size = 0.05")  # about 58000 triangles: seconds of gmsh

    def meshing(out):  # gmsh is at work once its scratch folder exists
        return bool(list((case / "meshes").glob(".femkin/scratch-*")))

    res = run(
        femkin_command(["mesh", case]),
        env=_env(TMPDIR=str(tmp)),
        signal_after=(signal.SIGKILL, meshing),
        timeout=120,
    )
    assert res.code == -signal.SIGKILL, res.text
    assert list(tmp.rglob("*")) == []
    assert list((case / "meshes").glob(".femkin/scratch-*"))  # the leftover stays in the case


def test_errno_hints():
    from femkin.errors import describe

    code, line = describe(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/y"))
    assert code == 2 and line.startswith("error: /x/y: No space left on device [ENOSPC]")
    code, line = describe(KeyboardInterrupt())
    assert (code, line) == (130, "interrupted")
