"""The case file: defaults, paths, and one error per kind of bad case file."""

from __future__ import annotations

import textwrap

import pytest

from femkin.case import SCHEMA, load_case
from femkin.errors import CaseError

GOOD = """
[data]
video = "data/video.npz"
[mesh]
size = 2                     # an int where a float is expected
[model]
kappa = 0.02
mu_h = [3.2, 0.0, 0.6]
j0 = [-0.6, 0.3]
j0_prefactor = [0.5, 0]
k0 = 1.5e-3
[simulate]
k_map = "data/k_map.npy"
noise = 0.07
seed = 1
[inversion]
learn = ["m", "k0"]
[inversion.prior]
m_std = 0.3
[solver.petsc_options]
snes_linesearch_type = "bt"
ksp_max_it = 10
[driving]
t = [0, 100.0]
mu_e = [-3, -4]
"""


def _write(tmp_path, text: str):
    (tmp_path / "case.toml").write_text(textwrap.dedent(text))
    return tmp_path


def test_good_case_defaults_and_paths(tmp_path):
    case = load_case(_write(tmp_path, GOOD))
    assert case.dir == tmp_path.resolve() and case.file == tmp_path.resolve() / "case.toml"
    assert case.resolve(case.data["video"]) == tmp_path.resolve() / "data/video.npz"
    assert case.resolve("/abs/x.npy").as_posix() == "/abs/x.npy"
    assert case.mesh["size"] == 2.0 and isinstance(case.mesh["size"], float)
    assert case.mesh["smoothing"] == 0.5 and case.mesh["min_hole_area"] == 4.0
    assert case.model["mu_h"] == [3.2, 0.0, 0.6] and case.model["j0_prefactor"] == [0.5, 0.0]
    assert case.model["alpha"] == 0.5 and case.model["element"] == "P1"
    assert case.model["kinetics"] == "bv" and case.model["lambda"] == 8.3
    assert case.simulate["model"]["kinetics"] is None and case.simulate["model"]["lambda"] is None
    assert case.simulate["noise"] == 0.07 and case.simulate["seed"] == 1
    assert case.simulate["outputs"] == ["npz", "xdmf", "png"] and case.simulate["m_std"] is None
    assert case.inversion["learn"] == ["m", "k0"] and case.inversion["tao_type"] == "bnls"
    assert case.inversion["prior"] == {
        "m_std": 0.3,
        "m_length": 0.2,
        "coefficient_std": 2.0,
        "k0_std": 2.0,
        "kappa_std": 0.02,
        "coherency_std": 2.0,
        "lambda_std": 0.5,
        "psf_fwhm_std": 0.5,
        "mu_e_std": 1.0,
        "initial_std": 0.1,
    }
    assert case.solver["petsc_options"] == {"snes_linesearch_type": "bt", "ksp_max_it": 10}
    assert case.solver["dt_initial"] is None and case.solver["newton_max_it"] == 25
    assert case.driving == {"mode": "data", "t": [0.0, 100.0], "mu_e": [-3.0, -4.0]}
    assert case.uq["max_rank"] == 50 and case.verify["steps"][-1] == 1.25e-3
    assert case.prepare["out"] == "data/video.npz" and case.prepare["i0_region"] is None
    # the toml path works as well as the folder
    assert load_case(tmp_path / "case.toml").model == case.model


def test_defaults_are_fresh_copies(tmp_path):
    a = load_case(_write(tmp_path, '[data]\nvideo = "v.npz"\n'))
    a.model["mu_h"].append(1.0)
    b = load_case(tmp_path)
    assert b.model["mu_h"] == [3.2] and b.simulate is None
    assert SCHEMA["model"]["mu_h"].default == [3.2]


BAD = {
    "unknown key with hint": (
        '[data]\nvideo="v"\n[model]\nkapa = 1.0\n',
        "model.kapa",
        "did you mean 'kappa'",
    ),
    "unknown section with hint": (
        '[data]\nvideo="v"\n[simulat]\nnoise=0.1\n',
        "simulat",
        "did you mean 'simulate'",
    ),
    "unknown prior key": (
        '[data]\nvideo="v"\n[inversion.prior]\nm_sdt=1.0\n',
        "inversion.prior.m_sdt",
        "m_std",
    ),
    "unknown key no hint": ('[data]\nvideo="v"\nzzz=1\n', "data.zzz", "unknown key 'zzz'"),
    "missing required": ("[mesh]\nsize=1.0\n", "data.video", "none given"),
    "string for float": ('[data]\nvideo="v"\n[model]\nkappa="0.1"\n', "model.kappa", "a string"),
    "float for int": (
        '[data]\nvideo="v"\n[solver]\nnewton_max_it=2.5\n',
        "solver.newton_max_it",
        "an integer",
    ),
    "bool for float": ('[data]\nvideo="v"\n[model]\nk0=true\n', "model.k0", "a boolean"),
    "int for str": ("[data]\nvideo=3\n", "data.video", "expected a string"),
    "scalar for list": ('[data]\nvideo="v"\n[model]\nmu_h=3.2\n', "model.mu_h", "an array"),
    "bad list element": (
        '[data]\nvideo="v"\n[model]\nmu_h=[3.2,"a"]\n',
        "model.mu_h[1]",
        "a float",
    ),
    "section not a table": ("data = 3\n", "data", "a table"),
    "petsc option array": (
        '[data]\nvideo="v"\n[solver.petsc_options]\nx=[1]\n',
        "solver.petsc_options.x",
        "an array",
    ),
    "negative kappa": ('[data]\nvideo="v"\n[model]\nkappa=-0.1\n', "model.kappa", "non-negative"),
    "zero mesh size": ('[data]\nvideo="v"\n[mesh]\nsize=0\n', "mesh.size", "positive"),
    "alpha one": ('[data]\nvideo="v"\n[model]\nalpha=1.0\n', "model.alpha", "(0, 1)"),
    "alpha zero": ('[data]\nvideo="v"\n[model]\nalpha=0\n', "model.alpha", "(0, 1)"),
    "pq length": (
        '[data]\nvideo="v"\n[model]\nj0_prefactor=[0.5]\n',
        "model.j0_prefactor",
        "length 2",
    ),
    "unknown block": (
        '[data]\nvideo="v"\n[inversion]\nlearn=["m","k1"]\n',
        "inversion.learn",
        "'k0'",
    ),
    "unknown verify block": (
        '[data]\nvideo="v"\n[verify]\nblocks=["x"]\n',
        "verify.blocks",
        "mu_h",
    ),
    "unknown driving mode": (
        '[data]\nvideo="v"\n[driving]\nmode="fit"\n',
        "driving.mode",
        "'fitted'",
    ),
    "driving t only": ('[data]\nvideo="v"\n[driving]\nt=[0.0,1.0]\n', "driving.mu_e", "together"),
    "driving lengths": (
        '[data]\nvideo="v"\n[driving]\nt=[0.0,1.0]\nmu_e=[1.0]\n',
        "driving.mu_e",
        "2 values",
    ),
    "driving t decreasing": (
        '[data]\nvideo="v"\n[driving]\nt=[1.0,0.0]\nmu_e=[1.0,2.0]\n',
        "driving.t",
        "increasing",
    ),
    "storage": ('[data]\nvideo="v"\n[solver]\nstorage="tape"\n', "solver.storage", "'disk'"),
    "hessian": ('[data]\nvideo="v"\n[uq]\nhessian="gn"\n', "uq.hessian", "'gauss-newton'"),
    "negative noise": ('[data]\nvideo="v"\n[simulate]\nnoise=-1\n', "simulate.noise", "non-neg"),
    "nan k0": ('[data]\nvideo="v"\n[model]\nk0=nan\n', "model.k0", "positive"),
    "i0_region length": (
        '[data]\nvideo="v"\n[prepare]\ni0_region=[0,1,2]\n',
        "prepare.i0_region",
        "length 4",
    ),
    "learned psf without a width": (
        '[data]\nvideo="v"\n[inversion]\nlearn=["m", "psf_fwhm"]\n',
        "inversion.learn",
        "[data] psf_fwhm",
    ),
    "empty steps": ('[data]\nvideo="v"\n[verify]\nsteps=[]\n', "verify.steps", "non-empty"),
    "unknown kinetics": (
        '[data]\nvideo="v"\n[model]\nkinetics="marcus"\n',
        "model.kinetics",
        "one of 'bv', 'bv-constant', 'bv-lim', 'ciet'",
    ),
    "unknown true kinetics": (
        '[data]\nvideo="v"\n[simulate.model]\nkinetics="BV"\n',
        "simulate.model.kinetics",
        "'bv-lim'",
    ),
    "zero lambda": ('[data]\nvideo="v"\n[model]\nlambda=0.0\n', "model.lambda", "positive"),
    "j0 learned under a fixed law": (
        '[data]\nvideo="v"\n[model]\nkinetics="ciet"\n[inversion]\nlearn=["j0","lambda"]\n',
        "inversion.learn",
        "found ['j0']",
    ),
    "lambda learned under bv": (
        '[data]\nvideo="v"\n[inversion]\nlearn=["mu_h","lambda"]\n',
        "inversion.learn",
        "found ['lambda']",
    ),
    "lambda verified under bv-lim": (
        '[data]\nvideo="v"\n[model]\nkinetics="bv-lim"\n[verify]\nblocks=["k0","lambda"]\n',
        "verify.blocks",
        "kinetics = 'bv-lim'",
    ),
    "two mcmc kernels": (
        '[data]\nvideo="v"\n[sample]\nlangevin=true\nleapfrog=4\n',
        "sample.leapfrog",
        "choose one",
    ),
    "negative leapfrog": (
        '[data]\nvideo="v"\n[sample]\nleapfrog=-1\n',
        "sample.leapfrog",
        "non-negative",
    ),
    "zero checkpoint": (
        '[data]\nvideo="v"\n[inversion]\ncheckpoint_every=0\n',
        "inversion.checkpoint_every",
        ">= 1",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_case(tmp_path, name):
    text, field, message = BAD[name]
    with pytest.raises(CaseError) as info:
        load_case(_write(tmp_path, text))
    assert info.value.field == field, str(info.value)
    assert message in str(info.value), str(info.value)
    assert str(tmp_path / "case.toml") in str(info.value)


def test_invalid_toml(tmp_path):
    with pytest.raises(CaseError, match="valid TOML"):
        load_case(_write(tmp_path, "[data\nvideo = 1"))


def test_missing_case_file(tmp_path):
    with pytest.raises(CaseError, match="no such file") as info:
        load_case(tmp_path)
    assert info.value.field is None and "case.toml" in str(info.value)


def test_kinetic_laws(tmp_path):
    """Each law parses; lambda is learnable under ciet, and [simulate.model] picks the truth's."""
    for law in ("bv", "bv-constant", "bv-lim", "ciet"):
        learn = '["mu_h","k0","m","lambda"]' if law == "ciet" else '["mu_h","k0","m"]'
        case = load_case(
            _write(
                tmp_path,
                f'[data]\nvideo="v"\n[model]\nkinetics="{law}"\nlambda=6.0\n'
                f'[inversion]\nlearn={learn}\n[simulate.model]\nkinetics="ciet"\nlambda=9.0\n',
            )
        )
        assert case.model["kinetics"] == law and case.model["lambda"] == 6.0
        default = load_case(_write(tmp_path, f'[data]\nvideo="v"\n[model]\nkinetics="{law}"\n'))
        assert (
            default.inversion["learn"]
            == {
                "bv": ["mu_h", "j0", "k0", "m"],
                "bv-constant": ["mu_h", "k0", "m"],
                "bv-lim": ["mu_h", "k0", "m"],
                "ciet": ["mu_h", "lambda", "k0", "m"],
            }[law]
        )
        assert case.simulate["model"] == {
            **case.simulate["model"],
            "kinetics": "ciet",
            "lambda": 9.0,
        }
