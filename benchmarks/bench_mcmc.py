"""Cost per effective sample of ``femkin sample``'s gpCN (Laplace proposal) against plain pCN.

Two problems, both measured in forward runs (one misfit evaluation per MCMC step) per
effective sample of the worst-mixed quantity (the smallest ESS, Geyer's initial monotone
sequence over all chains):

- ``linear``: the linear-Gaussian problem of ``tests/uq/uq_problems.py`` (P1 field on a
  5 x 5 mesh, 12 observations, noise 0.05; posterior eigenvalues up to ~3e4), quantities three
  smooth functionals. gpCN with the rank-``--rank`` Laplace posterior against pCN with the
  prior, each at several steps ``beta`` (the best is reported).
- ``twin`` (``--twin``): the tiny twin case of ``tests/workflow_case.py`` simulated, inverted
  and analysed (``femkin uq``), then ``femkin sample`` with ``proposal = "laplace"`` and
  ``"prior"``; quantities the global coefficients.

Prints one JSON object. Run: ``.venv/bin/python benchmarks/bench_mcmc.py [--twin]``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def linear(steps: int, chains: int, rank: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests" / "uq"))
    from uq_problems import make_problem

    from femkin._fem import MPI
    from femkin.uq import LowRankPosterior, double_pass_generalized
    from femkin.uq.mcmc import GpcnKernel, effective_sample_size, run_chain, start_chain

    p = make_problem(MPI.COMM_SELF, n=5, n_obs=12, sigma=0.05)
    n = p.template.getSize()
    x_star = np.sin(np.linspace(0, 3, n))
    H = p.dense_H

    def misfit(x):
        d = p.gather(x) - x_star
        return 0.5 * d @ H @ d

    rows = np.vstack([np.cos(np.linspace(0, np.pi, n) * j) / np.sqrt(n) for j in range(3)])
    zero = p.template.duplicate()
    zero.set(0.0)
    post_mean = np.linalg.solve(H + p.dense_B, H @ x_star)
    probes = [p.make_probe(i) for i in range(rank + 6)]
    lam, vs = double_pass_generalized(p.apply_H, p.apply_B, p.apply_Binv, probes, rank)
    laplace = LowRankPosterior(lam, vs, p.apply_Binv, apply_prior_precision=p.apply_B)
    prior = LowRankPosterior(np.zeros(0), [], p.apply_Binv, apply_prior_precision=p.apply_B)
    configs = {
        "gpcn_laplace": (laplace, p.scatter(post_mean), (0.3, 0.6, 0.9)),
        "pcn_prior": (prior, zero, (0.01, 0.03, 0.1)),
    }
    out = {}
    for name, (ref, centre, betas) in configs.items():
        best = None
        for beta in betas:
            kernel = GpcnKernel(misfit, p.apply_B, zero, ref, centre, p.prior_sample, beta=beta)
            t0 = time.perf_counter()
            draws, acc = [], 0
            for c in range(chains):
                # every chain starts at the posterior mean: this measures mixing, not burn-in
                st = start_chain(kernel, c, p.scatter(post_mean), lambda x: rows @ p.gather(x))
                st = run_chain(kernel, st, steps, seed=11, record=lambda x: rows @ p.gather(x))
                draws.append(st.records)
                acc += st.accepted
            draws = np.array(draws)
            ess = min(effective_sample_size(draws[:, :, q]) for q in range(rows.shape[0]))
            entry = {
                "beta": beta,
                "acceptance": acc / (chains * steps),
                "min_ess": ess,
                "forward_runs_per_effective_sample": chains * steps / ess,
                "wall_s": time.perf_counter() - t0,
            }
            if best is None or entry["min_ess"] > best["min_ess"]:
                best = entry
            out.setdefault(name + "_all", []).append(entry)
        out[name] = best
    out["ratio_pcn_over_gpcn"] = (
        out["pcn_prior"]["forward_runs_per_effective_sample"]
        / out["gpcn_laplace"]["forward_runs_per_effective_sample"]
    )
    out["size"] = {"dofs": n, "observations": 12, "rank": rank, "chains": chains, "steps": steps}
    return out


def twin(steps: int, chains: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from workflow_case import write_case

    from femkin.cli import main

    out = {}
    with tempfile.TemporaryDirectory(prefix="femkin-bench-mcmc-") as tmp:
        case = pathlib.Path(tmp) / "case"
        write_case(case, max_iterations=8)
        base = (case / "case.toml").read_text() + "\n[uq]\nsamples = 0\n"
        (case / "case.toml").write_text(base)
        for verb in ("simulate", "invert", "uq"):
            assert main([verb, str(case), "--quiet"]) == 0
        uq = json.loads((case / "results" / "uq.json").read_text())
        out["laplace_rank"] = uq["rank"]
        for proposal, beta in (("laplace", 0.5), ("prior", 0.05)):
            (case / "case.toml").write_text(
                base + f"\n[sample]\nchains = {chains}\nsteps = {steps}\nburn = 0.2\n"
                f'beta = {beta}\nproposal = "{proposal}"\nseed = 1\n'
            )
            for f in (case / "checkpoints").glob("mcmc_chain*.npz"):
                f.unlink()
            t0 = time.perf_counter()
            assert main(["sample", str(case), "--quiet"]) == 0
            m = json.loads((case / "results" / "mcmc.json").read_text())
            out[proposal] = {
                "beta": beta,
                "acceptance": m["acceptance_overall"],
                "min_ess": m["min_ess"],
                "max_rhat": m["max_rhat"],
                "forward_runs_per_effective_sample": m["forward_runs_per_effective_sample"],
                "wall_s": time.perf_counter() - t0,
                "coefficients": {
                    k: {
                        kk: v[kk]
                        for kk in (
                            "mean",
                            "std",
                            "ess",
                            "rhat",
                            "std_ratio",
                            "mean_difference_in_std",
                        )
                    }
                    for k, v in m["coefficients"].items()
                },
            }
        out["size"] = {"case": "tests/workflow_case.py", "chains": chains, "steps": steps}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--twin", action="store_true", help="also the tiny twin case")
    parser.add_argument("--twin-steps", type=int, default=100)
    args = parser.parse_args(argv)
    result = {"linear": linear(args.steps, args.chains, args.rank)}
    if args.twin:
        result["twin"] = twin(args.twin_steps, args.chains)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
