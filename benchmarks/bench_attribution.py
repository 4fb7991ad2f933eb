"""Attribution of twin data to the law (and observation) that made them, by the Laplace evidence.

Each twin is the tiny disc particle of the workflow tests (60 pixels of 0.05 um, fitting mesh
1.5 pixels, simulation mesh 1 pixel, noise 0.07, frames over a 1200 s lithiation-delithiation
cycle, variable-step BDF2) simulated with one kinetic law or observation; every variant is
a case directory that fits the twin's simulated video with another model
(``tests/compare_cases.py``), and ``femkin compare`` ranks them. Twins and variants:

* ``ciet``: CIET truth (lambda = 6 kT, k0 = 0.06 1/s, uniform k, 13 frames) under a strong
  drive (mu_e 1 -> 5.5 -> -6 kT, overpotentials up to ~8 kT, where the Marcus-Hush-Chidsey
  rate saturates);
* ``lim``: Butler-Volmer with Lim et al.'s j0 = c^(1/2) (1-c)^(3/2) (k0 = 2e-3 1/s), the same
  drive;

  both fitted by ``ciet`` (mu_h, k0 and lambda learned, lambda's prior 8.3 kT, std 0.5 in
  ln lambda), ``ciet-8.3`` (lambda fixed at 8.3 kT; mu_h, k0), ``bv-lim`` and ``bv-constant``
  (mu_h, k0) and ``bv-flex`` (Lim's j0 times a learned exp(b_1 P_1 + b_2 P_2) of 1 - 2c; mu_h,
  j0, k0);
* ``psf``: Lim's law, 25 frames, the milder cycle of ``tests/test_compare.py`` (mu_e 1 -> 4 ->
  -3 kT), observed through a Gaussian PSF of FWHM 0.075 um (1.5 pixels), with a rough true ln k(x)
  drawn from the fits' BiLaplacian prior (std 0.7, length 0.1 um) so that c has structure at
  the pixel scale, every fit learning m; fitted by ``point`` (point sampling), ``psf`` (the true
  width, fixed) and ``psf-learned`` (the width learned, prior median 0.05 um, std 0.5 in ln);
* ``point``: the same without the PSF, fitted by the same three;
* ``flex``: the default learned-j0 Butler-Volmer law with a j0 that is none of the closed forms,
  j0 = c^(1/2) (1-c)^(1/2) exp(b_1 P_1 + b_2 P_2) of 1 - 2c, b = (-0.6, 0.3) as the demo's
  truth (k0 = 2e-3 1/s), the strong drive and 13 frames of the law twins; fitted by ``bv`` (the
  family that made it: mu_h, j0, k0, the true prefactor), ``bv-lim``, ``bv-constant`` (mu_h,
  k0) and ``ciet`` (mu_h, k0, lambda).

Prints one JSON object: per twin the targets of issue 15 (each margin and whether it is met)
and per variant the log evidence, log Bayes factor against the twin's own model (positive: the
twin's model wins), misfit RMS, parameters, N_eff, converged flag, stop reason, the learned
global coefficients and the wall time of the variant's fit + UQ step.

Measured 2026-12-03 (one rank, 2-core machine shared with other jobs; 7-95 s per fit, ~6 min
in all): every fit converged and every target met. CIET twin: ciet 867.18, bv-flex -11.3,
ciet-8.3 -19.5, bv-lim -53.7, bv-constant -815.8 (lambda 5.02 kT, k0 0.046 1/s). bv-lim twin:
bv-lim 870.12, bv-flex -3.2, ciet -14.5 (lambda 2.0 kT), ciet-8.3 -38.9, bv-constant -1603.
PSF twin: psf 1726.49, psf-learned -3.0 (width 0.027 um), point -9.0. Point twin: point
1681.59, psf-learned -7.1 (0.016 um), psf -41.1.

Learned-j0 twin (``--twins flex``, measured 2026-12-03 alone, 497 s on the loaded machine):
bv 863.87 (misfit RMS 0.071, b = (-0.62, 0.15), k0 1.8e-3 1/s, mu_h (2.74, 0.16); converged),
bv-constant -189.3 (RMS 0.088, converged), ciet -890.3 (RMS 0.131; NOT converged: the line
search failed at iteration ~30 of 60, lambda 13.0 kT, k0 1.23 1/s, so its log Z is a Laplace
value away from its MAP point), bv-lim -1526.5 (RMS 0.161, converged). Targets (bv beats each
fixed law by > 3) met; the ciet margin rests on an unconverged fit.

Run: ``.venv/bin/python benchmarks/bench_attribution.py [--twins ciet lim psf point flex]``
(1-2 min per twin on one core; ``--keep DIR`` keeps the case directories).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import shutil
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # compare_cases and workflow_case

from compare_cases import (  # noqa: E402
    LAWS,
    STRONG,
    _cycle,
    write_law_twin,
    write_psf_twin,
    write_twin,
    write_variant,
)

#: The learned-j0 twin's truth: j0 = c^p (1-c)^q exp(b_1 P_1 + b_2 P_2) of 1 - 2c (the demo's b),
#: not one of the closed forms; its fit ("bv") learns b with the true (p, q).
FLEX_PQ, FLEX_B = (0.5, 0.5), (-0.6, 0.3)


def write_flex_twin(root: pathlib.Path) -> list[pathlib.Path]:
    """The twin made with the default learned-j0 law (case "bv", fitting mu_h, j0, k0) and its
    fixed-law variants bv-lim, bv-constant and ciet (lambda learned); the twin first.
    """
    twin = write_twin(root / "bv", FLEX_PQ, learn=["mu_h", "j0", "k0"], **STRONG)
    toml = twin / "case.toml"
    text = toml.read_text().replace("j0 = []", "j0 = [0.0, 0.0]", 1)
    toml.write_text(text + f"j0 = {list(FLEX_B)}\n")  # [simulate.model] is the last table
    cases = [twin]
    for name in ("bv-lim", "bv-constant", "ciet"):
        kw = dict(LAWS[name])
        write_variant(root / name, "bv", FLEX_PQ, [], kw.pop("learn"), **kw, **_cycle(STRONG))
        cases.append(root / name)
    return cases


def run_twin(root: pathlib.Path, name: str) -> dict:
    """Write, fit and compare one twin's variants; the record."""
    from femkin._fem import MPI
    from femkin.commands.compare import compare
    from femkin.commands.run import run_case

    comm = MPI.COMM_WORLD
    if name == "flex":
        cases = write_flex_twin(root)
    elif name in ("ciet", "lim"):
        cases = write_law_twin(root, "bv-lim" if name == "lim" else "ciet")
    else:
        cases = write_psf_twin(root, name == "psf")
    wall = {}
    for case in cases:
        t0 = time.perf_counter()
        run_case(case, quiet=True, comm=comm)
        wall[case.name] = time.perf_counter() - t0
    table = compare(cases, run_missing=False, quiet=True, comm=comm)
    rows = {r["case"]: r for r in table["rows"]}
    own = rows[cases[0].name]["log_evidence"]
    out = {}
    for case in cases:
        r = rows[case.name]
        summary = json.loads((case / "results" / "summary.json").read_text())
        out[case.name] = {
            "model": r["model"],
            "log_evidence": r["log_evidence"],
            "log_bf_own_vs_this": own - r["log_evidence"],
            "log_likelihood": r["log_likelihood"],
            "misfit_rms": r["misfit_rms"],
            "n_parameters": r["n_parameters"],
            "effective_parameters": r["effective_parameters"],
            "converged": r["converged"],
            "stop_reason": r["stop_reason"],
            "coefficients": {
                k: v
                for k, v in summary["coefficients"].items()
                if k in ("k0", "lambda", "psf_fwhm", "mu_h", "j0")
            },
            "wall_s": wall[case.name],
        }
    z = {n: v["log_evidence"] for n, v in out.items()}
    return {
        "truth_model": cases[0].name,
        "best": table["best"],
        "targets": targets(cases[0].name, z),
        "variants": out,
    }


def targets(truth: str, z: dict) -> dict:
    """The issue's targets on one twin's log evidences ``z``: each (margin, met)."""
    if truth == "psf":  # blurred data: the PSF (fixed and learned) over point sampling
        wanted = {("psf", "point"): 3.0, ("psf-learned", "point"): 3.0}
    elif truth == "bv":  # learned-j0 data: the family that made them beats every fixed law
        wanted = {(truth, n): 3.0 for n in z if n != truth}
    elif truth == "point":  # point-sampled data: point sampling wins or ties (Occam)
        wanted = {("point", "psf-learned"): -1.0, ("point", "psf"): 3.0}
    else:  # a kinetic law: beats every other law clearly, ties the flexible family at worst
        wanted = {(truth, n): 3.0 for n in z if n not in (truth, "bv-flex")}
        wanted[(truth, "bv-flex")] = -1.0
    return {
        f"{a} - {b} > {bound:g}": (z[a] - z[b], bool(z[a] - z[b] > bound))
        for (a, b), bound in wanted.items()
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--twins", nargs="+", default=["ciet", "lim", "psf", "point", "flex"])
    parser.add_argument("--keep", type=pathlib.Path, default=None, help="keep the cases here")
    args = parser.parse_args(argv)
    record = {
        "case": "tiny disc twin: ~60 pixels of 0.05 um, mesh 1.5 px (simulation 1 px), "
        "13 frames over 1200 s, noise 0.07",
        "twins": {},
    }
    for name in args.twins:
        root = args.keep / name if args.keep else pathlib.Path(tempfile.mkdtemp())
        root.mkdir(parents=True, exist_ok=True)
        try:
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # the solvers' warnings
                record["twins"][name] = run_twin(root, name)
            record["twins"][name]["wall_s"] = time.perf_counter() - t0
        finally:
            if args.keep is None:
                shutil.rmtree(root, ignore_errors=True)
        print(json.dumps({name: record["twins"][name]}), file=sys.stderr, flush=True)
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
