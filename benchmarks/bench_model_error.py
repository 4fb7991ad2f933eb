"""Coverage on a truth femkin did not make at the fitting settings, without and with model error.

For ``N`` realisations (seed ``s`` changes the noise and the true ln k field) of the tiny twin
case of the workflow tests (``twin_case.write_case``, one ~60-pixel particle, 5 frames):

1. simulate the data on a much finer mesh with a tight time tolerance (``--truth-mesh`` px,
   BDF2 ``--truth-tol``): the truth is not femkin's discretisation at the fitting settings;
2. fit at the coarse settings (``--fit-mesh`` px, ``--fit-scheme`` with ``--fit-tol``: BDF2
   ``time_tol`` or Euler ``dc_max``), Newton-CG up to ``--max-iterations``;
3. ``femkin uq`` with ``[uq] model_error`` = each of ``--modes`` (``none``, ``map``, ``samples``;
   ``map-diagonal`` etc. with ``model_error_form = "diagonal"``) at the same MAP point
   (refined model: ``[uq] model_error_mesh`` / ``model_error_time``);
4. per mode: the fraction of c in [0.1, 0.9] (grid of 0.01) where the 95% bands of mu_h and
   j0 (``results/mu_h.csv``, ``j0.csv``) hold the true curve, the median mu_h band width, and
   the z-scores ``(mean - truth) / std`` of the global coefficients. A mode may end in
   ``:full`` (e.g. ``none:full``): the same with ``[uq] hessian = "full"`` (the Gauss-Newton
   Hessian is the default); ``+marginal`` (e.g. ``none+marginal``) centres the coefficients on
   their Laplace-marginal mode (``[uq] coefficient_mean = "marginal"``) instead of the joint
   MAP point.

The issue's targets: bands hold the truth on >= 80% of c with the median mu_h width < 0.5 kT;
coefficient coverage in [0.85, 1] and z-rms in [0.7, 1.3] over the realisations. Every record
holds the fit's stop reason (converged or not) and the model-error summary of ``uq.json``.

Realisations run as separate processes (``--jobs`` at a time). Prints one JSON object.

Run: ``.venv/bin/python benchmarks/bench_model_error.py --realisations 4 --jobs 2``
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy.stats import chi2

ROOT = pathlib.Path(__file__).resolve().parents[1]
Z95 = 1.959963984540054
C_RANGE = (0.1, 0.9)


def _set(text: str, section: str, key: str, value: str) -> str:
    """Set ``key = value`` in ``[section]`` of a case.toml text (added when absent)."""
    pattern = re.compile(rf"(\[{re.escape(section)}\]\n)((?:(?!\[).*\n)*)")
    match = pattern.search(text)
    if match is None:
        return text + f"\n[{section}]\n{key} = {value}\n"
    body = match.group(2)
    line = re.compile(rf"^{re.escape(key)} = .*$", re.M)
    body = line.sub(f"{key} = {value}", body) if line.search(body) else body + f"{key} = {value}\n"
    return text[: match.start(2)] + body + text[match.end(2) :]


def _band_coverage(csv: pathlib.Path, truth: np.ndarray, grid: np.ndarray) -> dict:
    data = np.genfromtxt(csv, delimiter=",", names=True)
    c = data["c"]
    inside = (c >= C_RANGE[0] - 1e-9) & (c <= C_RANGE[1] + 1e-9)
    true = np.interp(c, grid, truth)
    lo, hi = data["lo"], data["hi"]
    held = (true >= lo) & (true <= hi)
    value = data[csv.stem]
    return {
        "coverage": float(np.mean(held[inside])),
        "median_width": float(np.median((hi - lo)[inside])),
        "median_log_width": float(np.median(np.log(hi[inside] / lo[inside])))
        if np.all(lo[inside] > 0)
        else None,
        "max_error": float(np.max(np.abs(value - true)[inside])),
    }


def _mahalanobis_parts(corr: np.ndarray, z: np.ndarray) -> dict:
    """``z^T R^{-1} z`` split along the eigenvectors of the correlation ``R`` (ascending)."""
    w, u = np.linalg.eigh(corr)
    proj = u.T @ z
    return {
        "eigenvalues": w.tolist(),
        "parts": (proj**2 / w).tolist(),
        "directions": u.T.tolist(),
    }


def one(seed: int, directory: pathlib.Path, args) -> dict:
    """Simulate finely, fit coarsely, run uq in every mode; returns the realisation's record."""
    from twin_case import write_case

    from femkin.cli import main
    from femkin.physics.acr import ln_j0, mu_h

    case = write_case(
        directory / f"case_{seed}", max_iterations=args.max_iterations, n_frames=args.frames
    )
    text = (case / "case.toml").read_text()
    text = _set(text, "simulate", "seed", str(seed))
    text = _set(text, "simulate", "noise", str(args.noise))
    if args.truth == "prior":  # the true m: a draw of the inversion's own prior
        text = _set(text, "simulate", "m_std", "0.5")
        text = _set(text, "simulate", "m_length", "0.15")
        text = _set(text, "simulate", "m_field", '"prior"')
    text = _set(text, "simulate", "mesh_size", str(args.truth_mesh))
    text = _set(text, "solver", "scheme", '"bdf2"')
    text = _set(text, "solver", "time_tol", str(args.truth_tol))
    (case / "case.toml").write_text(text)
    t0 = time.perf_counter()
    assert main(["simulate", str(case), "--quiet"]) == 0
    t_sim = time.perf_counter() - t0
    # The fit's settings: coarse mesh and steps (the twin's data stay in simulated/).
    text = _set(text, "mesh", "size", str(args.fit_mesh))
    text = _set(text, "solver", "scheme", f'"{args.fit_scheme}"')
    text = _set(text, "solver", "time_tol" if args.fit_scheme == "bdf2" else "dc_max", args.fit_tol)
    text = _set(text, "uq", "max_rank", str(args.max_rank))
    text = _set(text, "uq", "samples", "0")
    text = _set(text, "uq", "model_error_mesh", str(args.me_mesh))
    text = _set(text, "uq", "model_error_time", str(args.me_time))
    text = _set(text, "uq", "model_error_samples", str(args.me_samples))
    (case / "case.toml").write_text(text)
    t0 = time.perf_counter()
    main(["invert", str(case), "--quiet"])
    t_fit = time.perf_counter() - t0
    summary = json.loads((case / "results" / "summary.json").read_text())
    truth = np.load(case / "simulated" / "truth.npz")
    grid = np.linspace(0.01, 0.99, 99)
    p, q = truth["j0_prefactor"]
    true_mu = mu_h(grid, truth["mu_h"], np.log)
    true_j0 = np.exp(ln_j0(grid, truth["j0"], p, q, np.log))
    true_coef = np.concatenate([truth["mu_h"], truth["j0"], [np.log(float(truth["k0"]))]])
    modes = {}
    for mode in args.modes:
        me_mode, _, hessian = mode.partition(":")  # e.g. "none:full"
        me_mode, _, centre = me_mode.partition("+")  # e.g. "none+marginal"
        me_mode, _, form = me_mode.partition("-")  # e.g. "map-diagonal"
        mode_text = _set(text, "uq", "model_error", f'"{me_mode}"')
        mode_text = _set(mode_text, "uq", "coefficient_mean", f'"{centre or "map"}"')
        mode_text = _set(mode_text, "uq", "hessian", f'"{hessian or "gauss-newton"}"')
        (case / "case.toml").write_text(
            _set(mode_text, "uq", "model_error_form", f'"{form or "low-rank"}"')
        )
        t0 = time.perf_counter()
        flags = [] if summary["converged"] else ["--allow-unfinished"]
        assert main(["uq", str(case), "--quiet", *flags]) == 0
        t_uq = time.perf_counter() - t0
        uq = json.loads((case / "results" / "uq.json").read_text())
        mean = np.concatenate([v["mean"] for v in uq["coefficients"].values()])
        std = np.concatenate([v["std"] for v in uq["coefficients"].values()])
        z = (mean - true_coef) / std
        corr = np.asarray(uq["correlation"], dtype=float)
        record = {
            "mu_h": _band_coverage(case / "results" / "mu_h.csv", true_mu, grid),
            "j0": _band_coverage(case / "results" / "j0.csv", true_j0, grid),
            "names": uq["coefficient_names"],
            "z": z.tolist(),
            # squared Mahalanobis distance of the truth under the joint Laplace marginal of the
            # coefficients: chi^2 with len(z) degrees of freedom if the posterior is calibrated
            "mahalanobis2": float(z @ np.linalg.solve(corr, z)),
            # where it comes from: its parts along the correlation's eigenvectors (ascending
            # eigenvalues; the first is the combination the data fix most tightly)
            "mahalanobis2_parts": _mahalanobis_parts(corr, z),
            "std": std.tolist(),
            "rank": uq["rank"],
            "uq_s": t_uq,
        }
        if "marginal_mode" in uq:
            record["marginal_mode"] = {
                k: uq["marginal_mode"][k]
                for k in (
                    "shift_over_std",
                    "half_log_det",
                    "field_rank",
                    "failed",
                    "hessian_actions",
                )
            }
        if "model_error" in uq:
            me = uq["model_error"]
            record["model_error"] = {
                k: me[k]
                for k in (
                    "difference_rms",
                    "noise_rms",
                    "band_median_width",
                    "p1_dofs",
                    "points",
                    "wall_time",
                )
            }
        modes[mode] = record
    shutil.copy(case / "case.toml", directory / f"case_{seed}.toml")
    marginal = None
    if args.marginal_check and "none" in modes:
        uq = json.loads((case / "results" / "uq.json").read_text())
        joint_map = np.concatenate([v["map"] for v in uq["coefficients"].values()])
        marginal = marginal_check(case, text, joint_map, true_coef, modes["none"])
    return {
        "seed": seed,
        "fit": {
            "converged": summary["converged"],
            "stop_reason": summary["stop_reason"],
            "iterations": summary["iterations"],
            "misfit_rms": summary["misfit_rms"],
            "noise": float(truth["noise"]),
        },
        "modes": modes,
        "marginal_check": marginal,
        "wall_time": {"simulate": t_sim, "invert": t_fit},
    }


def _m_only(case: pathlib.Path, text: str, theta: np.ndarray, n_mu: int, name: str) -> dict:
    """Fit m alone with the coefficients fixed at ``theta``; the Laplace evidence over m."""
    from femkin.cli import main

    d = case.parent / f"{case.name}_{name}"
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(case, d, ignore=shutil.ignore_patterns("results", "checkpoints", ".femkin"))
    text = _set(text, "model", "mu_h", json.dumps([float(v) for v in theta[:n_mu]]))
    text = _set(text, "model", "j0", json.dumps([float(v) for v in theta[n_mu:-1]]))
    text = _set(text, "model", "k0", repr(float(np.exp(theta[-1]))))
    text = _set(text, "inversion", "learn", '["m"]')
    text = _set(text, "uq", "max_rank", "200")  # every informed direction of m: no tail
    (d / "case.toml").write_text(_set(text, "uq", "model_error", '"none"'))
    main(["invert", str(d), "--quiet"])
    summary = json.loads((d / "results" / "summary.json").read_text())
    flags = [] if summary["converged"] else ["--allow-unfinished"]
    assert main(["uq", str(d), "--quiet", *flags]) == 0
    ev = json.loads((d / "results" / "uq.json").read_text())["evidence"]
    return {
        "converged": summary["converged"],
        "profile_J": ev["misfit"] + ev["prior_penalty"],
        "half_log_det": 0.5 * (ev["log_det_kept"] + ev["log_det_tail"]["estimate"]),
        "log_det_tail_estimate": ev["log_det_tail"]["estimate"],
        "rank": ev["rank"],
    }


def marginal_check(case, text, theta_map, theta_true, laplace: dict) -> dict:
    """The truth's place in the coefficients' posterior, three ways (nats above the MAP point).

    ``gaussian``: half the squared Mahalanobis distance under the Laplace marginal (what the
    z-scores assume); ``profile``: ``J(theta, m*(theta))`` with m re-fitted at each theta
    (the joint MAP's own criterion); ``marginal``: the Laplace marginal of theta, the profile
    plus half the log det of m's posterior precision at ``(theta, m*(theta))`` (the volume the
    joint MAP point ignores). Twice each is chi^2 with len(theta) degrees of freedom at the
    truth if the posterior is calibrated.
    """
    import tomllib

    case_toml = tomllib.loads(text)
    prior = case_toml.get("inversion", {}).get("prior", {})
    model = case_toml["model"]
    mean0 = np.concatenate([model["mu_h"], model["j0"], [np.log(model["k0"])]])
    std0 = np.concatenate(
        [
            np.full(len(model["mu_h"]) + len(model["j0"]), prior.get("coefficient_std", 2.0)),
            [prior.get("k0_std", 2.0)],
        ]
    )

    def prior_penalty(theta):
        return 0.5 * float(np.sum(((theta - mean0) / std0) ** 2))

    n_mu = len(model["mu_h"])  # theta: the mu_h coefficients, the j0 coefficients, ln k0
    at_map = _m_only(case, text, theta_map, n_mu, "at_map")
    at_truth = _m_only(case, text, theta_true, n_mu, "at_truth")
    profile = at_truth["profile_J"] + prior_penalty(theta_true)
    profile -= at_map["profile_J"] + prior_penalty(theta_map)
    volume = at_truth["half_log_det"] - at_map["half_log_det"]
    return {
        "gaussian": 0.5 * laplace["mahalanobis2"],
        "profile": profile,
        "half_log_det": volume,
        "marginal": profile + volume,
        "points": {"map": at_map, "truth": at_truth},
    }


def aggregate(records: list[dict], modes: list[str]) -> dict:
    """Per mode: mean band coverage, median width, coefficient coverage and z-rms."""
    ok = [r for r in records if "error" not in r]
    out = {}
    for mode in modes:
        rs = [r["modes"][mode] for r in ok if mode in r["modes"]]
        if not rs:
            continue
        z = np.array([r["z"] for r in rs])
        d2 = np.array([r["mahalanobis2"] for r in rs])
        out[mode] = {
            "realisations": len(rs),
            "mu_h_band_coverage_mean": float(np.mean([r["mu_h"]["coverage"] for r in rs])),
            "j0_band_coverage_mean": float(np.mean([r["j0"]["coverage"] for r in rs])),
            "mu_h_band_coverage_min": float(np.min([r["mu_h"]["coverage"] for r in rs])),
            "j0_band_coverage_min": float(np.min([r["j0"]["coverage"] for r in rs])),
            "mu_h_median_width_mean": float(np.mean([r["mu_h"]["median_width"] for r in rs])),
            "coefficient_coverage": float(np.mean(np.abs(z) <= Z95)),
            "coefficient_coverage_by_name": dict(
                zip(rs[0]["names"], np.mean(np.abs(z) <= Z95, axis=0).tolist(), strict=True)
            ),
            # the joint 95% region (d^2 <= chi^2_p quantile) and E[d^2] / p (1 if calibrated)
            "joint_coverage": float(np.mean(d2 <= chi2.ppf(0.95, z.shape[1]))),
            "mahalanobis2_over_p": float(np.mean(d2) / z.shape[1]),
            # mean part of d^2 along each correlation eigenvector, the tightest first (1 each
            # if calibrated)
            "mahalanobis2_mean_parts": np.mean(
                [r["mahalanobis2_parts"]["parts"] for r in rs], axis=0
            ).tolist(),
            "z_rms_by_name": dict(
                zip(rs[0]["names"], np.sqrt(np.mean(z**2, axis=0)).tolist(), strict=True)
            ),
        }
    checks = [r["marginal_check"] for r in ok if r.get("marginal_check")]
    if checks:
        p = len(ok[0]["modes"]["none"]["z"])
        q95 = chi2.ppf(0.95, p)
        out["marginal_check"] = {
            "realisations": len(checks),
            "joint_coverage": {
                k: float(np.mean([2 * c[k] <= q95 for c in checks]))
                for k in ("gaussian", "profile", "marginal")
            },
            "mean_2delta_over_p": {
                k: float(np.mean([2 * c[k] for c in checks]) / p)
                for k in ("gaussian", "profile", "marginal")
            },
            "mean_half_log_det": float(np.mean([c["half_log_det"] for c in checks])),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--realisations", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--frames", type=int, default=21, help="frames over 0..400 s")
    parser.add_argument("--noise", type=float, default=0.02, help="noise std of c")
    parser.add_argument(
        "--truth",
        choices=("fourier", "prior"),
        default="fourier",
        help="true m: smooth Fourier-feature field (std 0.4, length 0.2 um, not the prior's "
        "law) or a draw of the inversion's prior (std 0.5, length 0.15 um)",
    )
    parser.add_argument("--truth-mesh", type=float, default=0.5, help="truth element size, px")
    parser.add_argument("--truth-tol", type=float, default=1e-5, help="truth BDF2 time_tol")
    parser.add_argument("--fit-mesh", type=float, default=1.5, help="fit element size, px")
    parser.add_argument("--fit-scheme", choices=("bdf2", "euler"), default="bdf2")
    parser.add_argument("--fit-tol", default="5e-4", help="fit time_tol (bdf2) or dc_max (euler)")
    parser.add_argument("--max-iterations", type=int, default=40)
    parser.add_argument("--max-rank", type=int, default=40)
    parser.add_argument("--me-mesh", type=float, default=0.5, help="[uq] model_error_mesh")
    parser.add_argument("--me-time", type=float, default=0.1, help="[uq] model_error_time")
    parser.add_argument("--me-samples", type=int, default=3, help="[uq] model_error_samples")
    parser.add_argument("--modes", default="none,map,samples")
    parser.add_argument(
        "--marginal-check",
        action="store_true",
        help="also fit m alone at the MAP and at the true coefficients and compare the truth's "
        "Gaussian, profile and Laplace-marginal distance from the MAP point (mode 'none')",
    )
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=pathlib.Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.modes = args.modes.split(",")
    if args.one is not None:
        print(json.dumps(one(args.one, args.dir, args)))
        return
    t0 = time.perf_counter()
    settings = {k: v for k, v in vars(args).items() if k not in ("one", "dir")}
    with tempfile.TemporaryDirectory(prefix="femkin-modelerr-") as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        passed = [a for a in sys.argv[1:]]

        def run(seed):
            cmd = [sys.executable, __file__, *passed, "--one", str(seed), "--dir", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if proc.returncode != 0:
                record = {"seed": seed, "error": proc.stderr[-2000:]}
            else:
                record = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(record), file=sys.stderr, flush=True)
            return record

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            records = list(pool.map(run, range(args.realisations)))
    print(
        json.dumps(
            {
                "benchmark": "model_error_coverage",
                "case": f"tiny twin (one ~60-pixel particle, {args.frames} frames over 400 s, "
                f"noise {args.noise})",
                "settings": settings,
                "summary": aggregate(records, args.modes),
                "fits_converged": sum(bool(r.get("fit", {}).get("converged")) for r in records),
                "records": records,
                "wall_s": time.perf_counter() - t0,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
