"""The Taylor verdict of ``femkin verify``: a correct derivative passes, a wrong one fails.

The synthetic sequences are the ones reported on a two-particle twin (issue 16): gradient
remainders whose first pair lies outside the asymptotic range (rates 0.86, 1.67, 1.86) and a
Hessian whose first pair gave 2.39 (then 2.88, 2.97). A gradient scaled by 1.1 in one block on
a real twin case must fail.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from workflow_case import write_case

from femkin._fem import MPI
from femkin.cli import main
from femkin.verification import block_direction, taylor_test, taylor_verdict

STEPS = [1e-2, 5e-3, 2.5e-3, 1.25e-3]
#: The ``[verify] steps`` of the workflow case.
STEPS_CASE = [0.04, 0.02, 0.01, 0.005]


def _with_rates(rates, r0=1.0):
    r = [r0]
    for q in rates:
        r.append(r[-1] / 2.0**q)
    return r


def test_issue_sequences_pass_on_their_asymptotic_range():
    g = taylor_verdict(STEPS, [4.0e-2, 2.2e-2, 6.9e-3, 1.9e-3], 2)
    assert g.passed, g
    assert g.pairs == [2] and g.rate == pytest.approx(np.log2(6.9 / 1.9), rel=1e-12)
    assert g.pair_rates[0] == pytest.approx(0.862, abs=1e-3)
    h = taylor_verdict(STEPS, _with_rates([2.39, 2.88, 2.97]), 3)
    assert h.passed and h.pairs == [1, 2], h
    assert h.rate == pytest.approx(2.925, abs=1e-9)  # the slope fitted over the last 3 points


def test_first_order_remainder_fails():
    # a wrong gradient: the error term e*h dominates at small steps, whatever happens above
    h = np.array(STEPS)
    v = taylor_verdict(STEPS, np.abs(2e-3 * h + 1.0 * h**2 - 30.0 * h**3), 2)
    assert not v.passed and v.pairs == [2], v
    assert 1.0 < v.rate < 1.5
    assert "expected 2" in v.reason
    # quadratic remainders fail as a Hessian check
    assert not taylor_verdict(STEPS, _with_rates([2.0, 2.0, 2.0]), 3).passed


def test_roundoff_pairs_are_flagged_and_not_used():
    r = _with_rates([2.0, 2.0, 2.0], r0=1e-8)
    r[-1] = 2e-12  # the last remainder is at the noise of J
    v = taylor_verdict(STEPS, r, 2, floor=5e-12)
    assert v.passed and v.roundoff == [2] and v.pairs == [0, 1], v
    assert v.rate == pytest.approx(2.0, abs=1e-12)
    # the noise floor lifts a remainder: the spoilt pair would fail, but it is not used
    r[-1] = 9e-12
    v = taylor_verdict(STEPS, r, 2, floor=1e-11)
    assert v.passed and v.roundoff == [2]


def test_all_below_noise_is_exact_and_none_usable_fails():
    v = taylor_verdict(STEPS, [1e-14, 2e-14, 1e-14, 3e-15], 3, floor=1e-12)
    assert v.passed and np.isnan(v.rate) and v.roundoff == [0, 1, 2]
    # one remainder above the noise but no pair of them: nothing to judge
    v = taylor_verdict(STEPS, [1e-6, 1e-14, 1e-14, 1e-14], 2, floor=1e-12)
    assert not v.passed and v.pairs == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="remainders"):
        taylor_verdict(STEPS, [1.0, 2.0], 2)
    with pytest.raises(ValueError, match="decrease"):
        taylor_verdict(STEPS[::-1], [1.0, 0.5, 0.2, 0.1], 2)


class _ScaledGradient:
    """An inverse problem whose gradient is scaled by ``factor`` in one block (a planted bug)."""

    def __init__(self, problem, block: str, factor: float):
        self._problem, self._factor = problem, factor
        self._mask = block_direction(problem, block, seed=5).getArray() != 0.0

    def __getattr__(self, name):
        return getattr(self._problem, name)

    def gradient(self, x, g):
        value = self._problem.gradient(x, g)
        g.getArray()[self._mask] *= self._factor
        return value


@pytest.mark.mpi
def test_wrong_gradient_fails_and_right_one_passes(mpi_tmp_path, capsys, monkeypatch):
    from femkin.study import build_problem, open_study

    comm = MPI.COMM_WORLD
    case = mpi_tmp_path / "case"
    if comm.rank == 0:
        write_case(case, n_frames=3)
    comm.barrier()
    assert main(["simulate", str(case), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["verify", str(case), "--json", "--blocks", "k0", "m"]) == 0
    out = capsys.readouterr().out
    report = comm.bcast(json.loads(out.strip().splitlines()[-1]) if comm.rank == 0 else None)
    assert report["passed"] is True
    for block in ("k0", "m"):
        verdict = report["blocks"][block]["gradient"]
        assert verdict["passed"] and verdict["pairs"] and verdict["rate"] > 1.8, verdict
        assert report["blocks"][block]["hessian"]["passed"]

    study = open_study(case, comm)
    problem = build_problem(study, comm)
    x = problem.initial_vector()
    wrong = taylor_test(_ScaledGradient(problem, "k0", 1.1), x, "k0", steps=STEPS_CASE, seed=1)
    assert not wrong.gradient.passed and wrong.gradient.rate < 1.5, wrong
    assert not wrong.passed

    # the command exits with status 1 and says which block failed
    import femkin.study

    def planted(study, comm, **kwargs):
        return _ScaledGradient(build_problem(study, comm, **kwargs), "m", 1.1)

    monkeypatch.setattr(femkin.study, "build_problem", planted)
    capsys.readouterr()
    assert main(["verify", str(case), "--json", "--blocks", "m"]) == 1
    out = capsys.readouterr().out
    report = comm.bcast(json.loads(out.strip().splitlines()[-1]) if comm.rank == 0 else None)
    assert report["passed"] is False
    assert report["blocks"]["m"]["gradient"]["passed"] is False
    assert report["blocks"]["m"]["gradient"]["rate"] < 1.5
