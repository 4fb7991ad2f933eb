"""Compare ``summary.json`` files of the same case (host, container, other rank counts).

Usage: ``python docker/compare_summary.py REFERENCE OTHER...``. Every number (misfit, objective,
coefficients, per-particle misfits) must agree with the reference to a relative ``--rtol``
(default 1e-6: the same wheels give the same arithmetic; MPI changes only the order of sums),
and the iteration count and TAO's stopping reason must be equal. Timings are ignored. Prints
the largest relative difference per file; exits 1 when any file disagrees.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

IGNORED = ("wall_time", "solves")  # timings; solve counts may differ by a line-search step


def numbers(tree, prefix=""):
    """Flatten a JSON tree into ``path -> value`` (numbers and strings)."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            if key not in IGNORED:
                out.update(numbers(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list):
        out = {}
        for i, value in enumerate(tree):
            out.update(numbers(value, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): tree}


def compare(reference: dict, other: dict, rtol: float) -> tuple[float, list[str]]:
    """Largest relative difference of the numbers, and the keys that disagree."""
    ref, oth = numbers(reference), numbers(other)
    bad = sorted(set(ref) ^ set(oth))
    worst = 0.0
    for key in sorted(set(ref) & set(oth)):
        a, b = ref[key], oth[key]
        if isinstance(a, bool) or not isinstance(a, int | float):
            if a != b:
                bad.append(f"{key}: {a!r} != {b!r}")
            continue
        scale = max(abs(a), abs(b), 1e-300)
        diff = 0.0 if a == b else abs(a - b) / scale
        if math.isnan(diff) or diff > rtol:
            bad.append(f"{key}: {a!r} vs {b!r}")
        worst = max(worst, diff)
    return worst, bad


def main(argv=None) -> int:
    """Compare the files; print one line per file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference")
    parser.add_argument("others", nargs="+")
    parser.add_argument("--rtol", type=float, default=1e-6)
    args = parser.parse_args(argv)
    with open(args.reference) as f:
        reference = json.load(f)
    failed = False
    for path in args.others:
        with open(path) as f:
            worst, bad = compare(reference, json.load(f), args.rtol)
        print(f"{path}: largest relative difference {worst:.2e} (rtol {args.rtol:g})")
        for line in bad:
            print(f"  differs: {line}")
        failed |= bool(bad)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
