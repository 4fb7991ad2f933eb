"""Where a run writes: checks before the work starts, result sets, scratch folders.

A run writes only inside its case directory (plus the DOLFINx/FFCx JIT cache, see the README).

- :func:`check_writable` (collective) creates the folders a verb will write and proves it can
  write there, and that the disk has room, before any long computation: a read-only case, a
  read-only ``checkpoints/`` or a full disk is reported at once, naming the folder.
- :class:`ResultSet` (collective): a verb writes its outputs into a staging folder
  ``CASE/.femkin/staging-<run id>/`` that then replaces ``CASE/results/`` in one atomic exchange
  of the two folders (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere two renames, and a
  swap cut in half by a kill is undone at the next start). A reader sees the old set or the new
  set, never files of two runs mixed; a verb that fails or is killed leaves ``results/`` as it
  was. ``results/run.json`` records the run id of every verb that made the set.
- :func:`scratch_dir`: temporary folders inside ``CASE/.femkin/`` (never the system temporary
  directory), removed afterwards; leftovers of killed runs are removed at the next start.
"""

from __future__ import annotations

import ctypes
import datetime
import errno
import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

from femkin.errors import InputError

#: Hidden folder of a case for staging and scratch files.
PRIVATE = ".femkin"
#: Free space (MiB) a verb needs on the case's file system before it starts.
MIN_FREE_MB = 32.0
_ACTIVE: dict[Path, Path] = {}


def new_run_id() -> str:
    """A unique run id: UTC time and 8 random hex digits."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{uuid.uuid4().hex[:8]}"


def shared_run_id(comm) -> str:
    """A new run id made on rank 0 and known to every rank (collective)."""
    return comm.bcast(new_run_id() if comm.rank == 0 else None, root=0)


def _collective(comm, work):
    """Run ``work()`` on rank 0; an error there is raised on every rank."""
    error, value = None, None
    if comm.rank == 0:
        try:
            value = work()
        except InputError as err:
            error = (err.file, err.field, err.expected, err.found)
    error, value = comm.bcast((error, value), root=0)
    if error is not None:
        raise InputError(*error)
    return value


def check_writable(comm, *folders, min_free_mb: float = MIN_FREE_MB) -> None:
    """Create ``folders`` and check they are writable with room to spare (collective).

    Raises:
        InputError: on every rank, naming the first folder that cannot be written and why.
    """

    def work():
        for folder in folders:
            folder = Path(folder)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / f".femkin-write-test-{os.getpid()}"
                with open(probe, "wb") as f:
                    f.write(b"femkin")
                    f.flush()
                    os.fsync(f.fileno())
                probe.unlink()
            except OSError as err:
                raise InputError(
                    folder, None, "a writable folder", f"{err.strerror or err} [errno {err.errno}]"
                ) from None
            free = shutil.disk_usage(folder).free / 2**20
            if free < min_free_mb:
                raise InputError(
                    folder,
                    None,
                    f"at least {min_free_mb:g} MiB free on its file system",
                    f"{free:.1f} MiB free",
                )

    _collective(comm, work)


def results_dir(case_dir, folder: str = "results") -> Path:
    """Where a verb writes ``CASE/<folder>`` now: the staging folder of an open result set."""
    final = Path(case_dir).resolve() / folder
    return _ACTIVE.get(final, final)


class ResultSet:
    """The outputs of one verb in ``CASE/<folder>``, replaced as one set (collective).

    Use as a context manager; writers ask :func:`results_dir` for the folder. On a normal exit
    the staged set replaces the folder; on an exception the staging folder is removed and the
    folder is untouched (no collective call on that path: other ranks may not be there).

    Args:
        case_dir: the case directory.
        comm: the communicator of the run.
        verb: the verb writing the set (recorded in ``run.json``).
        run_id: this run's id (same on every rank).
        keep_existing: start from a copy of the current folder (a verb that adds to another's
            results, as ``uq`` to ``invert``'s); else start empty (a fresh set).
        record: extra entries for this verb in ``run.json``.
        folder: the folder name (``results``, ``simulated``).
    """

    def __init__(
        self,
        case_dir,
        comm,
        *,
        verb: str,
        run_id: str,
        keep_existing: bool = False,
        record: dict | None = None,
        folder: str = "results",
    ):
        self.case_dir = Path(case_dir).resolve()
        self.comm = comm
        self.verb = verb
        self.run_id = run_id
        self.keep_existing = keep_existing
        self.record = dict(record or {})
        self.final = self.case_dir / folder
        self.path: Path | None = None

    def __enter__(self) -> ResultSet:
        def work():
            private = self.case_dir / PRIVATE
            recover(self.case_dir)
            staging = private / f"staging-{self.final.name}-{self.run_id}"
            try:
                if staging.exists():
                    shutil.rmtree(staging)
                if self.keep_existing and self.final.is_dir():
                    shutil.copytree(self.final, staging, symlinks=True)
                else:
                    staging.mkdir(parents=True)
            except OSError as err:
                raise InputError(
                    staging, None, "a writable staging folder", f"{err.strerror or err}"
                ) from None
            return str(staging)

        self.path = Path(_collective(self.comm, work))
        _ACTIVE[self.final] = self.path
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        _ACTIVE.pop(self.final, None)
        if exc_type is not None:
            if self.comm.rank == 0 and self.path is not None:
                shutil.rmtree(self.path, ignore_errors=True)
            return
        staged = self.path
        if staged is None:  # __enter__ did not finish (the same on every rank)
            return
        self.comm.barrier()  # every rank has written its part

        def work():
            try:
                self._write_record(staged)
                _replace_folder(staged, self.final)
            except OSError as err:
                shutil.rmtree(staged, ignore_errors=True)
                raise InputError(
                    self.final, None, f"a writable {self.final.name} folder", f"{err}"
                ) from None

        _collective(self.comm, work)

    def _write_record(self, staged: Path) -> None:
        path = staged / "run.json"
        runs = {}
        if path.exists():
            try:
                runs = json.loads(path.read_text())
            except (OSError, ValueError):
                runs = {}
        entry = {
            "run_id": self.run_id,
            "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        entry.update(self.record)
        runs[self.verb] = entry
        tmp = path.with_name(".run.json.tmp")
        tmp.write_text(json.dumps(runs, indent=2) + "\n")
        os.replace(tmp, path)


def read_run_record(case_dir, folder: str = "results") -> dict:
    """``CASE/<folder>/run.json`` (``{verb: {"run_id", ...}}``), or ``{}`` when absent."""
    path = Path(case_dir) / folder / "run.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise InputError(path, None, "a readable run record (JSON)", f"{err}") from None


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_folder(staged: Path, final: Path) -> None:
    """Put ``staged`` at ``final`` in one step; the old folder is removed afterwards."""
    if not final.exists():
        os.rename(staged, final)
        return
    if _renameat2_exchange(staged, final):
        shutil.rmtree(staged, ignore_errors=True)  # now holds the old set
        return
    old = staged.with_name(f"old-{final.name}-{staged.name}")
    os.rename(final, old)
    os.rename(staged, final)
    shutil.rmtree(old, ignore_errors=True)


def recover(case_dir) -> None:
    """Undo a swap cut in half by a kill, and remove leftovers of killed runs (rank 0)."""
    private = Path(case_dir) / PRIVATE
    if not private.is_dir():
        return
    for old in sorted(private.glob("old-*"), reverse=True):
        name = old.name.split("-")[1]
        final = Path(case_dir) / name
        if not final.exists():
            os.rename(old, final)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in private.glob("staging-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in private.glob("scratch-*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def scratch_dir(base=None, prefix: str = "scratch-"):
    """A temporary folder in ``base/.femkin/`` (``base``: a case or cache folder), removed on exit.

    Without ``base`` the system temporary directory is used (library calls outside a case).
    """
    if base is not None:
        parent = Path(base) / PRIVATE
        parent.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    else:
        path = Path(tempfile.mkdtemp(prefix=f"femkin-{prefix}"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fit_record(state: dict | None, case_dir, checkpoint, *, allow_unfinished: bool = False) -> dict:
    """Check that a checkpoint holds a finished fit whose results are in ``CASE/results/``.

    ``femkin uq`` works at the fit's point and adds to the fit's result set; it refuses a fit
    that did not finish (killed, or still running) unless ``allow_unfinished``, and results of a
    different fit run than the checkpoint's.

    Returns:
        The record for ``uq.json``: ``run_id``, ``finished``, ``converged``, ``stop_reason``,
        ``iterations`` and ``allow_unfinished`` (true when the refusal was overridden).

    Raises:
        InputError: an unfinished fit (without ``allow_unfinished``), or results of another run.
    """
    state = state or {}
    history = state.get("history") or []
    iteration = history[-1]["iteration"] if history else 0
    finished = bool(state.get("done"))
    if not finished and not allow_unfinished:
        raise InputError(
            checkpoint,
            None,
            "the checkpoint of a finished fit (run 'femkin invert CASE' to the end, "
            "'--resume' continues a killed one; 'femkin uq --allow-unfinished' overrides)",
            f"an unfinished fit, stopped at iteration {iteration}",
        )
    results = Path(case_dir) / "results"
    summary = {}
    try:
        summary = json.loads((results / "summary.json").read_text())
    except FileNotFoundError:
        if finished:
            raise InputError(
                results / "summary.json",
                None,
                "the results of the finished fit in the checkpoint",
                "no such file (rerun 'femkin invert CASE')",
            ) from None
    except (OSError, ValueError) as err:
        raise InputError(results / "summary.json", None, "a readable JSON summary", err) from None
    fit_run = read_run_record(case_dir).get("invert", {}).get("run_id")
    run_id = state.get("run_id")
    if finished and run_id is not None and fit_run is not None and fit_run != run_id:
        raise InputError(
            results,
            None,
            f"the results of the fit in the checkpoint (run {run_id})",
            f"results of run {fit_run} (rerun 'femkin invert CASE')",
        )
    reason = summary.get("stop_reason", summary.get("tao_reason"))
    converged = summary.get("converged")
    if converged is None and reason is not None and finished:
        converged = str(reason).startswith("CONVERGED")
    return {
        "run_id": run_id,
        "finished": finished,
        "converged": bool(converged) if finished and converged is not None else False,
        "stop_reason": reason if finished else "unfinished",
        "iterations": int(iteration),
        "allow_unfinished": bool(allow_unfinished and not finished),
    }
