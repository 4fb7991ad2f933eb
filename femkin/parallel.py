"""Spread particles over MPI sub-communicators.

With P particles on R ranks, the ranks form ``G = min(P, R)`` contiguous groups; each group
gets its own sub-communicator and a set of whole particles chosen to balance their weights
(e.g. pixel counts), so a particle's mesh may span several ranks when particles are few and
each rank holds whole particles when they are many. The assignment depends only on the weights
and the number of ranks, never on timing, so every run with the same ranks is identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from mpi4py import MPI


class Distribution(NamedTuple):
    """Where the particles live.

    Attributes:
        comm: the parent communicator.
        subcomm: this rank's group communicator.
        group: this rank's group index.
        n_groups: number of groups.
        owner: ``owner[i]`` is the group that holds particle ``i``.
        mine: indices of the particles held by this rank's group, ascending.
        group_root: ``group_root[g]`` is the rank in ``comm`` of the first rank of group ``g``.
    """

    comm: MPI.Comm
    subcomm: MPI.Comm
    group: int
    n_groups: int
    owner: tuple[int, ...]
    mine: tuple[int, ...]
    group_root: tuple[int, ...]


def assign_groups(weights: Sequence[float], n_groups: int) -> list[int]:
    """Greedy longest-processing-time assignment of items to ``n_groups`` bins.

    Returns the group of each item. Ties are broken by index, so the result is deterministic.
    """
    w = np.asarray(weights, dtype=float)
    load = np.zeros(n_groups)
    owner = [0] * len(weights)
    for i in sorted(range(len(w)), key=lambda i: (-w[i], i)):
        g = int(np.argmin(load))
        owner[i] = g
        load[g] += w[i]
    return owner


def distribute(comm: MPI.Comm, weights: Sequence[float]) -> Distribution:
    """Split ``comm`` into groups and assign the particles (with the given weights) to them."""
    n_items = len(weights)
    if n_items == 0:
        raise ValueError("distribute() needs at least one particle")
    n_groups = min(n_items, comm.size)
    group = comm.rank * n_groups // comm.size
    group_root = tuple(
        min(r for r in range(comm.size) if r * n_groups // comm.size == g) for g in range(n_groups)
    )
    subcomm = comm.Split(color=group, key=comm.rank)
    owner = tuple(assign_groups(weights, n_groups))
    mine = tuple(i for i in range(n_items) if owner[i] == group)
    return Distribution(comm, subcomm, group, n_groups, owner, mine, group_root)
