"""``femkin sample``'s kernels on one fitted case: cost per effective sample and the verdict.

Takes a case on which ``femkin invert`` and ``femkin uq`` have run (for example the 3x-finer
truth realisation of ``bench_model_error.py --one 2 --dir DIR``), copies it once per variant
into a scratch folder (the case itself is not touched), writes the variant's ``[sample]``
section and runs ``mpirun -n RANKS femkin sample`` on the copy. Variants (``--variants``):

- ``gpcn``: gpCN with the Laplace reference, centred by ``[sample] centre`` (``--centre``);
- ``langevin``: the same with the drift along the preconditioned gradient (pCN-Langevin);
- ``hmc``: infinity-HMC with the Laplace reference, ``--leapfrog`` steps of angle
  ``arcsin(--hmc-beta)`` per proposal (a gradient each);
- ``pcn``: plain pCN (the prior as reference; ``--pcn-beta``), the dimension-robust baseline.

Each variant runs ``--chains`` chains of ``--steps`` steps, one MPI group per rank. Printed
(one JSON object): per variant the acceptance, per coefficient ESS, split-R-hat, the MCMC mean
and std against the Laplace values, skewness, the chains' wall time, seconds and forward (or
gradient) runs per effective sample of the worst-mixing coefficient, the pilot's log-weight
spread per centre and ``laplace_check``'s verdict; ``ratios`` compares seconds per effective
sample of every variant with ``gpcn``'s, measured in the same run. The chains are capped at
``--steps``: an unconverged variant (R-hat >= 1.05 or ESS < 100) is reported as such, its ESS a
measured bound, not a converged estimate.

Run: ``.venv/bin/python benchmarks/bench_mcmc_kernels.py --case DIR [--steps 4000 --chains 4
--ranks 2 --variants gpcn,langevin,hmc,pcn --leapfrog 8 --hmc-beta 0.2 --hmc-steps 500]``
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _sample_section(variant: str, args) -> str:
    beta = {"pcn": args.pcn_beta, "hmc": args.hmc_beta}.get(variant, args.beta)
    steps = args.hmc_steps if variant == "hmc" and args.hmc_steps else args.steps
    return (
        f"\n[sample]\nchains = {args.chains}\nsteps = {steps}\nburn = {args.burn}\n"
        f'beta = {beta}\nproposal = "{"prior" if variant == "pcn" else "laplace"}"\n'
        f'centre = "{args.centre}"\nlangevin = {str(variant == "langevin").lower()}\n'
        f"leapfrog = {args.leapfrog if variant == 'hmc' else 0}\n"
        f"checkpoint_every = {max(1, min(250, steps // 10))}\nseed = {args.seed}\n"
    )


def run_variant(case: pathlib.Path, variant: str, scratch: pathlib.Path, args) -> dict:
    """Copy the case, set ``[sample]``, run ``femkin sample``; the summary of its mcmc.json."""
    copy = scratch / variant
    shutil.copytree(case, copy, ignore=shutil.ignore_patterns("mcmc_chain*.npz"))
    toml = copy / "case.toml"
    text = toml.read_text().split("\n[sample]")[0]
    toml.write_text(text.rstrip("\n") + "\n" + _sample_section(variant, args))
    femkin = pathlib.Path(sys.executable).with_name("femkin")
    mpirun = pathlib.Path(sys.executable).with_name("mpirun")
    cmd = [str(femkin), "sample", str(copy), "--quiet"]
    if args.ranks > 1:
        cmd = [str(mpirun), "-n", str(args.ranks), *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-5:], "wall_time": wall}
    mcmc = json.loads((copy / "results" / "mcmc.json").read_text())
    coefficients = {
        name: {
            k: v[k]
            for k in (
                "mean",
                "std",
                "laplace_mean",
                "laplace_std",
                "mean_difference_in_std",
                "std_ratio",
                "skewness",
                "ess",
                "rhat",
            )
            if k in v
        }
        for name, v in mcmc["coefficients"].items()
    }
    return {
        "kernel": mcmc.get("kernel"),
        "beta": mcmc["settings"]["beta"],
        "steps_per_chain": mcmc["steps_per_chain"],
        "forward_runs": mcmc["forward_runs"],
        "proposal_centre": mcmc.get("proposal_centre"),
        "centre_pilot": mcmc.get("centre_pilot"),
        "acceptance": mcmc["acceptance"],
        "acceptance_overall": mcmc["acceptance_overall"],
        "failed_forward_runs": mcmc["failed_forward_runs"],
        "min_ess": mcmc["min_ess"],
        "max_rhat": mcmc["max_rhat"],
        "converged": bool(mcmc["laplace_check"]["trusted"]),
        "runs_per_effective_sample": mcmc["forward_runs_per_effective_sample"],
        "seconds_per_effective_sample": mcmc.get("seconds_per_effective_sample"),
        "sample_wall_time": mcmc["wall_time"],
        "process_wall_time": wall,
        "verdict": mcmc["laplace_check"]["verdict"],
        "coefficients": coefficients,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=pathlib.Path, required=True, help="inverted, uq done")
    parser.add_argument("--variants", default="gpcn,langevin", help="gpcn, langevin, hmc, pcn")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--pcn-beta", type=float, default=0.05)
    parser.add_argument("--hmc-beta", type=float, default=0.2, help="sin of the HMC step angle")
    parser.add_argument("--leapfrog", type=int, default=8, help="HMC leapfrog steps per proposal")
    parser.add_argument("--hmc-steps", type=int, default=0, help="HMC chain steps (0: --steps)")
    parser.add_argument("--burn", type=float, default=0.2)
    parser.add_argument("--centre", default="auto", choices=("auto", "map", "laplace"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=pathlib.Path, default=None, help="keep the copies here")
    args = parser.parse_args()
    case = args.case.resolve()
    if not (case / "checkpoints" / "laplace.npz").exists():
        sys.exit(f"{case}: no checkpoints/laplace.npz (run 'femkin invert' and 'femkin uq')")
    scratch = args.keep or pathlib.Path(tempfile.mkdtemp(prefix="femkin-kernels-"))
    scratch.mkdir(parents=True, exist_ok=True)
    out: dict = {
        "case": str(case),
        "settings": {
            k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()
        },
        "variants": {},
    }
    try:
        for variant in args.variants.split(","):
            out["variants"][variant] = run_variant(case, variant.strip(), scratch, args)
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    base = out["variants"].get("gpcn", {}).get("seconds_per_effective_sample")
    if base:
        out["ratios"] = {
            f"{name}_over_gpcn_seconds_per_effective_sample": v["seconds_per_effective_sample"]
            / base
            for name, v in out["variants"].items()
            if v.get("seconds_per_effective_sample")
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
