"""The case directory: ``CASE/case.toml`` parsed against one declarative schema.

A case directory holds everything about one study: its ``case.toml``, the data it names
(relative paths resolve against the case directory), and the outputs femkin writes there
(``meshes/``, ``simulated/``, ...). :data:`SCHEMA` is the single place where keys, types,
defaults and valid values are declared; add a key there and every command sees it with its
default filled in.

Units: lengths in micrometres unless stated ("pixels" for mesh sizes), times in seconds,
chemical potentials in kT, rates in 1/s.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from femkin.blocks import BLOCKS, KINETICS, blocks_unused_by
from femkin.errors import CaseError, close_match_hint

CASE_FILE = "case.toml"
REQUIRED = object()  #: Default of a key that must be given.


Check = Callable[[Any], str | None]  # returns what was expected when the value is invalid


class Key(NamedTuple):
    """One key of the schema.

    Attributes:
        type: ``"str"``, ``"float"``, ``"int"``, ``"bool"``, ``"list[float]"``, ``"list[int]"``,
            ``"list[str]"``, ``"table"`` (str -> str/int/float/bool) or ``"files"`` (a table
            label -> path, or a path pattern with ``{label}``); a trailing ``"?"`` means the key
            may be absent with default None.
        default: The value when absent (:data:`REQUIRED` if it must be given).
        check: Optional validity check of the converted value.
        doc: Meaning and unit.
    """

    type: str
    default: Any = REQUIRED
    check: Check | None = None
    doc: str = ""


# ------------------------------------------------------------------------------------------------
# Value checks: each returns the expectation when violated, None when fine.


def _each(pred: Callable[[Any], bool], expected: str) -> Check:
    def check(value: Any) -> str | None:
        items = value if isinstance(value, list) else [value]
        return None if all(pred(v) for v in items) else expected

    return check


def _all(*checks: Check) -> Check:
    def check(value: Any) -> str | None:
        for c in checks:
            if (expected := c(value)) is not None:
                return expected
        return None

    return check


POSITIVE = _each(lambda v: math.isfinite(v) and v > 0, "a positive number")
NON_NEGATIVE = _each(lambda v: math.isfinite(v) and v >= 0, "a non-negative number")
FINITE = _each(math.isfinite, "finite numbers")
OPEN_UNIT = _each(lambda v: 0 < v < 1, "a number in the open interval (0, 1)")
AT_LEAST_ONE = _each(lambda v: v >= 1, "an integer >= 1")


def _length(n: int) -> Check:
    return lambda v: None if len(v) == n else f"a list of length {n}"


def _non_empty(v: list) -> str | None:
    return None if len(v) > 0 else "a non-empty list"


def _one_of(*choices: str) -> Check:
    return _each(lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices))


def _increasing(v: list) -> str | None:
    return None if all(b > a for a, b in zip(v, v[1:], strict=False)) else "increasing values"


# ------------------------------------------------------------------------------------------------
# The schema: section -> key -> Key (a nested dict is a sub-table).

#: ``[solver] petsc_options`` go under the prefix ``femkin_forward_`` (``snes_monitor``), and
#: ``[inversion] petsc_options`` under ``femkin_``, TAO's prefix (``tao_type``, ``tao_monitor``,
#: ``tao_bnk_ksp_max_it``): the command line's ``-femkin_tao_type`` is the case file's
#: ``tao_type``, and the command line wins.
PETSC_TABLE = Key("table", {}, None, "PETSc options, without the prefix (name -> value)")

SCHEMA: dict[str, dict[str, Any]] = {
    "data": {
        "video": Key("str", REQUIRED, None, "the video file (.npz, .h5, TIFF folder)"),
        "truth": Key("str?", None, None, "a truth file (simulated data) for comparisons"),
        "sigma": Key("float?", None, POSITIVE, "noise std of c; overrides the video's sigma"),
        "psf_fwhm": Key(
            "float?",
            None,
            POSITIVE,
            "FWHM of the instrument's Gaussian point-spread function, um: a pixel is the model "
            "averaged over its footprint convolved with the PSF (default: the value at the "
            "pixel centre)",
        ),
    },
    "mesh": {
        "size": Key("float", 1.0, POSITIVE, "target element size, pixels"),
        "smoothing": Key("float", 0.5, NON_NEGATIVE, "contour smoothing length, pixels"),
        "simplify": Key("float", 0.25, NON_NEGATIVE, "polygon simplification tolerance, pixels"),
        "min_hole_area": Key("float", 4.0, NON_NEGATIVE, "smaller holes are filled, pixels^2"),
        "files": Key("files?", None, None, "own meshes: {label = path} or a path with {label}"),
        "file_unit": Key("str", "um", _one_of("um", "pixel"), "unit of the files' coordinates"),
        "footprint_tolerance": Key("float", 0.1, OPEN_UNIT, "relative mismatch allowed"),
        "max_cells": Key(
            "int", 1_000_000, AT_LEAST_ONE, "refuse a mesh estimated above this many cells/particle"
        ),
    },
    "model": {
        "kappa": Key("float", 0.02, NON_NEGATIVE, "gradient energy coefficient, kT um^2"),
        "alpha": Key("float", 0.5, OPEN_UNIT, "charge transfer coefficient (bv laws)"),
        "coherency": Key("float", 0.0, NON_NEGATIVE, "coherency strain coefficient B, kT"),
        "mu_h": Key("list[float]", [3.2], FINITE, "Legendre coefficients a_1..a_N of mu_h, kT"),
        "j0": Key("list[float]", [], FINITE, "Legendre coefficients b_1..b_M of ln j0 (bv)"),
        "j0_prefactor": Key(
            "list[float]", [0.5, 0.5], _all(_length(2), FINITE), "p, q of ln j0 (bv)"
        ),
        "k0": Key("float", 1e-3, POSITIVE, "rate prefactor, 1/s"),
        "initial_smoothing": Key("float", 0.05, NON_NEGATIVE, "first-frame smoothing length, um"),
        "element": Key("str", "P1", _one_of("P1"), "Lagrange element of c and mu"),
        "kinetics": Key(
            "str",
            "bv",
            _one_of(*KINETICS),
            "reaction law: bv (Butler-Volmer, learned ln j0), bv-constant (j0 = 1), bv-lim "
            "(j0 = c^alpha (1-c)^(2-alpha), Lim 2016), ciet (coupled ion-electron transfer, MHC)",
        ),
        "lambda": Key("float", 8.3, POSITIVE, "ciet: reorganisation energy lambda, kT"),
    },
    "solver": {
        "dt_initial": Key("float?", None, POSITIVE, "first step, s (default: frame gap / 10)"),
        "dt_min": Key("float", 1e-6, POSITIVE, "smallest step before giving up, s"),
        "dt_max": Key("float?", None, POSITIVE, "largest step, s (default: no limit)"),
        "newton_rtol": Key("float", 1e-10, POSITIVE, "Newton relative tolerance"),
        "newton_atol": Key("float", 1e-11, POSITIVE, "Newton absolute tolerance"),
        "newton_max_it": Key("int", 25, AT_LEAST_ONE, "Newton iterations per step"),
        "scheme": Key(
            "str",
            "bdf2",
            _one_of("bdf2", "euler"),
            "time integrator: bdf2 (2nd order, error-controlled) or euler (backward Euler)",
        ),
        "time_tol": Key(
            "float",
            5e-4,
            POSITIVE,
            "bdf2: largest estimated local error of c per step (units of c; the particle "
            "average is then within ~0.005 of the exact time integral)",
        ),
        "dc_max": Key("float", 0.02, POSITIVE, "euler: largest change of c per step (accuracy)"),
        "storage": Key("str", "memory", _one_of("memory", "disk"), "where step states are kept"),
        "jacobian": Key(
            "str",
            "lagged",
            _one_of("exact", "lagged"),
            "forward Newton: exact (J factorised every iteration) or lagged (a factorised J "
            "reused across iterations and steps while it converges; same tolerances; bdf2 only)",
        ),
        "factor_cache_mb": Key(
            "float",
            1024.0,
            NON_NEGATIVE,
            "memory per process for the Jacobian factorisations (and the step's derivative "
            "operators) kept for derivative solves (0: reassemble and refactorise every time)",
        ),
        "petsc_options": PETSC_TABLE,
    },
    "simulate": {
        "k_map": Key("str?", None, None, "(H, W) .npy map of k in 1/s, NaN outside"),
        "noise": Key("float", 0.0, NON_NEGATIVE, "std of Gaussian noise added to c"),
        "seed": Key("int", 0, NON_NEGATIVE, "noise and random-field seed"),
        "mesh_size": Key("float?", None, POSITIVE, "data-generation element size, pixels"),
        "psf_fwhm": Key(
            "float?", None, POSITIVE, "PSF FWHM of the simulated data, um (default: [data])"
        ),
        "m_std": Key("float?", None, NON_NEGATIVE, "std of a random smooth m (no k_map)"),
        "m_length": Key("float?", None, POSITIVE, "correlation length of that m, um"),
        "m_field": Key(
            "str",
            "fourier",
            _one_of("fourier", "prior"),
            "that m: a smooth Fourier-feature field, or a sample of the BiLaplacian "
            "prior with that std and length (a twin whose truth follows the prior)",
        ),
        "outputs": Key(
            "list[str]",
            ["npz", "xdmf", "png"],
            _one_of("npz", "xdmf", "vtx", "png"),
            "npz: video.npz and truth.npz (always written); xdmf or vtx: c and mu of each "
            "particle at the frame times for ParaView (particle_<label>.xdmf / .bp); png: frames",
        ),
        # The truth of a twin experiment; [model] then holds the inversion's initial guesses.
        "model": {
            "mu_h": Key("list[float]?", None, FINITE, "true a_1..a_N (default: [model])"),
            "j0": Key("list[float]?", None, FINITE, "true b_1..b_M (default: [model])"),
            "k0": Key("float?", None, POSITIVE, "true k0, 1/s (default: [model])"),
            "kappa": Key("float?", None, NON_NEGATIVE, "true kappa (default: [model])"),
            "coherency": Key("float?", None, NON_NEGATIVE, "true B (default: [model])"),
            "kinetics": Key("str?", None, _one_of(*KINETICS), "true law (default: [model])"),
            "lambda": Key("float?", None, POSITIVE, "true lambda, kT (default: [model])"),
        },
    },
    "inversion": {
        "learn": Key(
            "list[str]",
            ["mu_h", "j0", "k0", "m"],
            _one_of(*BLOCKS),
            "fitted blocks (default under kinetics = bv-constant/bv-lim: no j0; ciet: lambda "
            "in place of j0)",
        ),
        "method": Key(
            "str",
            "newton",
            _one_of("newton", "tao"),
            "optimiser: inexact Newton-CG on the prior-preconditioned Hessian, or PETSc TAO "
            "(tao_type, petsc_options)",
        ),
        "max_iterations": Key(
            "int", 50, AT_LEAST_ONE, "iteration cap: a budget; a fit stopped by it is not converged"
        ),
        "decrement_tol": Key(
            "float",
            1e-3,
            NON_NEGATIVE,
            "Newton: converged when the predicted decrease of the negative log posterior "
            "(Newton decrement) is below this, nats",
        ),
        "gttol": Key(
            "float", 1e-6, NON_NEGATIVE, "converged when |g|/|g0| (prior-preconditioned) is below"
        ),
        "gatol": Key("float", 1e-6, NON_NEGATIVE, "converged when |g| is below (absolute)"),
        "cg_max_iterations": Key(
            "int",
            200,
            AT_LEAST_ONE,
            "Newton: CG cap per step (Hessian actions; CG stops on the forcing term first)",
        ),
        "hessian": Key("str", "gauss-newton", _one_of("gauss-newton", "full"), "Hessian"),
        "tao_type": Key("str", "bnls", None, "PETSc TAO type (method = 'tao')"),
        "grtol": Key("float", 1e-8, NON_NEGATIVE, "TAO: |g|/|f| tolerance (method = 'tao')"),
        "petsc_options": Key(
            "table", {}, None, "TAO's PETSc options without the prefix (method = 'tao')"
        ),
        "checkpoint_every": Key("int", 1, AT_LEAST_ONE, "iterations between checkpoints"),
        "prior": {
            "m_std": Key("float", 0.5, POSITIVE, "pointwise prior std of m"),
            "m_length": Key("float", 0.2, POSITIVE, "prior correlation length of m, um"),
            "coefficient_std": Key(
                "float", 2.0, POSITIVE, "prior std of the mu_h a_n (kT) and j0 b_n coefficients"
            ),
            "k0_std": Key(
                "float",
                2.0,
                POSITIVE,
                "prior std of the k0 block, whose coordinate is ln k0 (2.0: a factor e^2 on k0)",
            ),
            "kappa_std": Key("float", 0.02, POSITIVE, "prior std of kappa, kT um^2"),
            "coherency_std": Key("float", 2.0, POSITIVE, "prior std of the coherency B, kT"),
            "lambda_std": Key(
                "float",
                0.5,
                POSITIVE,
                "prior std of the lambda block, whose coordinate is ln lambda (0.5: a factor 1.65)",
            ),
            "psf_fwhm_std": Key(
                "float",
                0.5,
                POSITIVE,
                "prior std of ln psf_fwhm around ln [data] psf_fwhm (0.5: a factor e^0.5)",
            ),
            "mu_e_std": Key("float", 1.0, POSITIVE, "prior std of mu_e knots, kT"),
            "initial_std": Key("float", 0.1, POSITIVE, "prior std of the initial state"),
        },
    },
    "driving": {
        "mode": Key("str", "data", _one_of("data", "fitted"), "mu_e(t) from the data or fitted"),
        "t": Key("list[float]?", None, _all(_non_empty, FINITE, _increasing), "knot times, s"),
        "mu_e": Key("list[float]?", None, _all(_non_empty, FINITE), "knot values, kT"),
    },
    "uq": {
        "hessian": Key("str", "gauss-newton", _one_of("gauss-newton", "full"), "Hessian"),
        "max_rank": Key("int", 50, AT_LEAST_ONE, "largest low-rank approximation"),
        "threshold": Key("float", 0.1, NON_NEGATIVE, "smallest eigenvalue kept"),
        "oversampling": Key("int", 10, NON_NEGATIVE, "randomised eigensolver oversampling"),
        "samples": Key("int", 20, NON_NEGATIVE, "posterior samples"),
        "seed": Key("int", 0, NON_NEGATIVE, "sampling seed"),
        "marginal_tolerance": Key(
            "float", 0.01, POSITIVE, "relative variance gap of the exact coefficient marginals"
        ),
        "marginal_max_iterations": Key(
            "int", 20, NON_NEGATIVE, "CG iterations (x coefficients Hessian actions) for them"
        ),
        "coefficient_mean": Key(
            "str",
            "auto",
            _one_of("auto", "map", "marginal"),
            "centre of the coefficients and their bands: the joint MAP point, or the mode of "
            "their Laplace marginal (the fields' posterior volume included; one Newton step, "
            "2 forward runs and 2 x rank Hessian actions per coefficient); auto: the marginal "
            "mode where a field is learned, the fit converged and the marginals converged",
        ),
        "omitted_samples": Key(
            "int",
            10,
            _each(lambda v: v == 0 or v >= 2, "0 (off) or an integer >= 2"),
            "trace samples bounding what a capped rank leaves out",
        ),
        "evidence_lanczos": Key(
            "int",
            12,
            NON_NEGATIVE,
            "Lanczos steps per probe (omitted_samples probes) estimating the omitted spectrum's "
            "log det in the evidence, when its bracket is wider than 1 nat (0: bracket only)",
        ),
        "model_error": Key(
            "str",
            "none",
            _one_of("none", "map", "samples"),
            "discretisation error in the noise model (approximation-error approach): none, "
            "estimated at the MAP point (one refined forward run), or at it and posterior samples",
        ),
        "model_error_mesh": Key(
            "float",
            0.5,
            _each(lambda v: 0 < v <= 1, "a factor in (0, 1]"),
            "refined model: [mesh] size times this",
        ),
        "model_error_time": Key(
            "float",
            0.1,
            _each(lambda v: 0 < v <= 1, "a factor in (0, 1]"),
            "refined model: [solver] time_tol and dc_max times this (1: the fit's own steps)",
        ),
        "model_error_samples": Key(
            "int", 4, AT_LEAST_ONE, "model_error = 'samples': posterior draws besides the MAP"
        ),
        "model_error_form": Key(
            "str",
            "low-rank",
            _one_of("low-rank", "diagonal"),
            "the added covariance: the refined-minus-fit differences' outer products, or only "
            "their diagonal (pixel variances)",
        ),
        "model_error_scale": Key(
            "float",
            1.0,
            POSITIVE,
            "std of the added error in units of the refined-minus-fit difference (>1 when the "
            "refined model is itself far from converged)",
        ),
    },
    "sample": {
        "chains": Key("int", 4, AT_LEAST_ONE, "MCMC chains (spread over MPI groups)"),
        "steps": Key("int", 500, AT_LEAST_ONE, "steps per chain (more extends a finished run)"),
        "burn": Key(
            "float",
            0.2,
            _each(lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
            "fraction of each chain discarded as burn-in",
        ),
        "beta": Key(
            "float", 0.5, _each(lambda v: 0 < v <= 1, "a number in (0, 1]"), "gpCN/pCN step"
        ),
        "proposal": Key(
            "str", "laplace", _one_of("laplace", "prior"), "gpCN (laplace) or plain pCN (prior)"
        ),
        "centre": Key(
            "str",
            "auto",
            _one_of("auto", "map", "laplace"),
            "centre of the Laplace reference: the MAP point, uq's Laplace mean, or (auto) the "
            "one whose Gaussian fits the posterior better in a pilot of 8 draws each",
        ),
        "langevin": Key(
            "bool",
            False,
            None,
            "drift along the Laplace-preconditioned gradient (pCN-Langevin; an adjoint run "
            "per step)",
        ),
        "leapfrog": Key(
            "int",
            0,
            NON_NEGATIVE,
            "infinity-HMC: leapfrog steps of angle arcsin(beta) per proposal, each a gradient "
            "(0: off; about pi / (2 arcsin(beta)) follows a curved posterior furthest)",
        ),
        "checkpoint_every": Key("int", 25, AT_LEAST_ONE, "steps between chain checkpoints"),
        "seed": Key("int", 0, NON_NEGATIVE, "chain seed"),
    },
    "prepare": {
        "stacks": Key("list[str]", [], None, "raw STXM stacks"),
        "references": Key("str?", None, None, "reference spectra"),
        "out": Key("str", "data/video.npz", None, "video written"),
        "i0_region": Key("list[int]?", None, _all(_length(4), NON_NEGATIVE), "row0,row1,col0,col1"),
        "threshold": Key("float?", None, None, "segmentation threshold"),
        "min_size": Key("int", 20, NON_NEGATIVE, "smallest particle, pixels"),
        "bootstrap": Key("int", 100, NON_NEGATIVE, "bootstrap resamples of the energies for sigma"),
        "times": Key("list[float]?", None, _all(FINITE, _increasing), "frame times, s"),
    },
    "verify": {
        "blocks": Key("list[str]?", None, _one_of(*BLOCKS), "blocks checked (default: learn)"),
        "seed": Key("int", 1, NON_NEGATIVE, "direction seed"),
        "steps": Key("list[float]", [1e-2, 5e-3, 2.5e-3, 1.25e-3], _all(_non_empty, POSITIVE), ""),
    },
}

#: Sections that stay None when absent (instead of being filled with defaults).
OPTIONAL_SECTIONS = ("simulate",)


@dataclass(frozen=True)
class Case:
    """A parsed case: one plain dict per section, every default filled in.

    Attributes:
        dir: The case directory.
        file: The ``case.toml`` path.
        data, mesh, model, solver, inversion, driving, uq, sample, prepare, verify: Section
            dicts.
        simulate: The ``[simulate]`` dict, or None when the section is absent.
    """

    dir: Path
    file: Path
    data: dict[str, Any]
    mesh: dict[str, Any]
    model: dict[str, Any]
    solver: dict[str, Any]
    simulate: dict[str, Any] | None
    inversion: dict[str, Any]
    driving: dict[str, Any]
    uq: dict[str, Any]
    sample: dict[str, Any]
    prepare: dict[str, Any]
    verify: dict[str, Any]

    def resolve(self, relpath: str | os.PathLike) -> Path:
        """Return ``relpath`` relative to the case directory (absolute paths stay as they are)."""
        path = Path(relpath).expanduser()
        return path if path.is_absolute() else self.dir / path


def load_case(path: str | os.PathLike) -> Case:
    """Read ``CASE/case.toml`` (``path`` is the case directory or the toml file).

    Raises:
        CaseError: a missing or unparsable file, an unknown section or key (with a close match),
            a wrong type, a missing required key or an invalid value.
    """
    path = Path(path)
    file = path / CASE_FILE if path.is_dir() else path
    if not file.is_file():
        raise CaseError(
            file, None, "a case directory holding case.toml, or a .toml file", "no such file"
        )
    try:
        raw = tomllib.loads(file.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise CaseError(file, None, "a valid TOML file", f"{type(err).__name__}: {err}") from err
    sections = parse_sections(raw, file)
    case = Case(dir=file.parent.resolve(), file=file.resolve(), **sections)
    files = case.mesh["files"]
    if isinstance(files, str):
        case.mesh["files"] = str(case.resolve(files))
    elif files is not None:
        case.mesh["files"] = {lb: str(case.resolve(p)) for lb, p in files.items()}
    return case


def parse_sections(raw: dict[str, Any], file: str | os.PathLike) -> dict[str, Any]:
    """Validate a parsed TOML table against :data:`SCHEMA`; return the filled section dicts."""
    _unknown(raw, SCHEMA, file, "")
    out: dict[str, Any] = {}
    for name, schema in SCHEMA.items():
        if name not in raw and name in OPTIONAL_SECTIONS:
            out[name] = None
            continue
        out[name] = _parse_table(raw.get(name, {}), schema, file, name)
    _check_driving(out["driving"], file)
    _check_kinetics(out, "learn" in raw.get("inversion", {}), file)
    _check_psf(out, file)
    _check_sample(out["sample"], file)
    return out


def _unknown(table: dict[str, Any], schema: dict[str, Any], file, prefix: str) -> None:
    for key in table:
        if key not in schema:
            what = "section" if not prefix else "key"
            where = f"[{prefix}]" if prefix else "the case file"
            raise CaseError(
                file,
                prefix + key,
                f"a known {what} of {where}: " + ", ".join(schema),
                f"unknown {what} '{key}'{close_match_hint(key, schema)}",
            )


def _parse_table(table: Any, schema: dict[str, Any], file, path: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise CaseError(file, path, f"a table [{path}]", _toml_type(table))
    _unknown(table, schema, file, path + ".")
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        name = f"{path}.{key}"
        if isinstance(spec, dict):
            out[key] = _parse_table(table.get(key, {}), spec, file, name)
        elif key in table:
            out[key] = _convert(table[key], spec, file, name)
        elif spec.default is REQUIRED:
            raise CaseError(file, name, f"a value ({spec.type}) for the required key", "none given")
        else:
            default = spec.default
            out[key] = type(default)(default) if isinstance(default, list | dict) else default
    return out


def _convert(value: Any, spec: Key, file, name: str) -> Any:
    base = spec.type.rstrip("?")
    if base.startswith("list["):
        if not isinstance(value, list):
            raise CaseError(file, name, f"an array of {base[5:-1]}", _toml_type(value))
        value = [_scalar(v, base[5:-1], file, f"{name}[{i}]") for i, v in enumerate(value)]
    elif base == "files":
        value = _mesh_files(value, file, name)
    elif base == "table":
        if not isinstance(value, dict):
            raise CaseError(file, name, "a table", _toml_type(value))
        for k, v in value.items():
            if isinstance(v, list | dict) or not isinstance(v, str | int | float | bool):
                raise CaseError(file, f"{name}.{k}", "a string, number or boolean", _toml_type(v))
        value = dict(value)
    else:
        value = _scalar(value, base, file, name)
    if spec.check is not None and (expected := spec.check(value)) is not None:
        raise CaseError(file, name, expected, repr(value))
    return value


def _mesh_files(value: Any, file, name: str) -> dict[int, str] | str:
    """``[mesh] files``: a table label -> path, or one path with ``{label}`` in it."""
    if isinstance(value, str):
        if "{label}" not in value or value.replace("{label}", "").count("{"):
            raise CaseError(file, name, "a path pattern with '{label}'", repr(value))
        return value
    if not isinstance(value, dict) or not value:
        raise CaseError(
            file, name, "a table {label = path} or a path with '{label}'", _toml_type(value)
        )
    out: dict[int, str] = {}
    for k, v in value.items():
        if not k.isdigit() or int(k) < 1:
            raise CaseError(file, f"{name}.{k}", "a particle label (an integer >= 1)", repr(k))
        if not isinstance(v, str):
            raise CaseError(file, f"{name}.{k}", "a path", _toml_type(v))
        out[int(k)] = v
    return out


def _scalar(value: Any, kind: str, file, name: str) -> Any:
    ok = {
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
    }[kind]
    if not ok:
        names = {"float": "a float", "int": "an integer", "str": "a string", "bool": "a boolean"}
        raise CaseError(file, name, names[kind], _toml_type(value))
    return float(value) if kind == "float" else value


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return names.get(type(value), type(value).__name__) + f" ({value!r})"


def _check_psf(sections: dict[str, Any], file) -> None:
    for where, blocks in (
        ("inversion.learn", sections["inversion"]["learn"]),
        ("verify.blocks", sections["verify"]["blocks"] or []),
    ):
        if "psf_fwhm" in blocks and sections["data"]["psf_fwhm"] is None:
            raise CaseError(
                file,
                where,
                "[data] psf_fwhm (the starting PSF width and prior mean) with 'psf_fwhm'",
                "no [data] psf_fwhm",
            )


def _check_sample(sample: dict[str, Any], file) -> None:
    if sample["langevin"] and sample["leapfrog"] > 0:
        raise CaseError(
            file,
            "sample.leapfrog",
            "0 with langevin = true (pCN-Langevin and infinity-HMC are two kernels: choose one)",
            sample["leapfrog"],
        )


def _check_driving(driving: dict[str, Any], file) -> None:
    t, mu_e = driving["t"], driving["mu_e"]
    if (t is None) != (mu_e is None):
        given, missing = ("t", "mu_e") if mu_e is None else ("mu_e", "t")
        raise CaseError(
            file, f"driving.{missing}", f"'{missing}' given together with '{given}'", "none"
        )
    if t is not None and len(t) != len(mu_e):
        raise CaseError(file, "driving.mu_e", f"{len(t)} values, one per knot time", len(mu_e))


def _check_kinetics(sections: dict[str, Any], learn_given: bool, file) -> None:
    """Learned blocks must enter the kinetic law: ``j0`` only ``bv``, ``lambda`` only ``ciet``.

    The default ``[inversion] learn`` follows the law: its ``j0`` is dropped under the fixed
    Butler-Volmer laws and becomes ``lambda`` under ``ciet``; a ``learn`` given in the file is
    taken as written, and refused if it names a block the law does not contain.
    """
    kinetics = sections["model"]["kinetics"]
    inversion = sections["inversion"]
    if not learn_given and kinetics != "bv":
        swap = ["lambda"] if kinetics == "ciet" else []
        inversion["learn"] = [n for b in inversion["learn"] for n in (swap if b == "j0" else [b])]
    for field, blocks in (
        ("inversion.learn", inversion["learn"]),
        ("verify.blocks", sections["verify"]["blocks"] or []),
    ):
        unused = blocks_unused_by(kinetics, blocks)
        if unused:
            raise CaseError(
                file,
                field,
                f"blocks that [model] kinetics = {kinetics!r} contains ('j0' belongs to 'bv', "
                "'lambda' to 'ciet')",
                repr(unused),
            )
