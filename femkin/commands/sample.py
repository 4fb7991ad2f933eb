"""``femkin sample CASE``: MCMC of the posterior with the Laplace posterior as proposal.

Runs after ``femkin uq`` (which saves the MAP point and the low-rank posterior in
``CASE/checkpoints/laplace.npz``). Settings in ``[sample]``: ``chains``, ``steps`` (per chain;
raising it extends finished chains), ``burn`` (fraction discarded), ``beta`` (the gpCN step),
``proposal`` (``"laplace"``: generalised pCN; ``"prior"``: plain pCN), ``langevin`` (drift
along the Laplace-preconditioned gradient: pCN-Langevin), ``leapfrog`` (infinity-HMC with
that many leapfrog steps per proposal), ``checkpoint_every``,
``seed``. Chains run in parallel over MPI groups (``mpirun -n N``: ``min(N, chains)`` groups),
are checkpointed in ``CASE/checkpoints/mcmc_chain<c>.npz`` and resumed by a later run with the
same settings. Writes ``CASE/results/mcmc.json`` (acceptance, and per global coefficient the
mean, std, ESS, split-R-hat, skewness, excess kurtosis and the distance from the Laplace values;
``laplace_check``: whether Laplace and MCMC agree within 0.3 std in the mean and 25% in the std,
and where they do not, which is right and why), the columns ``mcmc_lo``/``mcmc_hi`` of
``mu_h.csv`` and ``j0.csv``, ``mcmc_bands.png`` and a section of ``report.md``. The numerics
live in :mod:`femkin.uq.sampling_study`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    """Add the ``sample`` verb."""
    parser = subparsers.add_parser(
        "sample",
        help="MCMC of the posterior (gpCN with the Laplace proposal); after 'femkin uq'",
        description="After 'femkin uq': Markov chains that sample the actual posterior with the "
        "Laplace posterior as proposal; writes CASE/results/mcmc.json, band columns of "
        "mu_h.csv/j0.csv and mcmc_bands.png. Resumes checkpointed chains.",
    )
    parser.add_argument("case", type=Path, help="case directory (or its case.toml)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the chains of ``args.case`` on ``MPI.COMM_WORLD``."""
    from femkin._fem import MPI
    from femkin.uq.sampling_study import sample

    sample(args.case, MPI.COMM_WORLD, quiet=args.quiet)
    return 0
