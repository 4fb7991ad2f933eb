"""Missing system dependencies, reported as such in one line.

femkin needs more than Python packages: the gmsh wheel's ``libgmsh`` links against OpenGL, X11
and font libraries (even without a GUI), and DOLFINx compiles every new form with a C compiler
into its JIT cache (``$XDG_CACHE_HOME/fenics``, default ``~/.cache/fenics``). Slim container
images and cluster nodes often lack them; the errors then surface as an ``OSError`` deep in
``ctypes`` or a ``cffi`` traceback, or are taken for bad data. :func:`import_gmsh` and
:func:`diagnose` turn them into :class:`~femkin.errors.SystemDependencyError` naming what is
missing and the Debian/Ubuntu package that provides it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from femkin.errors import SystemDependencyError

#: Debian/Ubuntu packages of the shared libraries that the gmsh wheel loads.
LIBRARY_PACKAGES = {
    "libGLU.so.1": "libglu1-mesa",
    "libGL.so.1": "libgl1",
    "libOpenGL.so.0": "libopengl0",
    "libGLX.so.0": "libglx0",
    "libXrender.so.1": "libxrender1",
    "libXcursor.so.1": "libxcursor1",
    "libXfixes.so.3": "libxfixes3",
    "libXext.so.6": "libxext6",
    "libXft.so.2": "libxft2",
    "libXinerama.so.1": "libxinerama1",
    "libX11.so.6": "libx11-6",
    "libfontconfig.so.1": "libfontconfig1",
    "libfreetype.so.6": "libfreetype6",
    "libgomp.so.1": "libgomp1",
    "libz.so.1": "zlib1g",
    "libstdc++.so.6": "libstdc++6",
}

_MISSING_LIBRARY = re.compile(r"([\w.+-]+\.so(?:\.\d+)*): cannot open shared object file")
_MISSING_HEADER = re.compile(r"([\w./-]+\.h): No such file or directory")
_JIT_MARKERS = (
    "Failed JIT compilation",
    "JIT compilation failed",
    "CompileError",
    "LinkError",
    "VerificationError",
    "command 'gcc' failed",
    "command 'cc' failed",
    "unable to execute",
)


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _text(err: BaseException) -> str:
    return " | ".join(f"{type(e).__name__}: {e}" for e in _chain(err))


def missing_library(err: BaseException, who: str = "femkin") -> SystemDependencyError | None:
    """The one-line error for a shared library that ``err`` says cannot be loaded, or None."""
    match = _MISSING_LIBRARY.search(_text(err))
    if match is None:
        return None
    lib = match.group(1)
    package = LIBRARY_PACKAGES.get(lib)
    how = (
        f"install {package}, e.g. apt-get install {package}"
        if package
        else "install the system package that provides it"
    )
    return SystemDependencyError(
        f"{who} cannot load system library {lib} ({how}; docker/Dockerfile lists every library "
        "the gmsh wheel needs)"
    )


def import_gmsh() -> ModuleType:
    """Import gmsh; a missing shared library or package is a :class:`SystemDependencyError`."""
    try:
        import gmsh
    except ImportError as err:
        problem = missing_library(err, "gmsh")
        if problem is not None:
            raise problem from err
        raise SystemDependencyError(
            f"the gmsh Python package cannot be imported ({err}; pip install gmsh)"
        ) from err
    except OSError as err:  # ctypes.CDLL of libgmsh: a missing dependency of the library
        problem = missing_library(err, "gmsh")
        raise (problem or SystemDependencyError(f"gmsh cannot load libgmsh: {err}")) from err
    return gmsh


def c_compiler() -> str:
    """The C compiler that cffi (DOLFINx's JIT) calls: ``$CC`` or Python's configured one."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shlex.split(cc)[0]


def jit_cache_dir() -> Path:
    """DOLFINx's JIT cache folder (``$XDG_CACHE_HOME/fenics``, default ``~/.cache/fenics``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fenics"


def diagnose(err: BaseException, who: str = "femkin") -> SystemDependencyError | None:
    """Say which system dependency ``err`` comes from, or None when it is not such an error.

    ``who`` names the program that failed to load a library (``"gmsh"`` around gmsh calls).

    Recognised: a shared library that cannot be loaded; a JIT compilation failure from a missing
    C compiler, missing C or Python headers, or a JIT cache that cannot be written. Any other
    JIT failure is left alone (it is a bug, and keeps its traceback).
    """
    if isinstance(err, SystemDependencyError):
        return err
    text = _text(err)
    if (problem := missing_library(err, who)) is not None:
        return problem
    cache = jit_cache_dir()
    denied = any(
        isinstance(e, PermissionError) or getattr(e, "errno", None) == 30 for e in _chain(err)
    )
    if denied and (str(cache) in text or "cache" in text.lower()):
        return SystemDependencyError(
            f"DOLFINx's JIT cache {cache} is not writable (set XDG_CACHE_HOME to a writable "
            "folder, e.g. export XDG_CACHE_HOME=$HOME/.cache)"
        )
    if not any(marker in text for marker in _JIT_MARKERS):
        return None
    cc = c_compiler()
    if shutil.which(cc) is None:
        return SystemDependencyError(
            f"DOLFINx's JIT compiles forms with a C compiler, and '{cc}' is not installed "
            "(install gcc and libc6-dev, e.g. apt-get install gcc libc6-dev, or set CC)"
        )
    header = _MISSING_HEADER.search(text)
    if header is not None:
        name = header.group(1)
        package = "python3-dev" if name.endswith("Python.h") else "libc6-dev"
        return SystemDependencyError(
            f"DOLFINx's JIT cannot find the C header {name} (install {package}, e.g. "
            f"apt-get install {package})"
        )
    return None
