"""Missing system dependencies are reported in one line as such (femkin.sysdeps), simulated by
making gmsh's import fail the way a slim image makes it fail, and by a JIT with no compiler."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

import numpy as np
import pytest

import femkin.commands.mesh
from femkin._fem import MPI, dolfinx, ufl
from femkin.cli import main
from femkin.errors import SystemDependencyError
from femkin.io.video import Video, write_video
from femkin.sysdeps import diagnose, import_gmsh, missing_library

LIBGLU = "libGLU.so.1: cannot open shared object file: No such file or directory"


class _BrokenGmsh(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import of ``gmsh`` raises what ctypes raises when libgmsh's libGLU is missing."""

    def find_spec(self, name, path=None, target=None):
        if name == "gmsh":
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise OSError(LIBGLU)


@pytest.fixture
def broken_gmsh(monkeypatch):
    monkeypatch.delitem(sys.modules, "gmsh", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenGmsh(), *sys.meta_path])


def test_import_gmsh_names_library_and_package(broken_gmsh):
    with pytest.raises(SystemDependencyError) as info:
        import_gmsh()
    msg = str(info.value)
    assert msg.startswith("gmsh cannot load system library libGLU.so.1")
    assert "install libglu1-mesa" in msg


@pytest.mark.mpi
def test_mesh_without_libglu_is_not_a_data_error(broken_gmsh, mpi_tmp_path, capsys):
    comm = MPI.COMM_WORLD
    case = mpi_tmp_path / "case"
    if comm.rank == 0:
        (case / "data").mkdir(parents=True)
        mask = np.zeros((12, 12), dtype=np.int64)
        mask[3:9, 2:10] = 1
        c = np.where(mask > 0, 0.2, np.nan)[None].repeat(2, axis=0)
        write_video(case / "data" / "video.npz", Video(c, mask, np.array([0.0, 1.0]), 0.05))
        (case / "case.toml").write_text('[data]\nvideo = "data/video.npz"\n')
    comm.barrier()
    assert main(["mesh", str(case)]) == 2  # every rank, no hang
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("femkin: error: gmsh cannot load system library libGLU.so.1")
    assert "mask" not in err[0] and "Traceback" not in err[0]


def test_missing_library_unknown_to_the_table():
    problem = missing_library(OSError("libfoo.so.7: cannot open shared object file: x"), "gmsh")
    assert "libfoo.so.7" in str(problem) and "install the system package" in str(problem)
    assert missing_library(OSError("disk full")) is None


def _compile_new_form(cache_dir):
    """JIT-compile a form into an empty cache (so the compiler must run)."""
    mesh = dolfinx.mesh.create_unit_interval(MPI.COMM_WORLD, 2)
    x = ufl.SpatialCoordinate(mesh)
    form = ufl.sin(x[0]) * ufl.dx(domain=mesh)
    return dolfinx.fem.form(form, jit_options={"cache_dir": str(cache_dir)})


@pytest.mark.mpi
def test_jit_without_c_compiler(monkeypatch, mpi_tmp_path):
    monkeypatch.setenv("CC", "femkin-no-such-cc")
    with pytest.raises(Exception) as info:  # cffi's error (serial) or DOLFINx's (parallel)
        _compile_new_form(mpi_tmp_path / "jit")
    problem = diagnose(info.value)
    assert isinstance(problem, SystemDependencyError), repr(info.value)
    assert "'femkin-no-such-cc' is not installed" in str(problem)
    assert "gcc" in str(problem)


def test_cli_reports_missing_compiler_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CC", "femkin-no-such-cc")
    monkeypatch.setattr(femkin.commands.mesh, "run", lambda args: _compile_new_form(tmp_path))
    assert main(["mesh", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("femkin: error: DOLFINx's JIT compiles forms"), err


def test_jit_with_compiler_is_not_diagnosed(tmp_path):
    form = _compile_new_form(tmp_path / "jit")  # the real compiler works: nothing to report
    assert form is not None
    assert diagnose(RuntimeError("Failed JIT compilation of form: syntax error")) is None


def test_unwritable_jit_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "ro"))
    target = tmp_path / "ro" / "fenics" / "libffcx_forms_x.c"
    err = PermissionError(13, "Permission denied", str(target))
    problem = diagnose(err)
    assert "JIT cache" in str(problem) and "XDG_CACHE_HOME" in str(problem)
    assert diagnose(PermissionError(13, "Permission denied", "/data/video.npz")) is None


def test_bugs_keep_their_traceback():
    assert diagnose(ValueError("shapes (3,) and (4,) not aligned")) is None
