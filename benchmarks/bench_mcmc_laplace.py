"""MCMC against the Laplace approximation on a small field twin, and the cost per effective sample.

The case is the tiny twin of the workflow tests (``twin_case.write_case``: one disc particle of
~60 pixels, 5 frames over 400 s, data simulated on a 1.0 px mesh with noise ``--noise``, fitted
on a 1.5 px mesh) with the ln k field ``m`` learned together with ``mu_h``, ``j0`` and ``k0``.

1. ``femkin simulate``, ``femkin invert`` (to convergence: the stop reason is reported) and
   ``femkin uq`` (rank by need, exact coefficient marginals);
2. in this process, the Laplace posterior std of ln k = ln k0 + m at every dof of the fitting
   mesh (:func:`femkin.uq.laplace_study.analyse`, the numbers behind ``k_std_<label>.npy``)
   and the prior std of m there;
3. gpCN chains (``femkin sample``'s kernel, the Laplace posterior as proposal: Gauss-Newton
   Hessian, or the full one with ``--proposal-hessian full``) and plain pCN
   chains (prior proposal, the same code with ``proposal = "prior"``), each recording the
   global coefficients and ln k at the dofs after every step. The pCN chains are capped at
   ``--pcn-steps`` steps (reported as ``capped``): their ESS is a measured lower bound of its
   cost, not a converged estimate. With ``hmc`` in ``--samplers``, infinity-HMC chains with the
   same Laplace reference (``--leapfrog`` steps of angle ``arcsin(--hmc-beta)``, ``--hmc-steps``
   steps per chain; a gradient per leapfrog step).

Printed (one JSON object): per global coefficient the Laplace mean/std against the MCMC
mean/std, ``|dmean|/std_laplace``, the std ratio, skewness and excess kurtosis of the samples
(:func:`femkin.uq.sampling_study.summarise`, also what ``femkin sample`` writes), the verdict
of :func:`femkin.uq.sampling_study.laplace_check`; the ln k std-map ratio MCMC/Laplace over the
*informed* dofs (Laplace posterior std of ln k / prior std of m < ``--informed``, default 0.5)
and over all
dofs; acceptance, ESS, R-hat, forward runs and seconds per effective sample of gpCN and pCN,
wall times and sizes. The truth's z-scores and the full-Hessian Laplace comparison are given
against every sampler run.

``--case DIR`` takes a fitted twin (``femkin invert`` and ``femkin uq`` run, ``simulated/truth.npz``
there) in place of the tiny twin: a copy of it, its own Laplace posterior as the reference and
its ``[uq] hessian`` for the Laplace ln k std map.

Run: ``.venv/bin/python benchmarks/bench_mcmc_laplace.py [--steps 2000 --chains 4 --samplers
gpcn,hmc,pcn --hmc-steps 250 --leapfrog 8 --hmc-beta 0.2 --case DIR]``
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _set(text: str, section: str, key: str, value: str) -> str:
    from bench_model_error import _set as set_key

    return set_key(text, section, key, value)


def _field_record(problem, coefficient_record):
    """Global coefficients then ln k0 + m at the owned dofs of every particle (serial)."""
    space = problem.space
    slices = [space.local_slice("m", lb) for lb in problem.labels]

    def record(x):
        a = x.getArray(readonly=True)
        ln_k0 = space.get_scalars(x, "k0")[0] if "k0" in problem.learn else 0.0
        return np.concatenate([coefficient_record(x)] + [ln_k0 + a[s] for s in slices])

    return record


def _laplace_fields(problem, prior, x, settings) -> tuple[np.ndarray, np.ndarray, dict]:
    """Laplace posterior std of ln k and prior std of m at the dofs (serial), the UQ result
    (with ``settings["hessian"]``).

    The prior std of m, not of ln k = ln k0 + m: with ln k0's wide prior (std 2) every dof
    would count as informed.
    """
    from femkin.uq.laplace_study import analyse, bilaplacian_pointwise_variance

    result = analyse(problem, prior, x, settings)
    post, pri = [], []
    for lb in problem.labels:
        n_owned = problem.particles[lb].model.V.dofmap.index_map.size_local
        post.append(result.ln_k_std_dofs[lb][:n_owned])
        diag, _ = bilaplacian_pointwise_variance(prior.priors[("m", lb)], samples=400, seed=0)
        pri.append(np.sqrt(diag))
    return np.concatenate(post), np.concatenate(pri), result


def _chains(problem, prior, case, settings, n_chains, record) -> tuple[dict, float]:
    from femkin.uq.sampling_study import run_group_chains

    for f in (case / "checkpoints").glob("mcmc_chain*.npz"):
        f.unlink()
    t0 = time.perf_counter()
    out = run_group_chains(
        problem,
        prior,
        case / "checkpoints" / "laplace.npz",
        case,
        settings,
        range(n_chains),
        record=record,
    )
    return out, time.perf_counter() - t0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="gpCN steps per chain")
    parser.add_argument("--pcn-steps", type=int, default=1000, help="pCN steps per chain (cap)")
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.5, help="gpCN step")
    parser.add_argument("--pcn-beta", type=float, default=0.05, help="pCN step")
    parser.add_argument("--samplers", default="gpcn,pcn", help="of gpcn, hmc, pcn")
    parser.add_argument("--hmc-steps", type=int, default=250, help="HMC steps per chain")
    parser.add_argument("--hmc-beta", type=float, default=0.2, help="sin of the HMC angle")
    parser.add_argument("--leapfrog", type=int, default=8, help="HMC leapfrog steps")
    parser.add_argument("--noise", type=float, default=0.07)
    parser.add_argument("--seed", type=int, default=3, help="twin seed (noise and true m)")
    parser.add_argument("--informed", type=float, default=0.5)
    parser.add_argument("--burn", type=float, default=0.2)
    parser.add_argument(
        "--proposal-hessian",
        choices=("gauss-newton", "full"),
        default="gauss-newton",
        help="[uq] hessian of the Laplace posterior the gpCN proposal uses (the comparison is "
        "always against both)",
    )
    parser.add_argument("--keep", type=pathlib.Path, default=None, help="keep the case here")
    parser.add_argument(
        "--case",
        type=pathlib.Path,
        default=None,
        help="a twin on which 'femkin invert' and 'femkin uq' have run, instead of the tiny twin "
        "(copied; the Laplace ln k std map then uses its [uq] hessian)",
    )
    args = parser.parse_args(argv)

    from twin_case import write_case

    import femkin._fem  # noqa: F401
    from femkin._fem import MPI
    from femkin.cli import main as cli
    from femkin.inversion.checkpoint import read_checkpoint
    from femkin.inversion.fit import build_prior
    from femkin.study import build_problem, checkpoint_path, checkpoint_settings, open_study
    from femkin.uq.laplace_study import analyse, coefficient_layout, coefficient_names
    from femkin.uq.sampling_study import (
        _record,
        field_agreement,
        laplace_check,
        runs_per_step,
        summarise,
    )

    tmp = None
    if args.keep is None:
        tmp = tempfile.TemporaryDirectory(prefix="femkin-bench-mcmc-laplace-")
        root = pathlib.Path(tmp.name)
    else:
        root = args.keep
    wall = {}
    if args.case is not None:
        case = root / "case"
        shutil.copytree(
            args.case, case, ignore=shutil.ignore_patterns("mcmc_chain*.npz"), dirs_exist_ok=True
        )
    else:
        case = write_case(root / "case", max_iterations=100)
        text = (case / "case.toml").read_text()
        text = _set(text, "simulate", "noise", str(args.noise))
        text = _set(text, "simulate", "seed", str(args.seed))
        text = _set(text, "uq", "samples", "0")
        text = _set(text, "uq", "hessian", f'"{args.proposal_hessian}"')
        (case / "case.toml").write_text(text)
        for verb in ("simulate", "invert", "uq"):
            t0 = time.perf_counter()
            assert cli([verb, str(case), "--quiet"]) == 0
            wall[verb] = time.perf_counter() - t0
    summary = json.loads((case / "results" / "summary.json").read_text())
    uq = json.loads((case / "results" / "uq.json").read_text())

    comm = MPI.COMM_WORLD
    study = open_study(case, comm)
    problem = build_problem(study, comm, quiet=True)
    x = problem.initial_vector()
    prior = build_prior(problem, study.case.inversion["prior"], x)
    _, case_hash = checkpoint_settings(study, problem)
    state = read_checkpoint(checkpoint_path(study.case), problem.space, x, case_hash=case_hash)
    problem.set_schedules(state.get("schedules", {}))
    problem.misfit(x)
    t0 = time.perf_counter()
    n_timed = 10
    for _ in range(n_timed):
        problem.misfit(x)
    forward_s = (time.perf_counter() - t0) / n_timed
    g = x.duplicate()
    t0 = time.perf_counter()
    for _ in range(n_timed):
        problem.gradient(x, g)
    gradient_s = (time.perf_counter() - t0) / n_timed
    g.destroy()
    t0 = time.perf_counter()
    field_hessian = study.case.uq["hessian"] if args.case is not None else "gauss-newton"
    lap_std_dofs, prior_std_dofs, result = _laplace_fields(
        problem, prior, x, {**study.case.uq, "hessian": field_hessian}
    )
    wall["laplace_fields"] = time.perf_counter() - t0
    blocks = coefficient_layout(problem.space)
    names = coefficient_names(blocks)
    n_q = len(names)
    record = _field_record(problem, _record(problem.space, blocks))
    lap = {"mean": np.asarray(result.mean), "std": np.asarray(result.std)}

    out: dict = {
        "proposal_hessian": args.proposal_hessian if args.case is None else field_hessian,
        "field_laplace_hessian": field_hessian,
        "size": {
            "case": str(args.case)
            if args.case is not None
            else "benchmarks/twin_case.write_case (tests/workflow_case.py)",
            "pixels": int(np.sum(problem.video.mask > 0)),
            "frames": len(problem.video.t),
            "noise": args.noise if args.case is None else None,
            "twin_seed": args.seed if args.case is None else None,
            "parameters": int(problem.space.global_size),
            "field_dofs": int(lap_std_dofs.size),
            "coefficients": names,
            "laplace_rank": uq["rank"],
            "chains": args.chains,
        },
        "fit": {
            "converged": summary["converged"],
            "stop_reason": summary["stop_reason"],
            "iterations": summary["iterations"],
        },
        "forward_run_s": forward_s,
        "gradient_run_s": gradient_s,
    }
    base = {"burn": args.burn, "checkpoint_every": 100000, "seed": 1}
    runs = {
        "gpcn": ({"proposal": "laplace", "beta": args.beta, "steps": args.steps}, False),
        "hmc": (
            {
                "proposal": "laplace",
                "beta": args.hmc_beta,
                "steps": args.hmc_steps,
                "leapfrog": args.leapfrog,
            },
            False,
        ),
        "pcn": ({"proposal": "prior", "beta": args.pcn_beta, "steps": args.pcn_steps}, True),
    }
    samplers = [v.strip() for v in args.samplers.split(",")]
    for name in samplers:
        extra, capped = runs[name]
        settings = {**base, **extra, "chains": args.chains}
        chains, seconds = _chains(problem, prior, case, settings, args.chains, record)
        coef = {c: {**v, "records": v["records"][:, :n_q]} for c, v in chains.items()}
        s = summarise(coef, names, args.burn, lap, runs_per_step=runs_per_step(settings))
        n = min(v["records"].shape[0] for v in chains.values())
        start = int(np.floor(args.burn * n))
        fields = np.concatenate([v["records"][start:n, n_q:] for v in chains.values()])
        entry = {
            "settings": settings,
            "capped": capped,
            "wall_s": seconds,
            "seconds_per_effective_sample": seconds / s["min_ess"],
            **{k: s[k] for k in s if k not in ("coefficients",)},
            "coefficients": s["coefficients"],
            "laplace_check": laplace_check(s),
            "ln_k_std": field_agreement(
                fields.std(axis=0, ddof=1), lap_std_dofs, prior_std_dofs, informed=args.informed
            ),
        }
        out[name] = entry
        print(json.dumps({name: {k: entry[k] for k in ("wall_s", "min_ess", "max_rhat")}}))
    # The Laplace approximation with the full Hessian (second-order residual terms included)
    # against the same gpCN samples: which part of a disagreement is the Gauss-Newton Hessian's.
    t0 = time.perf_counter()
    full = analyse(problem, prior, x, {**study.case.uq, "hessian": "full"})
    wall["laplace_full_hessian"] = time.perf_counter() - t0
    mc_runs = [n for n in samplers if n != "pcn"]
    out["laplace_full_hessian"] = {
        "rank": int(full.posterior.rank),
        "coefficients": {
            q: {
                "laplace_mean": float(full.mean[i]),
                "laplace_std": float(full.std[i]),
                **{
                    f"{n}_mean_difference_in_std": (
                        out[n]["coefficients"][q]["mean"] - full.mean[i]
                    )
                    / float(full.std[i])
                    for n in mc_runs
                },
                **{
                    f"{n}_std_ratio": out[n]["coefficients"][q]["std"] / float(full.std[i])
                    for n in mc_runs
                },
            }
            for i, q in enumerate(names)
        },
    }
    # Where the truth lies in each posterior: z = (mean - truth) / std, and the MCMC interval.
    truth = np.load(case / "simulated" / "truth.npz")
    true_coef = np.concatenate([truth["mu_h"], truth["j0"], [np.log(float(truth["k0"]))]])
    out["truth"] = {}
    for i, q in enumerate(names):
        t = float(true_coef[i])
        out["truth"][q] = {
            "value": t,
            "z_laplace": float((result.mean[i] - t) / result.std[i]),
            "z_laplace_full_hessian": float((full.mean[i] - t) / full.std[i]),
        }
        for n in mc_runs:
            mc = out[n]["coefficients"][q]
            out["truth"][q][f"z_{n}"] = (mc["mean"] - t) / mc["std"]
            out["truth"][q][f"in_{n}_95"] = bool(mc["q025"] <= t <= mc["q975"])
    out["cost_ratios"] = {
        f"{n}_over_gpcn": {
            "forward_runs_per_effective_sample": out[n]["forward_runs_per_effective_sample"]
            / out["gpcn"]["forward_runs_per_effective_sample"],
            "seconds_per_effective_sample": out[n]["seconds_per_effective_sample"]
            / out["gpcn"]["seconds_per_effective_sample"],
        }
        for n in samplers
        if n != "gpcn" and "gpcn" in out
    }
    if "pcn" in out:
        out["cost_ratios"]["note"] = "pCN capped at --pcn-steps: its ESS is what it gave"
    out["informed_definition"] = (
        f"dofs where the Laplace posterior std of ln k is below {args.informed} x the prior "
        "std of m there"
    )
    out["wall_s"] = wall
    print(json.dumps(out, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
